"""Start legacy exo with the rknpu engine plugged in (or one of exo's stock engines, fixed), without editing exo.

Every change the launcher makes to exo is one entry of `PATCHES` (below; docs/exo.md §4 lists them in the same
order), each applied in memory before `exo.main` is imported (it parses argv and builds the node at import), for
the engines the entry names: "rknpu" (an exo-rknpu node) or a stock engine started with `--engine tinygrad|mlx`
(stock_engines.py says why a stock engine needs its fixes). `install_patches` applies them in that order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from exo_rknpu.errors import ExoRknpuError
from exo_rknpu.exo import ENGINE_CLASS, ENGINE_NAME, options as node_options
from exo_rknpu.exo.api_tokenizer import TemplateOptionsTokenizer
from exo_rknpu.exo.availability import downloaded_folder
from exo_rknpu.exo.cards import CARDS, card_for_repo, local_override
from exo_rknpu.exo.options import NodeOptions
from exo_rknpu.exo.patching import replace_methods
from exo_rknpu.exo.ring_members import node_partitions, patch_node_partitioning, use_mixed_ring
from exo_rknpu.exo.stock_engines import STOCK_ENGINE_CLASSES, fix_tinygrad, report_stock_engine, stock_served_models
from exo_rknpu.runtime.sampling import Choice, SamplingParams, choose, step_rng

log = logging.getLogger(__name__)

_installed = False

RKNPU = (ENGINE_NAME,)
STOCK = tuple(STOCK_ENGINE_CLASSES)
EVERY = RKNPU + STOCK


@dataclass(frozen=True)
class Patch:
    """One change the launcher makes to exo, for the engines it names."""

    what: str  # what it changes and why, in one line
    engines: tuple[str, ...]  # "rknpu", or the stock engines ("tinygrad", "mlx")
    apply: Callable[[NodeOptions], None]


def install_patches(options: NodeOptions) -> None:
    """Apply every entry of PATCHES for this node's engine, in order (idempotent: exo's modules change for good).
    The request lifecycle acts only on a Node that has a RingNode attached (run_node does)."""
    global _installed
    node_options.set_current(options)
    if _installed:
        return
    engine = options.stock_engine or ENGINE_NAME
    for patch in PATCHES:
        if engine in patch.engines:
            patch.apply(options)
    _installed = True


def register_engine(options: NodeOptions) -> None:
    """`get_inference_engine`, in exo.inference.inference_engine and in exo.orchestration.node (which bound the name
    at import), returns RKNPUInferenceEngine for "rknpu"; `inference_engine_classes["rknpu"]` names the class."""
    import exo.inference.inference_engine as ie
    import exo.orchestration.node as node_mod

    original_get = ie.get_inference_engine

    def get_inference_engine(inference_engine_name: str, shard_downloader: Any):
        if inference_engine_name == ENGINE_NAME:
            from exo_rknpu.exo.inference_engine import RKNPUInferenceEngine

            return RKNPUInferenceEngine(shard_downloader, node_options.current())
        return original_get(inference_engine_name, shard_downloader)

    ie.get_inference_engine = get_inference_engine
    node_mod.get_inference_engine = get_inference_engine
    ie.inference_engine_classes[ENGINE_NAME] = ENGINE_CLASS


def add_cards(options: NodeOptions) -> None:
    """exo-rknpu's cards in exo.models.model_cards: smollm2-135m and qwen-3-* added, llama-3.2-* and qwen-2.5-* get
    the rknpu engine's repo; exo's wrong layer count for qwen-2.5-0.5b is corrected, any other difference stops."""
    import exo.models as models

    for card in CARDS.values():
        entry = models.model_cards.setdefault(card.model_id, {"layers": card.n_layers, "repo": {}})
        if entry.get("layers") != card.n_layers and entry.get("layers") == card.exo_wrong_layers:
            log.warning("exo's card for %s says %s layers; the model has %s: corrected in this node (legacy nodes "
                        "without exo-rknpu keep the wrong count and cannot share a ring for it)",
                        card.model_id, entry["layers"], card.n_layers)
            entry["layers"] = card.n_layers
        if entry.get("layers") != card.n_layers:
            raise RuntimeError(f"exo's card for {card.model_id} says {entry.get('layers')} layers; ours says {card.n_layers}")
        entry["repo"][ENGINE_CLASS] = card.repo
        models.pretty_name.setdefault(card.model_id, card.pretty_name)


def keep_engine(options: NodeOptions) -> None:
    """Node.select_best_inference_engine does nothing: otherwise exo replaces the engine with a fresh tinygrad one
    whenever the peer set changes."""
    import exo.orchestration.node as node_mod

    async def select_best_inference_engine(self: Any) -> None:
        return None

    replace_methods(node_mod.Node, select_best_inference_engine)


def report_node(options: NodeOptions) -> None:
    """linux_device_capabilities reports this node (capabilities.detect: no tinygrad import, no pynvml), its memory
    by its MemoryRule, derived once per node options (exo asks at start and again from UDP discovery)."""
    import exo.topology.device_capabilities as dc

    from exo_rknpu.exo.capabilities import detect, mem_total_mb, memory_rule

    rules: list[tuple[NodeOptions, Any]] = []

    async def linux_device_capabilities():
        opts = node_options.current()
        rule = next((r for o, r in rules if o == opts), None)
        if rule is None:
            rule = await asyncio.to_thread(memory_rule, opts, served_models(opts))
            rules.append((opts, rule))
            print(f"[exo-rknpu] this node {rule.explain(mem_total_mb())}", flush=True)
            for u in rule.unplanned:  # once per rule; RingNode.model_problem refuses its requests with the reason
                print(f"[exo-rknpu] {u.reason}; it is left out of the memory this node reports and of its mark (a "
                      f"ring of exo-rknpu nodes gives its layers to the others), and requests for it are refused "
                      f"with this reason", flush=True)
        return detect(rule, models=served_models(opts)).to_exo()

    dc.linux_device_capabilities = linux_device_capabilities


def bind_api_host(options: NodeOptions) -> None:
    """ChatGPTAPI.run binds to --api-host (exo hard-codes 0.0.0.0); expected errors outside a request are one line."""
    import exo.api.chatgpt_api as api_mod

    original_run = api_mod.ChatGPTAPI.run

    async def run(self: Any, host: str = "0.0.0.0", port: int = 52415) -> None:
        quiet_expected_errors(asyncio.get_running_loop())
        return await original_run(self, host=node_options.current().api_host, port=port)

    replace_methods(api_mod.ChatGPTAPI, run)


def resolve_api_tokenizers(options: NodeOptions) -> None:
    """exo's API resolves the tokenizer of local models (smollm2-135m, --model-dir) with exo-rknpu's tokenizer,
    offline; for downloaded repos it keeps exo's own; both render chat templates with the node's options
    (enable_thinking), each loaded once and off the event loop."""
    import exo.api.chatgpt_api as api_mod

    original_resolve = api_mod.resolve_tokenizer
    cache: dict[str, Any] = {}

    async def resolve_tokenizer(repo_id: Any):
        card = card_for_repo(str(repo_id))
        override = local_override(card, node_options.current().model_dir) if card is not None else None
        if card is not None and override is None and card.zoo_alias is None:
            override = downloaded_folder(card)  # complete on disk: no Hugging Face access needed
        thinking = node_options.current().enable_thinking
        key = str(repo_id)
        if key not in cache:
            if card is None or (override is None and card.zoo_alias is None):
                # a downloaded HF repo: exo's own way, as for tinygrad, but once, and off the event loop (exo
                # loads it with transformers on the loop for every request), with our chat template options
                cache[key] = TemplateOptionsTokenizer(await asyncio.to_thread(asyncio.run, original_resolve(repo_id)), thinking)
            else:
                cache[key] = await asyncio.to_thread(_api_tokenizer, str(override or card.zoo_alias), thinking)
        return cache[key]

    api_mod.resolve_tokenizer = resolve_tokenizer


def mixed_ring_partition(options: NodeOptions) -> None:
    """exo's Node asks its partitioning strategy with the model at hand (ring_members.py); run_node gives the node
    the mixed-ring strategy."""
    import exo.orchestration.node as node_mod

    patch_node_partitioning(node_mod.Node)


def request_lifecycle(options: NodeOptions) -> None:
    """The ring's requests (ring.py) on exo's Node and API: /v1/chat/completions answered by RingNode.handle_chat
    (validation -> 400, admission -> 429, a dead neighbour -> 503 within seconds, a client that leaves stops
    generation, max_tokens); the last shard samples under each request's parameters and finishes it at its
    max_tokens, EOS or a full cache; a step addressed to a shard this node would not give itself fails, named,
    instead of running the wrong layers; a failed hop is broadcast so the API answers at once, not after 900 s."""
    import exo.api.chatgpt_api as api_mod
    import exo.orchestration.node as node_mod

    _patch_node(node_mod.Node)
    original_chat = api_mod.ChatGPTAPI.handle_post_chat_completions

    async def handle_post_chat_completions(self: Any, request: Any):
        ring = getattr(self.node, "rknpu_ring", None)
        if ring is None:
            return await original_chat(self, request)
        return await ring.handle_chat(request)

    replace_methods(api_mod.ChatGPTAPI, handle_post_chat_completions)


NODE_CONTROL_ROUTES = ("handle_quit", "handle_delete_model", "handle_post_download", "handle_post_image_generations",
                       "handle_create_animation")


def install_api_safety(options: NodeOptions) -> None:
    """exo's HTTP surface narrowed (exo_rknpu/exo/http_guard.py): CORS only for --cors-origin, the API key, foreign
    origins and non-JSON POST bodies refused, and the routes that change the node off unless --allow-node-control."""
    import exo.api.chatgpt_api as api_mod

    from exo_rknpu.exo.api_routes import json_body_first
    from exo_rknpu.exo.http_guard import CorsShim, guard_middleware, turned_off

    api_mod.aiohttp_cors = CorsShim(api_mod.aiohttp_cors, options.cors_origins)
    for name in NODE_CONTROL_ROUTES:
        original = getattr(api_mod.ChatGPTAPI, name)
        if options.allow_node_control:
            setattr(api_mod.ChatGPTAPI, name, json_body_first(original))
        else:
            off = turned_off("--allow-node-control")
            setattr(api_mod.ChatGPTAPI, name, lambda self, request, _off=off: _off(request))
    original_init = api_mod.ChatGPTAPI.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        opts = node_options.current()
        self.app.middlewares.insert(0, guard_middleware(opts.api_key, opts.cors_origins))

    replace_methods(api_mod.ChatGPTAPI, __init__)


def install_api_routes(options: NodeOptions) -> None:
    """exo_rknpu/exo/api_routes.py answers /v1/models and /modelpool from what this node can serve now, and
    token/encode validated like a chat request, on a node that has a RingNode attached."""
    import exo.api.chatgpt_api as api_mod

    from exo_rknpu.exo import api_routes

    def routed(name: str, ours: Any) -> None:
        original = getattr(api_mod.ChatGPTAPI, name)

        async def handler(self: Any, request: Any) -> Any:
            ring = getattr(self.node, "rknpu_ring", None)
            return await (original(self, request) if ring is None else ours(ring, request))

        setattr(api_mod.ChatGPTAPI, name, handler)

    routed("handle_get_models", api_routes.handle_models)
    routed("handle_model_support", api_routes.handle_modelpool)
    routed("handle_post_chat_token_encode", api_routes.handle_token_encode)


def served_models(options: NodeOptions) -> tuple[str, ...]:
    """The model ids this node serves: exo-rknpu's cards, or what the stock engine can run (its launcher mark)."""
    if options.stock_engine is not None:
        return stock_served_models(options.stock_engine)
    return tuple(sorted(CARDS))


