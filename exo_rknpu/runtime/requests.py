"""Per-request state with a bound on live requests: exo never says when a request ends."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from exo_rknpu.runtime.cache import KVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestLimits:
    """Least-recently-used eviction once either bound is passed."""

    max_requests: int = 8
    max_bytes: int = 2 << 30  # KV-cache memory across all live requests of one shard


@dataclass
class RequestState:
    pos: int = 0  # tokens already in the cache
    caches: list[KVCache] = field(default_factory=list)  # one per layer slice

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


class RequestStore:
    """request_id -> RequestState, least recently used first."""

    def __init__(self, limits: RequestLimits = RequestLimits()) -> None:
        self.limits = limits
        self._states: OrderedDict[str, RequestState] = OrderedDict()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def get(self, request_id: str) -> RequestState:
        """The request's state (created empty if new), marked most recently used."""
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = RequestState()
        self._states.move_to_end(request_id)
        return state

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def clear(self) -> None:
        self._states.clear()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())

    def enforce(self, keep: str) -> list[str]:
        """Evict least recently used requests (never `keep`) until within limits; returns the evicted ids."""
        evicted = []
        while len(self._states) > 1 and (len(self._states) > self.limits.max_requests or self.nbytes > self.limits.max_bytes):
            victim = next(k for k in self._states if k != keep)
            self._states.pop(victim)
            evicted.append(victim)
            log.warning("evicted KV cache of request %s (limits: %s)", victim, self.limits)
        return evicted
