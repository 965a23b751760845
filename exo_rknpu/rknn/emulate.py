"""Numpy emulation of a w8a8 recipe: cheap (seconds, no toolkit) ranking of recipes before simulator runs.

Models what rknn's hybrid w8a8 does to each int8 linear (rknn/venv/worker.py policy): weights int8 per output
channel (symmetric), the linear's input AND output int8 per tensor (asymmetric, min/max ranges from the recipe's
calibration text through the same weights); everything else float32 (fp16 rounding is left out: the fp16 build
agrees 100 % in the simulator). It does not model `mmse`/`kl_divergence` ranges (recipe.algorithm is ignored).
Measured against the simulator on smollm2-135m (docs/compiler.md): within ~1-4 points of agreement.

    from exo_rknpu.rknn.emulate import emulate_agreement
    emulate_agreement("smollm2-135m", QuantRecipe(fp16_layers=(0, 1), head="fp16"))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exo_rknpu.rknn.recipe import RecipeBuild
from exo_rknpu.model.rope import cos_sin
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.calibration_text import HELDOUT_TEXT
from exo_rknpu.slices.graph import NumpyOps, head_slice, layers_slice
from exo_rknpu.slices.recipe import QuantRecipe
from exo_rknpu.slices.spec import MASK_VALUE


def fake_quant(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """x through asymmetric int8 with range [lo, hi] (widened to hold 0), back to float32."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / 255.0
    if s == 0.0:
        return x
    zp = np.round(-lo / s) - 128
    return ((np.clip(np.round(x / s) + zp, -128, 127) - zp) * s).astype(np.float32)


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel (row), back to float32."""
    s = np.abs(w).max(axis=1, keepdims=True) / 127.0
    s[s == 0] = 1.0
    return (np.round(w / s) * s).astype(np.float32)


class _RangeOps(NumpyOps):
    """Records min/max of every linear's input and output, keyed by the weight array's id."""

    def __init__(self) -> None:
        self.ranges: dict[int, list[float]] = {}

    def linear(self, x, w, b=None):
        y = super().linear(x, w, b)
        r = self.ranges.setdefault(id(w), [np.inf, -np.inf, np.inf, -np.inf])
        r[:] = [min(r[0], float(x.min())), max(r[1], float(x.max())), min(r[2], float(y.min())), max(r[3], float(y.max()))]
        return y


class _FakeQuantOps(NumpyOps):
    def __init__(self, ranges: dict[int, list[float]], int8: set[int]) -> None:
        self.ranges, self.int8, self.wq = ranges, int8, {}

    def linear(self, x, w, b=None):
        k = id(w)
        if k not in self.int8:
            return super().linear(x, w, b)
        lo, hi, olo, ohi = self.ranges[k]
        if k not in self.wq:
            self.wq[k] = fake_quant_weight(w)
        return fake_quant(super().linear(fake_quant(x, lo, hi), self.wq[k], b), olo, ohi)


def forward(ws: ShardWeights, ids: list[int], ops: NumpyOps, hidden: list[np.ndarray] | None = None) -> np.ndarray:
    """Logits [S, V] of the whole model over `ids` in one causal call (the numpy slices of slices/graph.py)."""
    a = ws.args
    assert ws.embed_tokens is not None and ws.final_norm is not None and ws.lm_head is not None, "needs the whole model"
    x = ws.embed_tokens[np.asarray(ids)][None].astype(np.float32)
    n = x.shape[1]
    cos, sin = cos_sin(a, np.arange(n))
    mask = np.triu(np.full((n, n), MASK_VALUE, np.float32), 1)[None, None]
    empty = np.zeros((1, a.num_key_value_heads, 0, a.head_dim), np.float32)
    for i in sorted(ws.layers):
        x, _, _ = layers_slice(ops, a, [ws.layers[i]], x, cos, sin, mask, empty, empty)
        if hidden is not None:
            hidden.append(x)
    return head_slice(ops, a, ws.final_norm, ws.lm_head, x)[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def emulate_agreement(model, recipe: QuantRecipe, text: str = HELDOUT_TEXT, max_tokens: int | None = None,
                      build: RecipeBuild | None = None) -> dict[str, Any]:
    """Teacher-forced greedy top-1 agreement of the emulated w8a8 `recipe` with the fp32 model on `text`.
    `build`: a RecipeBuild of the same model and recipe to reuse (its weights are computed once)."""
    rb = build or RecipeBuild(model, recipe)
    from exo_rknpu.model.loader import load_tokenizer

    tok = load_tokenizer(rb.source())
    ids = tok.encode(text)[:max_tokens] if max_tokens else tok.encode(text)
    calib = tok.encode(recipe.text)[:256]  # the calibration captures' tokens (4 calls of 64)
    ref_ws = RecipeBuild(model, QuantRecipe(smooth_alpha=None)).runtime_weights() if recipe.rotation else None
    ws = rb.smoothed_weights()
    ref = forward(ref_ws or rb.runtime_weights(), ids, NumpyOps())
    rec = _RangeOps()
    forward(ws, calib, rec)
    int8: set[int] = set()
    for i, lw in ws.layers.items():
        int8 |= {id(getattr(lw, n)) for n in recipe.int8_linears(f"layers.{i}")}
    if recipe.int8_linears("head"):
        int8.add(id(ws.lm_head))
    got = forward(ws, ids, _FakeQuantOps(rec.ranges, int8))
    a, b = got.argmax(-1), ref.argmax(-1)
    return {"recipe": recipe.describe(), "tokens": len(ids), "agree": int((a == b).sum()),
            "top1_agreement": round(float(np.mean(a == b)), 4), "cos_logits": round(_cos(got, ref), 6)}