def install_state_wire(options: NodeOptions) -> None:
    """exo's gRPC serializer of inference_state tests `isinstance(v, mx.array)`, and on Linux `mx` is numpy, whose
    `array` is a function: any non-empty state raised TypeError. Serialize numpy arrays as exo's tensors and
    everything else as JSON (exo's own format, read unchanged by exo's deserializer)."""
    import json as _json

    from exo.networking.grpc import grpc_peer_handle, node_service_pb2

    def serialize_inference_state(self: Any, inference_state: dict) -> Any:
        proto = node_service_pb2.InferenceState()
        other = {}
        for k, v in inference_state.items():
            if isinstance(v, np.ndarray):
                proto.tensor_data[k].CopyFrom(node_service_pb2.Tensor(
                    tensor_data=np.ascontiguousarray(v).tobytes(), shape=list(v.shape), dtype=str(v.dtype)))
            elif isinstance(v, list) and v and all(isinstance(t, np.ndarray) for t in v):
                tensors = [node_service_pb2.Tensor(tensor_data=np.ascontiguousarray(t).tobytes(), shape=list(t.shape),
                                                   dtype=str(t.dtype)) for t in v]
                proto.tensor_list_data[k].CopyFrom(node_service_pb2.TensorList(tensors=tensors))
            else:
                other[k] = v
        if other:
            proto.other_data_json = _json.dumps(other)
        return proto

    replace_methods(grpc_peer_handle.GRPCPeerHandle, serialize_inference_state)


