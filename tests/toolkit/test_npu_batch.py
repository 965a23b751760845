"""Batch buckets on the NPU path (issue 19): a decode step of several requests is one call of each layer's compiled
batch graph (slices/npu_form.py::build_npu_batch_onnx), each request with its own float16 cache handed over in
place. Checked in the rknn-toolkit2 simulator against the same requests decoded one at a time. Skipped (with the
command to run) without the toolkit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.errors import ArtifactError
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard, resolve_model
from exo_rknpu.rknn.compile import compile_range
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets, SliceSpec

from toolkit_common import NEEDS_TOOLKIT

pytestmark = NEEDS_TOOLKIT

BATCHED = Buckets(seq=(1, 16), context=(64, 128), batch=(2, 4))
# different lengths: the requests sit at different positions, and the 60-token one crosses context 64 -> 128
PROMPTS = [[5, 17, 42], list(range(3, 63)), [12], [7, 99, 3, 250, 11], [8, 8]]


def _decode(shard, tag: str, prompts: list[list[int]], steps: int, batched: bool, live: int) -> dict[int, list[int]]:
    """Greedy tokens of every prompt: prefilled alone, then `steps` decode steps of all of them (batched or one at a
    time), then `steps` more of the first `live` ones."""
    toks = {}
    for i, p in enumerate(prompts):
        toks[i] = [int(shard.forward(f"{tag}{i}", np.array([p]))[0, -1].argmax())]
    for n in (len(prompts), live):
        for _ in range(steps):
            calls = [(f"{tag}{i}", np.array([[toks[i][-1]]])) for i in range(n)]
            outs = shard.forward_batch(calls) if batched else [shard.forward(r, x, start=False) for r, x in calls]
            for i, out in enumerate(outs):
                toks[i].append(int(out[0, -1].argmax()))
    return toks


def test_each_request_of_an_npu_batch_gets_its_lone_greedy_tokens(tiny):
    src = resolve_model(str(tiny))
    shard = open_shard(src, LayerRange(0, 4, 4), "rknn-sim", BATCHED)
    try:
        assert shard.batches and shard.pool is None  # each request keeps its own cache (no pool on the NPU form)
        lone = _decode(shard, "lone", PROMPTS, 4, batched=False, live=3)
        for i in range(len(PROMPTS)):
            shard.drop(f"lone{i}")
        calls = dict(shard.stats.calls)
        batch = _decode(shard, "batch", PROMPTS, 4, batched=True, live=3)
        assert batch == lone
        # really batched: 5 requests are a batch of 4 and a lone step, 3 a batch of 4 with one padding row
        per_layer = shard.stats.calls["layers.0"] - calls["layers.0"]
        prefill = 1 + 4 + 1 + 1 + 1  # the 60-token prompt is chunks of 16
        assert per_layer == prefill + 4 * 2 + 4 * 1
        assert calls["layers.0"] == prefill + 4 * 5 + 4 * 3
        assert [shard.requests.get(f"batch{i}").pos for i in range(5)] == [len(p) + (8 if i < 3 else 4) for i, p in enumerate(PROMPTS)]
    finally:
        shard.close()


def test_batch_buckets_compile_with_no_cpu_op_verify_per_request_and_the_npu_backend_names_a_missing_one(tiny, tmp_path):
    """--verify runs every batch bucket in the simulator too: each request's row of one batched call (its own
    position, cache and mask) against onnxruntime's float32 run of that request alone, at the seq buckets' bound."""
    from exo_rknpu.rknn.npu import NpuBackend

    res = compile_range(str(tiny), "0-0", buckets=BATCHED, cache_dir=tmp_path, progress=False, strict=True, verify=True)
    (r,) = res
    assert sorted(Path(f).name for f in r.files) == ["layers.0.b2.rknn", "layers.0.b4.rknn", "layers.0.rknn"]
    assert {t for t in r.per_bucket if t.startswith("b")} == {"b2c64", "b2c128", "b4c64", "b4c128"}
    assert r.cpu_count == 0 and r.error_count == 0  # --strict refused any CPU op too
    assert set(r.verify_per_bucket) == {f"{b}c{c}" for b in ("s1", "s16", "b2", "b4") for c in (64, 128)}
    for tag, figures in r.verify_per_bucket.items():
        for k in ("cos_hidden_out", "cos_k_new", "cos_v_new", "cos_delta"):
            assert figures[k] >= 0.9999, (tag, k, figures[k])
    # 2 samples per seq bucket (4 buckets) + one call per batch bucket, each of its rows a sample
    assert r.verify["samples"] == 2 * 4 + (2 + 4) * 2
    m = json.loads((Path(r.folder) / "manifest.json").read_text())
    assert m["buckets"] == {"seq": [1, 16], "context": [64, 128], "batch": [2, 4]}
    b4 = next(f for f in m["files"] if f["file"] == "layers.0.b4.rknn")
    assert {(s["batch"], s["ctx"]) for s in b4["shapes"]} == {(4, 64), (4, 128)}
    assert b4["io"]["inputs"]["past_k_3"] == {"dtype": "float16", "layout": "UNDEFINED"}  # handed over as kept

    ws = load_shard(resolve_model(str(tiny)), LayerRange(0, 1, 4), weights="fp32")
    be = NpuBackend(cache_dir=tmp_path, check_board=False)
    spec = SliceSpec("layers", 0, 1, kv_layout="npu")
    be.locate(spec, ws, BATCHED)
    with pytest.raises(ArtifactError, match=r"lacks buckets \['b8c64', 'b8c128'\]") as e:
        be.locate(spec, ws, Buckets(seq=(1, 16), context=(64, 128), batch=(2, 4, 8)))
    assert "--batch 2,4,8" in str(e.value)


def test_the_npu_backend_runs_a_batch_from_the_compiled_files(tiny, tmp_path, monkeypatch):
    """The board path: a stand-in RKNNLite (tests/toolkit/test_board_path.py) hands each call, as the npu backend
    marshals it, to the simulator. Each request's hidden state from one batched call equals its lone step's."""
    from test_board_path import SimulatedRKNNLite, _install

    from exo_rknpu.rknn.sim import RknnSimBackend

    buckets = Buckets(seq=(1, 16), context=(64,), batch=(2,))

    class BatchRKNNLite(SimulatedRKNNLite):
        def load_rknn(self, path: str) -> int:
            type(self).loads.append(path)
            self.runner = type(self).sim.prepare(SliceSpec("layers", 0, 1, kv_layout="npu"), type(self).weights, buckets)
            return 0

    compile_range(str(tiny), "0-0", buckets=buckets, cache_dir=tmp_path, progress=False)
    src = resolve_model(str(tiny))
    _install(monkeypatch, BatchRKNNLite)
    BatchRKNNLite.sim, BatchRKNNLite.weights = RknnSimBackend(), load_shard(src, LayerRange(0, 1, 4), weights="fp32")
    shard = open_shard(src, LayerRange(0, 1, 4), "npu", buckets, backend_options={"cache_dir": tmp_path, "check_board": False})
    try:
        assert shard.batches and sorted(Path(p).name for p in BatchRKNNLite.loads) == ["layers.0.b2.rknn", "layers.0.rknn"]
        lone = {}
        for i, p in enumerate(PROMPTS[:2]):
            for tag in ("lone", "batch"):
                shard.forward(f"{tag}{i}", np.array([p]))
            lone[i] = shard.forward(f"lone{i}", np.array([[p[-1]]]), start=False)
        got = shard.forward_batch([(f"batch{i}", np.array([[p[-1]]])) for i, p in enumerate(PROMPTS[:2])])
        for i in lone:
            np.testing.assert_allclose(got[i], lone[i], rtol=0, atol=2e-3 * np.abs(lone[i]).max())
        assert [shard.requests.get(f"batch{i}").pos for i in range(2)] == [len(p) + 1 for p in PROMPTS[:2]]
    finally:
        shard.close()
        BatchRKNNLite.sim.close()


async def test_a_shard_without_batch_graphs_says_once_that_it_decodes_requests_one_after_another(tiny, caplog):
    """w8a8 has no batch graphs: an engine opening a w8a8 shard on rknn-sim says so once, with the reason (the
    shard then runs concurrent decode steps one call after another; docs/compiler.md, "Batch buckets")."""
    from exo_rknpu.engine import EngineConfig, ShardEngine
    from exo_rknpu.rknn.options import backend_options

    src = resolve_model(str(tiny))

    async def source(model_id, layer_range):
        return src

    engine = ShardEngine(EngineConfig(backend="rknn-sim", backend_options=backend_options("rknn-sim", dtype="w8a8", model=src)),
                         source)
    try:
        with caplog.at_level("WARNING", logger="exo_rknpu.engine"):
            loaded = await engine.ensure("tiny", LayerRange(0, 4, 4))
            await engine.ensure("tiny", LayerRange(0, 4, 4))
        assert not loaded.runner.batches
        said = [r.getMessage() for r in caplog.records if "one after another" in r.getMessage()]
        assert said == ["tiny layers 0-3 of 4 runs concurrent requests' decode steps one after another: backend "
                        "rknn-sim has no batch graphs in this form (w8a8 builds none)"]
    finally:
        await engine.aclose()
