"""SmoothQuant-style activation smoothing: an exactly equivalent (in exact arithmetic) weight transform that
moves per-channel activation outliers into the weights before w8a8 quantization.

Per-tensor int8 activations lose the small channels when a few channels are huge (smollm2: residual stream up
to ±183, down-projection inputs of layers 2, 11, 28). For a linear layer y = x W^T whose input x comes from an
op that is itself per-channel linear, x_j / s_j with W[:, j] * s_j leaves y unchanged and flattens x:

- q/k/v inputs  = RMSNorm(x) * input_norm : input_norm / s, columns of q_proj, k_proj, v_proj * s
- gate/up inputs = RMSNorm(x) * post_norm : post_norm / s,  columns of gate_proj, up_proj * s
- down input    = silu(gate) * up         : rows of up_proj / s, columns of down_proj * s (s from up_proj's
                                            output by default: rknn quantizes an int8 Conv's output per tensor,
                                            and up's output carries the outliers; down_proj itself stays fp16)
- head          = RMSNorm(x) * final_norm : final_norm / s, columns of lm_head * s (an untied copy: the host's
                                            embedding table is left alone)

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (max|W_j|: over every weight row reading channel j), with X the
real calibration activations (`activation_absmax`: the captured slice inputs replayed through the numpy slice
with a recording `Ops`). Slice inputs and outputs (hidden, k_new, v_new, logits) are unchanged, so calibration
captured on the original model stays valid and the KV cache keeps its meaning. o_proj (input = attention output)
is not smoothed: it would have to go through v_proj, changing the cached V.

Pure functions on LayerWeights / ShardWeights; the compiler applies them to the w8a8 build only (fp16 builds
the original weights).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from exo_rknpu.model.weights import LayerWeights, ShardWeights
from exo_rknpu.slices.graph import NumpyOps, head_slice, layers_slice
from exo_rknpu.slices.spec import SliceSpec

DEFAULT_ALPHA = 0.7
# what the "down" group flattens: "up_out" (up_proj's output; measured better while down_proj stays fp16) or
# "down" (the down-projection's input silu(gate) * up, the textbook choice when down_proj is int8 too)
DOWN_BASIS = "up_out"
# which linear inputs get smoothed: "qkv" (input_norm), "gate_up" (post_norm), "down" (up_proj rows), "head"
GROUPS = ("qkv", "gate_up", "down", "head")
_EPS = 1e-5


def _chmax(x: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(x, np.float32)).reshape(-1, x.shape[-1]).max(axis=0)


class RecordingOps(NumpyOps):
    """NumpyOps that records max|x| per channel of the input (`absmax`) and output (`out_absmax`) of every
    `linear`, keyed by the weight array's id."""

    def __init__(self) -> None:
        self.absmax: dict[int, np.ndarray] = {}
        self.out_absmax: dict[int, np.ndarray] = {}

    def linear(self, x, w, b=None):
        k = id(w)
        m = _chmax(x)
        self.absmax[k] = m if k not in self.absmax else np.maximum(self.absmax[k], m)
        y = super().linear(x, w, b)
        m = _chmax(y)
        self.out_absmax[k] = m if k not in self.out_absmax else np.maximum(self.out_absmax[k], m)
        return y


def _layer_keys(lw: LayerWeights) -> dict[str, int]:
    return {"qkv": id(lw.q_proj), "gate_up": id(lw.gate_proj), "down": id(lw.down_proj), "o": id(lw.o_proj)}


