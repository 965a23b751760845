"""Where one decode step of ours goes, by cause: onnxruntime's kernels by op type, the head, Python, sampling.

    python docs/perf/step_profile.py [MODEL] [--threads 1] [--steps 64] [--weights auto]

MODEL is an alias or a .gguf / HF folder (default smollm2-135m). Two passes over the same request shape (a 32-token
prompt, then `--steps` greedy decode steps), each on a shard opened as `exo-rknpu bench` opens it:

1. timed: wall and CPU time (`time.process_time`, every thread of this process) per step; the time spent inside
   onnxruntime's run calls per session; the sampler's time; Python = the step's wall time minus both.
2. profiled (onnxruntime's own profiler): kernel time by op type over the decode steps only, used as each op
   type's share of its session's run time in pass 1 (the profiler's absolute times include its own overhead).

On a loaded machine wall times stretch; `--threads 1` makes CPU time and wall time measure the same work, which
is how the docs/performance.md table was made. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np


def open_shard(model: str, threads: int, weights: str, profile: bool):
    import exo_rknpu.backends.ort as ort_backend
    from exo_rknpu.model.base import LayerRange
    from exo_rknpu.model.loader import load_header
    from exo_rknpu.model.zoo import resolve_model
    from exo_rknpu.rknn.options import backend_options
    from exo_rknpu.runtime.placement import default_buckets, open_plan, plan_shards

    plain = ort_backend.session_options

    def options(n: int, custom_ops=None):
        opts = plain(n, custom_ops)
        opts.enable_profiling = profile
        opts.profile_file_prefix = f"/tmp/step_profile_{os.getpid()}"
        return opts

    ort_backend.session_options = options
    src = resolve_model(model)
    header = load_header(src)
    args = header.args
    plans = plan_shards(None, args, [LayerRange.full(args.num_hidden_layers)], "onnx", default_buckets(args), weights=weights)
    shard = open_plan(header, plans[0], backend_options=backend_options("onnx", threads=threads))
    for runner in shard.runners.values():  # sessions open on their first call: open them with these options
        if hasattr(runner, "_open"):
            runner._open()
    ort_backend.session_options = plain
    return shard


def decode(shard, steps: int, on_step=None, after_prefill=None) -> list[int]:
    from exo_rknpu.runtime.sampling import Sampler

    sampler = Sampler()
    token = sampler(shard.forward("p", np.asarray([list(range(100, 132))], np.int64), "last"))
    ids = [token]
    if after_prefill is not None:
        after_prefill()
    for _ in range(steps):
        logits = shard.forward("p", np.asarray([[token]], np.int64), "last")
        t = time.perf_counter()
        token = sampler(logits)
        if on_step is not None:
            on_step(time.perf_counter() - t)
        ids.append(token)
    shard.drop("p")
    return ids


def timed(shard, drive, steps: int) -> dict:
    """Per-step wall and CPU time of `steps` decode steps, time inside each session's run calls, and sampling time.
    drive(on_sample, after_prefill) runs them on `shard`, calling after_prefill once the prefill is done and
    on_sample(seconds) after each step's sampling."""
    import onnxruntime as ort

    in_ort: dict[str, float] = collections.defaultdict(float)
    names = {}
    for name, runner in shard.runners.items():
        if hasattr(runner, "_open"):
            names[id(runner._open())] = name
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

    def after_prefill() -> None:  # the decode steps only
        in_ort.clear()
        start[:] = time.perf_counter(), time.process_time()

    try:
        drive(sampling.append, after_prefill)
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    finally:
        for meth, plain in patched.items():
            setattr(ort.InferenceSession, meth, plain)
    return {"wall": wall / steps, "cpu": cpu / steps, "sampling": sum(sampling) / steps,
            "ort": {n: v / steps for n, v in in_ort.items()}}


def timed_pass(model: str, threads: int, weights: str, steps: int) -> dict:
    shard = open_shard(model, threads, weights, profile=False)
    t = timed(shard, lambda on_sample, after_prefill: decode(shard, steps, on_sample, after_prefill), steps)
    shard.close()
    return t


def print_causes(t: dict, shares: dict[str, collections.Counter], sampling: str, python: str) -> None:
    """The markdown table of a step by cause: each session's time from the timed pass `t`, split by the profiled
    pass's `shares`; then sampling and Python (the wall time left)."""
    rows: list[tuple[str, float]] = []
    for name, by_op in shares.items():
        total = sum(by_op.values()) or 1
        session_ms = t["ort"].get(name, 0.0) * 1000
        for op, us in by_op.most_common():
            rows.append((f"{name}: {op}", session_ms * us / total))
    rest = t["wall"] - sum(t["ort"].values()) - t["sampling"]
    rows += [(sampling, t["sampling"] * 1000), (python, rest * 1000)]
    # on a loaded machine the wall time stretches; its shares times the CPU time estimate what a quiet core spends
    print("| cause | wall ms/step | share | ≈ CPU ms/step |\n|---|---|---|---|")
    for cause, ms in rows:
        share = ms / (t["wall"] * 1000)
        if ms >= 0.05:
            print(f"| {cause} | {ms:.2f} | {100 * share:.0f} % | {share * t['cpu'] * 1000:.2f} |")


def kernel_times(session, first_run: int, rows: bool = False) -> collections.Counter:
    """Kernel time (µs) by op type over the session's runs from its `first_run`-th on (negative: from the end), and
    the rest of those runs' time as "(onnxruntime between kernels)"; rows: MatMulNBits by its input's rows M."""
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][first_run:]
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"]:
            op = e["args"]["op_name"]
            if rows and op == "MatMulNBits":
                shape = next(iter(e["args"]["input_type_shape"][0].values()))
                op = f"MatMulNBits M={int(np.prod(shape[:-1]))}"
            by_op[op] += e["dur"]
    by_op["(onnxruntime between kernels)"] = max(0, sum(r["dur"] for r in runs) - sum(by_op.values()))
    return by_op


def profile_shares(shard, first_run: int, rows: bool = False) -> dict[str, collections.Counter]:
    """kernel_times of every session of a shard opened with profile=True, by slice name; closes the shard."""
    shares = {name: kernel_times(r.session, first_run, rows) for name, r in shard.runners.items()
              if getattr(r, "session", None) is not None}
    shard.close()
    return shares


def profiled_pass(model: str, threads: int, weights: str, steps: int) -> dict[str, collections.Counter]:
    shard = open_shard(model, threads, weights, profile=True)
    decode(shard, steps)
    return profile_shares(shard, 1)  # the first run is the prefill


def profile_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The options every profile script here takes: model, threads, decode steps, weights form."""
    p = argparse.ArgumentParser(description=description.split("\n")[0])
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--weights", default="auto")
    return p


def main() -> None:
    a = profile_parser(__doc__, 64).parse_args()
    t = timed_pass(a.model, a.threads, a.weights, a.steps)
    shares = profiled_pass(a.model, a.threads, a.weights, a.steps)
    print(f"load average {os.getloadavg()[0]:.1f}; {a.threads} thread(s); {a.steps} steps")
    print(f"wall {t['wall'] * 1000:.2f} ms/step ({1 / t['wall']:.1f} tok/s), CPU {t['cpu'] * 1000:.2f} ms/step\n")
    # each session's decode-step time from pass 1, split by the profile's decode-only shares of pass 2
    print_causes(t, shares, "sampling (greedy)", "Python (runtime, IO binding, embedding)")

if __name__ == "__main__":
    main()
