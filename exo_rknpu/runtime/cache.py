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
