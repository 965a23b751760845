"""Start legacy exo with the rknpu engine plugged in, without editing exo.

Patches, all applied before `exo.main` is imported (it parses argv and builds the node at import):
1. `get_inference_engine` in exo.inference.inference_engine and exo.orchestration.node (which bound the name at
   import) returns RKNPUInferenceEngine for "rknpu"; `inference_engine_classes["rknpu"]` names the class.
2. exo.models.model_cards gets our cards (smollm2-135m added, llama-3.2-1b/3b get our class's repo).
3. Node.select_best_inference_engine becomes a no-op: otherwise exo replaces our engine with a fresh tinygrad one
   whenever the peer set changes.
4. exo.topology.device_capabilities.linux_device_capabilities reports the board (no tinygrad import, no pynvml).
5. ChatGPTAPI.run binds to --api-host (exo hard-codes 0.0.0.0).
6. exo's API resolves the tokenizer of our local models (smollm2-135m, --model-dir) with our tokenizer, offline.
7. Failed requests fail: exo only prints an error from a hop and leaves the API waiting for 900 s. A node whose
   engine failed broadcasts {"type": "rknpu_request_failed"}; every node's API that waits for that request
   then answers with an error (HTTP 500, or a cut-off stream), and an unknown model id gets HTTP 400 instead of
   exo's silent fallback to the default model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import traceback
from typing import Any

from exo_rknpu.exo import ENGINE_CLASS, ENGINE_NAME, options as node_options
from exo_rknpu.exo.cards import CARDS, card_for_repo, local_override
from exo_rknpu.exo.options import NodeOptions
from exo_rknpu.exo.ring_members import restrict_ring

log = logging.getLogger(__name__)

FAILURE_STATUS = "rknpu_request_failed"
_installed = False


class RequestFailed(RuntimeError):
    """Raised inside exo's API handler when a node reported that the request failed."""


