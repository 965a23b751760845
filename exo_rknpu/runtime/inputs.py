"""Building the per-call inputs of layer slices: rotary tables and the attention mask."""

from __future__ import annotations

import numpy as np

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.rope import cos_sin
from exo_rknpu.slices.spec import MASK_VALUE


def attention_mask(seq: int, real: int, ctx: int, n_past: int) -> np.ndarray:
    """Additive mask [1,1,seq,ctx+seq]: row i sees cached positions < n_past and new positions <= i.

    Padded rows (i >= real) follow the same causal rule; their outputs are discarded.
    """
    m = np.full((seq, ctx + seq), MASK_VALUE, np.float32)
    m[:, :n_past] = 0.0
    causal = np.tril(np.ones((seq, seq), bool))
    m[:, ctx:][causal] = 0.0
    return m[None, None]


def layer_inputs(args: ModelArgs, hidden: np.ndarray, real: int, n_past: int, ctx: int) -> dict[str, np.ndarray]:
    """Everything but the cache for a chunk of `hidden` [1,S,H] whose first `real` rows are tokens at n_past..."""
    seq = hidden.shape[1]
    cos, sin = cos_sin(args, np.arange(n_past, n_past + seq))
    return {"hidden": hidden, "cos": cos, "sin": sin, "mask": attention_mask(seq, real, ctx, n_past)}


class RotaryTable:
    """Rotary rows (cos, sin [1,1,seq,hd]) for chunks at any position up to `max_positions`, computed once: calls
    hand out views. The mask, which depends on what a request's cache holds, is that cache's (RequestCache.mask)."""

    def __init__(self, args: ModelArgs, max_positions: int) -> None:
        self.args = args
        cos, sin = cos_sin(args, np.arange(max_positions))
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # [positions, hd]

    def __call__(self, at: int, seq: int) -> dict[str, np.ndarray]:
        if at + seq > len(self.cos):  # beyond the table (not reached via buckets)
            cos, sin = cos_sin(self.args, np.arange(at, at + seq))
            return {"cos": cos, "sin": sin}
        rows = slice(at, at + seq)
        return {"cos": self.cos[None, None, rows], "sin": self.sin[None, None, rows]}
