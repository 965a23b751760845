"""The native library's attention op (exo_rknpu.Attention, docs/native.md "Attention") against onnxruntime's
GroupQueryAttention, timed alternately.

    python docs/perf/native_attention.py op [--threads 2] [--rounds 8] [--prefill 128]
    python docs/perf/native_attention.py steps MODEL [--threads 2] [--rounds 6]
    python docs/perf/native_attention.py calls MODEL [--threads 2] [--sizes 1,8]

`op`: one node of the 1B shape (32 heads, 8 kv heads, head_dim 64), caches bound in place as the runner binds them,
median µs per call with the caches warm and evicted (a 16 MB copy before each call, as a decode step's matmuls evict
them), for one request, 8 at 20-35 positions, 8 at 100, and prefills of --prefill tokens (3 calls a round past 128).
`steps`: one process, two shards of MODEL at --weights native, the first with the native op (the default), the
second with GroupQueryAttention (its own prepared-slice cache); batched decode steps of 1 and 8 requests (prompts
of 16 + i tokens as batch_profile.py's, 16 steps) alternate between them, so both see the same machine. Wall and
CPU ms per step.
`calls`: the attention op's kernel time per call inside MODEL at --weights native (onnxruntime's profiler, the last
16 of batch_profile.py's batched steps of N requests): whichever op the build exports; run it on two builds
alternately to compare them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

NH, KV, HD = 32, 8, 64
NAMES = ["qkv", "past_k", "past_v", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]


def op_session(op: str, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exo_rknpu.backends.ort import session_options
    from exo_rknpu.native.build import library
    from exo_rknpu.slices.onnx_export import MS_DOMAIN, NATIVE_ATTENTION_OP, NATIVE_DOMAIN

    outs = ["out", "present_k", "present_v"]
    if op == "gqa":
        node = helper.make_node("GroupQueryAttention", NAMES[:1] + ["", ""] + NAMES[1:], outs, domain=MS_DOMAIN,
                                num_heads=NH, kv_num_heads=KV, scale=HD ** -0.5, do_rotary=1, rotary_interleaved=0)
    else:
        node = helper.make_node(NATIVE_ATTENTION_OP, NAMES, outs, domain=NATIVE_DOMAIN, num_heads=NH, kv_num_heads=KV,
                                scale=HD ** -0.5)
    f32 = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("qkv", f32, ["B", "S", (NH + 2 * KV) * HD])]
    ins += [helper.make_tensor_value_info(n, f32, ["B", KV, "C", HD]) for n in NAMES[1:3]]
    ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    ins += [helper.make_tensor_value_info(n, f32, ["P", HD // 2]) for n in NAMES[5:]]
    graph_outs = [helper.make_tensor_value_info("out", f32, ["B", "S", NH * HD])]
    graph_outs += [helper.make_tensor_value_info(n, f32, ["B", KV, "C", HD]) for n in outs[1:]]
    model = helper.make_model(helper.make_graph([node], "attention", ins, graph_outs), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(NATIVE_DOMAIN, 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, library()),
                                providers=["CPUExecutionProvider"])


def bound_call(session, past: list[int], seq: int, capacity: int):
    """An IO binding of one call (caches bound to the same memory as input and output) and what it points into."""
    rng = np.random.default_rng(0)
    b = len(past)
    ang = np.arange(2112)[:, None] * (10000.0 ** (-np.arange(HD // 2) / (HD // 2)))[None]
    keep = {"qkv": rng.standard_normal((b, seq, (NH + 2 * KV) * HD), np.float32),
            "seqlens_k": np.array(past, np.int32) + seq - 1,
            "total_sequence_length": np.array(max(past) + seq, np.int32),
            "cos_cache": np.cos(ang).astype(np.float32), "sin_cache": np.sin(ang).astype(np.float32),
            "out": np.empty((b, seq, NH * HD), np.float32)}
    io = session.io_binding()
    for name in ("past_k", "past_v"):
        keep[name] = cache = rng.standard_normal((b, KV, capacity, HD), np.float32)
        io.bind_input(name, "cpu", 0, np.float32, list(cache.shape), cache.ctypes.data)
        io.bind_output(name.replace("past", "present"), "cpu", 0, np.float32, list(cache.shape), cache.ctypes.data)
    for name in ("qkv", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"):
        io.bind_cpu_input(name, keep[name])
    io.bind_output("out", "cpu", 0, np.float32, list(keep["out"].shape), keep["out"].ctypes.data)
    return io, keep


def time_op(threads: int, rounds: int, prefills: list[int]) -> None:
    sessions = {op: op_session(op, threads) for op in ("gqa", "native")}
    big, dst = np.ones(16 << 20, np.uint8), np.empty(16 << 20, np.uint8)
    cases = {"1 request at 28": ([28], 1, 64), "8 requests at 20-35": ([20, 28, 35, 22, 25, 30, 33, 27], 1, 64),
             "8 requests at 100": ([100] * 8, 1, 128)}
    cases.update({f"prefill of {n}": ([0], n, max(n, 512)) for n in prefills})
    print(f"load {os.getloadavg()[0]:.1f}; {threads} thread(s); median µs per call, warm / caches evicted")
    for label, (past, seq, capacity) in cases.items():
        times: dict[str, dict[bool, list[float]]] = {op: {False: [], True: []} for op in sessions}
        for _ in range(rounds):
            for op, session in sessions.items():
                io, keep = bound_call(session, past, seq, capacity)
                for evict in (False, True):
                    ts = []
                    for _ in range(20 if seq <= 128 else 3):
                        if evict:
                            np.copyto(dst, big)
                        t = time.perf_counter()
                        session.run_with_iobinding(io)
                        ts.append(time.perf_counter() - t)
                    times[op][evict].append(float(np.median(ts)) * 1e6)
        cells = [f"{op} {np.median(t[False]):.0f} / {np.median(t[True]):.0f}" for op, t in times.items()]
        print(f"{label}: " + ", ".join(cells))
    print(f"load {os.getloadavg()[0]:.1f}")


def open_native(model: str, threads: int, cache_dir: str | None):
    from exo_rknpu.model.base import LayerRange
    from exo_rknpu.model.loader import load_header
    from exo_rknpu.model.zoo import resolve_model
    from exo_rknpu.runtime.placement import default_buckets, open_plan, plan_shards

    src = resolve_model(model)
    header = load_header(src)
    args = header.args
    plan = plan_shards(None, args, [LayerRange.full(args.num_hidden_layers)], "onnx", default_buckets(args),
                       weights="native")[0]
    opts = {"threads": threads} | ({"cache_dir": cache_dir} if cache_dir else {})
    return open_plan(header, plan, backend_options=opts)


def time_steps(model: str, threads: int, rounds: int) -> None:
    import exo_rknpu.slices.onnx_export as onnx_export
    from exo_rknpu.runtime.sampling import Sampler

    shards = {"native": open_native(model, threads, None)}

    class GqaOps(onnx_export.OnnxOps):  # the exporter's choice overridden: GroupQueryAttention with native linears
        native_attention = property(lambda self: False, lambda self, value: None)

    onnx_export.OnnxOps = GqaOps  # type: ignore[misc]
    shards["gqa"] = open_native(model, threads, tempfile.mkdtemp(prefix="gqa_slices_"))
    sampler, times = Sampler(), {(op, n): [] for op in shards for n in (1, 8)}
    load = os.getloadavg()[0]
    for r in range(rounds):
        for n in (1, 8):
            for op in (list(shards) if r % 2 == 0 else list(shards)[::-1]):
                shard, ids = shards[op], [f"r{i}" for i in range(n)]
                tokens = [[sampler(shard.forward(rid, np.asarray([list(range(100, 116 + i))]), "last"))]
                          for i, rid in enumerate(ids)]
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(16):
                    outs = shard.forward_batch([(rid, np.asarray([[t[-1]]])) for rid, t in zip(ids, tokens)], "last")
                    for t, out in zip(tokens, outs):
                        t.append(sampler(out))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                times[(op, n)].append((wall * 1000 / 16, cpu * 1000 / 16))
                for rid in ids:
                    shard.drop(rid)
    print(f"{model}: {threads} thread(s), {rounds} rounds, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for (op, n), ts in times.items():
        wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
        print(f"{op} N={n}: wall ms/step median {np.median(wall):.1f} ({min(wall):.1f}-{max(wall):.1f}), "
              f"CPU {np.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f})")


def time_calls(model: str, threads: int, sizes: list[int]) -> None:
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from batch_profile import batch_steps
    from step_profile import open_shard

    for n in sizes:
        shard, load = open_shard(model, threads, "native", profile=True), os.getloadavg()[0]
        batch_steps(shard, n, 16)
        durations, ops = [], set()
        for runner in shard.runners.values():
            if getattr(runner, "session", None) is None:
                continue
            events = json.loads(Path(runner.session.end_profiling()).read_text())
            runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-16:]
            for e in events:
                op = e.get("args", {}).get("op_name")
                if e.get("cat") == "Node" and op in ("GroupQueryAttention", "Attention") and e["ts"] >= runs[0]["ts"]:
                    durations.append(e["dur"])
                    ops.add(op)
        d = np.array(durations)
        print(f"N={n} ({', '.join(sorted(ops))}, load {load:.1f}): {len(d)} calls, median {np.median(d):.0f} µs, "
              f"p10 {np.percentile(d, 10):.0f}, {d.sum() / 16 / 1000:.2f} ms per step")
        shard.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["op", "steps", "calls"])
    p.add_argument("model", nargs="?", default="/tmp/perf/1b-q4_0.gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--sizes", default="1,8")
    p.add_argument("--prefill", default="128")
    a = p.parse_args()
    if a.what == "op":
        time_op(a.threads, a.rounds or 8, [int(x) for x in a.prefill.split(",")])
    elif a.what == "steps":
        time_steps(a.model, a.threads, a.rounds or 6)
    else:
        time_calls(a.model, a.threads, [int(x) for x in a.sizes.split(",")])


if __name__ == "__main__":
    main()
