"""A tiny Qwen3 (per-head q/k RMSNorm, head_dim 32 != hidden/heads, untied head) compiled for rk3588 and run in the
rknn-toolkit2 simulator: every slice builds fp16 with no op left on the CPU and verifies at cosine >= 0.9999
against onnxruntime on real activations, and a two-shard ring in the simulator gives onnx's greedy tokens.
Skipped (with the command to run) when the toolkit is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.rknn.io import cosine
from exo_rknpu.rknn.compile import compile_range
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.placement import open_shard
from tiny_models import make_tiny_hf

from toolkit_common import BUCKETS, NEEDS_TOOLKIT

pytestmark = NEEDS_TOOLKIT


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("qwen3") / "m", arch="qwen3", n_layers=2, head_dim=32)


def test_qwen3_slices_compile_and_verify_fp16(qwen3, tmp_path):
    results = compile_range(str(qwen3), "0-1", buckets=BUCKETS, verify=True, cache_dir=tmp_path, progress=False)
    assert [r.name for r in results] == ["layers.0", "layers.1", "head"]  # the embedding stays on the host
    for r in results:
        assert r.status == "built" and not r.cpu_ops and not r.fallbacks, (r.name, r.cpu_ops, r.fallbacks)
        cos = {k: v for k, v in r.verify.items() if k.startswith("cos_")}
        assert cos and min(cos.values()) >= 0.9999, (r.name, cos)
    assert {"cos_hidden_out", "cos_k_new", "cos_v_new"} <= set(results[0].verify)


def test_qwen3_two_shards_in_the_simulator_match_onnx(qwen3):
    src = resolve_model(str(qwen3))
    ranges = [LayerRange(0, 1, 2), LayerRange(1, 2, 2)]
    sim = LocalRing([open_shard(src, r, "rknn-sim", BUCKETS) for r in ranges])
    ref = LocalRing([open_shard(src, r, "onnx", BUCKETS, weights="fp32") for r in ranges])  # the float32 the sim compiles
    try:
        prompt = [5, 9, 13, 17, 21, 25, 29]  # 7 tokens: prefill in seq bucket 16, then one-token decode
        got, want = [], []
        for ring, out in ((sim, got), (ref, want)):
            x = np.asarray([prompt], np.int64)
            for _ in range(6):
                logits = ring.forward("r", x)[0, -1]
                out.append(logits)
                x = np.asarray([[int(logits.argmax())]], np.int64)
        assert [int(g.argmax()) for g in got] == [int(w.argmax()) for w in want]
        assert min(cosine(g, w) for g, w in zip(got, want)) >= 0.9999
    finally:
        sim.close()
        ref.close()
