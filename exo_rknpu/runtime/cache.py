"""Host-side KV cache of one request for one layer slice.

Capacity grows in context-bucket steps (never per token) and the cache is always exactly one bucket long,
so it is handed to backends as is: no per-call copy, and the NPU only sees compiled shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KVCache:
    keys: np.ndarray  # [n_layers, kv_heads, capacity, head_dim] ("seq") or [n_layers, kv_heads, head_dim, capacity] ("dim")
    values: np.ndarray
    layout: str = "seq"

    @classmethod
    def empty(cls, n_layers: int, kv_heads: int, capacity: int, head_dim: int, layout: str = "seq") -> "KVCache":
        shape = (n_layers, kv_heads, capacity, head_dim) if layout == "seq" else (n_layers, kv_heads, head_dim, capacity)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32), layout)

    @property
    def axis(self) -> int:
        """The positions axis."""
        return 2 if self.layout == "seq" else 3

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
        shape = list(self.keys.shape)
        shape[self.axis] = capacity
        for name in ("keys", "values"):
            new = np.zeros(shape, np.float32)
            old = getattr(self, name)
            new[(slice(None),) * self.axis + (slice(0, old.shape[self.axis]),)] = old
            setattr(self, name, new)

    def write(self, pos: int, k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """Store the first `count` new positions (the rest of a padded chunk is discarded)."""
        lead = (slice(None),) * self.axis
        self.keys[lead + (slice(pos, pos + count),)] = k_new[lead + (slice(0, count),)]
        self.values[lead + (slice(pos, pos + count),)] = v_new[lead + (slice(0, count),)]


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