def _ring(node: Any) -> Any:
    return getattr(node, "rknpu_ring", None)


def _patch_node(Node: Any) -> None:
    """exo's Node methods replaced for the request lifecycle; each acts as exo's own on a Node without a RingNode."""
    _sample_on_the_last_shard(Node)
    _check_tensor_steps(Node)
    _check_prompts(Node)
    _report_failed_hops(Node)


def _sample_on_the_last_shard(Node: Any) -> None:
    """The last shard samples under the request's own parameters (sample_next) and ends the request at its
    max_tokens, EOS or a full cache (RingNode.finish_decision); a sampling failure fails the request at once."""
    original_result = Node.process_inference_result

    async def process_inference_result(self: Any, shard: Any, result: Any, request_id: str | None = None,
                                       inference_state: Any = None):
        ring = _ring(self)
        if ring is None or shard.model_id == "stable-diffusion-2-1-base":
            return await original_result(self, shard, result, request_id, inference_state)
        tokens, _ = self.buffered_token_output.setdefault(request_id, ([], False))
        finished, forward = False, result
        if shard.is_last_layer():
            try:
                params = ring.sampling(request_id, inference_state)
                choice = await sample_next(self.inference_engine, result, params, tokens, ring.rng)
            except Exception as e:  # NaN logits, a malformed state from a peer: the client hears at once
                await ring.report_failure(request_id, f"sampling failed: {type(e).__name__}: {e}", "error")
                self.outstanding_requests.pop(request_id, None)
                return None
            tokens.append(choice.token)
            finished = ring.finish_decision(request_id, tokens, params)
            forward = np.array([[choice.token]], dtype=np.int64)
            if params.logprobs:  # before the token: the API node pairs them by position
                await ring.send_logprobs(request_id, len(tokens) - 1, choice)
            self.trigger_on_token_callbacks(request_id, [tokens[-1]], finished)
            asyncio.create_task(self.broadcast_result(request_id, [tokens[-1]], finished))
        if finished:
            self.buffered_token_output[request_id] = (tokens, True)
            self.outstanding_requests.pop(request_id, None)
        else:
            self.outstanding_requests[request_id] = "waiting"
            asyncio.create_task(self.forward_tensor(shard, forward, request_id,
                                                    self.get_partition_index(offset=1, model_id=shard.model_id),
                                                    inference_state))
        return np.array(tokens)

    replace_methods(Node, process_inference_result)


