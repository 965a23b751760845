"""The tools scripts/arm64-emulation.sh compares CPUs with: docs/perf/requant_gguf.py (a GGUF re-encoded as Q8_0,
read back by gguf-py) and docs/perf/isa_ops.py (each case is the op it names, checked against numpy; the comparison
tells identical bits from different ones)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.model.quant import quantize
from tiny_models import make_tiny_gguf, make_tiny_hf

PERF = Path(__file__).resolve().parents[2] / "docs" / "perf"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requantized_gguf_keeps_metadata_and_tensors_and_holds_q8_0_blocks_of_the_same_weights(tmp_path):
    import gguf
    src = make_tiny_gguf(tmp_path / "q4_1.gguf", make_tiny_hf(tmp_path / "hf", n_layers=2, seed=3), qtype="Q4_1")
    dst = tmp_path / "q8_0.gguf"
    _script("requant_gguf").requantize(str(src), str(dst), "Q8_0")
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    skip = {gguf.Keys.General.FILE_TYPE}
    assert {k: f.contents() for k, f in a.fields.items() if k not in skip and not k.startswith("GGUF.")} == \
           {k: f.contents() for k, f in b.fields.items() if k not in skip and not k.startswith("GGUF.")}
    assert b.fields[gguf.Keys.General.FILE_TYPE].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    tb = {t.name: t for t in b.tensors}
    assert [t.name for t in a.tensors] == list(tb)
    for t in a.tensors:
        u = tb[t.name]
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            assert u.tensor_type == gguf.GGMLQuantizationType.Q8_0
            old = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, 32)
            new = gguf.quants.dequantize(u.data, u.tensor_type).reshape(-1, 32)
            # Q8_0: q = round(x / d), d = max|x| / 127 per block of 32, stored as float16 (relative error <= 2**-11,
            # times |q| <= 127): each value within d/2 + 127 d 2**-11 of the Q4_1 one
            step = np.abs(old).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(new - old) <= step * (0.5 + 127 / 2048) * (1 + 1e-3))
        else:
            assert u.tensor_type == t.tensor_type and np.asarray(u.data).tobytes() == np.asarray(t.data).tobytes()


def test_isa_ops_cases_compute_what_they_name_and_the_comparison_tells_bits_apart():
    ops = _script("isa_ops")
    rng = np.random.default_rng(19)  # the inputs cases() draws, in its order
    w = ops._floats(rng, (ops.N, ops.K), 0.05)
    x1 = ops._floats(rng, (1, ops.K), 2.0)
    out = {name: f() for name, f in ops.cases().items()}
    exact = x1.astype(np.float64) @ w.T.astype(np.float64)
    # float32 activations: the quantized weights' product to float32 rounding; the fp32 MatMul the float one
    assert np.allclose(out["fp32 MatMul, constant weights, M=1"], exact, rtol=1e-5, atol=1e-4)
    cases = {"auto 4-bit, float32 activations (level 1), M=1": (4, 32, False, 1e-5),
             "auto 8-bit as split8 (level 1), M=1": (8, 64, True, 1e-5),
             "int4 (int8 activations, level 4), M=1": (4, 32, False, 2e-2),
             "int8 (int8 activations, level 4), M=1": (8, 32, False, 2e-2)}
    for name, (bits, block, fp32, tol) in cases.items():  # against the quantized weights' exact product
        ref = x1.astype(np.float64) @ quantize(w, bits, block, kernel="fp32" if fp32 else "int8").dequantize().astype(np.float64).T
        assert np.max(np.abs(out[name] - ref)) <= tol * np.max(np.abs(ref)), name
    same = ops.compare(out, out)
    assert all(line.startswith("identical bits") for line in same) and len(same) == len(out)
    nudged = dict(out)
    key = "auto 4-bit, float32 activations (level 1), M=1"
    nudged[key] = np.nextafter(out[key], np.inf, dtype=np.float32)
    lines = ops.compare(out, nudged)
    assert [line for line in lines if not line.startswith("identical bits")] == \
           [f"differ ({float(np.max(np.abs(out[key] - nudged[key])) / np.max(np.abs(out[key]))):.1e}, {out[key].size}/{out[key].size})  {key}"]


def test_isa_ops_float_cases_around_the_matmuls_compute_what_they_name():
    ops = _script("isa_ops")
    rng = np.random.default_rng(19)  # the inputs cases() draws, in its order
    _w, _x1 = ops._floats(rng, (ops.N, ops.K), 0.05), ops._floats(rng, (1, ops.K), 2.0)
    x7 = ops._floats(rng, (7, ops.K), 2.0).astype(np.float64)
    _kv, _mins = ops._floats(rng, (ops.K, 300), 1.0), ops._floats(rng, (ops.K // ops.BLOCK, ops.N), 0.01)
    scores = ops._floats(rng, (7, 300), 8.0).astype(np.float64)
    cases = ops.cases()
    softmax = np.exp(scores - scores.max(-1, keepdims=True))
    want = {"norm: ReduceMean of Pow(x, 2), M=7": np.mean(x7**2, axis=-1, keepdims=True),
            "SiLU's Sigmoid, M=7": 1 / (1 + np.exp(-x7)),
            "attention's Softmax over 300 positions, M=7": softmax / softmax.sum(-1, keepdims=True)}
    for name, ref in want.items():
        got = cases[name]()
        assert got.shape == ref.shape and np.allclose(got, ref, rtol=1e-5, atol=1e-7), name
