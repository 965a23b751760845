"""Token sampling: greedy, temperature, top-k, top-p; seedable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


class Sampler:
    """Picks one token from a logits row. Holds its own random generator (no global state)."""

    def __init__(self, params: SamplingParams = SamplingParams()) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [V], or any array whose last row along the last axis is the one to sample (x[..., -1, :])."""
        row = np.asarray(logits, np.float64)
        if row.ndim > 1:
            row = row.reshape(-1, row.shape[-1])[-1]
        return sample_row(row, self.params, self.rng)


def sample_row(row: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    if p.temperature == 0:
        return int(np.argmax(row))
    z = row / p.temperature
    order = np.argsort(-z, kind="stable")
    if p.top_k:
        order = order[: p.top_k]
    z = z[order]
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    return int(order[rng.choice(len(probs), p=probs)])