def _check_tensor_steps(Node: Any) -> None:
    """A tensor step for a shard this node would not give itself is refused (named, RingNode.shard_mismatch); an
    engine's expected failure is reported to the ring once, in one line."""
    original_process_tensor = Node.process_tensor
    original_inner_tensor = Node._process_tensor

    async def process_tensor(self: Any, base_shard: Any, tensor: Any, request_id: str | None = None,
                             inference_state: Any = None):
        ring = _ring(self)
        problem = ring.shard_mismatch(base_shard) if ring is not None and request_id is not None else None
        if problem is not None:
            await ring.report_failure(request_id, problem, "unavailable")
            return None
        return await original_process_tensor(self, base_shard, tensor, request_id, inference_state)

    async def _process_tensor(self: Any, base_shard: Any, tensor: Any, request_id: str | None = None,
                              inference_state: Any = None):
        if _ring(self) is None:
            return await original_inner_tensor(self, base_shard, tensor, request_id, inference_state)
        # exo's own body, with its print + traceback replaced: an expected failure (exo-rknpu's errors) is
        # reported to the ring once, in one line; anything else is a bug and keeps its traceback.
        request_id = request_id or str(uuid.uuid4())
        shard = self.get_current_shard(base_shard)
        try:
            self.outstanding_requests[request_id] = "processing"
            result, inference_state = await self.inference_engine.infer_tensor(request_id, shard, tensor,
                                                                               inference_state)
            return await self.process_inference_result(shard, result, request_id, inference_state)
        except Exception as e:
            self.outstanding_requests.pop(request_id, None)
            if not isinstance(e, ExoRknpuError):
                log.exception("request %s: unexpected error on %s", request_id, shard)
        finally:
            await _report_engine_failure(self, request_id)

    replace_methods(Node, process_tensor, _process_tensor)


