"""The core invariants, on tiny random llama and qwen2 models, on both CPU backends.

* split equivalence: [0,n) gives the same tokens as any cut into consecutive shards;
* the onnx backend computes what the numpy reference computes (NMSE <= 1e-9 on logits);
* cache continuity: chunked prefill and prefill-then-decode equal one uncached pass;
* requests keep separate caches; a request past the count or KV-memory limit is refused, never a live one evicted.
"""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.errors import CapacityError, RequestStateError
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_shard
from exo_rknpu.model.quant import DEFAULT_WEIGHTS
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.requests import RequestLimits
from exo_rknpu.runtime.sampling import Sampler
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets
from helpers import SMALL_BUCKETS, greedy, nmse, ring

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]  # 11 tokens: crosses the 8-token prefill bucket

ONNX_VS_NUMPY_NMSE = 1e-9  # both float32; differences are summation order only


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("backend", ["numpy", "onnx"])
def test_split_gives_the_same_tokens_as_unsplit(model, backend, request):
    path = request.getfixturevalue(model)
    n = 5 if model == "tiny_llama" else 3
    splits = {
        5: ["0-1,2-4", "0-0,1-3,4-4", "0-0,1-1,2-2,3-3,4-4"],
        3: ["0-0,1-2", "0-0,1-1,2-2"],
    }[n]
    expected = greedy(ring(path, None, backend), PROMPT, 10)
    for split in splits:
        assert greedy(ring(path, split, backend), PROMPT, 10) == expected, split


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
def test_onnx_matches_the_numpy_reference(model, request):
    path = request.getfixturevalue(model)
    logits = {}
    for backend in ("numpy", "onnx"):
        r = ring(path, "0-0,1-2" if model == "tiny_qwen2" else "0-2,3-4", backend)
        logits[backend] = np.concatenate([r.forward("a", np.array([PROMPT]), logits="all"), r.forward("a", np.array([[9]]), logits="all")], axis=1)
    assert nmse(logits["onnx"], logits["numpy"]) <= ONNX_VS_NUMPY_NMSE
    assert np.array_equal(logits["onnx"].argmax(-1), logits["numpy"].argmax(-1))


# float32 arithmetic: equal to rounding. The default native form quantizes activations to int16 per block, where a
# last-bit difference between bucket shapes (attention over another context length) can move a value by one step
# of 1/32767 of its block's largest: measured nmse 3.3e-10 on this model.
@pytest.mark.parametrize("backend,weights,bound", [("numpy", "fp32", 1e-10), ("onnx", "fp32", 1e-10),
                                                   ("numpy", DEFAULT_WEIGHTS, 1e-10), ("onnx", DEFAULT_WEIGHTS, 1e-8)])
def test_chunked_prefill_and_decode_equal_one_uncached_pass(tiny_llama, backend, weights, bound):
    src = resolve_model(str(tiny_llama))
    one_shot = open_shard(src, LayerRange.full(5), backend, Buckets(seq=(1, 16), context=(32,)), weights=weights)
    reference = one_shot.forward("x", np.array([PROMPT + [4, 2]]))  # one 16-bucket call, no cache reuse
    chunked = open_shard(src, LayerRange.full(5), backend, Buckets(seq=(1, 4), context=(8, 16, 32)), layers_per_slice=2,
                         weights=weights)
    parts = [chunked.forward("y", np.array([PROMPT])), chunked.forward("y", np.array([[4]])), chunked.forward("y", np.array([[2]]))]
    assert nmse(np.concatenate(parts, axis=1), reference) <= bound


def test_interleaved_requests_keep_separate_caches(tiny_qwen2):
    r = ring(tiny_qwen2, "0-0,1-2", "onnx")
    alone_a = greedy(r, PROMPT, 6, "a0")
    alone_b = greedy(r, PROMPT[:4], 6, "b0")
    gen_a = r.generate("a", PROMPT, 6, Sampler())
    gen_b = r.generate("b", PROMPT[:4], 6, Sampler())
    got_a, got_b = [], []
    for ta, tb in zip(gen_a, gen_b):  # strictly alternating steps on the same shards
        got_a.append(ta)
        got_b.append(tb)
    assert got_a == alone_a and got_b == alone_b


