"""Token sampling: greedy, temperature, top-k, top-p, OpenAI's presence/frequency penalties and logit bias,
seedable, with log-probabilities; and the request's generation parameters that travel with it around a ring.

`SamplingParams` is the one value every node that samples reads (the CLI's generate, an exo-rknpu last node, a
launcher-patched stock node): `to_json()` / `from_json()` are its (de)serialization, checked like any input from
outside the process. Definitions (the tests check them against transformers' logits warpers and OpenAI's text):

* penalties (OpenAI): logit[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0), c[j] = how often
  token j was generated so far in this answer (the prompt does not count); then logit_bias is added;
* temperature scales those logits; 0, or one so small that logits / T overflows, is greedy (the limit of softmax
  as T -> 0); then top-k, then top-p (the smallest set of most likely tokens whose probability reaches top_p);
* logprobs are the log-softmax of the model's own logits (before penalties, bias, temperature and filtering);
* logits that are NaN or infinite are an error (SamplingError), never a random pick.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from exo_rknpu.errors import SamplingError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGIT_BIAS = 300  # entries; OpenAI does not say, its examples use a handful


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    seed: int | None = None  # the same seed gives the same answer (per step: default_rng([seed, step]))
    presence_penalty: float = 0.0  # -2..2
    frequency_penalty: float = 0.0  # -2..2
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100)
    logprobs: bool = False  # report the chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives (0..20; needs logprobs)
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    max_tokens: int | None = None  # None: the node's own cap

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and -2 <= v <= 2):
                raise ValueError(f"{name} must be a number from -2 to 2, got {v!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        for tok, bias in self.logit_bias:
            if not _is_int(tok) or tok < 0 or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias maps token ids (>= 0) to numbers from -100 to 100; got {tok!r}: {bias!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        if len(self.stop) > MAX_STOP or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOP} non-empty strings, got {self.stop!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def needs_sampler(self) -> bool:
        """True if a sampler that knows only exo's (temperature 0) argmax would answer differently: anything
        beyond greedy decoding except stop / max_tokens, which the API can enforce on its own."""
        plain = SamplingParams(stop=self.stop, max_tokens=self.max_tokens)
        return self != plain

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (lists for tuples); from_json(to_json(p)) == p."""
        d = asdict(self)
        d["logit_bias"] = [[t, b] for t, b in self.logit_bias]
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_json(cls, d: Any) -> "SamplingParams":
        """The inverse of to_json; anything malformed (unknown keys, wrong types, out of range) -> ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling parameters must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
        kw = dict(d)
        try:
            if "logit_bias" in kw:
                kw["logit_bias"] = tuple((int(t), float(b)) for t, b in kw["logit_bias"])
            if "stop" in kw:
                kw["stop"] = tuple(kw["stop"])
        except (TypeError, ValueError):
            raise ValueError("logit_bias must be [[token id, bias], ...] and stop a list of strings") from None
        return cls(**kw)


@dataclass(frozen=True)
class Choice:
    """One sampled token, with its log-probability and the most likely alternatives when asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Picks one token from a logits row. Holds its own random generator (no global state)."""

    def __init__(self, params: SamplingParams = SamplingParams()) -> None:
        self.params = params

    @cached_property
    def rng(self) -> np.random.Generator:
        """Made when first drawn from: greedy decoding never imports numpy.random (~2 MiB resident)."""
        return np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [V], or any array whose last row along the last axis is the one to sample (x[..., -1, :])."""
        row = np.asarray(logits)  # float32 as the model gives it: choose widens where it computes
        if row.ndim > 1:
            row = row.reshape(-1, row.shape[-1])[-1]
        return sample_row(row, self.params, None if self.params.greedy else self.rng)


def sample_row(row: np.ndarray, p: SamplingParams, rng: np.random.Generator | None) -> int:
    """One token from a logits row under temperature / top-k / top-p (no penalties: nothing generated yet);
    `rng` may be None when `p` is greedy (nothing is drawn)."""
    return choose(row, p, (), rng).token


def adjusted_logits(row: np.ndarray, p: SamplingParams, generated: Sequence[int]) -> np.ndarray:
    """The logits after OpenAI's penalties (over the tokens generated so far) and logit_bias, float64."""
    z = np.array(row, dtype=np.float64).reshape(-1)
    if not np.isfinite(z).all():
        bad = int(np.count_nonzero(~np.isfinite(z)))
        raise SamplingError(f"the model's logits hold {bad} NaN or infinite values (of {z.size}); "
                            "nothing can be sampled from them")
    if generated and (p.presence_penalty or p.frequency_penalty):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        inside = (ids >= 0) & (ids < z.size)
        ids, counts = ids[inside], counts[inside]
        z[ids] -= counts * p.frequency_penalty + p.presence_penalty
    for tok, bias in p.logit_bias:
        if tok < z.size:
            z[tok] += bias
    return z


def distribution(row: np.ndarray, p: SamplingParams, generated: Sequence[int] = ()) -> np.ndarray | None:
    """The probabilities the next token is drawn from (length V, zeros outside top-k/top-p), or None when the
    choice is greedy (temperature 0, or so small that logits / temperature overflow)."""
    z = adjusted_logits(row, p, generated)
    if p.greedy:
        return None
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = z / p.temperature
    if not np.isfinite(z).all():
        return None
    order = np.argsort(-z, kind="stable")
    if p.top_k:
        order = order[: p.top_k]
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    if p.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = min(int(np.searchsorted(np.cumsum(probs), p.top_p) + 1), probs.size)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    out = np.zeros(z.size)
    out[order] = probs
    return out


def step_rng(p: SamplingParams, step: int, fallback: np.random.Generator) -> np.random.Generator:
    """The generator for step `step` of a request: with a seed it depends only on (seed, step), so the same seed
    gives the same answer on whichever node samples, with no state kept between steps; else `fallback`."""
    return np.random.default_rng([p.seed, step]) if p.seed is not None else fallback


def choose(row: np.ndarray, p: SamplingParams, generated: Sequence[int], rng: np.random.Generator | None) -> Choice:
    """The next token for a request that has generated `generated` so far, drawn with `rng` (None: `p` is greedy
    and nothing is drawn)."""
    if p.greedy and not p.logprobs and not p.logit_bias and not (generated and (p.presence_penalty or p.frequency_penalty)):
        return Choice(greedy_token(row))  # nothing changes the logits: no float64 copy of the row per step
    probs = distribution(row, p, generated)
    if probs is None:
        token = int(np.argmax(adjusted_logits(row, p, generated)))
    else:
        if rng is None:
            raise ValueError("sampling at a temperature above 0 needs a random generator")
        nonzero = np.flatnonzero(probs)
        token = int(nonzero[rng.choice(nonzero.size, p=probs[nonzero] / probs[nonzero].sum())])
    if not p.logprobs:
        return Choice(token)
    lp = log_softmax(row)
    top = ()
    if p.top_logprobs:
        best = np.argsort(-lp, kind="stable")[: p.top_logprobs]
        top = tuple((int(t), float(lp[t])) for t in best)
    return Choice(token, float(lp[token]), top)


def greedy_token(row: np.ndarray) -> int:
    """argmax of a logits row as it is (widening to float64 is exact, so it picks the same token), refusing NaN or
    infinite logits as adjusted_logits does."""
    z = np.asarray(row).reshape(-1)
    if not np.isfinite(z).all():
        adjusted_logits(z, SamplingParams(), ())  # raises the SamplingError that names the bad values
    return int(np.argmax(z))


def log_softmax(row: np.ndarray) -> np.ndarray:
    z = np.asarray(row, dtype=np.float64).reshape(-1)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())
