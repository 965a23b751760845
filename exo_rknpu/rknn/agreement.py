"""End-to-end accuracy of compiled slices: greedy top-1 agreement with the fp32 CPU run, in the rknn simulator.

Teacher-forced: a text (default: the held-out text, slices/calibration_text.py::HELDOUT_TEXT, never used for
calibration) is fed in `seq`-token chunks through the whole model twice, once with every decoder layer and the
head in the simulator (rknn-sim backend: fp16, or w8a8 built by the w8a8 recipe through rknn/recipe.py,
exactly as `compile --dtype w8a8` builds it) and once in float32 on onnxruntime (the original weights); the
argmax of the logits is compared at every position. seq 64 = prefill chunks (bounded by the NPU form's largest seq
bucket, slices/spec.py::npu_buckets: 32 for smollm2), seq 1 = decode (one token per call).

Per-layer figures come along: for every simulated layer call, the same slice runs on onnxruntime on the *same*
inputs (the simulated trajectory), giving the layer's own error (cos of the residual update, "cos_delta", and
of hidden_out); the trajectory's hidden states are also compared with the fp32 run's ("cos_hidden_acc",
accumulated error).

    exo-rknpu compile --model smollm2-135m --agreement --dtype w8a8 [--agreement-text FILE] [--agreement-seq 1]
        [--fp16-layers 0,29,head] [--quant-policy ...] [--smooth-alpha A] [--rotation hadamard] [--json]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from exo_rknpu.rknn import io as rknn_io
from exo_rknpu.backends.base import get_backend
from exo_rknpu.rknn.calibration import HELDOUT_TEXT
from exo_rknpu.errors import CompileError
from exo_rknpu.slices.recipe import DEFAULT_RECIPE, QuantRecipe
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.slices.spec import Buckets, SliceSpec, npu_buckets, npu_kv_layout, npu_outputs_to_seq


def parse_fp16_slices(text: str | None, n_layers: int) -> tuple[tuple[int, ...], bool]:
    """'0,29,head' or '0-2,head' -> (decoder layers kept in fp16, whether the head is fp16)."""
    layers: set[int] = set()
    head = False
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part == "head":
            head = True
            continue
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise ValueError(f"--fp16-layers: expected layer numbers, ranges A-B or 'head', got {part!r}") from None
        if not (0 <= lo <= hi < n_layers):
            raise ValueError(f"--fp16-layers: {part!r} is outside layers 0-{n_layers - 1}")
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers)), head


def weight_bytes_per_token(ws: ShardWeights, recipe: QuantRecipe | None) -> int:
    """Weight bytes the NPU reads per decoded token (every decoder layer + the head; the embedding is a host
    lookup): int8 linears 1 byte per weight, everything else fp16 (2 bytes). recipe None: all fp16. Computed from
    parameter counts (per-channel scales and the file format left out); docs/compiler.md lists measured file sizes."""
    total = 0
    for i, lw in ws.layers.items():
        int8 = set(recipe.int8_linears(f"layers.{i}")) if recipe is not None else set()
        total += sum(a.size * (1 if n in int8 else 2) for n, a in lw.arrays().items())
    if ws.lm_head is not None and ws.final_norm is not None:
        head_int8 = recipe is not None and recipe.int8_linears("head")
        total += ws.lm_head.size * (1 if head_int8 else 2) + ws.final_norm.size * 2
    return int(total)


def measure_agreement(model: str = "smollm2-135m", dtype: str = "w8a8", *, text: str = HELDOUT_TEXT,
                      recipe: QuantRecipe = DEFAULT_RECIPE, seq: int = 64, max_tokens: int | None = None,
                      per_layer: bool = True,
                      log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Greedy top-1 agreement of the simulated model (`dtype`; w8a8 built by `recipe`) vs fp32 onnxruntime on `text`."""
    from exo_rknpu.rknn.recipe import RecipeBuild
    from exo_rknpu.model.loader import load_args, load_shard, load_tokenizer, resolve_model

    t0 = time.monotonic()
    src = resolve_model(model)
    ids = load_tokenizer(src).encode(text)[:max_tokens or None]
    if len(ids) < 2:
        raise CompileError(f"the agreement text has {len(ids)} token(s); it needs at least 2")
    if seq < 1:
        raise CompileError(f"--agreement-seq must be >= 1, got {seq}")
    full = load_shard(src, LayerRange.full(load_args(src).num_hidden_layers), weights="fp32")
    ctx = 256
    while ctx < len(ids):
        ctx *= 2
    buckets = Buckets(seq=(1, seq) if seq > 1 else (1,), context=(ctx,))
    if npu_kv_layout(full.args) == "npu":  # prefill in the chunks the npu backend runs (npu_buckets), not larger
        bounded = npu_buckets(buckets, full.args)
        if max(bounded.seq) < seq:
            log(f"--agreement-seq {seq}: the NPU form runs prefill in chunks of at most {max(bounded.seq)}; measuring with those")
            buckets, seq = bounded, max(bounded.seq)
    x = np.asarray(ids, np.int64)[None]
    ref_logits, ref_hidden = _reference(full, buckets, x, seq)
    log(f"fp32 reference: {len(ids)} tokens in {time.monotonic() - t0:.0f} s")

    rb = RecipeBuild(src, recipe) if dtype == "w8a8" else None
    q = rb.rotation_matrix() if rb is not None else None
    if q is not None:  # compare hidden states in the rotated basis
        ref_hidden = {k: [(h.astype(np.float64) @ q).astype(np.float32) for h in v] for k, v in ref_hidden.items()}
    fp16_slices = sorted(s for s in (["head"] + [f"layers.{i}" for i in range(full.args.num_hidden_layers)])
                         if rb is not None and recipe.slice_dtype(s) == "fp16")
    figures = _LayerFigures(rb.runtime_weights() if rb is not None else full, buckets, ref_hidden, per_layer, seq)
    sim_logits, builds, run_s = _simulate(figures, dtype, rb, x, seq, log, fp16_slices)
    a, b = sim_logits[0].argmax(-1), ref_logits[0].argmax(-1)
    return {
        "model": src.name, "dtype": dtype, "recipe": recipe.to_dict() if rb is not None else None,
        "recipe_summary": recipe.describe() if rb is not None else None,
        "fp16_slices": fp16_slices, "tokens": len(ids), "seq": seq,
        "context": ctx, "top1_agreement": round(float(np.mean(a == b)), 4), "agree": int((a == b).sum()),
        "cos_logits": round(rknn_io.cosine(sim_logits, ref_logits), 6),
        "head_dtype": "fp16" if "head" in fp16_slices else dtype,
        "bytes_per_token": weight_bytes_per_token(full, recipe if rb is not None else None),
        "layers": figures.summary(lambda name: recipe.slice_dtype(name) if rb is not None else dtype),
        "builds": len(builds), "build_names": [b["name"] for b in builds],
        "build_seconds": round(sum(x.get("seconds", 0.0) for x in builds), 1),
        "sim_seconds": round(run_s, 1), "total_seconds": round(time.monotonic() - t0, 1),
    }


