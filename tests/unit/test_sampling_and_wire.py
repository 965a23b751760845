"""Sampling and the wire format between shards."""

import json
import math

import numpy as np
import pytest

from exo_rknpu.errors import SamplingError, TensorContractError
from exo_rknpu.runtime.sampling import Sampler, SamplingParams, choose, distribution, log_softmax, step_rng
from exo_rknpu.runtime.wire import from_wire, to_wire


def test_greedy_takes_the_argmax_of_the_last_position():
    logits = np.zeros((1, 3, 10), np.float32)
    logits[0, -1, 7] = 5.0
    logits[0, 0, 2] = 9.0  # an earlier position must not matter
    assert Sampler()(logits) == 7


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_greedy_on_the_model_dtype_picks_the_float64_argmax_ties_included(dtype):
    rng = np.random.default_rng(0)
    for _ in range(20):
        row = rng.integers(-4, 5, 257).astype(dtype)  # small integers: many ties for the maximum
        assert Sampler()(row[None, None]) == int(np.argmax(row.astype(np.float64))) == int(np.flatnonzero(row == row.max())[0])


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    row = np.linspace(0, 1, 50)
    a = [Sampler(SamplingParams(temperature=1.0, seed=3))(row) for _ in range(5)]
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    assert a[0] == s(row)
    topk = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=0))
    assert {topk(row) for _ in range(200)} <= {47, 48, 49}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    row = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=1))
    assert {s(row) for _ in range(300)} == {0, 1}


def test_bad_sampling_params_are_rejected():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


@pytest.mark.parametrize("dtype", ["float16", "float32", "int64"])
def test_wire_round_trip_gives_a_read_only_array_like_exo(dtype):
    x = np.arange(24, dtype=dtype).reshape(1, 3, 8)
    y = from_wire(to_wire(x))
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(x, y)
    assert not y.flags.writeable


def test_wire_can_halve_hidden_states_and_refuses_other_dtypes():
    assert from_wire(to_wire(np.ones((1, 2, 4), np.float32), "float16")).dtype == np.float16
    with pytest.raises(TensorContractError):
        to_wire(np.ones(3, np.complex64))


# ---------------------------------------------------------------------- the sampler against its definitions

def reference_distribution(row, temperature, top_k, top_p):
    """transformers' own logits warpers (temperature, then top-k, then top-p), softmaxed by torch."""
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    scores = torch.tensor(np.asarray(row, np.float64))[None]
    warpers = [gen.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(gen.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(gen.TopPLogitsWarper(top_p))
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 5, 1.0), (1.0, 0, 0.9),
                                                     (0.8, 10, 0.5), (2.0, 3, 0.95), (1.0, 0, 1e-9)])
def test_the_distribution_is_transformers_warpers(temperature, top_k, top_p):
    row = np.random.default_rng(0).normal(0, 3, 64)
    ours = distribution(row, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_allclose(ours, reference_distribution(row, temperature, top_k, top_p), atol=1e-9)


def test_draws_follow_the_distribution():
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(1)
    counts = np.bincount([choose(row, p, (), rng).token for _ in range(8000)], minlength=4) / 8000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.02)


def test_openai_presence_and_frequency_penalties_and_logit_bias():
    # OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty; then the bias is added.
    row = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    generated = [4, 4, 2, 4]
    p = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((0, 3.0),))
    expected = [1.0 + 3.0, 2.0, 3.0 - (1 * 0.25 + 0.5), 4.0, 5.0 - (3 * 0.25 + 0.5)]
    total = sum(math.exp(x) for x in expected)
    np.testing.assert_allclose(distribution(row, p, generated), [math.exp(x) / total for x in expected], rtol=1e-12)


def test_a_ban_by_logit_bias_is_never_drawn_and_greedy_sees_the_bias():
    row = np.array([0.0, 10.0, 0.0])
    p = SamplingParams(temperature=1.0, logit_bias=((1, -100.0),))
    assert {choose(row, p, (), np.random.default_rng(i)).token for i in range(200)} <= {0, 2}
    assert choose(row, SamplingParams(logit_bias=((2, 100.0),)), (), np.random.default_rng()).token == 2


def test_logprobs_are_the_log_softmax_of_the_model_logits():
    row = np.array([0.5, -1.0, 2.0, 0.0])
    total = sum(math.exp(x) for x in row)
    c = choose(row, SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, presence_penalty=2.0), [2],
               np.random.default_rng())
    assert c.token == 0  # the penalty moved the choice, not the reported log-probabilities
    assert c.logprob == pytest.approx(math.log(math.exp(0.5) / total))
    assert [t for t, _ in c.top] == [2, 0] and c.top[0][1] == pytest.approx(math.log(math.exp(2.0) / total))
    np.testing.assert_allclose(np.exp(log_softmax(row)).sum(), 1.0)


def test_the_same_seed_gives_the_same_tokens_on_any_generator():
    row = np.random.default_rng(3).normal(0, 1, 200)
    p = SamplingParams(temperature=1.0, seed=42)
    a = [choose(row, p, [0] * step, step_rng(p, step, np.random.default_rng(1))).token for step in range(20)]
    b = [choose(row, p, [0] * step, step_rng(p, step, np.random.default_rng(2))).token for step in range(20)]
    c = [choose(row, SamplingParams(temperature=1.0, seed=43), [0] * s,
                step_rng(SamplingParams(seed=43), s, np.random.default_rng())).token for s in range(20)]
    assert a == b and a != c


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-310])
def test_a_temperature_too_small_to_sample_is_greedy(temperature):
    row = np.array([1.0, 3.0, 2.0])
    p = SamplingParams(temperature=temperature)
    assert distribution(row, p) is None
    assert choose(row, p, (), np.random.default_rng()).token == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_logits_are_an_error_not_a_pick(bad):
    row = np.array([1.0, bad, 2.0])
    for p in (SamplingParams(), SamplingParams(temperature=1.0)):
        with pytest.raises(SamplingError, match="NaN or infinite"):
            choose(row, p, (), np.random.default_rng())


def test_sampling_params_round_trip_and_refuse_malformed_input():
    p = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=7, presence_penalty=-1, frequency_penalty=1.5,
                       logit_bias=((5, -100.0),), logprobs=True, top_logprobs=2, stop=("\n", "END"), max_tokens=9)
    assert SamplingParams.from_json(json.loads(json.dumps(p.to_json()))) == p
    for bad in ({"temperature": "hot"}, {"nope": 1}, {"stop": [1]}, {"logit_bias": [[1]]}, {"top_p": 0},
                {"top_logprobs": 3}, {"max_tokens": 0}, {"seed": -1}, {"presence_penalty": 3}, []):
        with pytest.raises(ValueError):
            SamplingParams.from_json(bad)
    assert not SamplingParams(stop=("x",), max_tokens=3).needs_sampler()
    assert SamplingParams(seed=1).needs_sampler() and SamplingParams(logprobs=True).needs_sampler()

