"""Host-side KV caches: `KVCache` for one layer slice, `RequestCache` for one request on one shard, and
`BatchState`/`BatchCache` for the requests of one batched decode step.

Capacity grows in context-bucket steps (never per token) and the cache is always exactly one bucket long,
so it is handed to backends as is: no per-call copy, and the NPU only sees compiled shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exo_rknpu.runtime.inputs import attention_mask


# positions axis of (keys, values) per layout; "npu" keeps float16 keys [n*kv, hd, C] and values [n*kv, C, hd] as
# the compiled NPU slice takes them (slices/npu_form.py), so they are handed over without a conversion
_AXES = {"seq": (2, 2), "dim": (3, 3), "npu": (2, 1)}


@dataclass
class KVCache:
    keys: np.ndarray  # [n_layers, kv_heads, capacity, head_dim] ("seq"), [n_layers, kv_heads, head_dim, capacity] ("dim"),
    values: np.ndarray  # or the NPU form ("npu": float16 keys [n*kv, hd, capacity], values [n*kv, capacity, hd])
    layout: str = "seq"

    @classmethod
    def empty(cls, n_layers: int, kv_heads: int, capacity: int, head_dim: int, layout: str = "seq") -> "KVCache":
        if layout == "npu":
            rows = n_layers * kv_heads
            return cls(np.zeros((rows, head_dim, capacity), np.float16), np.zeros((rows, capacity, head_dim), np.float16), layout)
        shape = (n_layers, kv_heads, capacity, head_dim) if layout == "seq" else (n_layers, kv_heads, head_dim, capacity)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32), layout)

    @property
    def axis(self) -> int:
        """The positions axis of the keys."""
        return _AXES[self.layout][0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[self.axis]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def grow(self, capacity: int) -> None:
        """Re-allocate to `capacity` positions, keeping what is stored."""
        if capacity <= self.capacity:
            return
        for name, axis in zip(("keys", "values"), _AXES[self.layout]):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[axis] = capacity
            new = np.zeros(shape, old.dtype)
            new[(slice(None),) * axis + (slice(0, old.shape[axis]),)] = old
            setattr(self, name, new)

    def write(self, pos: int, k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """Store the first `count` new positions (the rest of a padded chunk is discarded)."""
        for cache, new, axis in zip((self.keys, self.values), (k_new, v_new), _AXES[self.layout]):
            lead = (slice(None),) * axis
            cache[lead + (slice(pos, pos + count),)] = new[lead + (slice(0, count),)]


@dataclass
class RequestCache:
    """One request's state on one shard: its KV caches, its position, and what follows from the position.

    Like mlx-lm's cache owns its `offset`, this owns `pos` (tokens already in the cache; the next token goes there),
    the roll-back of a call that failed (`rollback`), and the attention mask over what it holds (`mask`). A call
    writes its rows past `pos` and moves `pos` only when it commits (`advance`): rows past `pos` are never read
    (the mask hides them) and the next write overwrites them, so rolling `pos` back undoes a call.
    """

    pos: int = 0
    caches: list[KVCache] = field(default_factory=list)  # one per attention slice, allocated by the first call
    touched: float = 0.0  # monotonic time of the last step (RequestStore's clock)
    _template: tuple[tuple[int, int], np.ndarray] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def advance(self, n: int) -> None:
        """A call of `n` tokens committed: they are part of the context from now on."""
        self.pos += n

    def rollback(self, pos: int) -> None:
        """Forget every position from `pos` on (a failed call's rows)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot roll back to position {pos}: the cache holds {self.pos}")
        self.pos = pos

    def mask(self, at: int, seq: int, ctx: int) -> np.ndarray:
        """Additive mask [1,1,seq,ctx+seq] of a `seq`-row chunk written at position `at`: row i sees the cached
        positions below `at` and the chunk's rows up to i. The causal part is kept from the last call of the same
        shape, so a decode step copies one row instead of rebuilding it."""
        if self._template is None or self._template[0] != (seq, ctx):
            self._template = ((seq, ctx), attention_mask(seq, seq, ctx, 0))
        m = self._template[1].copy()
        m[..., :at] = 0.0
        return m


@dataclass
class BatchCache:
    """The caches of one layer slice for the requests of a batched decode step (row b = request b).

    `keys`/`values` are [n_layers, B, kv_heads, span, head_dim]: what a batching backend takes (layer i of
    the batch is the contiguous block keys[i]). They are a copy made for the step; `write` puts each request's
    new row back into its own cache, which stays the only lasting copy.
    """

    caches: list[KVCache]
    span: int  # positions stacked: every position any request of the batch has written

    def __post_init__(self) -> None:
        if any(c.layout != "seq" for c in self.caches):
            raise ValueError("batched steps take the 'seq' cache layout only")
        self.keys = np.stack([c.keys[:, :, : self.span] for c in self.caches], axis=1)
        self.values = np.stack([c.values[:, :, : self.span] for c in self.caches], axis=1)

    def grow(self, capacity: int) -> None:
        """The batch's caches were grown before they were stacked (`capacity` is the span stacked)."""
        if capacity > self.keys.shape[3]:
            raise ValueError(f"batched caches hold {self.keys.shape[3]} positions, not {capacity}")

    def write(self, positions: list[int], k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """k_new/v_new [n_layers*B, kv, count, hd] (layer-major, as a batched slice returns them) -> each
        request's cache at its own position."""
        n, b = self.keys.shape[0], len(self.caches)
        k_new = k_new.reshape(n, b, *k_new.shape[1:])
        v_new = v_new.reshape(n, b, *v_new.shape[1:])
        for i, (cache, pos) in enumerate(zip(self.caches, positions)):
            cache.write(pos, k_new[:, i], v_new[:, i], count)


class BatchState:
    """The requests of a batched decode step seen as one: `caches[i]` stacks their caches of attention slice i
    (each RequestCache keeps its own position; the step's driver advances each one when the step commits)."""

    def __init__(self, requests: list[RequestCache], span: int) -> None:
        self.caches = [BatchCache([r.caches[i] for r in requests], span) for i in range(len(requests[0].caches))]
