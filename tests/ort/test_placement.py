"""Placement plans run: every plan gives the unsplit run's greedy tokens; a split layer equals the whole layer."""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.quant import DEFAULT_WEIGHTS
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


@pytest.mark.parametrize("backend,weights", [("numpy", "fp32"), ("onnx", "fp32"), ("onnx", "int8")])
@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_gives_the_unsplit_tokens(tiny_llama, backend, weights, plan):
    want = greedy(ring(tiny_llama, None, backend, weights=weights), PROMPT, 10)
    got = ring(tiny_llama, None, backend, weights=weights, placement=PlacementPlan.parse(plan), emulate=True)
    shard = got.shards[0]
    # emulated: the plan's NPU devices are there, run by the CPU backend
    npu_slices = [name for name, device in shard.devices.items() if device.startswith("npu")]
    assert bool(npu_slices) == ("npu" in plan)
    assert all(shard.backends[name].processor == "cpu" and shard.backends[name].name == backend for name in npu_slices)
    assert greedy(got, PROMPT, 10) == want


def test_a_plan_applies_inside_each_shard_of_a_split(tiny_qwen2):
    want = greedy(ring(tiny_qwen2, None, "onnx"), PROMPT, 10)
    got = ring(tiny_qwen2, "0-0,1-2", "onnx", placement=PlacementPlan.parse("0=npu0,1-2=npu1;attention=cpu"), emulate=True)
    assert [s.name for s in got.shards[1].specs][:3] == ["layers.1.attn_norm+qkv", "layers.1.attention", "layers.1.o_proj+mlp"]
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


# ---------------------------------------------------------------- per-device pipelining


def _staged(model, plan, **kw):
    from exo_rknpu.runtime.pipeline import LocalRing
    from exo_rknpu.runtime.stages import StagedShard

    src = resolve_model(str(model))
    from helpers import SMALL_BUCKETS
    from exo_rknpu.runtime.placement import open_shard

    staged = StagedShard(open_shard(src, LayerRange.full(5), "onnx", SMALL_BUCKETS, placement=PlacementPlan.parse(plan), emulate=True, **kw))
    return staged, LocalRing([staged])


