"""The host keeps each request's KV cache in the layout its backend takes ("seq" on the CPUs, the NPU's own form
on the NPU), grows it along the positions axis and writes new rows there."""

from __future__ import annotations

import numpy as np

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.runtime.cache import KVCache, KVPool, RequestCache
from exo_rknpu.slices.spec import SliceSpec, to_kv_layout


def test_spec_shapes_follow_the_layout():
    a = ModelArgs(architecture="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                  num_hidden_layers=2, vocab_size=100)
    assert SliceSpec("layers", 0, 2).input_shapes(a, 4, 32)["past_k"] == (2, 2, 32, 16)
    assert SliceSpec("layers", 0, 2).output_shapes(a, 4)["k_new"] == (2, 2, 4, 16)
    x = {"past_k": np.arange(12.0).reshape(1, 1, 3, 4), "past_v": np.zeros((1, 1, 3, 4)), "hidden": np.ones(2)}
    assert to_kv_layout(x, "seq") is x
    y = to_kv_layout(x, "npu")  # keys transposed, float16
    assert y["past_k"].shape == (1, 4, 3) and np.array_equal(y["past_k"][0], x["past_k"][0, 0].T.astype(np.float16))
    assert y["hidden"] is x["hidden"]


def test_cache_grows_and_writes_along_the_positions_axis():
    for layout in ("seq", "npu"):
        c = KVCache.empty(1, 2, 4, 3, layout)
        # two new positions: "seq" [n, kv, S, hd]; "npu" keys [n*kv, hd, S], values [n*kv, S, hd]
        k, v = (np.ones((1, 2, 2, 3)),) * 2 if layout == "seq" else (np.ones((2, 3, 2)), np.ones((2, 2, 3)))
        c.write(1, k, v * 2, 2)
        c.grow(8)
        assert c.capacity == 8
        keys = c.keys[0, 0, :, 0] if layout == "seq" else c.keys[0, 0, :]
        assert keys.tolist() == [0, 1, 1, 0, 0, 0, 0, 0]


def test_a_pool_grows_by_a_quarter_of_its_capacity_keeping_every_requests_rows():
    """Each growth copies every request's rows, so the pool grows geometrically (a long batched decode copies it a
    few times, not every 32 positions), never past its largest context; what each request holds survives."""
    pool = KVPool([2, 1], kv_heads=2, head_dim=4, max_positions=300, step=32)
    owners = [RequestCache(pos=p) for p in (5, 40)]
    for o in owners:
        pool.acquire(o)
    assert pool.reserve(40) == 64  # the first size: positions rounded up to the step
    rng = np.random.default_rng(0)
    want = [[rng.standard_normal(c.keys[:, :, : o.pos].shape).astype(np.float32) for c in o.caches] for o in owners]
    for o, rows in zip(owners, want):
        for c, r in zip(o.caches, rows):
            c.write(0, r, -r, o.pos)
    sizes = [pool.capacity]
    for needed in range(65, 301):
        sizes.append(pool.reserve(needed))
    assert sorted(set(sizes)) == [64, 96, 128, 160, 224, 288, 300]  # +1/4 at least, rounded up to 32; capped
    for o, rows in zip(owners, want):
        for c, r in zip(o.caches, rows):
            assert np.array_equal(c.keys[:, :, : o.pos], r) and np.array_equal(c.values[:, :, : o.pos], -r)
            assert not c.keys[:, :, o.pos :].any()  # past its position: zeros, nothing carried over
