"""Bit-level check of the onnxruntime kernels behind each --weights form: run on two machines, compare the outputs.

Each case is one op on fixed inputs (made from integers, so both machines build the same bits) at smollm2-135m's
shapes, one thread: MatMulNBits with float32 activations (accuracy_level 1: auto's 4-bit blocks, and split8's
8-bit ones as 4-bit blocks over K doubled), the ReduceSum + MatMul of Q4_1's per-block mins, float32 MatMul with a
constant (prepacked) and a computed right side (fp32 weights; attention), the int8-activation forms (int4, int8)
for contrast, and the float ops every form runs around them (the RMS norm's mean of squares, SiLU's Sigmoid,
attention's Softmax: what feeds --weights native's int8 step); M=1 is a decode step, M=7 a prefill. scripts/arm64-emulation.sh runs it on x86 and on the emulated
Cortex-A76 and prints the comparison (docs/design.md#weights reads it); an AVX2-only x86-64 is emulated on an
AVX-512 machine by `qemu-x86_64-static -cpu Haswell-noTSX PYTHON docs/perf/isa_ops.py run OUT.npz`.

    python docs/perf/isa_ops.py run OUT.npz        # this machine's outputs
    python docs/perf/isa_ops.py compare A.npz B.npz
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exo_rknpu.model.quant import quantize, split8, split8_input

K, N, BLOCK = 576, 1536, 32  # smollm2-135m: hidden 576, intermediate 1536


def _floats(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Float32 values from integers: numpy's integer draws and one correctly rounded division are the same bits
    on every machine (its float draws need not be)."""
    return (rng.integers(-(1 << 20), 1 << 20, size=shape) * (scale / (1 << 20))).astype(np.float32)


def _run(nodes: list, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray]) -> np.ndarray:
    graph = helper.make_graph(
        nodes, "case",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["y"], inputs)[0]


def _nbits(x: np.ndarray, w: np.ndarray, bits: int, block: int, level: int, as_split8: bool = False) -> np.ndarray:
    q = quantize(w, bits, block, kernel="fp32" if as_split8 else "int8")  # auto's 8-bit blocks (zero points pairable by split8)
    if as_split8:
        q, x = split8(q), split8_input(x, block)
    consts = {"b": q.blocks, "s": q.scales, "z": q.zero_points}
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=q.shape[1],
                            N=q.shape[0], bits=q.bits, block_size=q.block_size, accuracy_level=level)
    return _run([node], {"x": x}, consts)


def cases() -> dict[str, Callable[[], np.ndarray]]:
    rng = np.random.default_rng(19)
    w = _floats(rng, (N, K), 0.05)
    x1, x7 = _floats(rng, (1, K), 2.0), _floats(rng, (7, K), 2.0)
    kv = _floats(rng, (K, 300), 1.0)  # a computed right side: attention's keys over 300 positions
    mins = _floats(rng, (K // BLOCK, N), 0.01)
    scores = _floats(rng, (7, 300), 8.0)  # attention scores of 7 queries over 300 positions
    mm = lambda x: _run([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": x}, {"w": np.ascontiguousarray(w.T)})
    return {
        "auto 4-bit, float32 activations (level 1), M=1": lambda: _nbits(x1, w, 4, BLOCK, 1),
        "auto 4-bit, float32 activations (level 1), M=7": lambda: _nbits(x7, w, 4, BLOCK, 1),
        "auto 8-bit as split8 (level 1), M=1": lambda: _nbits(x1, w, 8, 64, 1, as_split8=True),
        "auto Q4_1 mins: ReduceSum of blocks, M=1": lambda: _run(
            [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
            {"x": x1.reshape(1, K // BLOCK, BLOCK)}, {"axes": np.array([-1], np.int64)}),
        "auto Q4_1 mins: blocksum @ mins (MatMul), M=1": lambda: _run(
            [helper.make_node("MatMul", ["x", "m"], ["y"])], {"x": x1.reshape(1, K)[:, : K // BLOCK]}, {"m": mins}),
        "fp32 MatMul, constant weights, M=1": lambda: mm(x1),
        "fp32 MatMul, constant weights, M=7": lambda: mm(x7),
        "fp32 MatMul, computed right side (attention), M=1": lambda: _run(
            [helper.make_node("MatMul", ["x", "k"], ["y"])], {"x": x1, "k": kv}, {}),
        "int4 (int8 activations, level 4), M=1": lambda: _nbits(x1, w, 4, BLOCK, 4),
        "int8 (int8 activations, level 4), M=1": lambda: _nbits(x1, w, 8, BLOCK, 4),
        "norm: ReduceMean of Pow(x, 2), M=7": lambda: _run(
            [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["y"], axes=[-1], keepdims=1)],
            {"x": x7}, {"two": np.array(2.0, np.float32)}),
        "SiLU's Sigmoid, M=7": lambda: _run([helper.make_node("Sigmoid", ["x"], ["y"])], {"x": x7}, {}),
        "attention's Softmax over 300 positions, M=7": lambda: _run(
            [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], {"x": scores}, {}),
    }


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """One line per case: identical bits, or how far apart (max |a-b| over max |a|, and elements that differ)."""
    lines = []
    for name in a:
        x, y = a[name], b[name]
        if x.tobytes() == y.tobytes():
            lines.append(f"identical bits     {name}")
        else:
            rel = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30))
            lines.append(f"differ ({rel:.1e}, {np.count_nonzero(x != y)}/{x.size})  {name}")
    return lines


def main(argv: list[str]) -> None:
    if argv[:1] == ["run"] and len(argv) == 2:
        np.savez(argv[1], **{name: f() for name, f in cases().items()})
    elif argv[:1] == ["compare"] and len(argv) == 3:
        with np.load(argv[1]) as a, np.load(argv[2]) as b:
            print("\n".join(compare(dict(a), dict(b))))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
