"""RKNPUInferenceEngine: legacy exo's InferenceEngine, backed by exo_rknpu.engine.ShardEngine.

Contract (exo 5f18faec, see docs/exo.md):
* infer_tensor: token ids (1, seq) on the first shard, hidden states (1, seq, H) float16/float32 (read-only
  arrays from gRPC) elsewhere -> hidden states (1, seq, H) in the configured dtype, or float32 logits
  (1, seq, vocab) on the last shard; returns inference_state None (all state stays here, per request_id).
* sample(x, temp, top_p) -> exactly one int64 token, shape (1,).
* ensure_shard: idempotent and lock-protected; a new shard releases the old one.

Request lifecycle (exo never says when a request starts or ends; the launcher tells us): infer_prompt starts a
request; elsewhere an unknown request id starts a request only if its input is a prefill (seq > 1; exo's decode
steps are always one token) or the API announced it (announce()). Any other step for a request this node holds no
cache for fails with RequestStateError, so a node that restarted or released a request never answers from
position 0. release() ends a request (finished, cancelled, failed) and frees its cache at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from exo.inference.inference_engine import InferenceEngine
from exo.inference.shard import Shard

from exo_rknpu.engine import ShardEngine
from exo_rknpu.errors import (
    CapacityError,
    ContextOverflowError,
    ExoRknpuError,
    ModelUnavailableError,
    RequestStateError,
    TensorContractError,
)
from exo_rknpu.exo import ENGINE_CLASS, options as node_options
from exo_rknpu.exo.api_tokenizer import encode_prompt
from exo_rknpu.exo.availability import Prober, model_availability
from exo_rknpu.exo.capabilities import budget_bytes, mem_total_mb
from exo_rknpu.exo.cards import get_card, local_override
from exo_rknpu.exo.options import NodeOptions
from exo_rknpu.exo.shards import extra_ranges_to_download, range_to_shard, shard_to_range
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.zoo import ModelSource, resolve_model
from exo_rknpu.exo.request_state import PROMPT_IDS_KEY, prompt_ids
from exo_rknpu.runtime.sampling import Choice, SamplingParams, choose, step_rng

log = logging.getLogger(__name__)

def failure_kind(e: BaseException) -> str:
    """How the API should answer a request that failed with `e`: "capacity" (429, retry later), "unavailable"
    (503: the ring lost the request's state or changed under it), "context" (400: too long), "error" (500)."""
    if isinstance(e, CapacityError):
        return "capacity"
    if isinstance(e, RequestStateError):
        return "unavailable"
    if isinstance(e, ContextOverflowError):
        return "context"
    if isinstance(e, ModelUnavailableError):
        return "model"
    return "error"


class RKNPUInferenceEngine(InferenceEngine):
    def __init__(self, shard_downloader=None, options: NodeOptions | None = None, prober: Prober | None = None) -> None:
        """`prober` tells whether the model's source (Hugging Face) answers now (default: a HEAD request)."""
        self.options = options or node_options.current()
        self.shard_downloader = shard_downloader
        self.shard: Optional[Shard] = None
        self.tokenizer = None  # exo_rknpu Tokenizer: eos_token_id, decode (Node and exo's TUI use these)
        self.session = {}  # exo's ABC has a class-level dict shared by every engine; keep ours separate
        config = self.options.engine
        if config.memory_bytes is None and mem_total_mb() > 0:  # a shard that needs more is refused before it loads
            config = replace(config, memory_bytes=budget_bytes(mem_total_mb(), config.backend))
        self.core = ShardEngine(config, self._source)
        self._rng = np.random.default_rng()
        self._prober = prober or Prober()

    # ------------------------------------------------------------------ model files

    async def _source(self, model_id: str, layer_range: LayerRange) -> ModelSource:
        card = get_card(model_id)
        if card.n_layers != layer_range.n_layers:
            raise ExoRknpuError(
                f"exo asked for {model_id} with {layer_range.n_layers} layers; its card says {card.n_layers}"
            )
        # Decided before any download starts: a model that is neither here nor fetchable fails in seconds
        # (exo's downloader would retry for minutes, and on after the client left).
        found = await asyncio.to_thread(model_availability, card, self.options.model_dir, self._prober)
        if not found.servable:
            raise ModelUnavailableError(found.reason)
        override = local_override(card, self.options.model_dir)
        if override is not None:
            return await self.core.run_blocking(resolve_model, str(override))
        if card.zoo_alias is not None:  # by its alias: the name its compiled slices are cached under
            return await self.core.run_blocking(resolve_model, card.zoo_alias)
        if found.local is not None:  # complete in exo's download folder: no need to ask the hub
            return await self.core.run_blocking(resolve_model, str(found.local))
        if self.shard_downloader is None:
            raise ModelUnavailableError(f"{model_id} must be downloaded but this engine has no shard downloader; "
                                        f"put it at --model-dir DIR as DIR/{model_id}")
        # exo's downloader: only the files holding this shard's layers when the repo has a safetensors index.
        path = await self.shard_downloader.ensure_shard(range_to_shard(model_id, layer_range), ENGINE_CLASS)
        # exo's allow-patterns miss the embedding of a tied last shard and the final norm of a whole-model shard:
        # ask for the one-layer shard whose patterns include that file.
        for extra in await self.core.run_blocking(extra_ranges_to_download, Path(path), layer_range):
            await self.shard_downloader.ensure_shard(range_to_shard(model_id, extra), ENGINE_CLASS)
        return await self.core.run_blocking(resolve_model, str(Path(path)))

    # ------------------------------------------------------------------ failures (for the launcher)

    def _record_failure(self, request_id: str, e: BaseException) -> None:
        self.core.lifecycle.fail(request_id, failure_kind(e), f"{type(e).__name__}: {e}")

    def take_failure(self, request_id: str) -> tuple[str, str] | None:
        """(kind, message) of the error that made this request fail here (once), or None. See failure_kind."""
        return self.core.lifecycle.take_failure(request_id)

    # ------------------------------------------------------------------ request lifecycle (for the launcher)

    def announce(self, request_id: str) -> None:
        """The API is about to start this request: a one-token prefill for it is a start, not a lost request."""
        self.core.lifecycle.announce(request_id)

    def release(self, request_id: str, reason: str) -> None:
        """The request is over (finished, cancelled, failed): free its cache now; later steps for it fail."""
        self.core.lifecycle.unannounce(request_id)
        self.core.release(request_id, reason)

    def positions_left(self, request_id: str) -> int | None:
        """How many more tokens the request's cache can take on this node (None: it holds none for it)."""
        return self.core.positions_left(request_id)

    # ------------------------------------------------------------------ exo's interface

    async def ensure_shard(self, shard: Shard) -> None:
        loaded = await self.core.ensure(shard.model_id, shard_to_range(shard))
        self.shard, self.tokenizer = shard, loaded.tokenizer

    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        # Training checkpoints are not supported; loading the shard is what exo needs before inference.
        await self.ensure_shard(shard)

    async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
        await self.ensure_shard(shard)
        # Off the event loop (not on the engine's worker, which may be busy with other requests' layers): a long
        # prompt must not delay exo's health checks and topology collection.
        ids = await asyncio.to_thread(encode_prompt, self.tokenizer, prompt)
        if not ids:
            raise TensorContractError(f"the prompt for {shard.model_id} encodes to no tokens")
        return np.asarray(ids, dtype=np.int64)

    async def decode(self, shard: Shard, tokens: np.ndarray) -> str:
        await self.ensure_shard(shard)
        return self.tokenizer.decode([int(t) for t in np.asarray(tokens).reshape(-1)])

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        """Logits (1, seq, vocab) (or (1, vocab)) -> one token id, int64, shape (1,) (exo's own interface)."""
        choice = await self.sample_request(x, SamplingParams(temperature=float(temp), top_p=float(top_p)), ())
        return np.array([choice.token], dtype=np.int64)

    async def sample_request(self, x: np.ndarray, params: SamplingParams, generated: Sequence[int]) -> Choice:
        """The next token of a request under its own parameters (penalties over `generated`, its seed), with
        log-probabilities when asked for; NaN or infinite logits raise SamplingError."""
        row = logits_row(x)
        rng = step_rng(params, len(generated), self._rng)
        if params.greedy and not params.logprobs and not params.logit_bias and not generated:
            return choose(row, params, generated, rng)  # an argmax: not worth a hop to the worker thread
        return await self.core.run_blocking(choose, row, params, list(generated), rng)

    async def infer_prompt(self, request_id: str, shard: Shard, prompt: str,
                           inference_state: Optional[dict] = None) -> tuple[np.ndarray, Optional[dict]]:
        """exo's infer_prompt (encode, then the first step), marking the step as the request's start. The prompt's
        ids come from inference_state when the API encoded them (content specials kept as text); they are
        dropped from the state passed on (only the first node needs them)."""
        try:
            ids = prompt_ids(inference_state)
            if ids is None:
                tokens = await self.encode(shard, prompt)
            else:
                await self.ensure_shard(shard)
                tokens = np.asarray(ids, dtype=np.int64)
        except Exception as e:
            self._record_failure(request_id, e)
            raise
        out, _ = await self._infer(request_id, shard, tokens.reshape(1, -1), start=True)
        state = {k: v for k, v in inference_state.items() if k != PROMPT_IDS_KEY} if inference_state else inference_state
        return out, state

    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: Optional[dict] = None) -> tuple[np.ndarray, Optional[dict]]:
        """One step; inference_state (the request's sampling parameters) is handed back for the next hop."""
        x = np.asarray(input_data)
        # A prefill (seq > 1) or an announced request may start here; a lone decode step must find its cache.
        start = None if (x.ndim >= 2 and x.shape[1] > 1) or self.core.lifecycle.is_announced(request_id) else False
        out, _ = await self._infer(request_id, shard, x, start)
        return out, inference_state

    async def _infer(self, request_id: str, shard: Shard, input_data: np.ndarray,
                     start: bool | None) -> tuple[np.ndarray, Optional[dict]]:
        try:
            layer_range = shard_to_range(shard)
            out = await self.core.forward(request_id, shard.model_id, layer_range, input_data, start)
        except Exception as e:
            self._record_failure(request_id, e)
            log.debug("request %s failed on %s: %s", request_id, shard, e)  # the ring reports it, once
            raise
        loaded = self.core.current
        if loaded is not None:
            self.shard, self.tokenizer = shard, loaded.tokenizer
        return out, None


def logits_row(x: np.ndarray) -> np.ndarray:
    """The last position's logits of (1, seq, vocab) or (1, vocab) float logits, or TensorContractError."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[0] == 1 and x.shape[1] >= 1:
        row = x[0, -1]
    elif x.ndim == 2 and x.shape[0] >= 1:
        row = x[-1]
    else:
        raise TensorContractError(f"sample() takes logits of shape (1, seq, vocab) or (1, vocab); got {x.shape}")
    if not np.issubdtype(row.dtype, np.floating):
        raise TensorContractError(f"sample() takes float logits; got {row.dtype} (is this node the last shard?)")
    return row

