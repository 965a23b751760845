"""Shape buckets: how calls are cut into the static shapes the NPU was compiled for."""

import pytest

from exo_rknpu.errors import ContextOverflowError
from exo_rknpu.slices.spec import Buckets, SliceSpec, plan_slices


def test_chunks_use_the_largest_bucket_then_the_smallest_that_fits():
    b = Buckets(seq=(1, 16, 64), context=(256,))
    assert b.chunks(1) == [(1, 1)]
    assert b.chunks(5) == [(5, 16)]
    assert b.chunks(64) == [(64, 64)]
    assert b.chunks(150) == [(64, 64), (64, 64), (22, 64)]


def test_context_overflow_names_the_limit_and_the_fix():
    b = Buckets.up_to(1024)
    assert b.context == (256, 512, 1024)
    assert b.context_for(257) == 512
    with pytest.raises(ContextOverflowError, match="1024.*--max-context"):
        b.context_for(1025)


def test_buckets_must_include_decode():
    with pytest.raises(ValueError, match="include 1"):
        Buckets(seq=(16, 64))


def test_plan_slices_per_layer_or_whole_shard():
    per_layer = plan_slices(0, 3, first=True, last=True, layers_per_slice=1)
    assert [s.name for s in per_layer] == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    whole = plan_slices(4, 8, first=False, last=False, layers_per_slice=None)
    assert [s.name for s in whole] == ["layers.4-7"]
    assert SliceSpec("layers", 4, 8).n_layers == 4


def test_npu_buckets_bound_prefill_chunks_by_the_folded_query_size():
    from exo_rknpu.model.base import ModelArgs
    from exo_rknpu.slices.spec import npu_buckets, npu_max_seq

    smollm2 = ModelArgs("llama", 576, 1536, 30, 9, 3, 49152, 64)
    llama1b = ModelArgs("llama", 2048, 8192, 16, 32, 8, 128256, 64)
    assert (npu_max_seq(smollm2), npu_max_seq(llama1b)) == (42, 32)  # rep*S*hd <= 8192
    for a in (smollm2, llama1b):
        b = npu_buckets(Buckets(), a)
        assert b.seq == (1, 16, 32) and b.context == Buckets().context
    wide = ModelArgs("qwen3", 1024, 3072, 28, 16, 8, 151936, 128)  # rep 2, hd 128: 32 fits
    assert npu_buckets(Buckets(), wide).seq == (1, 16, 32)
    assert npu_buckets(Buckets(seq=(1, 8)), llama1b) == Buckets(seq=(1, 8))


def test_batch_buckets_pad_a_batch_to_the_smallest_that_holds_it():
    b = Buckets(seq=(1, 16), context=(256,), batch=(2, 4, 8))
    assert [b.batch_for(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="largest batch bucket"):
        b.batch_for(9)
    for bad in ((1, 4), (4, 2), (4, 4)):
        with pytest.raises(ValueError, match="batch buckets"):
            Buckets(batch=bad)


def test_batch_buckets_are_recorded_only_when_there_are_some():
    """Entries compiled without batch buckets keep their cache keys (the recorded facts are unchanged)."""
    assert Buckets(seq=(1, 16), context=(64,)).describe() == {"seq": [1, 16], "context": [64]}
    assert Buckets(seq=(1,), context=(64,), batch=(4,)).describe() == {"seq": [1], "context": [64], "batch": [4]}


def test_batch_graphs_for_cache_slices_in_the_npu_form_and_seq_rows_for_the_others():
    from exo_rknpu.model.base import ModelArgs
    from exo_rknpu.slices.spec import bucket_shapes, bucket_tag, npu_buckets

    smollm2 = ModelArgs("llama", 576, 1536, 30, 9, 3, 49152, 64)
    b = Buckets(seq=(1, 16), context=(256, 512), batch=(2, 4))
    layer = bucket_shapes(SliceSpec("layers", 0, 1, kv_layout="npu"), smollm2, b)
    assert [bucket_tag(s) for s in layer] == ["s1c256", "s16c256", "b2c256", "b4c256", "s1c512", "s16c512", "b2c512", "b4c512"]
    b4 = next(s for s in layer if s.get("batch") == 4 and s["ctx"] == 512)
    assert b4["inputs"]["hidden"] == [1, 4, 576] and b4["inputs"]["past_k_3"] == [3, 64, 512]
    assert b4["inputs"]["mask_0"] == [1, 1, 513, 3] and b4["outputs"]["k_new"] == [4 * 3, 64, 1]
    assert [bucket_tag(s) for s in bucket_shapes(SliceSpec("head"), smollm2, b)] == ["s1", "s2", "s4", "s16"]
    assert not any("batch" in s for s in bucket_shapes(SliceSpec("layers", 0, 1), smollm2, b))  # "seq" form: none
    qwen3 = ModelArgs("qwen3", 1024, 3072, 28, 16, 8, 151936, 128, qk_norm=True)
    assert npu_buckets(b, qwen3).batch == () and npu_buckets(b, smollm2).batch == (2, 4)
