"""Where one batched decode step goes, by batch size: onnxruntime's kernels by op type (MatMulNBits split by rows
M), the head, Python around the sessions, sampling.

    python docs/perf/batch_profile.py [MODEL] [--threads 1] [--steps 8] [--sizes 1,2,4,8] [--weights auto]

MODEL is an alias or a .gguf / HF folder (default smollm2-135m). For each batch size N: N requests (a 16-token
prompt each, one token apart) are prefilled, then `--steps` decode steps run as one batch each
(`ShardRunner.forward_batch`, what the engine runs) with greedy sampling of every row. Two passes, as
step_profile.py: timed (wall and CPU time per step, time.process_time; time inside each session's run calls) and
profiled (onnxruntime's profiler, kernel time by op type, used as shares of the timed pass's session time).
Prints one markdown table per N and a summary of CPU ms per step and per request.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from step_profile import open_shard  # noqa: E402


def batch_steps(shard, n: int, steps: int, after_prefill=None, on_sample=None) -> list[list[int]]:
    """Prefill n requests, then `steps` batched greedy steps; every request's tokens."""
    from exo_rknpu.runtime.sampling import Sampler

    sampler = Sampler()
    ids = [f"r{i}" for i in range(n)]
    tokens = []
    for i, rid in enumerate(ids):
        tokens.append([sampler(shard.forward(rid, np.asarray([list(range(100, 116 + i))], np.int64), "last"))])
    if after_prefill is not None:
        after_prefill()
    for _ in range(steps):
        outs = shard.forward_batch([(rid, np.asarray([[t[-1]]], np.int64)) for rid, t in zip(ids, tokens)], "last")
        t0 = time.perf_counter()
        for t, out in zip(tokens, outs):
            t.append(sampler(out))
        if on_sample is not None:
            on_sample(time.perf_counter() - t0)
    for rid in ids:
        shard.drop(rid)
    return tokens


def timed(shard, n: int, steps: int) -> dict:
    import onnxruntime as ort

    names = {id(r._open()): name for name, r in shard.runners.items() if hasattr(r, "_open")}
    in_ort: dict[str, float] = collections.defaultdict(float)
    patched = {}
    for meth in ("run", "run_with_iobinding"):
        plain = patched[meth] = getattr(ort.InferenceSession, meth)

        def wrap(self, *a, plain=plain, **k):
            t = time.perf_counter()
            try:
                return plain(self, *a, **k)
            finally:
                in_ort[names.get(id(self), "?")] += time.perf_counter() - t
        setattr(ort.InferenceSession, meth, wrap)
    sampling: list[float] = []
    start = [0.0, 0.0]

    def after_prefill() -> None:
        in_ort.clear()
        start[:] = time.perf_counter(), time.process_time()

    try:
        batch_steps(shard, n, steps, after_prefill, sampling.append)
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    finally:
        for meth, plain in patched.items():
            setattr(ort.InferenceSession, meth, plain)
    return {"wall": wall / steps, "cpu": cpu / steps, "sampling": sum(sampling) / steps,
            "ort": {k: v / steps for k, v in in_ort.items()}}


def profiled(model: str, threads: int, weights: str, n: int, steps: int) -> dict[str, collections.Counter]:
    shard = open_shard(model, threads, weights, profile=True)
    marks = []
    batch_steps(shard, n, steps, after_prefill=lambda: marks.append(time.time_ns() // 1000))
    shares = {}
    for name, runner in shard.runners.items():
        session = getattr(runner, "session", None)
        if session is None:
            continue
        path = Path(session.end_profiling())
        events = json.loads(path.read_text())
        path.unlink()
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        decode_runs = runs[-steps:] if len(runs) >= steps else runs
        first = decode_runs[0]["ts"]
        by_op: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
                op = e["args"]["op_name"]
                if op == "MatMulNBits":
                    shape = e["args"].get("input_type_shape", [{}])[0]
                    dims = next(iter(shape.values()), []) if shape else []
                    rows = int(np.prod(dims[:-1])) if dims else "?"
                    op = f"MatMulNBits M={rows}"
                by_op[op] += e["dur"]
        by_op["(onnxruntime between kernels)"] = max(0, sum(e["dur"] for e in decode_runs) - sum(by_op.values()))
        shares[name] = by_op
    shard.close()
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sizes", default="1,2,4,8")
    p.add_argument("--weights", default="auto")
    a = p.parse_args()
    shard = open_shard(a.model, a.threads, a.weights, profile=False)
    summary = []
    for n in (int(s) for s in a.sizes.split(",")):
        load = os.getloadavg()[0]
        t = timed(shard, n, a.steps)
        shares = profiled(a.model, a.threads, a.weights, n, a.steps)
        rows: list[tuple[str, float]] = []
        for name, by_op in shares.items():
            total = sum(by_op.values()) or 1
            session_ms = t["ort"].get(name, 0.0) * 1000
            for op, us in by_op.most_common():
                rows.append((f"{name}: {op}", session_ms * us / total))
        python = t["wall"] - sum(t["ort"].values()) - t["sampling"]
        rows += [("sampling (greedy, per row)", t["sampling"] * 1000), ("Python (runtime, IO binding)", python * 1000)]
        print(f"\nN={n}: load average {load:.1f}; {a.threads} thread(s); {a.steps} batched steps")
        print(f"wall {t['wall'] * 1000:.1f} ms/step, CPU {t['cpu'] * 1000:.1f} ms/step ({t['cpu'] * 1000 / n:.1f} per request)\n")
        print("| cause | wall ms/step | share | ≈ CPU ms/step |\n|---|---|---|---|")
        for cause, ms in rows:
            share = ms / (t["wall"] * 1000)
            if ms >= 0.05:
                print(f"| {cause} | {ms:.2f} | {100 * share:.0f} % | {share * t['cpu'] * 1000:.2f} |")
        summary.append((n, t["cpu"] * 1000, t["wall"] * 1000, load))
    shard.close()
    print("\n| N | CPU ms/step | x N=1 | CPU ms per request | wall ms/step | load |\n|---|---|---|---|---|---|")
    for n, cpu, wall, load in summary:
        print(f"| {n} | {cpu:.1f} | {cpu / summary[0][1]:.2f} | {cpu / n:.1f} | {wall:.1f} | {load:.1f} |")


if __name__ == "__main__":
    main()
