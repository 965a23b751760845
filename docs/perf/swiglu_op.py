"""The MLP's gate/up and activation on the 1B shape (K 2048, gate and up 8192 rows each, Q4_0, random weights) as
the exporter writes it for native weights (one QMatMulSwiGLU) against the composed form it replaced (QMatMul, Split,
x * Sigmoid(x), Mul), one graph each, the two alternately; median wall and CPU µs per call by rows M.

    python docs/perf/swiglu_op.py [--threads 2] [--rows 1,8] [--calls 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exo_rknpu.backends.ort import session_options
from exo_rknpu.native import Q4_0, pack
from exo_rknpu.native.build import library
from exo_rknpu.slices.onnx_export import NATIVE_DOMAIN, NATIVE_OP, NATIVE_SWIGLU_OP

K, HALF = 2048, 8192


def graph(fused: bool, packed: np.ndarray, threads: int) -> ort.InferenceSession:
    attrs = {"domain": NATIVE_DOMAIN, "fmt": Q4_0, "K": K, "N": 2 * HALF}
    if fused:
        nodes = [helper.make_node(NATIVE_SWIGLU_OP, ["x", "w"], ["y"], **attrs)]
    else:
        nodes = [helper.make_node(NATIVE_OP, ["x", "w"], ["gu"], **attrs),
                 helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=-1),
                 helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["silu"]),
                 helper.make_node("Mul", ["silu", "u"], ["y"])]
    init = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(np.array([HALF, HALF], np.int64), "sizes")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 1, HALF])], initializer=init)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NATIVE_DOMAIN, 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, library()),
                                providers=["CPUExecutionProvider"])


def timed(session: ort.InferenceSession, x: np.ndarray, calls: int) -> tuple[float, float]:
    """(wall, CPU) µs per call over `calls` calls."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(calls):
        session.run(None, {"x": x})
    return (time.perf_counter() - w) / calls * 1e6, (time.process_time() - c) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    d = (rng.uniform(0.002, 0.05, (2 * HALF, K // 32)) * rng.choice([-1, 1], (2 * HALF, K // 32))).astype(np.float16)
    packed = pack(Q4_0, d, rng.integers(0, 16, (2 * HALF, K)).astype(np.uint8))
    sessions = {name: graph(name == "fused", packed, a.threads) for name in ("composed", "fused")}
    print(f"load average {os.getloadavg()[0]:.1f}; {a.threads} thread(s); medians of {a.rounds} rounds of {a.calls}")
    for m in (int(v) for v in a.rows.split(",")):
        x = rng.standard_normal((m, 1, K)).astype(np.float32)
        composed, fused = (s.run(None, {"x": x})[0] for s in sessions.values())
        assert np.abs(fused - composed).max() <= 1e-6 * np.abs(composed).max()  # float32 rounding apart
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sessions}
        for _ in range(a.rounds):
            for name, s in sessions.items():
                runs[name].append(timed(s, x, a.calls))
        for name, r in runs.items():
            wall, cpu = (statistics.median(v[i] for v in r) for i in (0, 1))
            print(f"M={m} {name:9s} wall {wall:7.1f} µs  CPU {cpu:7.1f} µs")


if __name__ == "__main__":
    main()
