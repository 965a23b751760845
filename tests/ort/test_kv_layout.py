"""The transposed ("dim") KV-cache layout the NPU uses computes exactly what the CPU layout computes."""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.backends.numpy_ref import NumpyBackend
from exo_rknpu.backends.ort import OrtBackend
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.cache import KVCache
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.slices.spec import SliceSpec, to_kv_layout
from helpers import SMALL_BUCKETS, nmse

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]


def with_layout(backend, layout: str):
    backend.kv_layout = layout  # the layout is the backend's choice; the runtime follows it
    return backend


@pytest.mark.parametrize("make", [NumpyBackend, OrtBackend])
def test_dim_layout_gives_the_same_logits_through_prefill_and_decode(tiny_llama, make):
    w = load_shard(resolve_model(str(tiny_llama)), LayerRange.full(5), weights="fp32")
    out = {}
    for layout in ("seq", "dim"):
        r = ShardRunner(w, with_layout(make(), layout), SMALL_BUCKETS, layers_per_slice=2)
        assert all(s.kv_layout == layout for s in r.layer_specs)
        out[layout] = np.concatenate([r.forward("a", np.array([PROMPT])), r.forward("a", np.array([[9]])), r.forward("a", np.array([[4]]))], axis=1)
        cache = r.requests.get("a").caches[0]
        assert cache.keys.shape[cache.axis] == 16 and cache.layout == layout
    assert nmse(out["dim"], out["seq"]) <= 1e-10


def test_spec_shapes_follow_the_layout(tiny_llama):
    w = load_shard(resolve_model(str(tiny_llama)), LayerRange(0, 2, 5), weights="fp32")
    dim = SliceSpec("layers", 0, 2, kv_layout="dim")
    assert dim.input_shapes(w.args, 4, 32)["past_k"] == (2, 2, 16, 32)
    assert dim.output_shapes(w.args, 4)["k_new"] == (2, 2, 16, 4)
    assert SliceSpec("layers", 0, 2).input_shapes(w.args, 4, 32)["past_k"] == (2, 2, 32, 16)
    x = {"past_k": np.arange(12.0).reshape(1, 1, 3, 4), "past_v": np.zeros((1, 1, 3, 4)), "hidden": np.ones(2)}
    y = to_kv_layout(x, "dim")
    assert y["past_k"].shape == (1, 1, 4, 3) and np.array_equal(y["past_k"][0, 0], x["past_k"][0, 0].T) and y["hidden"] is x["hidden"]


def test_cache_grows_and_writes_along_the_positions_axis():
    for layout in ("seq", "dim"):
        c = KVCache.empty(1, 2, 4, 3, layout)
        new = np.ones((1, 2, 2, 3)) if layout == "seq" else np.ones((1, 2, 3, 2))
        c.write(1, new, new * 2, 2)
        c.grow(8)
        assert c.capacity == 8
        keys = c.keys if layout == "seq" else c.keys.swapaxes(-1, -2)
        assert keys[0, 0, :, 0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