class _FailureMarker:
    """Put into exo's per-request token queue: unpacking it (`tokens, is_finished = ...`) raises."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __iter__(self):
        raise RequestFailed(self.message)


def install_patches(options: NodeOptions) -> None:
    """Apply patches 1-6 and the failure hook on Node (idempotent)."""
    global _installed
    node_options.set_current(options)
    if _installed:
        return
    import exo.api.chatgpt_api as api_mod
    import exo.inference.inference_engine as ie
    import exo.models as models
    import exo.orchestration.node as node_mod
    import exo.topology.device_capabilities as dc

    from exo_rknpu.exo.capabilities import detect

    # 1. engine registration
    original_get = ie.get_inference_engine

    def get_inference_engine(inference_engine_name: str, shard_downloader: Any):
        if inference_engine_name == ENGINE_NAME:
            from exo_rknpu.exo.inference_engine import RKNPUInferenceEngine

            return RKNPUInferenceEngine(shard_downloader, node_options.current())
        return original_get(inference_engine_name, shard_downloader)

    ie.get_inference_engine = get_inference_engine
    node_mod.get_inference_engine = get_inference_engine
    ie.inference_engine_classes[ENGINE_NAME] = ENGINE_CLASS

    # 2. model cards
    for card in CARDS.values():
        entry = models.model_cards.setdefault(card.model_id, {"layers": card.n_layers, "repo": {}})
        if entry.get("layers") != card.n_layers:
            raise RuntimeError(f"exo's card for {card.model_id} says {entry.get('layers')} layers; ours says {card.n_layers}")
        entry["repo"][ENGINE_CLASS] = card.repo
        models.pretty_name.setdefault(card.model_id, card.pretty_name)

    # 3. keep our engine
    async def select_best_inference_engine(self: Any) -> None:
        return None

    node_mod.Node.select_best_inference_engine = select_best_inference_engine

    # 4. capabilities
    async def linux_device_capabilities():
        opts = node_options.current()
        caps = detect(opts.engine.backend, opts.engine.limits.max_bytes, opts.memory_mb).to_exo()
        return caps

    dc.linux_device_capabilities = linux_device_capabilities

    # 5. API bind host
    original_run = api_mod.ChatGPTAPI.run

    async def run(self: Any, host: str = "0.0.0.0", port: int = 52415) -> None:
        return await original_run(self, host=node_options.current().api_host, port=port)

    api_mod.ChatGPTAPI.run = run

    # 6. tokenizers of local models
    original_resolve = api_mod.resolve_tokenizer
    cache: dict[str, Any] = {}

    async def resolve_tokenizer(repo_id: Any):
        card = card_for_repo(str(repo_id))
        if card is None:
            return await original_resolve(repo_id)
        override = local_override(card, node_options.current().model_dir)
        if override is None and card.zoo_alias is None:
            return await original_resolve(repo_id)  # a downloaded HF repo: exo's own way, as for tinygrad
        if card.model_id not in cache:
            cache[card.model_id] = await asyncio.to_thread(_api_tokenizer, str(override or card.zoo_alias))
        return cache[card.model_id]

    api_mod.resolve_tokenizer = resolve_tokenizer

    # 7a. unknown models -> 400
    original_chat = api_mod.ChatGPTAPI.handle_post_chat_completions

    async def handle_post_chat_completions(self: Any, request: Any):
        from aiohttp import web

        if node_options.current().reject_unknown_models:
            try:
                data = await request.json()
            except Exception:
                return web.json_response({"detail": "the request body is not JSON"}, status=400)
            model = data.get("model") if isinstance(data, dict) else None
            if model and not str(model).startswith("gpt-") and model not in models.model_cards:
                served = sorted(m for m, c in models.model_cards.items() if ENGINE_CLASS in c.get("repo", {}))
                msg = f"model {model!r} has no card; models served by exo-rknpu nodes: {', '.join(served)}"
                print(f"[exo-rknpu] rejected request: {msg}", flush=True)
                return web.json_response({"detail": msg}, status=400)
        return await original_chat(self, request)

    api_mod.ChatGPTAPI.handle_post_chat_completions = handle_post_chat_completions

    # 7b. a failed hop tells the ring
    original_process_tensor = node_mod.Node._process_tensor

    async def _process_tensor(self: Any, base_shard: Any, tensor: Any, request_id: str | None = None,
                              inference_state: Any = None):
        result = await original_process_tensor(self, base_shard, tensor, request_id, inference_state)
        take = getattr(self.inference_engine, "take_failure", None)
        message = take(request_id) if take is not None and request_id is not None else None
        if message is not None:
            await report_failure(self, request_id, message)
        return result

    node_mod.Node._process_tensor = _process_tensor
    _installed = True


async def report_failure(node: Any, request_id: str, message: str) -> None:
    text = f"node {node.id}: {message}"
    print(f"[exo-rknpu] request {request_id} failed: {text}", flush=True)
    status = json.dumps({"type": FAILURE_STATUS, "node_id": node.id, "request_id": request_id, "error": text})
    await node.broadcast_opaque_status(request_id, status)  # peers, and this node's own handlers


def attach_failure_handler(node: Any, api: Any) -> None:
    """Make `api` answer a request with an error as soon as any node reports that it failed."""

    def on_status(request_id: str, status: str) -> None:
        try:
            data = json.loads(status)
        except (TypeError, ValueError):
            return
        if not isinstance(data, dict) or data.get("type") != FAILURE_STATUS:
            return
        rid = data.get("request_id") or request_id
        if data.get("node_id") != node.id:
            print(f"[exo-rknpu] request {rid} failed on another node: {data.get('error')}", flush=True)
        node.outstanding_requests.pop(rid, None)
        api.token_queues[rid].put_nowait(_FailureMarker(str(data.get("error"))))

    node.on_opaque_status.register("exo-rknpu-failures").on_next(on_status)


def _api_tokenizer(name_or_path: str) -> Any:
    from exo_rknpu.exo.api_tokenizer import ExoApiTokenizer
    from exo_rknpu.model.loader import load_tokenizer
    from exo_rknpu.model.zoo import resolve_model

    return ExoApiTokenizer(load_tokenizer(resolve_model(name_or_path)))


def _arg_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def exo_argv(exo_args: list[str]) -> list[str]:
    """exo's argv: EXO_ARGS unchanged, plus `--inference-engine rknpu` unless already there (another value is an error)."""
    args = list(exo_args)
    if args and args[0] == "--":
        args = args[1:]
    value = _arg_value(args, "--inference-engine")
    if value is not None:
        if value != ENGINE_NAME:
            raise ValueError(f"exo-rknpu node runs the {ENGINE_NAME!r} engine; remove --inference-engine {value}")
        return ["exo", *args]
    return ["exo", *args, "--inference-engine", ENGINE_NAME]


def run_node(options: NodeOptions, exo_args: list[str]) -> int:
    """Patch exo, hand it EXO_ARGS, and run it until it exits."""
    argv = exo_argv(exo_args)
    node_id = _arg_value(argv, "--node-id")
    if node_id and not options.engine.label:
        options = dataclasses.replace(options, engine=dataclasses.replace(options.engine, label=f"node {node_id}"))
    install_patches(options)
    sys.argv = argv
    try:
        import exo.main as exo_main  # parses sys.argv and builds the node, the server and the API
    except SystemExit as e:  # argparse errors / --help
        return int(e.code or 0)
    attach_failure_handler(exo_main.node, exo_main.api)
    restrict_ring(exo_main.node)  # layers go to exo-rknpu nodes only (ring_members.py)
    import exo.api.chatgpt_api as api_mod

    exo_main.resolve_tokenizer = api_mod.resolve_tokenizer  # `exo run MODEL` resolves its tokenizer here
    opts = node_options.current()
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
