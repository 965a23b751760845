"""The native library's norms (exo_rknpu/native/norm.c): RMSNorm, and AddRMSNorm (a residual Add fused with the norm
that reads its sum). Each row is normed in one fixed order: the result equals a float32 numpy computation in that
order bit for bit (and float64 to float32 rounding), a row gets the same bits alone or in any batch, inline or split
over two threads, and in every build of the library; AddRMSNorm's sum is x + skip exactly and its norm is RMSNorm's.
Slices of native weights run them in place of onnxruntime's Add and norm, and a slice boundary changes no bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from exo_rknpu.backends.ort import session_options
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.native.build import X86, library
from exo_rknpu.slices.onnx_export import NATIVE_ADD_NORM_OP, NATIVE_DOMAIN, NATIVE_NORM_OP, build_onnx_compact
from exo_rknpu.slices.spec import SliceSpec
from helpers import ring
from tiny_models import make_tiny_gguf, make_tiny_hf

EPS = 1e-5
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]


def norm_session(add: bool, threads: int = 1, isa: str = "native") -> ort.InferenceSession:
    """One RMSNorm (x, gamma -> y) or AddRMSNorm (x, skip, gamma -> y, sum) node over [B, S, H]."""
    f32 = TensorProto.FLOAT
    names = ["x", "skip", "gamma"] if add else ["x", "gamma"]
    node = helper.make_node(NATIVE_ADD_NORM_OP if add else NATIVE_NORM_OP, names, ["y", "sum"] if add else ["y"],
                            domain=NATIVE_DOMAIN, epsilon=EPS)
    ins = [helper.make_tensor_value_info(n, f32, ["B", "S", "H"]) for n in names[:-1]]
    ins.append(helper.make_tensor_value_info("gamma", f32, ["H"]))
    outs = [helper.make_tensor_value_info(n, f32, ["B", "S", "H"]) for n in node.output]
    model = helper.make_model(helper.make_graph([node], "norm", ins, outs), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(NATIVE_DOMAIN, 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, library(isa)),
                                providers=["CPUExecutionProvider"])


def lane_order_reference(s: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """The op's arithmetic in float32 numpy, step by step (each numpy float32 operation rounds as C's does):
    squares summed in 16 lanes, the lanes pairwise, rms = sqrt(mean + eps), y = s / rms * gamma."""
    rows = s.reshape(-1, s.shape[-1])
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        acc = row[:16] * row[:16]
        for i in range(16, len(row), 16):
            acc = acc + row[i : i + 16] * row[i : i + 16]
        for w in (8, 4, 2, 1):
            acc = acc[:w] + acc[w : 2 * w]
        rms = np.sqrt(acc[0] / np.float32(len(row)) + np.float32(EPS), dtype=np.float32)
        out[r] = row / rms * gamma
    return out.reshape(s.shape)


def inputs(b: int, s: int, h: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal((b, s, h)) * 3).astype(np.float32),
            "skip": rng.standard_normal((b, s, h)).astype(np.float32),
            "gamma": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)}


@pytest.mark.parametrize("h", [16, 64, 576, 2048])
def test_rmsnorm_equals_its_float32_order_bit_for_bit_and_float64_to_rounding(h):
    x = inputs(3, 5, h)
    (y,) = norm_session(False).run(None, {"x": x["x"], "gamma": x["gamma"]})
    assert np.array_equal(y, lane_order_reference(x["x"], x["gamma"]))
    x64 = x["x"].astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + EPS) * x["gamma"]
    assert np.abs(y - want).max() <= 1e-6 * np.abs(want).max()


def test_add_rmsnorm_sums_exactly_and_norms_as_rmsnorm_does():
    x = inputs(2, 7, 576, seed=1)
    y, total = norm_session(True).run(None, x)
    assert np.array_equal(total, x["x"] + x["skip"])
    (alone,) = norm_session(False).run(None, {"x": total, "gamma": x["gamma"]})
    assert np.array_equal(y, alone)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gets_the_same_bits_alone_in_a_batch_and_in_a_long_chunk(threads):
    """8 rows run inline; 200 rows (a prefill chunk) go over onnxruntime's pool in tasks of 16 rows."""
    sess = norm_session(True, threads)
    for b, s in ((8, 1), (2, 100)):
        x = inputs(b, s, 2048, seed=2)
        y, total = sess.run(None, x)
        for i in (0, b - 1):
            for j in (0, s - 1):
                one = {k: (v[i : i + 1, j : j + 1] if v.ndim == 3 else v) for k, v in x.items()}
                y1, t1 = sess.run(None, one)
                assert np.array_equal(y1[0, 0], y[i, j]) and np.array_equal(t1[0, 0], total[i, j])


def test_every_build_of_the_library_gives_the_same_bits():
    isas = ["scalar", "native"] + (["avx2"] if X86 and "avx2" in open("/proc/cpuinfo").read() else [])
    x = inputs(4, 9, 2048, seed=3)
    runs = [norm_session(True, 1, isa).run(None, x) for isa in isas]
    for other in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("bad, message", [
    ({"gamma": np.ones(24, np.float32)}, "multiple of 16"),
    ({"gamma": np.ones(32, np.float32)}, "last dimension"),
    ({"skip": np.ones((1, 1, 64), np.float32)}, "differ in shape"),
])
def test_malformed_inputs_are_refused_with_a_clear_error(bad, message):
    x = {**inputs(2, 3, 64), **bad}
    with pytest.raises(Exception, match=message):
        norm_session(True).run(None, x)


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("norm")
    return make_tiny_gguf(d / "q4_0.gguf", make_tiny_hf(d / "hf", n_layers=3, seed=11), qtype="Q4_0")


def test_slices_of_native_weights_run_the_native_norms_and_others_onnxruntimes(q4_model):
    src = resolve_model(str(q4_model))
    for weights, native in (("native", True), ("fp32", False)):
        shard = load_shard(src, LayerRange.full(3), weights)
        model, _ = build_onnx_compact(SliceSpec("layers", 0, 3), shard, attention_form="gqa")
        ops = [n.op_type for n in model.graph.node]
        if native:  # layer 0's first norm reads the input; every later norm reads a residual sum
            assert (ops.count(NATIVE_NORM_OP), ops.count(NATIVE_ADD_NORM_OP)) == (1, 5), weights
            assert "Pow" not in ops and ops.count("Add") == 1  # the last residual: the slice's output
        else:
            assert NATIVE_NORM_OP not in ops and NATIVE_ADD_NORM_OP not in ops and "Pow" in ops


def test_a_slice_boundary_changes_no_bit_of_the_logits(q4_model):
    """Unsplit, layer 1's first norm is an AddRMSNorm; split after layer 0 it is an RMSNorm of the received state."""
    whole = ring(q4_model, None, "onnx", weights="native").forward("r", np.array([PROMPT]), logits="all")
    split = ring(q4_model, "0-0,1-2", "onnx", weights="native").forward("r", np.array([PROMPT]), logits="all")
    assert np.array_equal(whole, split)
