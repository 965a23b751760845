"""`exo-rknpu bench --placement PLAN --concurrency N`: throughput of N concurrent requests through a placement,
pipelined per device (runtime/stages.py) vs served one call at a time, and the same estimated for a board.

Runs alternate (serial, pipelined, serial, ...) and the ratio of medians is reported: the machine is shared and
noisy. Without an NPU the NPU devices are emulated (one CPU thread each), so the figure says how well the stages
overlap here, never how fast an NPU is.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from dataclasses import dataclass

from exo_rknpu.runtime.placement import ResolvedPlan
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


def measure(serial: ShardRunner, pipelined: ShardRunner, prompts: list[list[int]], tokens: int, repeats: int) -> PipelineFigures:
    """Alternate serial and pipelined runs of the same requests; medians of each and their ratio."""
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
        plan = pipelined.placement
        return PipelineFigures(statistics.median(s_rates), statistics.median(p_rates),
                               statistics.median(p_rates) / statistics.median(s_rates), same,
                               [f"{st.device}:{st.specs[0].name}..{st.specs[-1].name}" for st in p_shard.stages],
                               bool(plan and plan.emulated))
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
        if not s.device.startswith("npu"):
            continue
        per_device[s.device] = per_device.get(s.device, 0.0) + s.weight_bytes / (a.core_gbps * 1e9) + a.call_ms / 1e3
    if not per_device:
        return {}
    serial = sum(per_device.values())
    slowest = max(per_device.values())
    bandwidth_cap = a.dram_gbps / a.core_gbps
    return {"serial_step_ms": serial * 1e3, "slowest_stage_ms": slowest * 1e3,
            "gain": min(serial / slowest, bandwidth_cap, float(len(per_device)))}
