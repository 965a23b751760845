"""The native kernel inside onnxruntime: the custom op QMatMul (exo_rknpu/native/ort_op.c) in a one-node graph gives
exactly the bits of exo_rknpu.native.reference (docs/native.md), for every format (Q6_K included), one row and
several, with one intra-op thread and two (the rows split over onnxruntime's threads); bad input is one clear error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exo_rknpu.backends.ort import session_options
from exo_rknpu.native import Q4_0, Q4_1, Q6_K, Q8_0, pack, reference
from exo_rknpu.native.build import library
from exo_rknpu.slices.onnx_export import NATIVE_DOMAIN, NATIVE_OP

FMTS = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0}


def random_weights(fmt: int, n: int, k: int, rng: np.random.Generator):
    """(d, codes, m) of a random N x K matrix in `fmt`, scales of the size real models have."""
    d = (rng.uniform(0.002, 0.05, (n, k // 32)) * rng.choice([-1, 1], (n, k // 32))).astype(np.float16)
    codes = rng.integers(-128, 128, (n, k)).astype(np.int8) if fmt == Q8_0 else rng.integers(0, 16, (n, k)).astype(np.uint8)
    m = rng.uniform(-0.3, 0.1, (n, k // 32)).astype(np.float16) if fmt == Q4_1 else None
    return d, codes, m


def qmatmul_session(fmt: int, packed: np.ndarray, n: int, k: int, threads: int) -> ort.InferenceSession:
    """One QMatMul node, x [B, S, K] -> y [B, S, N], the packed weights an initializer (as the exporter writes it)."""
    node = helper.make_node(NATIVE_OP, ["x", "w"], ["y"], domain=NATIVE_DOMAIN, fmt=fmt, K=k, N=n)
    graph = helper.make_graph([node], "qmatmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "K"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
                              initializer=[numpy_helper.from_array(packed, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NATIVE_DOMAIN, 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, library()),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(FMTS))
@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 1), (8, 1), (1, 7)])  # 8 x 1: a batched decode step (AMX)
def test_qmatmul_op_equals_the_reference_bit_for_bit(name, threads, batch, seq):
    fmt, rng = FMTS[name], np.random.default_rng(7)
    n, k = 200, 576  # N not a multiple of the 16-row group, several chunks per call
    d, codes, m = random_weights(fmt, n, k, rng)
    session = qmatmul_session(fmt, pack(fmt, d, codes, m), n, k, threads)
    x = rng.standard_normal((batch, seq, k)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    want = reference.qmatmul(fmt, d, codes, x.reshape(-1, k), m).reshape(batch, seq, n)
    assert y.shape == want.shape and np.array_equal(y.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name,n,k", [("Q4_0", 4099, 64), ("Q4_1", 2100, 1024), ("Q8_0", 2100, 1024)])
def test_a_large_matrix_packs_in_steps_and_splits_over_threads_with_the_same_bits(name, n, k):
    """Large shapes (the head's N >> K; 2100 x 1024 packs in three steps of row groups): many chunks per call,
    each row computed by exactly one of them."""
    fmt, rng = FMTS[name], np.random.default_rng(3)
    d, codes, m = random_weights(fmt, n, k, rng)
    packed = pack(fmt, d, codes, m)
    x = rng.standard_normal((2, 1, k)).astype(np.float32)
    one, two = (qmatmul_session(fmt, packed, n, k, t).run(None, {"x": x})[0] for t in (1, 2))
    assert np.array_equal(one, two)
    assert np.array_equal(one.reshape(2, n), reference.qmatmul(fmt, d, codes, x.reshape(2, k), m))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,seq", [(1, 1), (8, 1), (1, 7)])
def test_qmatmul_op_in_q6_k_equals_the_reference_bit_for_bit(threads, batch, seq):
    rng = np.random.default_rng(6)
    n, k = 2100, 512  # several chunks per call, a partial last row group
    d = (rng.uniform(0.0002, 0.005, (n, k // 256)) * rng.choice([-1, 1], (n, k // 256))).astype(np.float16)
    sc = rng.integers(-128, 128, (n, k // 16)).astype(np.int8)
    codes = rng.integers(0, 64, (n, k)).astype(np.uint8)
    session = qmatmul_session(Q6_K, pack(Q6_K, d, codes, sc=sc), n, k, threads)
    x = rng.standard_normal((batch, seq, k)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    want = reference.qmatmul(Q6_K, d, codes, x.reshape(-1, k), sc=sc).reshape(batch, seq, n)
    assert y.shape == want.shape and np.array_equal(y.view(np.uint32), want.view(np.uint32))


def test_packed_weights_of_the_wrong_size_are_one_clear_error():
    rng = np.random.default_rng(0)
    d, codes, _ = random_weights(Q8_0, 32, 64, rng)
    session = qmatmul_session(Q8_0, pack(Q8_0, d, codes)[:-1], 32, 64, 1)
    with pytest.raises(Exception, match="packed weights are not exo_packed_bytes"):
        session.run(None, {"x": np.zeros((1, 1, 64), np.float32)})


def test_an_input_of_the_wrong_width_is_one_clear_error():
    rng = np.random.default_rng(0)
    d, codes, _ = random_weights(Q8_0, 32, 64, rng)
    session = qmatmul_session(Q8_0, pack(Q8_0, d, codes), 32, 64, 1)
    with pytest.raises(Exception, match="last dimension is not K"):
        session.run(None, {"x": np.zeros((1, 1, 96), np.float32)})


def test_bad_attributes_are_refused_when_the_session_is_made():
    packed = np.zeros(100, np.uint8)
    with pytest.raises(Exception, match="K must be a positive multiple of 32"):
        qmatmul_session(Q8_0, packed, 32, 48, 1)
    with pytest.raises(Exception, match="of 256 for Q6_K"):
        qmatmul_session(Q6_K, packed, 32, 96, 1)
    with pytest.raises(Exception, match="fmt must be 0"):
        qmatmul_session(7, packed, 32, 64, 1)


def test_the_op_is_unknown_without_the_library():
    """A graph holding QMatMul needs the library registered: onnxruntime refuses it otherwise (the backend registers
    it exactly for graphs with native weights)."""
    rng = np.random.default_rng(0)
    d, codes, _ = random_weights(Q8_0, 32, 64, rng)
    node = helper.make_node(NATIVE_OP, ["x", "w"], ["y"], domain=NATIVE_DOMAIN, fmt=Q8_0, K=64, N=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              initializer=[numpy_helper.from_array(pack(Q8_0, d, codes), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NATIVE_DOMAIN, 1)])
    model.ir_version = 8
    with pytest.raises(Exception, match="QMatMul"):
        ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    assert isinstance(onnx.load_from_string(model.SerializeToString()), onnx.ModelProto)
