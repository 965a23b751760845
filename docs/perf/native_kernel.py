"""Microbenchmark of the native quantized matmul (exo_rknpu/native) against onnxruntime's MatMulNBits at accuracy
level 1 (float32 activations: what --weights auto runs today) and, when llama-cpp-python is installed, ggml's own
mul_mat (llama.cpp's CPU library, called through ctypes on a plain context: the same GGUF blocks, its activations
quantized to Q8_0/Q8_1; llama.cpp's model loader may repack Q4_0 for its GEMM, which this does not do), one thread
each, the same weights, timed alternately.

    python docs/perf/native_kernel.py [--fmts Q4_0,Q4_1,Q8_0] [--rows 1,2,4,8] [--rounds 15] [--stream-mb 0]
    python docs/perf/native_kernel.py --builds amx,avx512 [--shapes 2048x2048,...] [--rows 1,2,4,8]

Shapes: the 1B model's (K=2048,N=2048; K=2048,N=8192; K=8192,N=2048) and smollm2-135m's (K=576,N=1536; the head
K=576,N=49152). By default each contender calls one matrix again and again (it stays in L2/L3, like
matmulnbits_rows.py); --stream-mb S rotates over copies totalling about S MB (more than the L3, as a decode step
streams every weight from memory; ORT then holds one session per copy). Prints `uptime` before and after.
--builds A,B,... instead times builds of the native kernel against each other (exo_rknpu.native.build ISA_FLAGS
keys, e.g. the AMX path against the AVX-512 one), alternately, and gives each one's time over the first's.
Q4_0 and Q8_0 are given to MatMulNBits exactly (4 or 8 bits, zero point 8 or 128, float32 scales); Q4_1's minimum
is not a MatMulNBits zero point, so its row uses rounded zero points (the same work, not the same weights). Q6_K
(`--fmts Q6_K`, K a multiple of 256, e.g. the 1B model's head `--shapes 2048x49152`) is given to MatMulNBits as
`--weights native` gave it before the kernel had Q6_K and `auto` still does: exactly, as 8-bit blocks of 16 run as
4-bit blocks over K doubled (quant.split8; its [16x | x] input is made outside the timed call); ggml gets the same
GGUF Q6_K blocks (tests/tiny_models.q6_k_blocks) and quantizes activations to Q8_K.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
from onnx import NodeProto, TensorProto, helper, numpy_helper

from exo_rknpu.model.quant import QTensor, split8, split8_input
from exo_rknpu.native import FORMATS, Q4_1, Q6_K, Q8_0, pack, reference
from exo_rknpu.native.kernel import Native, load, qmatmul

TESTS = Path(__file__).resolve().parents[2] / "tests"

SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (576, 1536), (576, 49152)]


@dataclass
class Weights:
    fmt: int
    d: np.ndarray
    codes: np.ndarray
    m: np.ndarray | None
    sc: np.ndarray | None = None  # Q6_K's int8 sub-block scales


def random_weights(fmt: int, K: int, N: int, rng: np.random.Generator) -> Weights:
    lo, hi = {Q8_0: (-128, 128), Q6_K: (0, 64)}.get(fmt, (0, 16))
    codes = rng.integers(lo, hi, (N, K)).astype(np.int8 if fmt == Q8_0 else np.uint8)
    d = (rng.random((N, K // (256 if fmt == Q6_K else 32))) * 0.02 + 0.001).astype(np.float16)
    m = (-(d.astype(np.float32) * rng.integers(4, 12, d.shape))).astype(np.float16) if fmt == Q4_1 else None
    sc = rng.integers(-128, 128, (N, K // 16)).astype(np.int8) if fmt == Q6_K else None
    return Weights(fmt, d, codes, m, sc)


def q6_k_split8(w: Weights) -> QTensor:
    """Q6_K as the runtime gives it to MatMulNBits (quant.q6_k_exact's 8-bit blocks of 16, then split8)."""
    N, K = w.codes.shape
    scales = np.repeat(w.d.astype(np.float32), 16, axis=1) * w.sc.astype(np.float32)
    q8 = QTensor(8, (N, K), 16, (w.codes + 2).reshape(N, K // 16, 16), scales, np.full((N, K // 16), 34, np.uint8),
                 "Q6_K (exact)", "fp32")
    return split8(q8)


def ort_session(w: Weights) -> ort.InferenceSession:
    """One MatMulNBits node at accuracy level 1 on w (block 32; see the module docstring for Q4_1 and Q6_K)."""
    N, K = w.codes.shape
    if w.fmt == Q6_K:
        q4 = q6_k_split8(w)
        inits = [numpy_helper.from_array(q4.blocks, "B"), numpy_helper.from_array(q4.scales.reshape(-1), "S"),
                 numpy_helper.from_array(q4.zero_points.reshape(-1), "Z")]
        node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=2 * K, N=N,
                                bits=4, block_size=q4.block_size, accuracy_level=1)
        return one_node_session(node, 2 * K, N, inits)
    nb = K // 32
    bits = 8 if w.fmt == Q8_0 else 4
    if bits == 8:
        b = (w.codes.astype(np.int16) + 128).astype(np.uint8).reshape(N, nb, 32)
    else:
        c = w.codes.reshape(N, nb, 16, 2)
        b = (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(w.d.astype(np.float32).reshape(-1), "S")]
    inputs = ["x", "B", "S"]
    if w.fmt == Q4_1:  # weight = d * q + m = d * (q - z) with z = -m / d, rounded into 0..15
        z = np.clip(np.rint(-w.m.astype(np.float32) / w.d.astype(np.float32)), 0, 15).astype(np.uint8)
        z = np.concatenate([z, np.zeros((N, nb % 2), np.uint8)], axis=1).reshape(N, -1, 2)
        inits.append(numpy_helper.from_array((z[..., 0] | (z[..., 1] << 4)).reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=32, accuracy_level=1)
    return one_node_session(node, K, N, inits)


def one_node_session(node: NodeProto, K: int, N: int, inits: list) -> ort.InferenceSession:
    """A session running `node` on x [M, K] -> y [M, N], one thread."""
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def native_call(nat: Native, fmt: int, packed: list[np.ndarray], N: int, K: int, x: np.ndarray) -> Callable[[], None]:
    """One call = quantize x and multiply by the next copy of the weights (what the runtime's op does)."""
    M = x.shape[0]
    qa = np.empty(nat.lib.exo_act_bytes(M, K), np.uint8)
    y = np.empty((M, N), np.float32)
    ptrs = [p.ctypes.data for p in packed]
    turn = [0]

    def call() -> None:
        nat.lib.exo_quantize_act(x.ctypes.data, M, K, qa.ctypes.data)
        nat.lib.exo_qmatmul_rows(fmt, ptrs[turn[0]], N, K, qa.ctypes.data, M, y.ctypes.data, 0, N)
        turn[0] = (turn[0] + 1) % len(ptrs)
    return call


def ort_input(w: Weights, x: np.ndarray) -> np.ndarray:
    """What the MatMulNBits session of w takes for x (Q6_K: split8's [16x | x] per block of 16)."""
    return split8_input(x, 16) if w.fmt == Q6_K else x


def ort_call(sessions: list[ort.InferenceSession], x: np.ndarray) -> Callable[[], None]:
    return rotate([lambda s=s: s.run(None, {"x": x}) for s in sessions])


GGML_TYPES = {0: 2, 1: 3, 2: 8, 3: 14}  # our fmt -> ggml_type (Q4_0, Q4_1, Q8_0, Q6_K)


class GgmlParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """libggml-base and libggml-cpu from the llama_cpp package (not imported: its shared libraries only), or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    if not (lib / "libggml-base.so").exists() or not (lib / "libggml-cpu.so").exists():
        return None
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    vp = ctypes.c_void_p
    base.ggml_init.argtypes, base.ggml_init.restype = [GgmlParams], vp
    base.ggml_new_tensor_2d.argtypes, base.ggml_new_tensor_2d.restype = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], vp
    base.ggml_mul_mat.argtypes, base.ggml_mul_mat.restype = [vp, vp, vp], vp
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [vp], vp
    base.ggml_build_forward_expand.argtypes, base.ggml_build_forward_expand.restype = [vp, vp], None
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [vp], vp
    base.ggml_free.argtypes, base.ggml_free.restype = [vp], None
    cpu.ggml_graph_compute_with_ctx.argtypes, cpu.ggml_graph_compute_with_ctx.restype = [vp, vp, ctypes.c_int], ctypes.c_int
    cpu.ggml_cpu_init.argtypes, cpu.ggml_cpu_init.restype = [], None
    cpu.ggml_cpu_init()
    return base, cpu


def gguf_blocks(w: Weights) -> np.ndarray:
    """w as GGUF/ggml blocks [N, K/32, bytes]: fp16 d (+ fp16 m for Q4_1), then the codes (Q4: k and k+16 share a
    byte, low nibble first; Q8_0: int8)."""
    N, K = w.codes.shape
    if w.fmt == Q6_K:
        sys.path.insert(0, str(TESTS))
        from tiny_models import q6_k_blocks

        return q6_k_blocks(w.d, w.sc, w.codes)
    nb = K // 32
    heads = [w.d] + ([w.m] if w.fmt == Q4_1 else [])
    head = np.concatenate([h.astype("<f2").view(np.uint8).reshape(N, nb, 2) for h in heads], axis=2)
    c = w.codes.reshape(N, nb, 32)
    body = c.view(np.uint8) if w.fmt == Q8_0 else (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)
    return np.concatenate([head, body], axis=2)


class GgmlMatmul:
    """One ggml context holding the weights, x [M, K] and y = mul_mat(w, x), computed on one thread."""

    def __init__(self, libs: tuple[ctypes.CDLL, ctypes.CDLL], w: Weights, x: np.ndarray) -> None:
        self.base, self.cpu = libs
        blocks = gguf_blocks(w)
        N, K = w.codes.shape
        M = x.shape[0]
        self.ctx = self.base.ggml_init(GgmlParams(blocks.nbytes + 4 * (M * K + M * N) + (16 << 20), None, False))
        wt = self.base.ggml_new_tensor_2d(self.ctx, GGML_TYPES[w.fmt], K, N)
        ctypes.memmove(self.base.ggml_get_data(wt), blocks.ctypes.data, blocks.nbytes)
        xt = self.base.ggml_new_tensor_2d(self.ctx, 0, K, M)
        ctypes.memmove(self.base.ggml_get_data(xt), np.ascontiguousarray(x).ctypes.data, x.nbytes)
        self.y = self.base.ggml_mul_mat(self.ctx, wt, xt)
        self.graph = self.base.ggml_new_graph(self.ctx)
        self.base.ggml_build_forward_expand(self.graph, self.y)
        self.shape = (M, N)

    def __call__(self) -> None:
        self.cpu.ggml_graph_compute_with_ctx(self.ctx, self.graph, 1)

    def result(self) -> np.ndarray:
        self()
        out = ctypes.cast(self.base.ggml_get_data(self.y), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(out, self.shape).copy()

    def close(self) -> None:
        self.base.ggml_free(self.ctx)


def rotate(calls: list[Callable[[], None]]) -> Callable[[], None]:
    turn = [0]

    def call() -> None:
        calls[turn[0]]()
        turn[0] = (turn[0] + 1) % len(calls)
    return call


def alternate(calls: list[Callable[[], None]], rounds: int, per_round: int) -> list[float]:
    """Median seconds per call of each contender, timed in alternation (round r: contender 0, then 1, ...)."""
    for c in calls:
        for _ in range(per_round):
            c()
    times = [[] for _ in calls]
    for _ in range(rounds):
        for c, out in zip(calls, times):
            t = time.perf_counter()
            for _ in range(per_round):
                c()
            out.append((time.perf_counter() - t) / per_round)
    return [float(np.median(t)) for t in times]


def compare_builds(builds: list[str], fmts: list[str], shapes: list[tuple[int, int]], rows: list[int],
                   rounds: int, stream_mb: float) -> None:
    """One table row per (fmt, shape, M): each build's ms per call, timed alternately, and its time over the first
    build's; the builds' outputs must be the same bits."""
    nats = [load(b) for b in builds]
    print(f"builds: {', '.join(f'{b} ({n.isa})' for b, n in zip(builds, nats))}; 1 thread; "
          + (f"rotating over ~{stream_mb:.0f} MB of copies" if stream_mb else "one matrix, called repeatedly"))
    print("| fmt | K × N | M | " + " | ".join(f"{b} ms" for b in builds) + " | "
          + " | ".join(f"{b} / {builds[0]}" for b in builds[1:]) + " |")
    print("|---" * (3 + 2 * len(builds) - 1) + "|")
    rng = np.random.default_rng(0)
    for fmt_name in fmts:
        fmt = FORMATS[fmt_name]
        for K, N in shapes:
            w = random_weights(fmt, K, N, rng)
            one = pack(fmt, w.d, w.codes, w.m)
            copies = max(1, int(stream_mb * 1e6 // one.size)) if stream_mb else 1
            packed = [one] + [one.copy() for _ in range(copies - 1)]
            for M in rows:
                x = rng.standard_normal((M, K)).astype(np.float32)
                calls = [native_call(nat, fmt, packed, N, K, x) for nat in nats]
                times = alternate(calls, rounds, max(copies, int(2e-3 / max(1e-6, M * N * K / 50e9))))
                ref = reference.qmatmul(fmt, w.d, w.codes, x, w.m)
                for nat in nats:
                    y = qmatmul(fmt, packed[0], N, K, x, native=nat)
                    same = np.array_equal(y.view(np.uint32), ref.view(np.uint32))
                    assert same, f"{nat.isa} differs from the reference"
                print(f"| {fmt_name} | {K} × {N} | {M} | " + " | ".join(f"{t * 1e3:.3f}" for t in times) + " | "
                      + " | ".join(f"{t / times[0]:.2f}" for t in times[1:]) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fmts", default="Q4_0,Q4_1,Q8_0")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--stream-mb", type=float, default=0.0, help="rotate over copies totalling this many MB")
    p.add_argument("--builds", default="", help="time these native builds against each other instead (amx,avx512)")
    a = p.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if a.builds:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
        compare_builds(a.builds.split(","), a.fmts.split(","), shapes, [int(r) for r in a.rows.split(",")], a.rounds,
                       a.stream_mb)
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        return
    nat = load()
    ggml = ggml_libs()
    print(f"native build: {nat.isa}; onnxruntime {ort.__version__} MatMulNBits accuracy level 1; "
          + ("ggml from llama-cpp-python; " if ggml else "no llama-cpp-python (no ggml column); ") + "1 thread each; "
          + (f"rotating over ~{a.stream_mb:.0f} MB of copies" if a.stream_mb else "one matrix, called repeatedly"))
    print("| fmt | K × N | M | native ms | native GMAC/s | native GB/s | ORT ms | ORT / native | ggml ms | ggml / native |"
          " max rel. diff vs reference: ORT, ggml |")
    print("|---" * 11 + "|")
    rng = np.random.default_rng(0)
    rows = [int(r) for r in a.rows.split(",")]
    for fmt_name in a.fmts.split(","):
        fmt = FORMATS[fmt_name]
        for shape in a.shapes.split(","):
            K, N = (int(v) for v in shape.split("x"))
            w = random_weights(fmt, K, N, rng)
            one = pack(fmt, w.d, w.codes, w.m, w.sc)
            copies = max(1, int(a.stream_mb * 1e6 // one.size)) if a.stream_mb else 1
            packed = [one] + [one.copy() for _ in range(copies - 1)]
            sessions = [ort_session(w) for _ in range(copies)]
            for M in rows:
                x = rng.standard_normal((M, K)).astype(np.float32)
                calls = [native_call(nat, fmt, packed, N, K, x), ort_call(sessions, ort_input(w, x))]
                mats = [GgmlMatmul(ggml, w, x) for _ in range(copies)] if ggml else []
                calls += [rotate(mats)] if mats else []
                per_round = max(copies, int(2e-3 / max(1e-6, M * N * K / 50e9)))
                times = alternate(calls, a.rounds, per_round)
                ref = reference.qmatmul(fmt, w.d, w.codes, x, w.m, w.sc)
                outs = [sessions[0].run(None, {"x": ort_input(w, x)})[0]] + ([mats[0].result()] if mats else [])
                diffs = ", ".join(f"{float(np.abs(o - ref).max() / np.abs(ref).max()):.1e}" for o in outs)
                for mat in mats:
                    mat.close()
                t_ours, t_ort = times[:2]
                ggml_cols = f"{times[2] * 1e3:.3f} | {times[2] / t_ours:.2f}" if mats else "– | –"
                macs = M * N * K
                print(f"| {fmt_name} | {K} × {N} | {M} | {t_ours * 1e3:.3f} | {macs / t_ours / 1e9:.1f} | "
                      f"{one.size / t_ours / 1e9:.1f} | {t_ort * 1e3:.3f} | {t_ort / t_ours:.2f} | {ggml_cols} | "
                      f"{diffs} |", flush=True)
            del sessions, packed
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
