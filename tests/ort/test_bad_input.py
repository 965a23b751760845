"""Bad input gets a clear error and disturbs nothing: the same request (and others) carry on correctly afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.errors import ContextOverflowError, LayerRangeError, TensorContractError, UnknownModelError
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets
from helpers import SMALL_BUCKETS

PROMPT = [5, 17, 42, 7]


@pytest.fixture(scope="module")
def shards(tiny_llama):
    src = resolve_model(str(tiny_llama))
    first = open_shard(src, LayerRange(0, 2, 5), "onnx", SMALL_BUCKETS)
    rest = open_shard(src, LayerRange(2, 5, 5), "onnx", SMALL_BUCKETS)
    return first, rest


def test_hidden_states_of_the_wrong_width_rank_or_dtype(shards):
    _, rest = shards
    with pytest.raises(TensorContractError, match=r"\(1, seq, 64\).*got \(1, 3, 32\)"):
        rest.forward("r", np.zeros((1, 3, 32), np.float32))
    with pytest.raises(TensorContractError, match="shape"):
        rest.forward("r", np.zeros((3, 64), np.float32))
    with pytest.raises(TensorContractError, match="float16 or float32"):
        rest.forward("r", np.zeros((1, 3, 64), np.float64))


def test_token_ids_to_a_non_first_shard_and_hidden_states_to_the_first(shards):
    first, rest = shards
    with pytest.raises(TensorContractError, match="token ids go to the first shard"):
        rest.forward("r", np.array([[1, 2, 3]]))
    with pytest.raises(TensorContractError, match="takes token ids"):
        first.forward("r", np.zeros((1, 3, 64), np.float32))
    with pytest.raises(TensorContractError, match="out of range"):
        first.forward("r", np.array([[1, 10_000]]))


def test_context_overflow_says_the_limit_and_leaves_the_request_usable(tiny_llama):
    src = resolve_model(str(tiny_llama))
    shard = open_shard(src, LayerRange.full(5), "onnx", Buckets(seq=(1, 4), context=(8, 16)))
    ref = open_shard(src, LayerRange.full(5), "onnx", Buckets(seq=(1, 4), context=(8, 16)))
    shard.forward("r", np.array([PROMPT]))
    with pytest.raises(ContextOverflowError, match="largest context bucket is 16.*--max-context"):
        shard.forward("r", np.array([list(range(1, 14))]))
    # the failed call changed nothing: the request continues exactly as one that never saw it
    ref.forward("r", np.array([PROMPT]))
    assert np.array_equal(shard.forward("r", np.array([[9]])), ref.forward("r", np.array([[9]])))


def test_a_failing_backend_call_rolls_the_request_back(tiny_llama):
    src = resolve_model(str(tiny_llama))
    shard = open_shard(src, LayerRange.full(5), "numpy", SMALL_BUCKETS)
    ref = open_shard(src, LayerRange.full(5), "numpy", SMALL_BUCKETS)
    shard.forward("r", np.array([PROMPT]))
    ref.forward("r", np.array([PROMPT]))
    head = shard.runners["head"]
    real_run = head.run
    head.run = lambda inputs, **_: (_ for _ in ()).throw(RuntimeError("device lost"))  # a backend that fails mid-call
    with pytest.raises(RuntimeError, match="device lost"):
        shard.forward("r", np.array([[9]]))
    head.run = real_run
    assert np.array_equal(shard.forward("r", np.array([[9]])), ref.forward("r", np.array([[9]])))


def test_layer_range_outside_the_model(tiny_llama):
    with pytest.raises(LayerRangeError, match="0-4"):
        LayerRange.parse("3-5", 5)


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        resolve_model("no-such-model")
