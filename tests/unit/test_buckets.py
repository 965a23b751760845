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