def _reference(full: ShardWeights, buckets: Buckets, x: np.ndarray, seq: int) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """fp32 logits on onnxruntime, one graph per layer so the trajectory can be compared layer by layer: the
    logits and every layer call's hidden_out."""
    hidden: dict[str, list[np.ndarray]] = {}

    def on_ref(spec: SliceSpec, _i: dict, out: dict) -> None:
        if spec.kind == "layers":
            hidden.setdefault(spec.name, []).append(out["hidden_out"].copy())

    ref = ShardRunner(full, get_backend("onnx"), buckets, layers_per_slice=1, on_slice=on_ref)
    try:
        return _feed(ref, x, seq), hidden
    finally:
        ref.close()


class _LayerFigures:
    """Per simulated layer call: its own error (the same slice on onnxruntime, same inputs) and the accumulated
    one (against the fp32 run's hidden states). `on_slice` is the simulated runner's observer."""

    def __init__(self, weights: ShardWeights, buckets: Buckets, ref_hidden: dict[str, list[np.ndarray]], per_layer: bool,
                 seq: int) -> None:
        self.weights, self.buckets, self.ref_hidden, self.per_layer = weights, buckets, ref_hidden, per_layer
        self.onnx = get_backend("onnx")
        self.state: dict[str, int] = {"real": seq}  # real rows of the current chunk (_feed sets it)
        self.runners: dict[str, Any] = {}
        self.figs: dict[str, list[dict[str, float]]] = {}

    def on_slice(self, spec: SliceSpec, inputs: dict, out: dict) -> None:
        if spec.kind != "layers":
            return
        i = len(self.figs.get(spec.name, []))
        rows = slice(0, self.state["real"])  # the padded rows of a short last chunk are left out
        f: dict[str, float] = {}
        if self.per_layer:
            if spec.kv_layout == "npu":  # the onnx reference runs the "seq" form
                a = self.weights.args
                spec, inputs, out = replace(spec, kv_layout="seq"), npu_outputs_to_seq(inputs, a), npu_outputs_to_seq(out, a)
            want = self.runners.setdefault(spec.name, self.onnx.prepare(spec, self.weights, self.buckets)).run(inputs)
            f["cos_delta"] = rknn_io.cosine((out["hidden_out"] - inputs["hidden"])[:, rows], (want["hidden_out"] - inputs["hidden"])[:, rows])
            f["cos_hidden_out"] = rknn_io.cosine(out["hidden_out"][:, rows], want["hidden_out"][:, rows])
            pos = (slice(None),) * (2 if spec.kv_layout == "seq" else 3) + (rows,)  # the new positions' axis
            f["cos_k_new"] = rknn_io.cosine(out["k_new"][pos], want["k_new"][pos])
            f["cos_v_new"] = rknn_io.cosine(out["v_new"][pos], want["v_new"][pos])
        f["cos_hidden_acc"] = rknn_io.cosine(out["hidden_out"][:, rows], self.ref_hidden[spec.name][i][:, rows])
        self.figs.setdefault(spec.name, []).append(f)

    def summary(self, dtype_of: Callable[[str], str]) -> dict[str, dict[str, Any]]:
        """The worst figure of each layer over its calls, in layer order, with the dtype it was built in."""
        out: dict[str, dict[str, Any]] = {}
        for name, figs in sorted(self.figs.items(), key=lambda kv: int(kv[0].split(".")[1])):
            out[name] = {k: round(min(f[k] for f in figs), 6) for k in figs[0]}
            out[name]["dtype"] = dtype_of(name)
        return out

    def close(self) -> None:
        for r in self.runners.values():
            r.close()


