"""How onnxruntime's MatMulNBits costs grow with the rows M of its input: one op alone, random 4-bit weights, CPU time
(time.process_time) of M rows as a multiple of one row's, for the 1B shape's matrices.

    python docs/perf/matmulnbits_rows.py [--threads 1] [--level 1] [--block 32] [--reps 10]

Level 1 (float32 activations, what --weights auto runs) has a one-row kernel; from two rows on onnxruntime 1.32
widens the weights to float32 and runs SGEMM (docs/performance.md, "Where a batched step goes"). Also prints whether
row 0 of an 8-row call equals the one-row call bit for bit. The weights stay in cache here (one matrix, called
again and again): in a model, where each step streams every weight from memory, one row costs relatively more.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (K, N, block, zero points): q/k/v stacked, o, gate/up stacked, down; the 1B Q4_0 GGUF's head (Q6_K kept exactly:
# 8-bit blocks of 16 as 4-bit blocks over K doubled, with zero points)
SHAPES = [(2048, 3072, None, False), (2048, 2048, None, False), (2048, 16384, None, False), (8192, 2048, None, False),
          (4096, 49152, 16, True)]
ROWS = (1, 2, 3, 4, 5, 6, 8)


def session(k: int, n: int, block: int, zero_points: bool, level: int, threads: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    nb = k // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, nb, block // 2), dtype=np.uint8), "B"),
             numpy_helper.from_array((rng.random(n * nb) * 0.01).astype(np.float32), "S")]
    inputs = ["x", "B", "S"]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (n * ((nb + 1) // 2),), dtype=np.uint8), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def cpu_ms(s: ort.InferenceSession, x: np.ndarray, reps: int) -> float:
    s.run(None, {"x": x})
    t = time.process_time()
    for _ in range(reps):
        s.run(None, {"x": x})
    return (time.process_time() - t) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--level", type=int, default=1)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    print(f"accuracy level {a.level}, {a.threads} thread(s); CPU time of M rows / one row")
    print("| K × N (block) | one row ms | " + " | ".join(f"M = {m}" for m in ROWS[1:]) + " | M=8 row 0 == one row |")
    print("|---" * (len(ROWS) + 2) + "|")
    for k, n, block, zp in SHAPES:
        s = session(k, n, block or a.block, zp, a.level, a.threads)
        x = np.random.default_rng(1).standard_normal((max(ROWS), k)).astype(np.float32)
        times = [cpu_ms(s, x[:m], a.reps) for m in ROWS]
        same = np.array_equal(s.run(None, {"x": x})[0][0], s.run(None, {"x": x[:1]})[0][0])
        print(f"| {k} × {n} ({block or a.block}{', zero points' if zp else ''}) | {times[0]:.2f} | "
              + " | ".join(f"{t / times[0]:.2f}" for t in times[1:]) + f" | {same} |")


if __name__ == "__main__":
    main()
