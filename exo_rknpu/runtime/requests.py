"""Per-request state with admission control: a live request's cache is never evicted to make room for another.

A new request is admitted only if the shard holds fewer than `max_requests` live requests and the KV memory
reserved for all of them, each at the largest context the shard can reach, stays within `max_bytes`. Otherwise it
is refused with CapacityError: the caller (exo's API) answers "busy, retry", and every live request keeps its
cache. Reserving the largest context up front means a request admitted once never runs out of budget later.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from exo_rknpu.errors import CapacityError, RequestStateError
from exo_rknpu.runtime.cache import RequestCache

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class RequestLimits:
    """Admission bounds of one shard. A request past either bound is refused; live ones are never evicted.

    idle_seconds: a live request that has not been stepped for this long is treated as abandoned and released
    when the next request asks for admission (None: never).
    """

    max_requests: int = 8
    max_bytes: int = 2 << 30  # KV-cache memory reserved across all live requests of one shard
    idle_seconds: float | None = None


class RequestStore:
    """request_id -> RequestCache of the live requests of one shard.

    reserve_bytes: KV memory one request may grow to (its cache at the largest context bucket).
    """

    def __init__(self, limits: RequestLimits = RequestLimits(), reserve_bytes: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.reserve_bytes = reserve_bytes
        self.clock = clock
        self._states: OrderedDict[str, RequestCache] = OrderedDict()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def ids(self) -> list[str]:
        return list(self._states)

    def get(self, request_id: str) -> RequestCache:
        """A live request's cache; RequestStateError if this shard holds none for it."""
        state = self._states.get(request_id)
        if state is None:
            raise RequestStateError(
                f"this node holds no KV cache for request {request_id} (its position is unknown), so the request "
                f"cannot continue here; send it again"
            )
        state.touched = self.clock()
        return state

    def peek(self, request_id: str) -> RequestCache | None:
        """A live request's state without marking it stepped; None if not live."""
        return self._states.get(request_id)

    def admit(self, request_id: str) -> RequestCache:
        """Start a new request, or raise CapacityError if it does not fit (nothing live is evicted)."""
        if request_id in self._states:
            raise RequestStateError(f"request {request_id} is already live on this node; request ids are never reused")
        limits = self.limits
        if self.reserve_bytes > limits.max_bytes:
            raise CapacityError(
                f"one request needs up to {_mb(self.reserve_bytes)} of KV cache on this shard (at its largest "
                f"context) but the KV budget is {_mb(limits.max_bytes)}; raise --max-kv-mb or lower --max-context"
            )
        if len(self._states) >= limits.max_requests:
            raise CapacityError(
                f"this node already serves {len(self._states)} requests (--max-requests {limits.max_requests}); "
                f"retry when one has finished"
            )
        reserved = (len(self._states) + 1) * self.reserve_bytes
        if reserved > limits.max_bytes:
            raise CapacityError(
                f"another request would reserve {_mb(reserved)} of KV cache on this node, over the budget of "
                f"{_mb(limits.max_bytes)} (--max-kv-mb; {len(self._states)} live requests of up to "
                f"{_mb(self.reserve_bytes)} each); retry when one has finished"
            )
        state = self._states[request_id] = RequestCache(touched=self.clock())
        return state

    def idle(self) -> list[str]:
        """Live requests not stepped for limits.idle_seconds (abandoned by whoever started them)."""
        if self.limits.idle_seconds is None:
            return []
        cutoff = self.clock() - self.limits.idle_seconds
        return [rid for rid, s in self._states.items() if s.touched < cutoff]

    def drop(self, request_id: str) -> None:
        """Forget a request and free its cache (its pool slot goes back to the pool)."""
        state = self._states.pop(request_id, None)
        if state is not None:
            state.release()

    def clear(self) -> None:
        for state in self._states.values():
            state.release()
        self._states.clear()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())


class BoundedMap(OrderedDict[K, V]):
    """A dict that keeps the `limit` most recently set keys: setting a key makes it the newest, and the oldest go
    beyond the limit. For what a node remembers about requests that are not live (never for live caches)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


MAX_REMEMBERED = 4096  # request ids remembered per kind (a few hundred bytes each)


class RequestLog:
    """The one record of a node's requests beyond their caches (those are the RequestStore's):

    - announced: the API is about to start it, so a one-token prefill for it is a start, not a lost request;
    - ended: finished, cancelled, failed or abandoned, with why: a later step for it is refused, never restarted;
    - failures: the error that made it fail here, taken once by whoever reports it to the ring.
    Each remembers the newest MAX_REMEMBERED ids. Thread-safe enough for its users: single dict operations.
    """

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self.announced: BoundedMap[str, None] = BoundedMap(limit)
        self.ended: BoundedMap[str, str] = BoundedMap(limit)
        self.failures: BoundedMap[str, tuple[str, str]] = BoundedMap(limit)

    def announce(self, request_id: str) -> None:
        self.announced[request_id] = None

    def is_announced(self, request_id: str) -> bool:
        return request_id in self.announced

    def unannounce(self, request_id: str) -> None:
        """No longer only announced: its first step arrived, or it is over."""
        self.announced.pop(request_id, None)

    def end(self, request_id: str, reason: str) -> None:
        self.unannounce(request_id)
        self.ended[request_id] = reason

    def why_ended(self, request_id: str) -> str | None:
        return self.ended.get(request_id)

    def fail(self, request_id: str, kind: str, message: str) -> None:
        self.failures[request_id] = (kind, message)

    def take_failure(self, request_id: str) -> tuple[str, str] | None:
        """(kind, message) of the error that made it fail here (once), or None."""
        return self.failures.pop(request_id, None)


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB"
