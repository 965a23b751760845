"""The issue's done-when on the real model: smollm2-135m under each plan gives the unsplit run's greedy tokens,
through `exo-rknpu generate` as a user runs it, and through a per-core pipeline with concurrent requests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.placement import PlacementPlan
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.runtime.stages import StagedShard
from helpers import greedy, ring

pytestmark = pytest.mark.slow

PLANS = ["0-29=npu;attention=cpu", "0-9=npu0,10-19=npu1,20-29=npu2"]


def _generate(*extra: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "exo_rknpu.cli.main", "generate", "--model", "smollm2-135m", "--prompt",
                        "The capital of France is", "--max-tokens", "16", "--json", "--weights", "fp32", *extra],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_generate_under_each_plan_gives_the_unsplit_tokens():
    want = _generate()["token_ids"]
    assert want[:2] == [7042, 30]  # " Paris."
    for plan in PLANS:
        got = _generate("--placement", plan, "--emulate")
        assert got["token_ids"] == want and got["emulated"] is True, plan


def test_three_concurrent_requests_through_the_core_pipeline_give_the_sequential_tokens():
    from exo_rknpu.slices.spec import Buckets

    src = resolve_model("smollm2-135m")
    buckets = Buckets(seq=(1, 16), context=(256,))
    prompts = [[504, 3575, 282, 4649, 314], [504, 3575, 282, 4649, 314, 314], list(range(100, 140))]  # 40: 3 chunks
    want = [greedy(ring(src.path, None, "onnx", buckets), p, 8, f"s{i}") for i, p in enumerate(prompts)]  # fp32
    staged = StagedShard(open_shard(src, LayerRange.full(30), "onnx", buckets, placement=PlacementPlan.parse(PLANS[1]),
                                    weights="fp32", emulate=True))
    r, got = LocalRing([staged]), [None] * 3
    try:
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, greedy(r, prompts[i], 8, f"c{i}"))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        staged.close()
    assert got == want