def _simulate(figures: _LayerFigures, dtype: str, rb: Any, x: np.ndarray, seq: int, log: Callable[[str], None],
              fp16_slices: list[str]) -> tuple[np.ndarray, list[dict[str, Any]], float]:
    """The model in the simulator (the one planner's default plan for rknn-sim: one graph per layer, the embedding
    on the host CPU): its logits, its builds and the seconds the run took."""
    from exo_rknpu.rknn.sim import RknnSimBackend
    from exo_rknpu.runtime.placement import resolve

    weights = figures.weights
    main = RknnSimBackend(dtype=dtype, recipe_build=rb)
    plan = resolve(None, weights.args, weights.layer_range, "rknn-sim", figures.buckets, layers_per_slice=1)
    devices = {name: main if backend == "rknn-sim" else figures.onnx for name, backend in plan.backends.items()}
    t1 = time.monotonic()
    sim = ShardRunner(weights, buckets=figures.buckets, on_slice=figures.on_slice,
                      placed=[(s.spec, s.device, devices[s.device]) for s in plan.slices])
    try:
        log(f"simulator ready ({dtype}{', fp16: ' + ','.join(fp16_slices) if fp16_slices else ''}) in {time.monotonic() - t1:.0f} s")
        t2 = time.monotonic()
        logits = _feed(sim, x, seq, figures.state)
        return logits, list(main.builds), time.monotonic() - t2
    finally:
        sim.close()
        figures.close()
        main.close()


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