# a long prompt: more than one prefill chunk with SMALL_BUCKETS (seq 1, 4, 8), so chunks flow through the stages
PROMPTS = [PROMPT, [1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 44, 45, 46]]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("plan", ["0-1=npu0,2-3=npu1,4=npu2", "0-4=npu;attention=cpu"])
def test_concurrent_requests_through_a_per_core_pipeline_give_the_sequential_tokens(tiny_llama, n, plan):
    import threading

    want = [greedy(ring(tiny_llama, None, "onnx", weights=DEFAULT_WEIGHTS), p, 8, f"s{i}") for i, p in enumerate(PROMPTS[:n])]
    staged, r = _staged(tiny_llama, plan)
    try:
        assert len(staged.devices) >= 3  # embedding host + at least two devices
        got: list = [None] * n
        start = threading.Barrier(n)

        def one(i):
            start.wait()
            got[i] = greedy(r, PROMPTS[i], 8, f"c{i}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want
    finally:
        staged.close()


def test_a_failed_pipelined_call_leaves_the_request_where_it_was(tiny_llama):
    from exo_rknpu.errors import TensorContractError

    staged, r = _staged(tiny_llama, "0-1=npu0,2-4=npu1")
    try:
        first = r.forward("a", np.array([PROMPT[:5]]))
        runner = staged.runner
        boom = runner.runners["layers.2"]
        real_run = boom.run
        boom.run = lambda inputs, **_: (_ for _ in ()).throw(TensorContractError("injected"))
        with pytest.raises(TensorContractError, match="injected"):
            r.forward("a", np.array([PROMPT[5:]]))
        boom.run = real_run
        assert runner.requests.get("a").pos == 5
        again = r.forward("a", np.array([PROMPT[5:]]))
        want = ring(tiny_llama, None, "onnx", weights=DEFAULT_WEIGHTS)
        np.testing.assert_array_equal(first, want.forward("a", np.array([PROMPT[:5]])))
        np.testing.assert_allclose(again, want.forward("a", np.array([PROMPT[5:]])), rtol=1e-6, atol=1e-6)
    finally:
        staged.close()


def test_a_pipelined_shard_admits_like_an_unpipelined_one(tiny_llama):
    """Past --max-requests a new request is refused and the live one is untouched; a step for a request the shard
    holds no cache for fails instead of starting it again at position 0."""
    from exo_rknpu.errors import CapacityError, RequestStateError
    from exo_rknpu.runtime.requests import RequestLimits

    staged, _ = _staged(tiny_llama, "0-1=npu0,2-4=npu1", limits=RequestLimits(max_requests=1))
    try:
        first = staged.forward("a", np.array([PROMPT[:5]]), start=True)
        with pytest.raises(CapacityError, match="max-requests 1"):
            staged.forward("b", np.array([PROMPT[:5]]))
        with pytest.raises(RequestStateError, match="holds no KV cache"):
            staged.forward("c", np.array([PROMPT[5:]]), start=False)
        assert staged.runner.requests.ids() == ["a"] and staged.runner.requests.get("a").pos == 5
        again = staged.forward("a", np.array([PROMPT[5:]]), start=False)
        want = ring(tiny_llama, None, "onnx", weights=DEFAULT_WEIGHTS).shards[0]  # unpipelined, every position's logits
        np.testing.assert_array_equal(first, want.forward("a", np.array([PROMPT[:5]])))
        np.testing.assert_allclose(again, want.forward("a", np.array([PROMPT[5:]])), rtol=1e-6, atol=1e-6)
    finally:
        staged.close()


def test_compile_streams_a_plans_part_slices_with_one_read_per_layer(tiny_llama, monkeypatch):
    """`compile --placement '...;attention=cpu'` builds two NPU slices per layer; the compiler reads each layer's
    tensors once for both of them, and hands the head over once, with the last layer's weights."""
    import exo_rknpu.model.loader as loader
    from exo_rknpu.rknn.compile import _one_layer_at_a_time
    from exo_rknpu.runtime.placement import resolve
    from helpers import SMALL_BUCKETS

    src = resolve_model(str(tiny_llama))
    args = loader.load_args(src)
    full = LayerRange.full(args.num_hidden_layers)
    specs = resolve(PlacementPlan.parse("0-4=npu;attention=cpu"), args, full, "onnx", SMALL_BUCKETS, emulate=True).on_npu()
    assert len([s for s in specs if s.kind == "layers"]) == 2 * args.num_hidden_layers and specs[-1].kind == "head"
    reads: list[tuple[int, int]] = []
    real_load = loader.load_shard

    def counting(src, lr, *a, **kw):
        reads.append((lr.start, lr.stop))
        return real_load(src, lr, *a, **kw)

    monkeypatch.setattr(loader, "load_shard", counting)
    got = [(s.name, sorted(w.layers), w.lm_head is not None) for s, w in _one_layer_at_a_time(src, full, specs)]
    assert reads == [(i, i + 1) for i in range(args.num_hidden_layers)]
    assert [g[0] for g in got] == [s.name for s in specs]
    assert all(layers == [s.start] for (_, layers, _), s in zip(got, specs) if s.kind == "layers")
    assert got[-1][2]  # the head slice gets the final norm + head read with the last layer


def test_w8a8_refuses_block_split_slices_before_loading_anything(tiny_llama, tmp_path):
    """The w8a8 recipe calibrates whole layers: a plan's part slices are refused with a clear error, nothing built."""
    from exo_rknpu.rknn.compile import compile_range
    from exo_rknpu.errors import CompileError
    from exo_rknpu.runtime.placement import resolve
    from helpers import SMALL_BUCKETS

    from exo_rknpu.model.loader import load_args

    src = resolve_model(str(tiny_llama))
    args = load_args(src)
    plan = resolve(PlacementPlan.parse("0-4=npu;attention=cpu"), args, LayerRange.full(args.num_hidden_layers), "onnx",
                   SMALL_BUCKETS, emulate=True)
    with pytest.raises(CompileError, match="w8a8 compiles whole decoder layers"):
        compile_range(str(tiny_llama), "0-4", dtype="w8a8", buckets=SMALL_BUCKETS, cache_dir=tmp_path / "c",
                      progress=False, specs=plan.on_npu(), cut=plan.specs)
    assert not any((tmp_path / "c").rglob("*.rknn"))
