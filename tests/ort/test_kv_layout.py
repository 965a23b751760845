"""The host keeps each request's KV cache in the layout its backend takes ("seq" on the CPUs, the NPU's own form
on the NPU), grows it along the positions axis and writes new rows there."""

from __future__ import annotations

import numpy as np

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.runtime.cache import KVCache
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
