"""`exo-rknpu bench --placement PLAN --concurrency N`: throughput of N concurrent requests through a placement,
pipelined per device (runtime/stages.py) vs served one call at a time, and the same estimated for a board.
Both run in this process (they share the machine alternately, not a worker process each as `bench`'s contenders do).

Runs alternate (serial, pipelined, serial, ...) and the ratio of medians is reported: the machine is shared and
noisy. Without an NPU the NPU devices are emulated (one CPU thread each), so the figure says how well the stages
overlap here, never how fast an NPU is.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from dataclasses import dataclass

from exo_rknpu.bench.harness import BenchPlan
from exo_rknpu.runtime.placement import ResolvedPlan, open_plan
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.sampling import Sampler
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.runtime.stages import StagedShard


class SerialShard:
    """The baseline: one call at a time through the whole shard (what a single worker thread gives)."""

    def __init__(self, runner: ShardRunner) -> None:
        self.runner, self.lock = runner, threading.Lock()
        self.layer_range = runner.layer_range

    def forward(self, request_id, x, logits="all"):
        with self.lock:
            return self.runner.forward(request_id, x, logits=logits)

    def drop(self, request_id: str) -> None:
        with self.lock:
            self.runner.drop(request_id)

    def close(self) -> None:
        self.runner.close()


def concurrent_tokens_per_s(shard, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """Generate `tokens` greedy tokens for every prompt at once (a thread each); total tokens per wall second."""
    ring = LocalRing([shard])
    out: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        rid = uuid.uuid4().hex
        try:
            out[i] = list(ring.generate(rid, prompts[i], tokens, Sampler(), frozenset()))
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)
        finally:
            shard.drop(rid)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(len(o) for o in out) / wall, out


@dataclass
class PipelineFigures:
    serial_tokens_per_s: float
    pipelined_tokens_per_s: float
    gain: float  # ratio of medians
    same_tokens: bool
    stages: list[str]
    emulated: bool


def measure(serial: ShardRunner, pipelined: ShardRunner, prompts: list[list[int]], tokens: int, repeats: int,
            emulated: bool) -> PipelineFigures:
    """Alternate serial and pipelined runs of the same requests; medians of each and their ratio. `emulated`: the
    plan both were opened from has NPU slices on the CPU (the figures then say nothing of NPU speed)."""
    s_shard, p_shard = SerialShard(serial), StagedShard(pipelined)
    try:
        concurrent_tokens_per_s(s_shard, prompts, 2)  # open sessions before timing
        concurrent_tokens_per_s(p_shard, prompts, 2)
        s_rates, p_rates, same = [], [], True
        for _ in range(repeats):
            rs, ids_s = concurrent_tokens_per_s(s_shard, prompts, tokens)
            rp, ids_p = concurrent_tokens_per_s(p_shard, prompts, tokens)
            s_rates.append(rs)
            p_rates.append(rp)
            same = same and ids_s == ids_p
        return PipelineFigures(statistics.median(s_rates), statistics.median(p_rates),
                               statistics.median(p_rates) / statistics.median(s_rates), same,
                               [f"{st.device}:{st.specs[0].name}..{st.specs[-1].name}" for st in p_shard.stages],
                               emulated)
    finally:
        s_shard.close()
        p_shard.close()


@dataclass(frozen=True)
class BoardAssumptions:
    """What a board estimate assumes (not measured here; docs/placement.md says why these values)."""

    core_gbps: float = 6.0  # bytes/s one NPU core streams weights at during decode (fp16 matmul, memory bound)
    dram_gbps: float = 20.0  # what the three cores share (LPDDR4x/5 achievable, not the datasheet peak)
    call_ms: float = 0.5  # RKNNLite per-call overhead (inputs in, outputs out, driver)


def board_estimate(plan: ResolvedPlan, a: BoardAssumptions = BoardAssumptions()) -> dict[str, float]:
    """Decode step time per NPU device from the plan's per-slice weight bytes, and the pipelining gain with as many
    requests in flight as stages: serial time / slowest stage, capped by the shared DRAM bandwidth."""
    per_device: dict[str, float] = {}
    for s in plan.slices:
        if not s.on.npu:
            continue
        per_device[s.device] = per_device.get(s.device, 0.0) + s.weight_bytes / (a.core_gbps * 1e9) + a.call_ms / 1e3
    if not per_device:
        return {}
    serial = sum(per_device.values())
    slowest = max(per_device.values())
    bandwidth_cap = a.dram_gbps / a.core_gbps
    return {"serial_step_ms": serial * 1e3, "slowest_stage_ms": slowest * 1e3,
            "gain": min(serial / slowest, bandwidth_cap, float(len(per_device)))}


def run_pipelining(p: BenchPlan, as_json: bool) -> int:
    """bench --placement P --concurrency N: pipelined vs serial throughput over the whole model, and the board
    estimate. The N prompts are the bench prompt and N-1 variants of it one token longer each (distinct requests)."""
    o = p.options
    assert o.placement is not None and o.concurrency is not None  # checked by bench/options.py
    full = p.placements[0].layer_range if len(p.placements) == 1 else None
    if full is None or not (full.is_first and full.is_last):
        from exo_rknpu.errors import BenchError

        raise BenchError("--concurrency runs the whole model as one shard; drop --split")
    open_ = lambda: open_plan(p.source, p.placements[0])  # the plan resolved (and checked) by bench's plan()
    prompts = [p.prompt_ids + [p.prompt_ids[-1]] * i for i in range(o.concurrency)]
    figs = measure(open_(), open_(), prompts, o.gen_tokens, o.repeat, p.placements[0].emulated)
    board = board_estimate(p.placements[0])
    report = {"model": p.source.name, "placement": o.placement, "concurrency": o.concurrency,
              "prompt_tokens": o.prompt_tokens, "gen_tokens": o.gen_tokens, "repeat": o.repeat, **figs.__dict__,
              "board_estimate": board}
    if as_json:
        print(json.dumps(report))
        return 0
    tag = " (emulated: NPU devices are CPU threads here; no NPU speed is claimed)" if figs.emulated else ""
    print(f"{p.source.name}, placement {o.placement}, {o.concurrency} requests x {o.gen_tokens} tokens "
          f"(prompt {o.prompt_tokens}), median of {o.repeat}{tag}")
    devices = list(dict.fromkeys(st.split(":")[0] for st in figs.stages))
    print(f"  stages: {' -> '.join(figs.stages)}" if len(figs.stages) <= 6 else
          f"  stages: {len(figs.stages)}, alternating over devices {', '.join(devices)}")
    print(f"  one call at a time: {figs.serial_tokens_per_s:.1f} tok/s; pipelined per device: "
          f"{figs.pipelined_tokens_per_s:.1f} tok/s; gain {figs.gain:.2f}x; same tokens: {'yes' if figs.same_tokens else 'NO'}")
    if board:
        print(f"  board estimate (assumed bandwidths, not measured): decode step {board['serial_step_ms']:.1f} ms serial, "
              f"slowest stage {board['slowest_stage_ms']:.1f} ms, gain {board['gain']:.2f}x")
    return 0