class SentBack(RuntimeError):
    """A prompt this node refuses, raised back to the peer that sent it (exo's gRPC server hands the sender the
    message). Already reported to the ring in one line: exo's gRPC server logs it without a traceback."""


class _OneLineSentBack(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SentBack):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused a prompt from a peer, raised back to it: %s", (record.exc_info[1],), None, None)
        return True


def _check_prompts(Node: Any) -> None:
    """A prompt a peer sends for a shard this node would not give itself is refused (named); a prompt this node's
    API took for a model the ring leaves this node out of goes to the ring's first node; an engine's expected
    failure is reported to the ring, not raised as a traceback in exo's gRPC server, and also raised, in one line,
    for a request no exo-rknpu API announced (a plain stock node's API: its process_prompt then fails at once
    instead of waiting for its response timeout)."""
    original_process_prompt = Node.process_prompt

    async def process_prompt(self: Any, base_shard: Any, prompt: str, request_id: str | None = None,
                             inference_state: Any = {}):
        ring = _ring(self)
        if ring is not None and request_id is not None and (base_shard.start_layer, base_shard.end_layer) != (0, 0):
            problem = ring.shard_mismatch(base_shard)  # sent by a peer: the shard it believes this node holds
            if problem is not None:
                await ring.report_failure(request_id, problem, "unavailable")
                raise SentBack(problem)
        elif ring is not None and self.id not in {p.node_id for p in node_partitions(self, base_shard.model_id)}:
            # this node's API took a request for a model the ring leaves this node out of: the first node runs it
            return await self.forward_prompt(base_shard, prompt, request_id, 0, inference_state)
        announced = ring is not None and ring.announced(request_id)
        try:
            return await original_process_prompt(self, base_shard, prompt, request_id, inference_state)
        except Exception as e:
            await _report_engine_failure(self, request_id)
            if ring is None or not isinstance(e, ExoRknpuError):
                raise
            if not announced:  # a plain stock node's API started it: it hears no report, only the sender's error
                raise SentBack(f"node {self.id}: {type(e).__name__}: {e}") from None
            return None  # reported to the ring (the client hears of it); not a traceback in exo's gRPC server

    replace_methods(Node, process_prompt)


def _target_name(node: Any, target_index: int) -> str:
    """" (node-b)": the id of the node at `target_index` of exo's partition, for a failed hop's message (the gRPC
    error alone names only an address, or nothing: "Connection reset by peer"); "" if exo cannot say."""
    try:
        return f" ({node.partitioning_strategy.partition(node.topology)[target_index].node_id})"
    except Exception:  # the topology may already have changed under a dead peer: the message goes out without it
        return ""


