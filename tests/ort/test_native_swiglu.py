"""The native library's fused MLP activation (exo_rknpu/native/ort_op.c, exo_rknpu.QMatMulSwiGLU): over gate|up
packed as QMatMul's, it gives silu(g) * u of QMatMul's own products g, u -- within float32 rounding of float64
arithmetic, and bit for bit the numpy replica of its arithmetic (reference.swiglu); each row of a batch gets its lone
result at one thread and two; every build of the library gives the same bits; and slices with native weights run
it in place of the Split, SiLU and Mul (other weights keep them)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exo_rknpu.backends.ort import session_options
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.native import Q4_0, Q4_1, Q6_K, Q8_0, pack, reference
from exo_rknpu.native.build import X86, library
from exo_rknpu.slices.onnx_export import NATIVE_DOMAIN, NATIVE_OP, NATIVE_SWIGLU_OP, build_onnx_compact
from exo_rknpu.slices.spec import SliceSpec

FLOAT32_ROUNDING = 1e-6  # the activation's error against float64, relative to each element (measured 2e-7)


def session(op: str, fmt: int, packed: np.ndarray, n: int, k: int, threads: int = 1,
            isa: str = "native") -> ort.InferenceSession:
    """One `op` node (QMatMul or QMatMulSwiGLU over n stacked rows), x [B, S, K], the packed weights an initializer."""
    width = n // 2 if op == NATIVE_SWIGLU_OP else n
    node = helper.make_node(op, ["x", "w"], ["y"], domain=NATIVE_DOMAIN, fmt=fmt, K=k, N=n)
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", width])],
                              initializer=[numpy_helper.from_array(packed, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NATIVE_DOMAIN, 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, library(isa)),
                                providers=["CPUExecutionProvider"])


def gate_up(fmt: int, n: int, k: int, rng: np.random.Generator, wide: bool = False) -> np.ndarray:
    """Packed random gate|up rows (n of them, gate first) in `fmt`. wide: scales over 1e-4 .. 1e2, so the products
    reach past +-87 (where the exp saturates)."""
    per = 256 if fmt == Q6_K else 32
    if wide:
        d = (10 ** rng.uniform(-4, 2, (n, k // per)) * rng.choice([-1, 1], (n, k // per))).astype(np.float16)
    else:
        d = (rng.uniform(0.002, 0.05, (n, k // per)) * rng.choice([-1, 1], (n, k // per))).astype(np.float16)
    if fmt == Q6_K:
        d = (d.astype(np.float32) / 10).astype(np.float16)
        sc = rng.integers(-128, 128, (n, k // 16)).astype(np.int8)
        return pack(fmt, d, rng.integers(0, 64, (n, k)).astype(np.uint8), sc=sc)
    if fmt == Q8_0:
        return pack(fmt, d, rng.integers(-128, 128, (n, k)).astype(np.int8))
    m = rng.uniform(-0.3, 0.1, (n, k // 32)).astype(np.float16) if fmt == Q4_1 else None
    return pack(fmt, d, rng.integers(0, 16, (n, k)).astype(np.uint8), m)


def products(fmt: int, packed: np.ndarray, n: int, k: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g, u: QMatMul's output over the same packed rows, split in halves."""
    y = session(NATIVE_OP, fmt, packed, n, k).run(None, {"x": x})[0]
    return y[..., : n // 2], y[..., n // 2 :]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", [Q4_0, Q4_1, Q8_0, Q6_K])
@pytest.mark.parametrize("batch,seq,wide", [(1, 1, False), (8, 1, False), (1, 7, False), (3, 2, True)])
def test_the_activation_of_qmatmuls_own_products_within_float32_rounding(fmt, batch, seq, wide, threads):
    rng = np.random.default_rng(fmt * 10 + batch)
    n, k = 2 * 208, 512  # several chunks per call (two output groups each), 13 row groups in each half
    packed = gate_up(fmt, n, k, rng, wide)
    x = rng.standard_normal((batch, seq, k)).astype(np.float32)
    got = session(NATIVE_SWIGLU_OP, fmt, packed, n, k, threads).run(None, {"x": x})[0]
    g, u = products(fmt, packed, n, k, x)
    assert got.shape == (batch, seq, n // 2)
    assert np.array_equal(got.view(np.uint32), reference.swiglu(g, u).view(np.uint32))
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = g64 / (1 + np.exp(-g64)) * u64
    err = np.abs(got - want)
    finite = np.isfinite(want) & (np.abs(want) <= np.finfo(np.float32).max)
    exact = finite & (g >= -87)  # below, sigmoid's e^g is taken as e^-87: |silu(g) * u| < |g u| 1.7e-38 either way
    assert np.all(err[exact] <= FLOAT32_ROUNDING * np.abs(want[exact]) + 1e-37)
    assert np.all(err[finite & (g < -87)] <= 1.7e-38 * np.abs(g64 * u64)[finite & (g < -87)])
    if wide:  # the products reached the exp's saturation on both sides
        assert (g < -87).any() and (g > 87).any()


@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_of_a_batch_gets_its_lone_result_bit_for_bit(threads):
    """8 rows (the AMX path where the CPU has it) against each row alone (AVX-512 VNNI or AVX2), on the 1B shape's
    K and a slice of its 8192 gate rows."""
    rng = np.random.default_rng(2)
    n, k = 2 * 1024, 2048
    op = session(NATIVE_SWIGLU_OP, Q4_0, gate_up(Q4_0, n, k, rng), n, k, threads)
    x = rng.standard_normal((8, 1, k)).astype(np.float32)
    batch = op.run(None, {"x": x})[0]
    for r in range(8):
        assert np.array_equal(batch[r : r + 1], op.run(None, {"x": x[r : r + 1]})[0])


def test_every_build_of_the_library_gives_the_same_bits():
    flags = open("/proc/cpuinfo").read() if X86 else ""
    isas = ["scalar", "native"] + [isa for isa, flag in (("avx2", "avx2"), ("avx512", "avx512_vnni"),
                                                          ("amx", "amx_int8")) if X86 and flag in flags]
    rng = np.random.default_rng(4)
    n, k = 2 * 96, 256
    for fmt in (Q4_0, Q6_K):
        packed = gate_up(fmt, n, k, rng, wide=True)
        x = rng.standard_normal((6, 1, k)).astype(np.float32)  # 6 rows: AMX's batched path for Q4_0
        runs = [session(NATIVE_SWIGLU_OP, fmt, packed, n, k, 1, isa).run(None, {"x": x})[0] for isa in isas]
        for isa, other in zip(isas[1:], runs[1:]):
            assert np.array_equal(other.view(np.uint32), runs[0].view(np.uint32)), isa


def test_gate_and_up_of_a_partial_row_group_are_refused_when_the_session_is_made():
    with pytest.raises(Exception, match="gate and up rows of a multiple of 16"):
        session(NATIVE_SWIGLU_OP, Q8_0, np.zeros(100, np.uint8), 2 * 24, 64)


def test_slices_of_native_weights_run_the_fused_activation_and_others_split_silu_and_mul(tiny_llama):
    """With native weights each layer's MLP is down(QMatMulSwiGLU(norm(x))): no Split, Sigmoid or Mul left (the norms
    are the library's too); fp32 and int4 slices keep the composed form."""
    for weights in ("native", "int4", "fp32"):
        shard = load_shard(resolve_model(str(tiny_llama)), LayerRange.full(5), weights)
        model, _ = build_onnx_compact(SliceSpec("layers", 0, 5), shard, attention_form="gqa")
        ops = [n.op_type for n in model.graph.node]
        if weights != "native":
            assert NATIVE_SWIGLU_OP not in ops and ops.count("Sigmoid") == 5 and ops.count("Split") >= 5, weights
            continue
        assert ops.count(NATIVE_SWIGLU_OP) == 5 and not {"Split", "Sigmoid", "Mul"} & set(ops)  # (norms: native)
        readers = {i: n for n in model.graph.node for i in n.input}
        fused = [n for n in model.graph.node if n.op_type == NATIVE_SWIGLU_OP]
        assert all(readers[n.output[0]].op_type == NATIVE_OP for n in fused)  # straight into down_proj
