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
