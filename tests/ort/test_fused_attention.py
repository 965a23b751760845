"""The onnx backend's fused attention ("gqa" form: onnxruntime's GroupQueryAttention extending each layer's cache in
place) computes what the split form computes: on float32 weights the same greedy tokens and logits equal up to
float32 summation order, for single requests, padded prefill chunks, qwen3's per-head norms and batched steps."""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.backends.ort import MaskPositions, OrtBackend, cached_positions, written_rows
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.cache import RequestCache
from exo_rknpu.runtime.inputs import attention_mask, layer_inputs
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.onnx_export import build_onnx_compact
from exo_rknpu.slices.spec import SliceSpec
from helpers import SMALL_BUCKETS, greedy, nmse, ring
from tiny_models import make_tiny_hf

FUSED_VS_SPLIT_NMSE = 1e-10  # float32 summation order only
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31, 2, 9]  # 13 tokens: chunks of 8 and 5 (padded to 8)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """qwen3: q/k RMS norms per head, head_dim (32) independent of hidden / heads."""
    return make_tiny_hf(tmp_path_factory.mktemp("tiny_qwen3"), arch="qwen3", n_layers=2, head_dim=32, seed=3)


def _shard(model, fused: bool, split: bool = False):
    src = resolve_model(str(model))
    return open_shard(src, LayerRange.full(_layers(model)), "onnx", SMALL_BUCKETS, weights="fp32",
                      layers_per_slice=2 if split else None, backend_options={"fused_attention": fused, "use_cache": False})


def _layers(model) -> int:
    return load_args(resolve_model(str(model))).num_hidden_layers


def test_the_fused_form_runs_one_attention_op_per_layer_and_no_attention_matmul(tiny_llama):
    shard = load_shard(resolve_model(str(tiny_llama)), LayerRange.full(5), "int4")
    model, _ = build_onnx_compact(SliceSpec("layers", 0, 5), shard, attention_form="gqa")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 5 and "MatMul" not in ops and "Softmax" not in ops
    # each layer's cache comes back as its own output (the runner binds it to the input's memory)
    assert {o.name for o in model.graph.output} == {"hidden_out"} | {f"present_{x}.{i}" for x in "kv" for i in range(5)}


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])  # plain, q/k/v biases, q/k norms
def test_fused_and_split_forms_give_the_same_greedy_tokens_and_logits(model, request):
    path = request.getfixturevalue(model)
    fused, split = (ring(path, None, "onnx", backend_options={"fused_attention": f, "use_cache": False}) for f in (True, False))
    assert greedy(fused, PROMPT, 40) == greedy(split, PROMPT, 40)  # 13 + 40 positions: context buckets 16, 32, 64
    logits = [r.forward("r", np.array([PROMPT]), logits="all") for r in (fused, split)]
    assert nmse(*logits) <= FUSED_VS_SPLIT_NMSE


def test_a_padded_chunk_running_past_the_context_bucket_is_not_lost(tiny_llama):
    """13 cached positions + a call of 3 tokens padded to 4 rows: 17 rows do not fit the 16-position bucket the
    call needs, so that call's cache is grown in a buffer of the runner's; what is stored is the same."""
    shards = [_shard(tiny_llama, fused) for fused in (True, False)]
    outs = []
    for shard in shards:
        shard.forward("r", np.array([PROMPT]))
        outs.append(shard.forward("r", np.array([[4, 5, 6]]), logits="all"))
        outs.append(shard.forward("r", np.array([[7]]), logits="all"))
        assert shard.requests.get("r").pos == 17
    assert nmse(outs[0], outs[2]) <= FUSED_VS_SPLIT_NMSE and nmse(outs[1], outs[3]) <= FUSED_VS_SPLIT_NMSE
    caches = [shard.requests.get("r").caches[0] for shard in shards]
    assert np.allclose(caches[0].keys[:, :, :17], caches[1].keys[:, :, :17], atol=1e-5)
    assert np.allclose(caches[0].values[:, :, :17], caches[1].values[:, :, :17], atol=1e-5)


def test_a_decode_step_writes_the_cache_in_place(tiny_llama):
    (shard,) = (_shard(tiny_llama, True),)
    shard.forward("r", np.array([PROMPT]))
    cache = shard.requests.get("r").caches[0]
    keys, before = cache.keys, cache.keys.copy()
    shard.forward("r", np.array([[3]]))
    assert np.shares_memory(cache.keys, keys)  # the same buffer (a view of the pool), extended at position 13 only
    changed = np.nonzero(np.any(keys != before, axis=(0, 1, 3)))[0]
    assert changed.tolist() == [13]


