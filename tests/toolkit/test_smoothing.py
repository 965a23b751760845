"""SmoothQuant-style smoothing (rknn/smoothing.py): exact fp32 equivalence, outlier reduction, and its place
in the w8a8 policies. Numpy only; the recipe's cache key and manifest are tests/toolkit/test_recipe.py."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.rknn import smoothing as sm
from exo_rknpu.rknn.calibration import CALIBRATION_TEXT
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_shard, load_tokenizer, resolve_model
from exo_rknpu.slices.graph import NumpyOps, run_slice
from exo_rknpu.slices.spec import Buckets, plan_slices

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_models import make_tiny_hf  # noqa: E402

TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. Once upon a time there was a tiny model "
        "that ran on a Rockchip board with an NPU, split into layer ranges across three nodes. ") * 3


def _with_outliers(ws):
    """Give every layer massive activations on a few channels (like smollm2): scale some norm weights up."""
    layers = {}
    for i, lw in ws.layers.items():
        inorm, pnorm, up = lw.input_norm.copy(), lw.post_norm.copy(), lw.up_proj.copy()
        inorm[[3, 17]] *= 60.0
        pnorm[[5]] *= 80.0
        up[[7, 40]] *= 50.0  # rows of up: channels of the down-projection input
        layers[i] = replace(lw, input_norm=inorm, post_norm=pnorm, up_proj=up)
    fn = ws.final_norm.copy()
    fn[[2]] *= 40.0
    return replace(ws, layers=layers, final_norm=fn)


def _setup(path: Path):
    src = resolve_model(str(path))
    n = load_args(src).num_hidden_layers
    full = _with_outliers(load_shard(src, LayerRange.full(n), weights="fp32"))
    targets = [s for s in plan_slices(0, n, True, True, 1) if s.kind != "embed"]
    ids = load_tokenizer(src).encode(TEXT)
    return full, targets, ids


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch,tied,basis", [("llama", False, "up_out"), ("qwen2", True, "down")])  # qwen2: biases, tied head
def test_smoothing_is_exactly_equivalent_in_fp32(tmp_path, arch, tied, basis):
    from exo_rknpu.rknn.calibration import capture

    full, targets, ids = _setup(make_tiny_hf(tmp_path / "m", arch=arch, n_layers=3, tied=tied, seed=3))
    stats = sm.calibration_stats(full, targets, ids, seq=16)
    assert set(stats) == {t.name for t in targets}
    smooth = sm.smooth_shard(full, stats, alpha=0.5, down_basis=basis)
    # the transform really changed the weights (and not the host's embedding table, even when the head is tied)
    for i, lw in full.layers.items():
        s = smooth.layers[i]
        assert not np.allclose(s.input_norm, lw.input_norm) and not np.allclose(s.post_norm, lw.post_norm)
        assert not np.allclose(s.down_proj, lw.down_proj) and not np.allclose(s.q_proj, lw.q_proj)
        assert s.o_proj is lw.o_proj  # o_proj is not smoothed (it would change the cached V)
    assert not np.allclose(smooth.lm_head, full.lm_head)
    assert smooth.embed_tokens is full.embed_tokens and smooth.fingerprint == full.fingerprint
    if tied:
        assert np.array_equal(full.lm_head, full.embed_tokens)
    # same function: every slice on real inputs (prefill and decode), numpy fp32
    got = capture(full, targets, Buckets(seq=(1, 16), context=(64,)), ids, per_bucket=2)
    ops = NumpyOps()
    checked = 0
    for t in targets:
        for seq, samples in got[t.name].items():
            for inputs in samples:
                ref, out = run_slice(ops, t, full, inputs), run_slice(ops, t, smooth, inputs)
                for k in ref:
                    assert _rel(out[k], ref[k]) <= 5e-5, (t.name, seq, k, _rel(out[k], ref[k]))  # fp32 rounding (outliers x60)
                checked += 1
    assert checked == len(targets) * 4


def test_smoothing_shrinks_the_outlier_ratio(tmp_path):
    full, targets, ids = _setup(make_tiny_hf(tmp_path / "m", arch="llama", n_layers=2, seed=4))
    before = sm.calibration_stats(full, targets, ids, seq=16)
    smooth = sm.smooth_shard(full, before, alpha=0.5)
    after = sm.calibration_stats(smooth, targets, ids, seq=16)
    # default basis: the "down" group flattens up_proj's output (what rknn quantizes while down_proj stays fp16)
    for name in before:
        for g in ("qkv", "gate_up", "up_out") if name != "head" else ("head",):
            r0, r1 = sm.outlier_ratio(before[name][g]), sm.outlier_ratio(after[name][g])
            assert r0 > 10 and r1 < r0 / 3, (name, g, r0, r1)  # injected outliers were there, and are gone mostly
    # alpha = 0 only rescales by the weights (activations keep their outliers); alpha=1 flattens them completely
    flat = sm.calibration_stats(sm.smooth_shard(full, before, alpha=1.0), targets, ids, seq=16)
    assert sm.outlier_ratio(flat["layers.0"]["up_out"]) < 1.5 and sm.outlier_ratio(flat["layers.0"]["qkv"]) < 1.5
    # basis "down": the down-projection's input itself
    prod = sm.calibration_stats(sm.smooth_shard(full, before, alpha=1.0, down_basis="down"), targets, ids, seq=16)
    assert sm.outlier_ratio(before["layers.0"]["down"]) > 10 and sm.outlier_ratio(prod["layers.0"]["down"]) < 1.5


def test_smoothing_factors_formula():
    x = np.array([100.0, 1.0, 0.0, 4.0], np.float32)
    w = [np.array([[1.0, 4.0, 2.0, 0.0]], np.float32), np.array([[-0.25, 1.0, 1.0, 0.0]], np.float32)]
    s = sm.smoothing_factors(x, w, 0.5)
    np.testing.assert_allclose(s, [10.0, 0.5, 1.0, 1.0], rtol=1e-6)  # sqrt(100)/sqrt(1), 1/sqrt(4); zeros -> 1


@pytest.mark.slow
def test_smollm2_massive_activations_are_flattened():
    # Decided at run time: the model is fetched on first use (as every slow test does), never skipped for being absent.
    src = resolve_model("smollm2-135m", progress=lambda m: print(m, file=sys.stderr))
    n = 12  # layer 11 carries massive activations (its down-projection input reaches 2,800)
    full = load_shard(src, LayerRange(0, n, load_args(src).num_hidden_layers), weights="fp32")
    targets = [s for s in plan_slices(0, n, True, False, 1) if s.name == "layers.11"]
    ids = load_tokenizer(src).encode(CALIBRATION_TEXT)
    before = sm.calibration_stats(full, targets, ids)["layers.11"]
    after = sm.calibration_stats(sm.smooth_shard(full, {"layers.11": before}, alpha=0.7), targets, ids)["layers.11"]
    # measured max/median of the channel maxima: qkv 13.9 -> 2.8, gate_up 7.3 -> 2.7, up_out 35.1 -> 5.5
    for g in ("qkv", "gate_up", "up_out"):
        r0, r1 = sm.outlier_ratio(before[g]), sm.outlier_ratio(after[g])
        assert r0 > 7 and r1 < r0 / 2.5, (g, r0, r1)


def test_quant_policies_pick_the_right_linear_layers():
    """rknn/venv/worker.py::_int8_convs on a step-1-like graph (rknn's fused op names): which Convs stay int8."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from exo_rknpu.rknn.venv.worker import _int8_convs

    nodes = [helper.make_node("exNorm", ["x"], ["h"], name="norm"),
             helper.make_node("Conv", ["h", "wq"], ["q"], name="matmul_q"),
             helper.make_node("Reshape", ["q", "s"], ["qr"], name="reshape_q"),
             helper.make_node("Conv", ["att", "wo"], ["o"], name="matmul_o"),
             helper.make_node("Add", ["x", "o"], ["x2"], name="add_o"),
             helper.make_node("Conv", ["h2", "wg"], ["g"], name="matmul_gate"),
             helper.make_node("exSwish", ["g"], ["sg"], name="swish"),
             helper.make_node("Conv", ["h2", "wu"], ["u"], name="matmul_up"),
             helper.make_node("Mul", ["sg", "u"], ["m"], name="mul"),
             helper.make_node("Conv", ["m", "wd"], ["d"], name="matmul_down"),
             helper.make_node("Conv", ["kv", "wr"], ["kvr"], name="unsqueeze_1_gather_2conv")]
    m = helper.make_model(helper.make_graph(nodes, "g", [], []))
    lin = {"matmul_q", "matmul_o", "matmul_gate", "matmul_up", "matmul_down"}
    assert _int8_convs(m, "linear") == lin  # never the KV-repeat Conv
    assert _int8_convs(m, "linear-fp16-down") == lin - {"matmul_down"}
    assert _int8_convs(m, "linear-fp16-gate-down") == lin - {"matmul_down", "matmul_gate"}
    assert _int8_convs(m, "mlp-gate-up") == {"matmul_gate", "matmul_up"}
