"""Small helpers for tests that run shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exo_rknpu.model.base import LayerRange, parse_split
from exo_rknpu.model.loader import load_args
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.sampling import Sampler
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets

SMALL_BUCKETS = Buckets(seq=(1, 4, 8), context=(16, 32, 64))


def ring(model: Path, split: str | None, backend: str, buckets: Buckets = SMALL_BUCKETS, weights: str = "fp32",
         **kw) -> LocalRing:
    """Shards of `model` on `backend`; float32 weights unless asked (the exact comparisons need them)."""
    src = resolve_model(str(model))
    n = load_args(src).num_hidden_layers
    ranges = parse_split(split, n) if split else [LayerRange.full(n)]
    return LocalRing([open_shard(src, r, backend, buckets, weights=weights, **kw) for r in ranges])


def greedy(r: LocalRing, prompt: list[int], n: int, request_id: str = "req") -> list[int]:
    return list(r.generate(request_id, prompt, n, Sampler()))


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mean squared error of a against reference b (the error metric of every backend comparison)."""
    b = b.astype(np.float64)
    return float(np.mean((a.astype(np.float64) - b) ** 2) / max(np.mean(b**2), 1e-30))