def _report_failed_hops(Node: Any) -> None:
    """A hop to the next node that cannot be sent fails the request at once (exo would wait 900 s)."""
    original_forward_tensor = Node.forward_tensor
    original_forward_prompt = Node.forward_prompt

    async def forward_tensor(self: Any, base_shard: Any, tensor: Any, request_id: str, target_index: int,
                             inference_state: Any = None):
        try:
            return await original_forward_tensor(self, base_shard, tensor, request_id, target_index, inference_state)
        except Exception as e:  # runs as a fire-and-forget task in exo: nobody else would hear of it
            ring = _ring(self)
            if ring is None:
                raise
            await ring.report_failure(request_id, f"could not hand the request to the next node"
                                                  f"{_target_name(self, target_index)}: {type(e).__name__}: {_short(e)}",
                                      "unavailable")

    async def forward_prompt(self: Any, base_shard: Any, prompt: str, request_id: str, target_index: int,
                             inference_state: Any = None):
        try:
            return await original_forward_prompt(self, base_shard, prompt, request_id, target_index, inference_state)
        except Exception as e:
            ring = _ring(self)
            if ring is not None:
                await ring.report_failure(request_id, f"could not hand the prompt to the first node: "
                                                      f"{type(e).__name__}: {_short(e)}", "unavailable")
            raise

    replace_methods(Node, forward_tensor, forward_prompt)


PATCHES = (  # in the order applied (docs/exo.md §4 lists them in this order)
    Patch("register the rknpu engine with exo", EVERY, register_engine),
    Patch("exo-rknpu's model cards (and exo's wrong qwen-2.5-0.5b layer count corrected)", EVERY, add_cards),
    Patch("keep the node's engine (exo would swap in tinygrad when peers change)", EVERY, keep_engine),
    Patch("report this node: what it can hold in exo's unit, and the launcher's mark", RKNPU, report_node),
    Patch("fix exo's tinygrad engine: final norm, per-request caches, SmolLM2's card and shape (stock_engines.py)",
          ("tinygrad",), fix_tinygrad),
    Patch("report exo's own capabilities with the launcher's mark; --memory-mb replaces the memory", STOCK,
          report_stock_engine),
    Patch("bind the API to --api-host", EVERY, bind_api_host),
    Patch("API tokenizers: local models offline, chat templates with the node's options", EVERY,
          resolve_api_tokenizers),
    Patch("exo's gRPC serializer of inference_state writes numpy arrays", EVERY, install_state_wire),
    Patch("the mixed-ring partition, asked with the model at hand (ring_members.py)", EVERY, mixed_ring_partition),
    Patch("the request lifecycle and /v1/chat/completions (ring.py)", EVERY, request_lifecycle),
    Patch("/v1/models, /modelpool and token/encode from what this node serves (api_routes.py)", EVERY,
          install_api_routes),
    Patch("the API's safety: key, origins, JSON bodies, node control off (http_guard.py)", EVERY, install_api_safety),
)


async def sample_next(engine: Any, logits: Any, params: SamplingParams, generated: list[int],
                      rng: np.random.Generator) -> Choice:
    """The request's next token under its own parameters: the engine's sample_request (exo-rknpu's engine), or
    exo_rknpu.runtime.sampling on the logits for an engine without it (a launcher-started stock engine)."""
    own = getattr(engine, "sample_request", None)
    if own is not None:
        return await own(logits, params, generated)
    from exo_rknpu.exo.inference_engine import logits_row

    row = logits_row(logits)
    return await asyncio.to_thread(choose, row, params, list(generated), step_rng(params, len(generated), rng))


def quiet_expected_errors(loop: asyncio.AbstractEventLoop) -> None:
    """One line, not a traceback, for expected conditions that surface outside a request's own path: a task of
    exo's that failed with one of exo-rknpu's errors (exo's preemptive shard load of a model that is not here),
    a malformed HTTP request (aiohttp logs "Error handling request" with a traceback), and a prompt raised back
    to its sender (SentBack: exo's gRPC server logs it with a traceback)."""
    from exo_rknpu.exo.http_guard import quiet_aiohttp_logs

    quiet_aiohttp_logs()
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _OneLineSentBack) for f in grpc_log.filters):
        grpc_log.addFilter(_OneLineSentBack())

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        e = context.get("exception")
        if isinstance(e, ExoRknpuError):
            print(f"[exo-rknpu] {type(e).__name__}: {e}", flush=True)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _report_engine_failure(node: Any, request_id: str | None) -> None:
    """If the engine failed this request, tell the ring (once)."""
    ring = _ring(node)
    engine = ring.request_engine if ring is not None else None
    failure = engine.take_failure(request_id) if engine is not None and request_id is not None else None
    if ring is not None and failure is not None:
        kind, message = failure
        await ring.report_failure(request_id, message, kind)


