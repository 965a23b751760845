"""`exo-rknpu bench --concurrency N` (no placement): decode throughput of 1, 2, 4, ... N requests in flight at once,
their one-token steps run as one batch (`ShardRunner.forward_batch`, what the engine does with steps that wait
together), against the same requests decoded one after another.

In this process, one shard: for each level n and round, two sets of the n requests (the bench prompt and variants
of it one token longer each, so each is its own request) are prefilled untimed, then decode `gen_tokens` steps
interleaved step by step: each step, one set's n requests take their steps one after another (sequential) and the
other set's take theirs as one batch, in alternating order. So both see the same machine at the same moment (a
shared, busy host's load changes within seconds). Figures are medians over rounds. Aggregate decode tok/s = n *
gen_tokens / decode seconds; per-request latency = the time a request waits for each of its tokens (sequential:
one lone step; batched: one batched step). The same is reported in CPU time (time.process_time: every thread of
this process), which other jobs on a shared machine stretch far less than wall time.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from exo_rknpu.bench.harness import BenchPlan
from exo_rknpu.errors import BenchError
from exo_rknpu.runtime.placement import default_buckets, open_shard
from exo_rknpu.runtime.requests import RequestLimits
from exo_rknpu.runtime.shard import ShardRunner


@dataclass
class Level:
    """Figures of one concurrency level (medians over rounds)."""

    requests: int
    sequential_tok_s: float
    batched_tok_s: float
    gain: float  # batched / sequential aggregate decode
    sequential_latency_ms: float  # per token, per request
    batched_latency_ms: float
    latency_ratio: float  # batched / lone
    same_tokens: bool
    sequential_cpu_ms: float  # CPU time per token of a lone step
    batched_cpu_ms: float  # CPU time of a batched step
    cpu_gain: float  # requests * sequential_cpu_ms / batched_cpu_ms
    cpu_latency_ratio: float  # batched_cpu_ms / sequential_cpu_ms


def levels(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def _prefill(shard: ShardRunner, prompts: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    ids, tokens = [], []
    for p in prompts:
        rid = uuid.uuid4().hex
        logits = shard.forward(rid, np.array([p]), logits="last")
        ids.append(rid)
        tokens.append([int(logits[0, -1].argmax())])
    return ids, tokens


def decode(shard: ShardRunner, prompts: list[list[int]], steps: int) -> tuple[float, float, bool, float, float]:
    """Greedy `steps` tokens for every prompt, one set of requests one after another and another set batched,
    interleaved step by step; (sequential seconds, batched seconds, whether both sets got the same tokens,
    sequential CPU seconds, batched CPU seconds)."""
    seq_ids, seq_tok = _prefill(shard, prompts)
    bat_ids, bat_tok = _prefill(shard, prompts)
    seconds = {"seq": 0.0, "batch": 0.0}
    cpu = {"seq": 0.0, "batch": 0.0}

    def sequential() -> None:
        for rid, tok in zip(seq_ids, seq_tok):
            tok.append(int(shard.forward(rid, np.array([[tok[-1]]]), "last", start=False)[0, -1].argmax()))

    def batched() -> None:
        outs = shard.forward_batch([(rid, np.array([[tok[-1]]])) for rid, tok in zip(bat_ids, bat_tok)], "last")
        for tok, out in zip(bat_tok, outs):
            tok.append(int(out[0, -1].argmax()))

    try:
        for i in range(steps):
            for name, fn in (("seq", sequential), ("batch", batched))[:: 1 if i % 2 == 0 else -1]:
                t, c = time.perf_counter(), time.process_time()
                fn()
                seconds[name] += time.perf_counter() - t
                cpu[name] += time.process_time() - c
        return seconds["seq"], seconds["batch"], seq_tok == bat_tok, cpu["seq"], cpu["batch"]
    finally:
        for rid in seq_ids + bat_ids:
            shard.drop(rid)


def measure_level(shard: ShardRunner, prompts: list[list[int]], steps: int, repeats: int) -> Level:
    n = len(prompts)
    seq_s, bat_s, seq_c, bat_c, same = [], [], [], [], True
    for _ in range(repeats):
        ts, tb, ok, cs, cb = decode(shard, prompts, steps)
        seq_s.append(ts)
        bat_s.append(tb)
        seq_c.append(cs)
        bat_c.append(cb)
        same = same and ok
    ts, tb = statistics.median(seq_s), statistics.median(bat_s)
    lone_ms, batch_ms = ts / (n * steps) * 1e3, tb / steps * 1e3
    lone_cpu, batch_cpu = statistics.median(seq_c) / (n * steps) * 1e3, statistics.median(bat_c) / steps * 1e3
    return Level(n, n * steps / ts, n * steps / tb, ts / tb, lone_ms, batch_ms, batch_ms / lone_ms, same,
                 lone_cpu, batch_cpu, n * lone_cpu / batch_cpu, batch_cpu / lone_cpu)


def run_batching(p: BenchPlan, as_json: bool) -> int:
    """bench --concurrency N without a placement: the table of levels 1, 2, 4, ... N."""
    o = p.options
    assert o.concurrency is not None
    if o.split:
        raise BenchError("--concurrency batches the decode steps of one shard; drop --split")
    full = p.ranges[0]
    opts = {"threads": o.n_threads} if o.backend == "onnx" else {}
    # two sets of up to N live requests at once (sequential and batched, interleaved); their KV memory is what
    # they use (short prompts), not the budget a server reserves
    limits = RequestLimits(max_requests=2 * o.concurrency, max_bytes=1 << 62)
    load_start = os.getloadavg()[0]  # the machine's load (other jobs on the same cores), reported with the figures
    shard = open_shard(p.source, full, o.backend, default_buckets(load_args_of(p), o.max_context), o.layers_per_slice,
                       limits=limits, backend_options=opts, weights=o.weights)
    try:
        if not shard.batches:
            raise BenchError(f"backend {o.backend!r} runs steps one at a time here (it does not batch, or has no batch "
                             f"buckets: w8a8, or a model whose NPU layers keep the seq form); use fp16, onnx or numpy")
        decode(shard, [p.prompt_ids], 2)  # sessions open before timing
        prompts = [p.prompt_ids + [p.prompt_ids[-1]] * i for i in range(o.concurrency)]
        table = [measure_level(shard, prompts[:n], o.gen_tokens, o.repeat) for n in levels(o.concurrency)]
    finally:
        shard.close()
    load_end = os.getloadavg()[0]
    report = {"model": p.source.name, "backend": o.backend, "weights": o.weights, "threads": o.n_threads,
              "prompt_tokens": o.prompt_tokens, "gen_tokens": o.gen_tokens, "repeat": o.repeat,
              "load_1m": load_start, "load_1m_end": load_end, "levels": [asdict(level) for level in table]}
    if as_json:
        print(json.dumps(report))
        return 0
    print(f"{p.source.name}, {o.backend} weights={o.weights}, {o.n_threads} thread(s), prompt {o.prompt_tokens} tokens, "
          f"{o.gen_tokens} decode steps per request (sequential and batched interleaved step by step), medians of "
          f"{o.repeat} rounds; load average {load_start:.1f} -> {load_end:.1f} on {os.cpu_count()} CPUs")
    print(f"{'requests':>8s} {'sequential tok/s':>16s} {'batched tok/s':>13s} {'gain':>6s} "
          f"{'lone ms/token':>13s} {'batched ms/token':>16s} {'latency':>8s} {'same tokens':>11s} "
          f"{'CPU: lone ms':>12s} {'batched ms':>10s} {'gain':>6s} {'latency':>8s}")
    for lv in table:
        print(f"{lv.requests:8d} {lv.sequential_tok_s:16.1f} {lv.batched_tok_s:13.1f} {lv.gain:5.2f}x "
              f"{lv.sequential_latency_ms:13.1f} {lv.batched_latency_ms:16.1f} {lv.latency_ratio:7.2f}x "
              f"{'yes' if lv.same_tokens else 'NO':>11s} {lv.sequential_cpu_ms:12.1f} {lv.batched_cpu_ms:10.1f} "
              f"{lv.cpu_gain:5.2f}x {lv.cpu_latency_ratio:7.2f}x")
    return 0


def load_args_of(p: BenchPlan):
    from exo_rknpu.model.loader import load_args

    return load_args(p.source)
