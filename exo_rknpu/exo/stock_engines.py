"""exo's stock engines started by `exo-rknpu node --engine tinygrad|mlx`, with the fixes a mixed ring needs.

exo's tinygrad engine at 5f18faec cannot be a correct member of a mixed ring as shipped (measured, docs/exo.md
"Mixed clusters"); the launcher fixes it in memory, in this process only:
1. **No final norm on a last shard.** `TransformerShard` applies the output head to the last layer's output without
   the final RMSNorm (`Transformer.forward_base` has it; exo does not use that path): garbage whenever tinygrad holds
   the last layers. Fixed: the last shard's head is `output(norm(x))`.
2. **Only the first request after start is right.** `TransformerShard.forward_jit` is one TinyJit per model, and the
   KV cache is passed to it inside a list, which TinyJit does not treat as an input (it takes Tensor arguments
   only): the JIT captured on the first request's decode steps keeps that request's cache buffers, so every later
   request decodes against the first request's cache (its prefill, not jitted, uses its own). Fixed: the JIT takes
   each layer's cache as its own Tensor argument, so every call runs on the caller's cache. The per-request state
   is also bounded without eviction: stock keeps 2 and silently restarts the oldest request at position 0 when a
   third arrives; here a request beyond `--max-requests` is refused (HTTP 429), a decode step for a request without
   state fails, and `release` (called by ring.RingNode when a request ends) frees it.
3. **No card and no shape for SmolLM2.** exo has no `smollm2-135m` card, and the engine picks its model shape by
   name ("1b", "3b", "8b", anything else 70B). Added: the card, `MODEL_PARAMS["135M"]` with SmolLM2's shape, and an
   explicit shape per model id (an id without one fails with that reason instead of loading as 70B).
4. **Sampling and prompts** as on an exo-rknpu node: the launcher's Node samples with exo-rknpu's sampler under
   each request's parameters (launcher.sample_next), and a first shard takes the prompt's token ids the API sends
   in inference_state (request_state.py) instead of re-encoding the prompt string.
5. **Capabilities:** exo's own report (total RAM on a Linux CPU box, VRAM on a GPU box, a Mac's unified memory),
   with the launcher's mark (capabilities.LauncherMark) at the end of `model`; `--memory-mb` replaces the memory.

MLX (`--engine mlx`) imports only on Apple silicon; it gets 4 (sampling; not the prompt ids) and 5, and serves the
models exo-rknpu also has cards for. Not run here (no Mac).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from exo_rknpu.errors import CapacityError, ExoRknpuError, RequestStateError
from exo_rknpu.exo.capabilities import LauncherMark, with_mark
from exo_rknpu.exo.cards import CARDS
from exo_rknpu.exo.options import NodeOptions
from exo_rknpu.exo.patching import add_methods, replace_methods
from exo_rknpu.exo.request_state import PROMPT_IDS_KEY, prompt_ids
from exo_rknpu.runtime.requests import RequestLog

STOCK_ENGINE_CLASSES = {"tinygrad": "TinygradDynamicShardInferenceEngine", "mlx": "MLXDynamicShardInferenceEngine"}
# Cards exo lacks, for the tinygrad engine: model id -> (Hugging Face repo, MODEL_PARAMS key)
TINYGRAD_CARDS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "135M")}
SMOLLM2_PARAMS = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json, in tinygrad's Transformer arguments
    "args": {"dim": 576, "n_heads": 9, "n_kv_heads": 3, "n_layers": 30, "norm_eps": 1e-5, "rope_theta": 100000,
             "vocab_size": 49152, "hidden_dim": 1536, "tie_word_embeddings": True},
    "files": 1,
}


def tinygrad_model_size(model_id: str) -> str | None:
    """The MODEL_PARAMS key of `model_id` for exo's tinygrad engine, or None if it has no card for tinygrad. exo's
    own cards name Llama 3.x models whose size is in the id; the rule is exo's ("1b", "3b", "8b", else 70B)."""
    from exo.models import model_cards

    if model_id in TINYGRAD_CARDS:
        return TINYGRAD_CARDS[model_id][1]
    if STOCK_ENGINE_CLASSES["tinygrad"] not in model_cards.get(model_id, {}).get("repo", {}):
        return None
    low = model_id.lower()
    return "1B" if "1b" in low else "3B" if "3b" in low else "8B" if "8b" in low else "70B" if "70b" in low else None


def stock_served_models(engine: str) -> tuple[str, ...]:
    """The model ids a launcher-started stock engine serves (its launcher mark)."""
    from exo.models import model_cards

    cls = STOCK_ENGINE_CLASSES[engine]
    if engine == "tinygrad":
        return tuple(sorted(m for m in set(model_cards) | set(TINYGRAD_CARDS) if tinygrad_model_size(m) is not None))
    return tuple(sorted(m for m in CARDS if cls in model_cards.get(m, {}).get("repo", {})))


