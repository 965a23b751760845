"""End-to-end accuracy of compiled slices: greedy top-1 agreement with the fp32 CPU run, in the rknn simulator.

Teacher-forced: the held-out text (compiler/calibration.py::HELDOUT_TEXT, never used for calibration) is fed in
`seq`-token chunks through the whole model twice, once with every decoder layer and the head in the simulator
(rknn-sim backend, the compiler's build recipe: fp16, or w8a8 with its calibration and hybrid policy) and once
in float32 on onnxruntime; the argmax of the logits is compared at every position.

Per-layer figures come along: for every simulated layer call, the same slice runs on onnxruntime on the *same*
inputs (the simulated trajectory), giving the layer's own error (cos of the residual update, "cos_delta", and
of hidden_out); the trajectory's hidden states are also compared with the fp32 run's ("cos_hidden_acc",
accumulated error).

    exo-rknpu compile --model smollm2-135m --agreement --dtype w8a8 [--fp16-layers 0,29,head] [--json]
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np

from exo_rknpu.backends import rknn_io
from exo_rknpu.backends.base import get_backend
from exo_rknpu.compiler.calibration import CALIBRATION_TEXT, HELDOUT_TEXT
from exo_rknpu.model.base import LayerRange
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.slices.spec import Buckets, SliceSpec


def parse_fp16_slices(text: str | None, n_layers: int) -> set[str]:
    """'0,29,head' or '0-2,head' -> slice names kept in fp16 ({'layers.0', 'layers.29', 'head'})."""
    out: set[str] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part == "head":
            out.add("head")
            continue
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise ValueError(f"--fp16-layers: expected layer numbers, ranges A-B or 'head', got {part!r}") from None
        if not (0 <= lo <= hi < n_layers):
            raise ValueError(f"--fp16-layers: {part!r} is outside layers 0-{n_layers - 1}")
        out.update(f"layers.{i}" for i in range(lo, hi + 1))
    return out


def measure_agreement(model: str = "smollm2-135m", dtype: str = "w8a8", *, text: str = HELDOUT_TEXT,
                      calib_text: str = CALIBRATION_TEXT, seq: int = 64, max_tokens: int | None = None,
                      fp16_slices: set[str] | frozenset[str] = frozenset(), per_layer: bool = True,
                      quant_policy: str | None = None, quantized_algorithm: str | None = None,
                      smooth_alpha: float | dict[str, float] | None | str = "default",
                      log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Greedy top-1 agreement of the simulated model (`dtype`, with `fp16_slices` in fp16) vs fp32 onnxruntime.

    w8a8: the int8 slices are built from SmoothQuant-smoothed weights (compiler/smoothing.py, as the compiler
    does) with `smooth_alpha` ("default": the compiler's DEFAULT_SMOOTH_ALPHA; None: no smoothing)."""
    from exo_rknpu.backends.rknn_sim import RknnSimBackend
    from exo_rknpu.model.loader import load_args, load_shard, load_tokenizer, resolve_model
    from exo_rknpu.runtime.placement import fallback_placement

    t0 = time.monotonic()
    src = resolve_model(model)
    tok = load_tokenizer(src)
    ids = tok.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    n_tok = len(ids)
    full = load_shard(src, LayerRange.full(load_args(src).num_hidden_layers), weights="fp32")
    ctx = 256
    while ctx < n_tok:
        ctx *= 2
    buckets = Buckets(seq=(1, seq) if seq > 1 else (1,), context=(ctx,))
    x = np.asarray(ids, np.int64)[None]

    # fp32 reference, one graph per layer so the trajectory can be compared layer by layer
    ref_hidden: dict[str, list[np.ndarray]] = {}

    def on_ref(spec: SliceSpec, _i: dict, out: dict) -> None:
        if spec.kind == "layers":
            ref_hidden.setdefault(spec.name, []).append(out["hidden_out"].copy())

    onnx_be = get_backend("onnx")
    ref = ShardRunner(full, onnx_be, buckets, layers_per_slice=1, on_slice=on_ref)
    try:
        ref_logits = _feed(ref, x, seq)
    finally:
        ref.close()
    log(f"fp32 reference: {n_tok} tokens in {time.monotonic() - t0:.0f} s")

    from exo_rknpu.compiler.calibration import ModelCalibration
    from exo_rknpu.compiler.worker import DEFAULT_QUANT_POLICY

    from exo_rknpu.compiler import smoothing
    from exo_rknpu.compiler.compile import DEFAULT_SMOOTH_ALPHA
    from exo_rknpu.slices.spec import plan_slices

    if smooth_alpha == "default":
        smooth_alpha = DEFAULT_SMOOTH_ALPHA
    sim_weights = full
    if dtype == "w8a8" and smooth_alpha is not None:
        # the int8 slices only: fp16-kept slices run the original weights, as the compiler builds fp16
        n = full.args.num_hidden_layers
        targets = [s for s in plan_slices(0, n, True, True, 1) if s.kind != "embed" and s.name not in fp16_slices]
        stats = smoothing.calibration_stats(full, targets, tok.encode(calib_text))
        sim_weights = smoothing.smooth_shard(full, stats, smooth_alpha)
        log(f"smoothing (alpha {smooth_alpha}) of {len(stats)} slices in {time.monotonic() - t0:.0f} s")
    calib = ModelCalibration(src, calib_text) if dtype == "w8a8" else None
    main = RknnSimBackend(dtype=dtype, calibration=calib, quant_policy=quant_policy, quantized_algorithm=quantized_algorithm)
    keep = RknnSimBackend(dtype="fp16") if (fp16_slices and dtype != "fp16") else None

    def place(spec: SliceSpec):
        if keep is not None and spec.name in fp16_slices:
            return keep
        return fallback_placement(main, onnx_be)(spec)

    state: dict[str, int] = {"real": seq}
    ort_layers: dict[str, Any] = {}
    layer_figs: dict[str, list[dict[str, float]]] = {}
    calls: dict[str, int] = {}

    def on_sim(spec: SliceSpec, inputs: dict, out: dict) -> None:
        if spec.kind != "layers":
            return
        i = calls.get(spec.name, 0)
        calls[spec.name] = i + 1
        f: dict[str, float] = {}
        rows = slice(0, state["real"])  # the padded rows of a short last chunk are left out
        if per_layer:
            r = ort_layers.setdefault(spec.name, onnx_be.prepare(spec, full, buckets))
            want = r.run(inputs)
            f["cos_delta"] = rknn_io.cosine((out["hidden_out"] - inputs["hidden"])[:, rows], (want["hidden_out"] - inputs["hidden"])[:, rows])
            f["cos_hidden_out"] = rknn_io.cosine(out["hidden_out"][:, rows], want["hidden_out"][:, rows])
            pos = (slice(None),) * (2 if spec.kv_layout == "seq" else 3) + (rows,)  # the new positions' axis
            f["cos_k_new"] = rknn_io.cosine(out["k_new"][pos], want["k_new"][pos])
            f["cos_v_new"] = rknn_io.cosine(out["v_new"][pos], want["v_new"][pos])
        f["cos_hidden_acc"] = rknn_io.cosine(out["hidden_out"][:, rows], ref_hidden[spec.name][i][:, rows])
        layer_figs.setdefault(spec.name, []).append(f)

    t1 = time.monotonic()
    sim = ShardRunner(sim_weights, place, buckets, layers_per_slice=1, on_slice=on_sim)
    try:
        log(f"simulator ready ({dtype}{', fp16: ' + ','.join(sorted(fp16_slices)) if fp16_slices else ''}) in {time.monotonic() - t1:.0f} s")
        t2 = time.monotonic()
        sim_logits = _feed(sim, x, seq, state)
        run_s = time.monotonic() - t2
        builds = main.builds + (keep.builds if keep else [])
    finally:
        sim.close()
        for r in ort_layers.values():
            r.close()
        main.close()
        if keep:
            keep.close()
    a, b = sim_logits[0].argmax(-1), ref_logits[0].argmax(-1)
    agree = float(np.mean(a == b))
    layers = {}
    for name, figs in sorted(layer_figs.items(), key=lambda kv: int(kv[0].split(".")[1])):
        layers[name] = {k: round(min(f[k] for f in figs), 6) for k in figs[0]}
        layers[name]["dtype"] = "fp16" if name in fp16_slices else dtype
    result = {
        "model": src.name, "dtype": dtype, "quant_policy": (quant_policy or DEFAULT_QUANT_POLICY) if dtype == "w8a8" else None,
        "quantized_algorithm": (quantized_algorithm or "normal") if dtype == "w8a8" else None,
        "smooth_alpha": smooth_alpha if dtype == "w8a8" else None, "fp16_slices": sorted(fp16_slices), "tokens": n_tok, "seq": seq,
        "context": ctx, "top1_agreement": round(agree, 4), "agree": int((a == b).sum()),
        "cos_logits": round(rknn_io.cosine(sim_logits, ref_logits), 6),
        "head_dtype": "fp16" if "head" in fp16_slices else dtype,
        "layers": layers, "builds": len(builds),
        "build_seconds": round(sum(x.get("seconds", 0.0) for x in builds), 1),
        "sim_seconds": round(run_s, 1), "total_seconds": round(time.monotonic() - t0, 1),
    }
    return result


def _feed(runner: ShardRunner, x: np.ndarray, seq: int, state: dict[str, int] | None = None) -> np.ndarray:
    """Teacher-forced: all tokens in `seq`-token calls; logits for every position."""
    out = []
    rid = "agreement"
    state = state if state is not None else {}
    try:
        for i in range(0, x.shape[1], seq):
            state["real"] = min(seq, x.shape[1] - i)
            out.append(runner.forward(rid, x[:, i : i + seq], logits="all"))
    finally:
        runner.drop(rid)
    return np.concatenate(out, axis=1)