def test_a_request_past_the_limits_is_refused_and_live_ones_keep_their_caches(tiny_llama):
    """No eviction: the third request is refused (by count, then by KV memory) and the first two continue exactly
    as if they had run alone."""
    src = resolve_model(str(tiny_llama))
    alone = open_shard(src, LayerRange(0, 5, 5), "numpy", SMALL_BUCKETS)
    ref = [alone.forward("ref", np.array([PROMPT])), alone.forward("ref", np.array([[7]]))]
    shard = open_shard(src, LayerRange(0, 5, 5), "numpy", SMALL_BUCKETS, limits=RequestLimits(max_requests=2))
    for rid in ("a", "b"):
        shard.forward(rid, np.array([PROMPT]))
    with pytest.raises(CapacityError, match="--max-requests 2"):
        shard.forward("c", np.array([PROMPT]))
    assert "c" not in shard.requests and shard.requests.get("a").pos == len(PROMPT)
    np.testing.assert_array_equal(shard.forward("a", np.array([[7]])), ref[1])
    one = shard.request_reserve_bytes  # 2 (k, v) x 5 layers x kv heads x largest context x head dim x fp32
    assert one == 2 * 5 * load_args(src).num_key_value_heads * SMALL_BUCKETS.max_context * load_args(src).head_dim * 4
    tight = open_shard(src, LayerRange(0, 5, 5), "numpy", SMALL_BUCKETS,
                       limits=RequestLimits(max_requests=8, max_bytes=2 * one + 1))
    tight.forward("a", np.array([PROMPT]))
    tight.forward("b", np.array([PROMPT]))
    with pytest.raises(CapacityError, match="over the budget"):
        tight.forward("c", np.array([PROMPT]))
    tight.drop("a")  # a finished request frees its reservation
    tight.forward("c", np.array([PROMPT]))


def test_a_request_without_a_cache_fails_instead_of_restarting_at_position_0(tiny_llama):
    src = resolve_model(str(tiny_llama))
    shard = open_shard(src, LayerRange(0, 5, 5), "numpy", SMALL_BUCKETS)
    with pytest.raises(RequestStateError, match="no KV cache for request x"):
        shard.forward("x", np.array([[7]]), start=False)
    shard.forward("x", np.array([PROMPT]), start=True)
    with pytest.raises(RequestStateError, match="already live"):
        shard.forward("x", np.array([PROMPT]), start=True)
    shard.drop("x")
    with pytest.raises(RequestStateError):
        shard.forward("x", np.array([[7]]), start=False)
    assert len(shard.requests) == 0


def test_weights_are_shared_not_copied_between_layer_groupings(tiny_llama):
    # One loaded shard, two groupings of its layers (one graph per layer, one graph for all) on the numpy backend.
    from exo_rknpu.backends.numpy_ref import NumpyBackend
    from exo_rknpu.runtime.shard import ShardRunner

    w = load_shard(resolve_model(str(tiny_llama)), LayerRange(1, 4, 5), weights="fp32")
    per_layer = ShardRunner(w, NumpyBackend(), SMALL_BUCKETS, layers_per_slice=1)
    grouped = ShardRunner(w, NumpyBackend(), SMALL_BUCKETS, layers_per_slice=None)
    assert sorted(per_layer.runners) == ["layers.1", "layers.2", "layers.3"] and sorted(grouped.runners) == ["layers.1-3"]
    for runner in [*per_layer.runners.values(), *grouped.runners.values()]:
        for i, lw in runner.weights.layers.items():
            for name, a in lw.arrays().items():
                assert np.shares_memory(a, w.layers[i].arrays()[name]), (i, name)
    # Behaviour, not just identity: a weight changed in place in the loaded shard changes both groupings alike.
    x = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    before = per_layer.forward("a", x)
    np.testing.assert_allclose(grouped.forward("a", x), before, rtol=1e-5, atol=1e-6)
    w.layers[2].down_proj *= 0.5
    after = per_layer.forward("b", x)
    assert not np.allclose(after, before, atol=1e-4)
    np.testing.assert_allclose(grouped.forward("b", x), after, rtol=1e-5, atol=1e-6)
