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

import collections
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from step_profile import open_shard, print_causes, profile_parser, profile_shares, timed  # noqa: E402


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


def profiled(model: str, threads: int, weights: str, n: int, steps: int) -> dict[str, collections.Counter]:
    shard = open_shard(model, threads, weights, profile=True)
    batch_steps(shard, n, steps)
    # the last `steps` runs of each session are decode steps (a batch of two split per row runs twice a step: its
    # last `steps` runs are then the last steps/2 steps, the same shares)
    return profile_shares(shard, -steps, rows=True)


def main() -> None:
    p = profile_parser(__doc__, 8)
    p.add_argument("--sizes", default="1,2,4,8")
    a = p.parse_args()
    shard = open_shard(a.model, a.threads, a.weights, profile=False)
    summary = []
    for n in (int(s) for s in a.sizes.split(",")):
        load = os.getloadavg()[0]
        t = timed(shard, lambda on_sample, after_prefill: batch_steps(shard, n, a.steps, after_prefill, on_sample), a.steps)
        shares = profiled(a.model, a.threads, a.weights, n, a.steps)
        print(f"\nN={n}: load average {load:.1f}; {a.threads} thread(s); {a.steps} batched steps")
        print(f"wall {t['wall'] * 1000:.1f} ms/step, CPU {t['cpu'] * 1000:.1f} ms/step ({t['cpu'] * 1000 / n:.1f} per request)\n")
        print_causes(t, shares, "sampling (greedy, per row)", "Python (runtime, IO binding)")
        summary.append((n, t["cpu"] * 1000, t["wall"] * 1000, load))
    shard.close()
    print("\n| N | CPU ms/step | x N=1 | CPU ms per request | wall ms/step | load |\n|---|---|---|---|---|---|")
    for n, cpu, wall, load in summary:
        print(f"| {n} | {cpu:.1f} | {cpu / summary[0][1]:.2f} | {cpu / n:.1f} | {wall:.1f} | {load:.1f} |")


if __name__ == "__main__":
    main()
