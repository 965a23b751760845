"""Several shards in one process, handing hidden states across exactly as a ring would (bytes + shape + dtype)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from exo_rknpu.runtime.sampling import Sampler
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.runtime.wire import from_wire, to_wire


@dataclass
class Timings:
    """Wall-clock seconds: prefill (prompt -> first token) and each decode step."""

    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.decode_s)
        return len(self.decode_s) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(sum(self.decode_s), 6),
            "decode_tokens": len(self.decode_s),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }


class LocalRing:
    """Shards [0,a), [a,b), ... of one model, run one after another like the nodes of a ring."""

    def __init__(self, shards: list[ShardRunner], wire_dtype: str = "float32") -> None:
        if not shards or not shards[0].layer_range.is_first or not shards[-1].layer_range.is_last:
            raise ValueError("a ring needs shards from the first layer to the last")
        for prev, nxt in zip(shards, shards[1:]):
            if prev.layer_range.stop != nxt.layer_range.start:
                raise ValueError(f"shards {prev.layer_range} and {nxt.layer_range} are not consecutive")
        self.shards, self.wire_dtype = shards, wire_dtype

    def forward(self, request_id: str, ids: np.ndarray, logits: str = "last") -> np.ndarray:
        """Token ids (1, seq) through every shard; returns the last shard's logits."""
        x: np.ndarray = ids
        for i, shard in enumerate(self.shards):
            last = i == len(self.shards) - 1
            x = shard.forward(request_id, x, logits=logits) if last else from_wire(to_wire(shard.forward(request_id, x), self.wire_dtype))
        return x

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_tokens: int,
        sampler: Sampler,
        stop_ids: frozenset[int] = frozenset(),
        timings: Timings | None = None,
    ) -> Iterator[int]:
        """Yield new token ids until a stop id (which is yielded too) or max_tokens; then release the caches
        (shards admit a bounded number of live requests and never evict one)."""
        timings = timings if timings is not None else Timings()
        x = np.asarray([prompt_ids], np.int64)
        try:
            for step in range(max_tokens):
                t = time.perf_counter()
                token = sampler(self.forward(request_id, x))
                dt = time.perf_counter() - t
                if step == 0:
                    timings.prefill_s = dt
                else:
                    timings.decode_s.append(dt)
                yield token
                if token in stop_ids:
                    return
                x = np.asarray([[token]], np.int64)
        finally:
            self.drop(request_id)

    def drop(self, request_id: str) -> None:
        for s in self.shards:
            s.drop(request_id)

    def close(self) -> None:
        for s in self.shards:
            s.close()