def _short(e: BaseException) -> str:
    """gRPC errors print a multi-line debug string; the first line says enough."""
    details = getattr(e, "details", None)
    text = details() if callable(details) else str(e)
    return (text or repr(e)).splitlines()[0][:300]


def _api_tokenizer(name_or_path: str, enable_thinking: bool) -> Any:
    from exo_rknpu.exo.api_tokenizer import ExoApiTokenizer
    from exo_rknpu.model.loader import load_tokenizer
    from exo_rknpu.model.zoo import resolve_model

    return ExoApiTokenizer(load_tokenizer(resolve_model(name_or_path)), enable_thinking)


def _arg_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def exo_argv(exo_args: list[str], engine: str = ENGINE_NAME) -> list[str]:
    """exo's argv: EXO_ARGS unchanged, plus `--inference-engine ENGINE` unless already there (another value is an
    error: the engine is chosen with `exo-rknpu node --engine`)."""
    args = list(exo_args)
    if args and args[0] == "--":
        args = args[1:]
    value = _arg_value(args, "--inference-engine")
    if value is not None:
        if value != engine:
            raise ValueError(f"this exo-rknpu node runs the {engine!r} engine; remove --inference-engine {value} "
                             f"(choose the engine with `exo-rknpu node --engine`)")
        return ["exo", *args]
    return ["exo", *args, "--inference-engine", engine]


def run_node(options: NodeOptions, exo_args: list[str]) -> int:
    """Patch exo, hand it EXO_ARGS, and run it until it exits."""
    engine_name = options.stock_engine or ENGINE_NAME
    argv = exo_argv(exo_args, engine_name)
    node_id = _arg_value(argv, "--node-id")
    if node_id and not options.engine.label:
        options = dataclasses.replace(options, engine=dataclasses.replace(options.engine, label=f"node {node_id}"))
    install_patches(options)
    sys.argv = argv
    try:
        import exo.main as exo_main  # parses sys.argv and builds the node, the server and the API
    except SystemExit as e:  # argparse errors / --help
        return int(e.code or 0)
    from exo_rknpu.exo.ring import RingNode

    use_mixed_ring(exo_main.node)  # one partition, derived identically by every node (ring_members.py)
    RingNode(exo_main.node, exo_main.api, options, default_model=exo_main.args.default_model,
             served=served_models(options))
    import exo.api.chatgpt_api as api_mod

    exo_main.resolve_tokenizer = api_mod.resolve_tokenizer  # `exo run MODEL` resolves its tokenizer here
    opts = node_options.current()
    if opts.stock_engine is not None:
        print(f"[exo-rknpu] node {exo_main.args.node_id}: exo's stock {opts.stock_engine} engine with the launcher's "
              f"fixes (stock_engines.py), serving {', '.join(served_models(opts))}, API on {opts.api_host}:"
              f"{exo_main.args.chatgpt_api_port}", flush=True)
    else:
        print(f"[exo-rknpu] node {exo_main.args.node_id}: engine {ENGINE_NAME} on backend {opts.engine.backend!r}, "
              f"hidden states {opts.engine.hidden_dtype}, API on {opts.api_host}:{exo_main.args.chatgpt_api_port}",
              flush=True)
    try:
        exo_main.run()
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass  # exo's SIGINT/SIGTERM handler cancels its tasks: a normal shutdown
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        engine = getattr(exo_main.node, "inference_engine", None)
        core = getattr(engine, "core", None)
        if core is not None:
            core.close()
    return 0