def activation_absmax(ws: ShardWeights, samples: dict[str, list[dict[str, np.ndarray]]],
                      rows: dict[str, list[int]] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-channel max|x| of each linear's input, from real slice inputs.

    `samples`: {slice name: [inputs, ...]} (the compiler's captures, e.g. rknn/calibration.py::capture).
    Returns {"layers.N": {"qkv", "gate_up", "down", "o", "up_out": [channels]}, "head": {"head": [H]}} for the
    slices given ("up_out": up_proj's output, the other factor of the down-projection input).
    """
    a = ws.args
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, lst in samples.items():
        if not lst:
            continue
        ops = RecordingOps()
        if name == "head":
            assert ws.final_norm is not None and ws.lm_head is not None
            for s in lst:
                head_slice(ops, a, ws.final_norm, ws.lm_head, s["hidden"])
            out[name] = {"head": ops.absmax[id(ws.lm_head)]}
            continue
        i = int(name.split(".")[1])
        lw = ws.layers[i]
        for s in lst:
            layers_slice(ops, a, [lw], *(s[n] for n in ("hidden", "cos", "sin", "mask", "past_k", "past_v")))
        out[name] = {g: ops.absmax[k] for g, k in _layer_keys(lw).items()}
        out[name]["up_out"] = ops.out_absmax[id(lw.up_proj)]
    return out


def smoothing_factors(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where a channel never fires or has no weight."""
    wmax = np.max(np.stack([np.abs(w).max(axis=0) for w in weights]), axis=0).astype(np.float64)
    x = np.asarray(act_absmax, np.float64)
    ok = (x > 0) & (wmax > 0)
    s = np.ones_like(x)
    s[ok] = np.power(x[ok], alpha) / np.power(wmax[ok], 1.0 - alpha)
    return np.clip(s, _EPS, None).astype(np.float32)


def _alpha(alpha: float | dict[str, float], group: str) -> float:
    return float(alpha[group]) if isinstance(alpha, dict) else float(alpha)


def smooth_layer(lw: LayerWeights, act_absmax: dict[str, np.ndarray], alpha: float | dict[str, float] = DEFAULT_ALPHA,
                 groups: tuple[str, ...] = GROUPS, down_basis: str = DOWN_BASIS) -> LayerWeights:
    """The smoothed layer (new arrays; `lw` is not modified). Same fp32 function up to rounding.
    `alpha`: one migration strength, or one per group ({"qkv": .., "gate_up": .., "down": ..})."""
    f32 = np.float32
    new = {}
    if "qkv" in groups:
        s = smoothing_factors(act_absmax["qkv"], [lw.q_proj, lw.k_proj, lw.v_proj], _alpha(alpha, "qkv"))
        new["input_norm"] = (lw.input_norm / s).astype(f32)
        for n in ("q_proj", "k_proj", "v_proj"):
            new[n] = (getattr(lw, n) * s[None, :]).astype(f32)
    if "gate_up" in groups:
        s = smoothing_factors(act_absmax["gate_up"], [lw.gate_proj, lw.up_proj], _alpha(alpha, "gate_up"))
        new["post_norm"] = (lw.post_norm / s).astype(f32)
        new["gate_proj"] = (lw.gate_proj * s[None, :]).astype(f32)
        new["up_proj"] = (lw.up_proj * s[None, :]).astype(f32)
    if "down" in groups:
        # basis "up_out": flatten up_proj's own output (rknn quantizes an int8 Conv's output per tensor too, and the
        # down-projection stays fp16 by default); "down": the down-projection's input silu(gate) * up
        s = smoothing_factors(act_absmax[down_basis], [lw.down_proj], _alpha(alpha, "down"))
        up = new.get("up_proj", lw.up_proj)
        new["up_proj"] = (up / s[:, None]).astype(f32)
        new["down_proj"] = (lw.down_proj * s[None, :]).astype(f32)
    return replace(lw, **new)


def smooth_head(final_norm: np.ndarray, lm_head: np.ndarray, act_absmax: np.ndarray,
                alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """(final_norm / s, lm_head * s): a new lm_head array, so a tied embedding table is never changed."""
    s = smoothing_factors(act_absmax, [lm_head], alpha)
    return (final_norm / s).astype(np.float32), (lm_head * s[None, :]).astype(np.float32)


def smooth_shard(ws: ShardWeights, stats: dict[str, dict[str, np.ndarray]], alpha: float | dict[str, float] = DEFAULT_ALPHA,
                 groups: tuple[str, ...] = GROUPS, down_basis: str = DOWN_BASIS) -> ShardWeights:
    """A ShardWeights whose layers (and head) with statistics in `stats` are smoothed; same fingerprint,
    same embedding. Layers without statistics are left as they are."""
    layers = dict(ws.layers)
    for i, lw in ws.layers.items():
        st = stats.get(f"layers.{i}")
        if st is not None:
            layers[i] = smooth_layer(lw, st, alpha, groups, down_basis)
    final_norm, lm_head = ws.final_norm, ws.lm_head
    if "head" in groups and "head" in stats and final_norm is not None and lm_head is not None:
        final_norm, lm_head = smooth_head(final_norm, lm_head, stats["head"]["head"], _alpha(alpha, "head"))
    return replace(ws, layers=layers, final_norm=final_norm, lm_head=lm_head)


def calibration_stats(full: ShardWeights, targets: list[SliceSpec], token_ids: list[int],
                      seq: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Activation maxima over the whole calibration text: capture every target slice's inputs in `seq`-token
    calls (numpy, CPU; as many calls as the text fills) and replay them with RecordingOps."""
    from exo_rknpu.rknn.calibration import capture
    from exo_rknpu.slices.spec import Buckets

    n_calls = max(1, len(token_ids) // seq)
    ctx = 256
    while ctx < n_calls * seq:
        ctx *= 2
    got = capture(full, targets, Buckets(seq=(1, seq), context=(ctx,)), token_ids, per_bucket=n_calls)
    return activation_absmax(full, {name: by_seq.get(seq, []) for name, by_seq in got.items()})


def outlier_ratio(act_absmax: np.ndarray) -> float:
    """max / median of the per-channel maxima: how much a per-tensor int8 scale wastes on the typical channel."""
    a = np.asarray(act_absmax, np.float64)
    return float(a.max() / max(np.median(a), 1e-12))
