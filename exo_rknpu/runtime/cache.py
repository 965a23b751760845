"""Host-side KV cache of one request for one layer slice.

Capacity grows in context-bucket steps (never per token) and the cache is always exactly one bucket long,
so it is handed to backends as is: no per-call copy, and the NPU only sees compiled shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KVCache:
    keys: np.ndarray  # [n_layers, kv_heads, capacity, head_dim]
    values: np.ndarray

    @classmethod
    def empty(cls, n_layers: int, kv_heads: int, capacity: int, head_dim: int) -> "KVCache":
        shape = (n_layers, kv_heads, capacity, head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def grow(self, capacity: int) -> None:
        """Re-allocate to `capacity` positions, keeping what is stored."""
        if capacity <= self.capacity:
            return
        n, kv, old, hd = self.keys.shape
        for name in ("keys", "values"):
            new = np.zeros((n, kv, capacity, hd), np.float32)
            new[:, :, :old] = getattr(self, name)
            setattr(self, name, new)

    def write(self, pos: int, k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """Store the first `count` new positions (the rest of a padded chunk is discarded)."""
        self.keys[:, :, pos : pos + count] = k_new[:, :, :count]
        self.values[:, :, pos : pos + count] = v_new[:, :, :count]
