"""The rknn-sim backend: slices in the rknn-toolkit2 simulator through a worker process in the toolkit venv.
Skipped (with the command to run) when the toolkit is absent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.rknn.io import cosine
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard, resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets, SliceSpec

from toolkit_common import BUCKETS, NEEDS_TOOLKIT, greedy

pytestmark = NEEDS_TOOLKIT


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_two_shards_match_onnx_fp16(tiny):
    src = resolve_model(str(tiny))
    sim = [open_shard(src, LayerRange(0, 2, 4), "rknn-sim", BUCKETS), open_shard(src, LayerRange(2, 4, 4), "rknn-sim", BUCKETS)]
    # the simulator is compiled from float32 weights: compare with onnx on the same float32 weights
    ref = LocalRing([open_shard(src, LayerRange(0, 2, 4), "onnx", BUCKETS, weights="fp32"),
                     open_shard(src, LayerRange(2, 4, 4), "onnx", BUCKETS, weights="fp32")])
    try:
        # open_shard put the embedding on onnx (the simulator, like the board, leaves it on the host), one graph per layer
        kinds = {n: b.name for n, b in sim[0].backends.items()}
        assert kinds == {"embed": "onnx", "layers.0": "rknn-sim", "layers.1": "rknn-sim"}
        assert set(sim[1].backends) == {"layers.2", "layers.3", "head"} and sim[1].backends["head"].name == "rknn-sim"
        workers = [sim[0].backends["layers.0"].worker_pid, sim[1].backends["layers.2"].worker_pid]
        assert all(_alive(p) for p in workers)
        prompt = [5, 9, 13, 17, 21, 25, 29]
        got_toks, got_logits = greedy(LocalRing(sim), prompt, 6)
        want_toks, want_logits = greedy(ref, prompt, 6)
        assert got_toks == want_toks
        for g, w in zip(got_logits, want_logits):
            assert cosine(g, w) >= 0.9999
    finally:
        for s in sim:
            s.close()
        ref.close()
    deadline = time.monotonic() + 20  # closing the shards stops the workers
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def test_a_single_shape_decode_build_reads_the_whole_cache(tiny):
    """One bucket (seq 1, ctx 64) makes a static graph, where rknn once fused the two value matmuls of the NPU form
    and dropped the cached values: token-by-token logits must still equal onnxruntime's."""
    src = resolve_model(str(tiny))
    b = Buckets(seq=(1,), context=(64,))
    sim = open_shard(src, LayerRange(0, 4, 4), "rknn-sim", b)
    ref = open_shard(src, LayerRange(0, 4, 4), "onnx", b, weights="fp32")
    try:
        got_toks, got_logits = greedy(LocalRing([sim]), [5, 9, 13, 17], 4)
        want_toks, want_logits = greedy(LocalRing([ref]), [5, 9, 13, 17], 4)
        assert got_toks == want_toks and min(cosine(g, w) for g, w in zip(got_logits, want_logits)) >= 0.9999
    finally:
        sim.close()
        ref.close()


def test_killed_worker_is_a_clear_error_not_a_hang(tiny):
    from exo_rknpu.rknn.sim import RknnSimBackend, SimulatorWorkerError

    ws = load_shard(resolve_model(str(tiny)), LayerRange(3, 4, 4), weights="fp32")
    be = RknnSimBackend(run_timeout=60)
    runner = be.prepare(SliceSpec("head"), ws, Buckets(seq=(1,), context=(64,)))
    try:
        h = np.random.default_rng(0).standard_normal((1, 1, ws.args.hidden_size)).astype(np.float32)
        assert runner.run({"hidden": h})["logits"].shape == (1, 1, ws.args.vocab_size)
        os.kill(be.worker_pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(SimulatorWorkerError, match="killed by signal SIGKILL"):
            runner.run({"hidden": h})
        assert time.monotonic() - t < 30
    finally:
        runner.close()
        be.close()


def test_worker_dies_with_its_parent(tmp_path):
    code = ("import sys, os\n"
            "from exo_rknpu.rknn.sim import RknnSimBackend\n"
            f"be = RknnSimBackend(workdir={str(tmp_path)!r})\n"
            "print(be.worker().pid, flush=True)\n"
            "os._exit(0)\n")  # no cleanup at all: the worker must notice on its own
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert p.returncode == 0, p.stderr
    pid = int(p.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), f"rknn-sim worker {pid} outlived its parent"


def test_w8a8_builds_each_bucket_on_first_use_with_the_compiler_recipe(tiny):
    from exo_rknpu.rknn.recipe import RecipeBuild
    from exo_rknpu.slices.recipe import DEFAULT_RECIPE

    src = resolve_model(str(tiny))
    b = Buckets(seq=(1, 16), context=(64,))
    sim = open_shard(src, LayerRange(0, 4, 4), "rknn-sim", b,
                     backend_options={"dtype": "w8a8", "recipe_build": RecipeBuild(src)})
    ref = open_shard(src, LayerRange(0, 4, 4), "onnx", b)
    try:
        be = sim.backends["layers.0"]
        assert be.dtype == "w8a8" and be.builds == []  # each bucket is calibrated and built when first used
        ids = np.asarray([[5, 9, 13, 17, 21, 25, 29]], np.int64)
        got, want = sim.forward("r", ids), ref.forward("r", ids)
        assert sorted(x["name"] for x in be.builds) == ["head.s16", "layers.0.s16.c64", "layers.1.s16.c64",
                                                        "layers.2.s16.c64", "layers.3.s16.c64"]
        # the default recipe keeps layers 0, 1 and the head in fp16 (built per bucket too), the rest int8
        kept = {"head.s16", "layers.0.s16.c64", "layers.1.s16.c64"}
        assert all(x["quant_policy"] == (None if x["name"] in kept else DEFAULT_RECIPE.policy) for x in be.builds)
        step = np.asarray([[int(want[0, -1].argmax())]], np.int64)
        got1, want1 = sim.forward("r", step), ref.forward("r", step)
        assert len(be.builds) == 10  # + the 5 decode (seq 1) files
        # int8 is lossy: a loose bound that still catches a broken calibration or marshalling (random-weight model)
        assert cosine(got, want) >= 0.95 and cosine(got1, want1) >= 0.95
    finally:
        sim.close()
        ref.close()
