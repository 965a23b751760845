"""Partial download through exo's shard downloader, for the Qwen cards' tied heads.

A fake repo (tiny random qwen3 with 28 layers, tied embedding, one safetensors file per layer plus one for the
embedding and one for the final norm, with an index) stands in for Hugging Face; the fake downloader copies exactly
the files exo's own `get_allow_patterns` selects for the shard it is asked for, as exo's downloader does.
"""

from __future__ import annotations

import fnmatch
import json
import shutil

import numpy as np
import pytest

from exo_helpers import FixedProber, fake_shard_downloader, needs_exo
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import resolve_model
from exo_rknpu.runtime.placement import open_shard
from tiny_models import make_tiny_hf, shard_file_name
from helpers import SMALL_BUCKETS

pytestmark = [needs_exo, pytest.mark.exo]

MODEL, N = "qwen-3-0.6b", 28  # the card's id and layer count


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("hub") / "Qwen3-0.6B", arch="qwen3", n_layers=N, tied=True,
                        sharded=True, head_dim=32)


def fake_hub(repo, target):
    """exo's downloader in miniature: copy into `target` exactly the files exo's get_allow_patterns selects."""
    from exo.download.hf.hf_helpers import get_allow_patterns

    def fetch(shard):
        weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
        patterns = get_allow_patterns(weight_map, shard)
        target.mkdir(exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in patterns):
                shutil.copy(f, target / f.name)
        return target

    return fake_shard_downloader(fetch)


def layers_asked(downloader) -> list[tuple[int, int, str]]:
    return [(s.start_layer, s.end_layer, name) for s, name in downloader.calls]


async def run_last_shard(repo, target, start):
    from exo.inference.shard import Shard

    from exo_rknpu.engine import EngineConfig
    from exo_rknpu.exo.inference_engine import RKNPUInferenceEngine
    from exo_rknpu.exo.options import NodeOptions

    downloader = fake_hub(repo, target)
    engine = RKNPUInferenceEngine(downloader, NodeOptions(engine=EngineConfig(backend="numpy")), FixedProber(True))
    hidden = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    try:
        out, state = await engine.infer_tensor("r", Shard(MODEL, start, N - 1, N), hidden)
    finally:
        engine.core.close()
    return layers_asked(downloader), out, hidden


async def test_tied_last_shard_also_fetches_the_embedding_file_and_nothing_else(repo, tmp_path):
    target = tmp_path / "downloads"
    calls, logits, hidden = await run_last_shard(repo, target, 14)
    # exo's patterns for layers 14-27 miss file 1 (the embedding, which is this tied model's head): the engine asks
    # for the one-layer first shard too
    assert calls == [(14, N - 1, "RKNPUInferenceEngine"), (0, 0, "RKNPUInferenceEngine")]
    total = N + 2
    got = {f.name for f in target.glob("*.safetensors")}
    assert got == {shard_file_name(p, total) for p in [1, 2, *range(2 + 14, 2 + N), total]}  # not layers 1-13
    want = open_shard(resolve_model(str(repo)), LayerRange(14, N, N), "numpy", SMALL_BUCKETS)
    try:
        # same weights; the engine's buckets/padding differ from this reference's, hence float32 rounding only
        np.testing.assert_allclose(logits, want.forward("r", hidden, logits="all"), rtol=0, atol=1e-4)
    finally:
        want.close()


async def test_whole_model_shard_also_fetches_the_final_norm_file(repo, tmp_path):
    from exo.inference.shard import Shard

    from exo_rknpu.engine import EngineConfig
    from exo_rknpu.exo.inference_engine import RKNPUInferenceEngine
    from exo_rknpu.exo.options import NodeOptions

    target = tmp_path / "downloads"
    downloader = fake_hub(repo, target)
    engine = RKNPUInferenceEngine(downloader, NodeOptions(engine=EngineConfig(backend="numpy")), FixedProber(True))
    try:
        out, _ = await engine.infer_tensor("r", Shard(MODEL, 0, N - 1, N), np.array([[5, 6, 7]], np.int64))
    finally:
        engine.core.close()
    # exo gives a first shard the first file but not the last one (model.norm here)
    assert layers_asked(downloader) == [(0, N - 1, "RKNPUInferenceEngine"), (N - 1, N - 1, "RKNPUInferenceEngine")]
    assert out.shape == (1, 3, 320)