def test_batched_fused_steps_give_each_request_its_lone_split_tokens(tiny_llama):
    prompts = [PROMPT[:3], PROMPT, PROMPT[:1]]
    fused, split = _shard(tiny_llama, True, split=True), _shard(tiny_llama, False, split=True)
    last = {}
    for i, p in enumerate(prompts):
        for shard in (fused, split):
            last[i] = int(shard.forward(f"r{i}", np.array([p]))[0, -1].argmax())
    want, got = {i: [t] for i, t in last.items()}, {i: [t] for i, t in last.items()}
    for _ in range(8):
        outs = fused.forward_batch([(f"r{i}", np.array([[s[-1]]])) for i, s in got.items()])
        for i, out in zip(got, outs):
            got[i].append(int(out[0, -1].argmax()))
        for i, s in want.items():
            s.append(int(split.forward(f"r{i}", np.array([[s[-1]]]))[0, -1].argmax()))
    assert got == want


def test_masks_that_do_not_show_a_prefix_of_the_cache_are_refused():
    good = attention_mask(1, 1, 16, 5)
    assert cached_positions(good, 16).tolist() == [5]
    holey = good.copy()
    holey[..., 2] = -1e9
    with pytest.raises(ValueError, match="prefix of the cache"):
        cached_positions(holey, 16)


def test_a_mask_that_can_change_is_read_again_at_every_call_and_the_runtime_hands_out_masks_that_cannot():
    read = MaskPositions()
    mask = attention_mask(1, 1, 16, 5)
    assert read(mask, 16)[0].tolist() == [5]
    mask[..., 5:9] = 0.0  # the same array, changed in place: its positions are read again
    past, seqlens, total = read(mask, 16)
    assert past.tolist() == [9] and seqlens.tolist() == [9] and int(total) == 10
    frozen = RequestCache(pos=3).mask(3, 1, 16)
    assert not frozen.flags.writeable and frozen.base is None  # what MaskPositions may recognise by identity
    assert read(frozen, 16)[0].tolist() == [3] and read(frozen, 16)[0].tolist() == [3]


def test_handed_its_cache_in_place_the_fused_form_returns_no_new_rows_and_the_cache_holds_the_split_forms(tiny_llama):
    """What the shard relies on to skip storing k_new/v_new: the rows are in its cache after the call, as the split
    form (which writes nothing into its inputs) returns them."""
    shard = load_shard(resolve_model(str(tiny_llama)), LayerRange.full(5), "fp32")
    a, spec, pos, ctx = shard.args, SliceSpec("layers", 0, 2), 6, 16
    rng = np.random.default_rng(0)
    past = rng.standard_normal((2, 2, a.num_key_value_heads, ctx, a.head_dim)).astype(np.float32)  # keys, values
    inputs = layer_inputs(a, rng.standard_normal((1, 1, a.hidden_size)).astype(np.float32), 1, pos, ctx)
    split = OrtBackend(use_cache=False, fused_attention=False).prepare(spec, shard, SMALL_BUCKETS)
    want = split.run({**inputs, "past_k": past[0].copy(), "past_v": past[1].copy()})
    keys, values = past[0].copy(), past[1].copy()
    fused = OrtBackend(use_cache=False).prepare(spec, shard, SMALL_BUCKETS)
    got = fused.run({**inputs, "past_k": keys, "past_v": values}, cache_in_place=True)
    assert "k_new" not in got and "v_new" not in got
    np.testing.assert_allclose(got["hidden_out"], want["hidden_out"], rtol=1e-5, atol=1e-5)
    for cache, new in ((keys, want["k_new"]), (values, want["v_new"])):
        np.testing.assert_allclose(cache[:, :, pos : pos + 1], new, rtol=1e-5, atol=1e-5)
    assert np.array_equal(keys[:, :, :pos], past[0][:, :, :pos])  # the rows before are untouched


def test_a_batched_call_returns_the_rows_each_request_wrote_at_its_own_position_layer_major():
    n, b, kv, hd = 2, 3, 2, 4
    cache = np.random.default_rng(0).standard_normal((n, b, kv, 12, hd)).astype(np.float32)
    past = np.array([0, 7, 3])
    for seq in (1, 2):
        got = written_rows(cache, past, seq, batched=True)
        assert got.shape == (n * b, kv, seq, hd)
        for layer in range(n):
            for row, p in enumerate(past):
                assert np.array_equal(got[layer * b + row], cache[layer, row, :, p : p + seq])


def test_models_whose_heads_the_kernel_does_not_take_keep_the_split_form(tmp_path):
    path = make_tiny_hf(tmp_path / "hd8", n_layers=1, hidden=32, heads=4, kv_heads=2)  # head_dim 8
    shard = load_shard(resolve_model(str(path)), LayerRange.full(1), "fp32")
    assert OrtBackend(use_cache=False).attention_form(SliceSpec("layers", 0, 1), shard.args) == "split"