def check_engine_importable(engine: str) -> str | None:
    """Why `engine` cannot run in this process, or None."""
    try:
        if engine == "tinygrad":
            import tinygrad  # noqa: F401
        elif engine == "mlx":
            import mlx.core  # noqa: F401
        else:
            return f"unknown stock engine {engine!r} (choose one of: {', '.join(STOCK_ENGINE_CLASSES)})"
    except Exception as e:  # ImportError, or a native library failing to load
        where = "Apple silicon" if engine == "mlx" else "tinygrad 0.10.2 and clang (docs/exo.md)"
        return f"exo's {engine} engine cannot run here (needs {where}): {type(e).__name__}: {e}"
    return None


def fix_tinygrad(options: NodeOptions) -> None:
    """Fixes 1-3 of the module docstring, and the prompt ids of 4, in exo's tinygrad engine (launcher.PATCHES)."""
    import exo.models as models

    for model_id, (repo, _) in TINYGRAD_CARDS.items():
        entry = models.model_cards.setdefault(model_id, {"layers": CARDS[model_id].n_layers, "repo": {}})
        entry["repo"][STOCK_ENGINE_CLASSES["tinygrad"]] = repo
    _patch_tinygrad(options)


def report_stock_engine(options: NodeOptions) -> None:
    """5 of the module docstring: exo's own capabilities with the launcher's mark (launcher.PATCHES)."""
    import exo.topology.device_capabilities as dc

    mark = LauncherMark(options.stock_engine, stock_served_models(options.stock_engine))

    def marked(caps: Any) -> Any:
        update = {"model": with_mark(caps.model, mark)}
        if options.memory_mb is not None:
            update["memory"] = int(options.memory_mb)
        return caps.model_copy(update=update)

    original_linux, original_mac = dc.linux_device_capabilities, dc.mac_device_capabilities

    async def linux_device_capabilities() -> Any:
        return marked(await original_linux())

    async def mac_device_capabilities() -> Any:
        return marked(await original_mac())

    dc.linux_device_capabilities = linux_device_capabilities
    dc.mac_device_capabilities = mac_device_capabilities


@dataclass
class RequestState:
    """One request's KV cache on a tinygrad shard and its position."""

    cache: list
    start: int


