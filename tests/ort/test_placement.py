"""Placement plans run: every plan gives the unsplit run's greedy tokens; a split layer equals the whole layer."""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.inputs import layer_inputs
from exo_rknpu.runtime.placement import PlacementPlan
from exo_rknpu.slices.spec import SliceSpec, state_name
from helpers import greedy, ring

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]
# The plans, scaled to the tiny llama's 5 layers, and a few cuts that split a layer elsewhere.
PLANS = ["0-4=npu;attention=cpu", "0-1=npu0,2-3=npu1,4=npu2", "attention=cpu", "0-4=npu;attention=cpu,norm=cpu",
         "1-3=npu;projections=cpu", "0=cpu,1-4=npu;mlp=npu0"]
# A layer cut into slices hands [1,S,D] float32 tensors across on the host, so on float32 weights it computes
# what the whole layer computes up to float32 rounding (onnxruntime may fuse differently across a cut).
SPLIT_LAYER_RTOL, SPLIT_LAYER_ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("backend,weights", [("numpy", "fp32"), ("onnx", "fp32"), ("onnx", "auto")])
@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_gives_the_unsplit_tokens(tiny_llama, backend, weights, plan):
    want = greedy(ring(tiny_llama, None, backend, weights=weights), PROMPT, 10)
    got = ring(tiny_llama, None, backend, weights=weights, placement=PlacementPlan.parse(plan))
    assert got.shards[0].placement.emulated == ("npu" in plan)
    assert greedy(got, PROMPT, 10) == want


def test_a_plan_applies_inside_each_shard_of_a_split(tiny_qwen2):
    want = greedy(ring(tiny_qwen2, None, "onnx"), PROMPT, 10)
    got = ring(tiny_qwen2, "0-0,1-2", "onnx", placement=PlacementPlan.parse("0=npu0,1-2=npu1;attention=cpu"))
    assert [s.name for s in got.shards[1].specs][:3] == ["layers.1.attn_norm+qkv", "layers.1.attention", "layers.1.o_proj+mlp_norm+ffn"]
    assert greedy(got, PROMPT, 10) == want


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
@pytest.mark.parametrize("cut", [[("attn_norm", "qkv"), ("attention",), ("o_proj", "mlp_norm", "ffn")],
                                 [("attn_norm",), ("qkv",), ("attention",), ("o_proj",), ("mlp_norm",), ("ffn",)]])
def test_a_split_layer_equals_the_whole_layer(tiny_llama, backend, cut):
    from exo_rknpu.backends.base import get_backend
    from exo_rknpu.slices.spec import Buckets

    w = load_shard(resolve_model(str(tiny_llama)), LayerRange(1, 2, 5), weights="fp32")
    b = get_backend(backend, **({"use_cache": False} if backend == "onnx" else {}))
    buckets = Buckets(seq=(1, 4), context=(16,))
    rng = np.random.default_rng(0)
    a, n_past, seq = w.args, 5, 4
    hidden = rng.standard_normal((1, seq, a.hidden_size)).astype(np.float32)
    cache = rng.standard_normal((1, a.num_key_value_heads, 16, a.head_dim)).astype(np.float32)
    common = layer_inputs(a, hidden, seq, n_past, 16)
    whole = b.prepare(SliceSpec("layers", 1, 2), w, buckets).run({**common, "past_k": cache, "past_v": cache * 0.5})
    st, attn = {"x": hidden}, {}
    for parts in cut:
        spec = SliceSpec("layers", 1, 2, parts)
        inputs = {state_name(k): st[k] for k in spec.state_inputs()}
        if spec.has_attention:
            inputs.update({k: common[k] for k in ("cos", "sin", "mask")}, past_k=cache, past_v=cache * 0.5)
        out = b.prepare(spec, w, buckets).run(inputs)
        st.update({k: out[state_name(k, output=True)] for k in spec.state_outputs()})
        attn.update({k: out[k] for k in ("k_new", "v_new") if k in out})
    np.testing.assert_allclose(st["x"], whole["hidden_out"], rtol=SPLIT_LAYER_RTOL, atol=SPLIT_LAYER_ATOL)
    for k in ("k_new", "v_new"):
        np.testing.assert_allclose(attn[k], whole[k], rtol=SPLIT_LAYER_RTOL, atol=SPLIT_LAYER_ATOL)