class TinygradRequests:
    """The per-request states of one tinygrad engine (replaces exo's `states`, which holds 2 and evicts)."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.states: OrderedDict[str, RequestState] = OrderedDict()
        self.model: Any = None  # the model the states belong to; a new shard drops them
        self.lifecycle = RequestLog()  # announced and failed requests, as the rknpu engine records them

    def state(self, model: Any, request_id: str, h: Any, seq: int) -> RequestState:
        from exo.inference.tinygrad.stateful_model import make_prompt_state

        if model is not self.model:
            self.states.clear()
            self.model = model
        state = self.states.get(request_id)
        if state is not None:
            return state
        if seq == 1 and not self.lifecycle.is_announced(request_id):
            raise RequestStateError(f"request {request_id}: a decode step arrived but this node holds no state for "
                                    f"it (it restarted, or the request was released)")
        if len(self.states) >= self.max_requests:
            raise CapacityError(f"this tinygrad node holds {len(self.states)} live requests (--max-requests "
                                f"{self.max_requests}); retry later")
        self.lifecycle.unannounce(request_id)
        state = RequestState(make_prompt_state(h, model).cache, 0)
        self.states[request_id] = state
        return state

    def record(self, request_id: str, e: BaseException) -> None:
        from exo_rknpu.exo.inference_engine import failure_kind

        self.lifecycle.fail(request_id, failure_kind(e), f"{type(e).__name__}: {e}")


def _patch_tinygrad(options: NodeOptions) -> None:
    import exo.inference.tinygrad.inference as tgi
    import exo.inference.tinygrad.models.llama as llama

    tgi.MODEL_PARAMS.setdefault("135M", SMOLLM2_PARAMS)
    original_build = tgi.build_transformer

    def build_transformer(model_path: Any, shard: Any, model_size: str = "8B", device: Any = None) -> Any:
        size = tinygrad_model_size(shard.model_id)
        if size is None:  # exo would load it with the 70B shape
            raise ExoRknpuError(f"exo's tinygrad engine has no model shape for {shard.model_id} (it serves "
                                f"{', '.join(stock_served_models('tinygrad'))})")
        return original_build(model_path, shard, size, device)

    tgi.build_transformer = build_transformer

    _patch_transformer_shard(llama.TransformerShard)
    _patch_tinygrad_requests(tgi.TinygradDynamicShardInferenceEngine, options.engine.limits.max_requests)


def _patch_transformer_shard(TransformerShard: Any) -> None:
    """Fix 1 (final norm) and the JIT half of fix 2 (the cache as the JIT's inputs)."""
    from tinygrad import TinyJit, Variable

    original_init = TransformerShard.__init__

    def __init__(self: Any, shard: Any, base: Any, jit: bool = True) -> None:
        original_init(self, shard, base, jit)
        if shard.is_last_layer():
            self.post = lambda x: self.output(self.norm(x))  # exo applies output(x)

        def run(x: Any, start_pos: Any, **caches: Any) -> Any:
            return self.forward_base(x, start_pos, cache=[caches[k] for k in sorted(caches)])

        self.forward_jit = TinyJit(run) if jit else None

    def forward(self: Any, x: Any, start_pos: int, cache: list | None = None) -> Any:
        if x.shape[0:2] == (1, 1) and self.forward_jit is not None and start_pos != 0:  # exo's condition
            start = Variable("start_pos", 1, self.max_context).bind(start_pos)
            return self.forward_jit(x, start, **{f"cache{i:04d}": c for i, c in enumerate(cache)})
        return self.forward_base(x, start_pos, cache=cache)

    replace_methods(TransformerShard, __init__, forward)


def _patch_tinygrad_requests(Engine: Any, max_requests: int) -> None:
    """Fix 2's per-request state, the prompt ids of 4, and the request lifecycle ring.RingNode drives
    (ring.RequestEngine)."""
    from tinygrad import Tensor

    original_init = Engine.__init__
    original_infer_prompt = Engine.infer_prompt
    original_ensure_shard = Engine.ensure_shard

    def __init__(self: Any, shard_downloader: Any) -> None:
        original_init(self, shard_downloader)
        self.requests = TinygradRequests(max_requests)
        self.shard_lock = asyncio.Lock()

    async def ensure_shard(self: Any, shard: Any) -> None:
        """exo's ensure_shard, one at a time: two overlapping calls for the same shard each built the model, and the
        second model replaced the first under a request whose state was made against it (its next step then found
        no state)."""
        async with self.shard_lock:
            await original_ensure_shard(self, shard)

    async def infer_prompt(self: Any, request_id: str, shard: Any, prompt: str,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        """exo's infer_prompt, or the prompt's ids as the API encoded them (dropped from the state passed on)."""
        try:
            ids = prompt_ids(inference_state)
        except Exception as e:  # a malformed state from a peer
            self.requests.record(request_id, e)
            raise
        if ids is None:
            return await original_infer_prompt(self, request_id, shard, prompt, inference_state)
        state = {k: v for k, v in inference_state.items() if k != PROMPT_IDS_KEY}
        return await self.infer_tensor(request_id, shard, np.asarray(ids, dtype=np.int64).reshape(1, -1), state)

    async def infer_tensor(self: Any, request_id: str, shard: Any, input_data: np.ndarray,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        try:
            await self.ensure_shard(shard)

            def step() -> np.ndarray:  # exo's wrap_infer, with the request's own state and JIT
                x = Tensor(np.array(input_data))  # a copy: arrays received over gRPC are read-only
                h = self.model.embed(x)
                seq = int(x.shape[1])
                state = self.requests.state(self.model, request_id, h, seq)
                out = self.model.forward(h, state.start, cache=state.cache)
                state.start += seq
                return out.numpy()

            out = await asyncio.get_running_loop().run_in_executor(self.executor, step)
        except Exception as e:
            self.requests.record(request_id, e)
            raise
        return out, inference_state

    replace_methods(Engine, __init__, ensure_shard, infer_prompt, infer_tensor)
    add_methods(Engine, _RequestLifecycle.announce, _RequestLifecycle.release, _RequestLifecycle.take_failure,
                _RequestLifecycle.positions_left)


class _RequestLifecycle:
    """The request lifecycle ring.RingNode drives (ring.RequestEngine), added to exo's tinygrad engine: its records
    are the engine's TinygradRequests."""

    requests: TinygradRequests

    def announce(self, request_id: str) -> None:
        self.requests.lifecycle.announce(request_id)

    def release(self, request_id: str, reason: str) -> None:
        self.requests.lifecycle.unannounce(request_id)
        self.requests.states.pop(request_id, None)

    def take_failure(self, request_id: str) -> tuple[str, str] | None:
        return self.requests.lifecycle.take_failure(request_id)

    def positions_left(self, request_id: str) -> int | None:
        return None  # no context bound is known here: exo's own token cap applies
