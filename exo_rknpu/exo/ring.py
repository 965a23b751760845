"""What an exo-rknpu node adds to legacy exo's Node and ChatGPT API at run time (installed by the launcher).

exo never tells an engine when a request starts or ends, waits 900 s for a dead neighbour, ignores a request's
`max_tokens`, and answers bad bodies with a plain-text 500. `RingNode` (one per process, attached to exo's Node as
`node.rknpu_ring`) closes those gaps with exo's own messages, so it needs no change to exo's code or wire format:

* request lifecycle over exo's opaque-status broadcast: the API announces a request (`rknpu_request_start`:
  max_tokens, temperature) to every node before its prompt is sent, and ends it (`rknpu_request_end`) when the
  client goes away; a node whose engine failed broadcasts `rknpu_request_failed` (kind, message). Every node frees
  the request's KV cache when it ends, fails or finishes (exo's `is_finished` token broadcast).
* the last node finishes a request at its `max_tokens`, at EOS, at exo's `--max-generate-tokens`, or when its KV
  cache is full (finish_reason "length"), and samples at the request's temperature;
* a tensor for a shard the receiver does not hold (the nodes disagree on the partition) fails the request instead
  of running the wrong layers, with the reason (ring_members.MixedRingPartitioning.explain_mismatch);
* a request whose partition gives layers to a node that cannot run them (ring_members: a plain stock node without
  a card for the model) is refused at once, naming the node;
* `handle_chat` is the /v1/chat/completions handler: validation (400), admission (429), prompt templating and
  tokenizing off the event loop, a ring health watch (503 within seconds when a node dies), client disconnects
  (generation stops), and streaming that only commits to HTTP 200 once the first token exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from exo_rknpu.exo.ring_members import MixedRingPartitioning, layer_ranges, node_partitions
from exo_rknpu.exo.chat_request import (
    MAX_BODY_BYTES,
    BadRequest,
    FailureMarker,
    ChatRequest,
    IncrementalDecoder,
    check_body_size,
    error_body,
    parse_chat_request,
)
from exo_rknpu.exo.inference_engine import failure_kind
from exo_rknpu.exo.options import NodeOptions

log = logging.getLogger(__name__)

START_STATUS = "rknpu_request_start"
END_STATUS = "rknpu_request_end"
FAILURE_STATUS = "rknpu_request_failed"
HEALTH_INTERVAL_S = 1.0  # how often a waiting request checks that every node of the ring still answers
PROBE_TIMEOUT_S = 2.0
DEAD_AFTER_S = 8.0  # a node that accepts no connection for this long is taken for gone
MAX_TRACKED = 1024
HTTP_STATUS = {"capacity": 429, "unavailable": 503, "context": 400, "error": 500}


@dataclass(frozen=True)
class RequestParams:
    max_tokens: int | None = None
    temperature: float | None = None


@dataclass
class Outcome:
    """How a request served by this node's API ended."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    error: tuple[int, str, str] | None = None  # (HTTP status, kind, message)


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Every stop id of a tokenizer: exo-rknpu's (`eos_token_ids`, a set) or a Hugging Face one (exo's stock
    engines: `eos_token_id`, and an `eos_token_ids` that may be one int)."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    ids = [ids] if isinstance(ids, int) else list(ids or ())
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return {int(t) for t in ids if t is not None}


def _say(text: str) -> None:
    print(f"[exo-rknpu] {text}", flush=True)


class RingNode:
    def __init__(self, node: Any, api: Any, options: NodeOptions, default_model: str | None,
                 served: tuple[str, ...]) -> None:
        self.node, self.api, self.options = node, api, options
        self.default_model = default_model
        self.served = served  # the model ids this node's API serves
        self.params: OrderedDict[str, RequestParams] = OrderedDict()
        self.active: dict[str, asyncio.Queue] = {}  # requests this node's API is serving
        self._health: tuple[float, str | None] = (0.0, None)
        self._health_lock = asyncio.Lock()
        self._silent_since: dict[str, float] = {}
        node.rknpu_ring = self
        node.on_opaque_status.register("exo-rknpu-requests").on_next(self._on_status)
        node.on_token.register("exo-rknpu-finished").on_next(self._on_token)

    # ------------------------------------------------------------------ lifecycle messages

    @property
    def engine(self) -> Any:
        return self.node.inference_engine

    def _release(self, request_id: str, reason: str) -> None:
        release = getattr(self.engine, "release", None)
        if release is not None:
            release(request_id, reason)
        self.params.pop(request_id, None)
        self.node.outstanding_requests.pop(request_id, None)

    def _on_token(self, request_id: str, tokens: Any, is_finished: bool) -> None:
        if not is_finished:
            return
        self._release(request_id, "finished")
        asyncio.get_running_loop().call_later(1.0, self._forget, request_id)

    def _forget(self, request_id: str) -> None:
        """Drop what exo keeps forever per request (its token buffer; token queues of other nodes' requests)."""
        self.node.buffered_token_output.pop(request_id, None)
        if request_id not in self.active:
            self.api.token_queues.pop(request_id, None)

    def _on_status(self, request_id: str, status: str) -> None:
        try:
            data = json.loads(status)
        except (TypeError, ValueError):
            return
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        rid = data.get("request_id") or request_id
        if kind == START_STATUS:
            announce = getattr(self.engine, "announce", None)
            if announce is not None:
                announce(rid)
            self.params[rid] = RequestParams(data.get("max_tokens"), data.get("temperature"))
            while len(self.params) > MAX_TRACKED:
                self.params.popitem(last=False)
        elif kind == END_STATUS:
            self._release(rid, str(data.get("reason") or "ended by the API"))
            self._forget(rid)
        elif kind == FAILURE_STATUS:
            if data.get("node_id") != self.node.id:
                _say(f"request {rid} failed on another node: {data.get('error')}")
            self._release(rid, f"failed: {data.get('error')}")
            queue = self.active.get(rid)
            if queue is not None:
                queue.put_nowait(FailureMarker(str(data.get("error")), str(data.get("kind") or "error")))

    async def report_failure(self, request_id: str, message: str, kind: str = "error") -> None:
        text = f"node {self.node.id}: {message}"
        _say(f"request {request_id} failed: {text}")
        status = json.dumps({"type": FAILURE_STATUS, "node_id": self.node.id, "request_id": request_id,
                             "error": text, "kind": kind})
        await self.node.broadcast_opaque_status(request_id, status)  # peers, and this node's own handlers

    async def end(self, request_id: str, reason: str) -> None:
        status = json.dumps({"type": END_STATUS, "request_id": request_id, "reason": reason})
        await self.node.broadcast_opaque_status(request_id, status)

    # ------------------------------------------------------------------ node-side checks (called by patches)

    def shard_mismatch(self, sent: Any) -> str | None:
        """Why this node must not run a step the sender addressed to shard `sent`, or None if it holds it."""
        partitions = node_partitions(self.node, sent.model_id)
        own = layer_ranges(partitions, int(sent.n_layers)).get(self.node.id)
        if own == (sent.start_layer, sent.end_layer):
            return None
        strategy = self.node.partitioning_strategy
        if isinstance(strategy, MixedRingPartitioning):
            return strategy.explain_mismatch(self.node.topology, sent, own)
        return (f"node {self.node.id} refuses the step: the sender expects it to hold layers {sent.start_layer}-"
                f"{sent.end_layer} of {sent.model_id}, its own partition gives it {own}")

    def finish_decision(self, request_id: str, tokens: list[int]) -> bool:
        """On the last node, after sampling tokens[-1]: is the request done?"""
        eng, node = self.engine, self.node
        stop = stop_token_ids(eng.tokenizer)
        cap = node.max_generate_tokens
        params = self.params.get(request_id)
        if params is not None and params.max_tokens is not None:
            cap = min(cap, params.max_tokens)
        left_fn = getattr(getattr(eng, "core", None), "positions_left", None)
        left = left_fn(request_id) if left_fn is not None else None
        return tokens[-1] in stop or len(tokens) >= cap or (left is not None and left < 1)

    def temperature(self, request_id: str) -> float:
        params = self.params.get(request_id)
        if params is not None and params.temperature is not None:
            return params.temperature
        return self.node.default_sample_temperature

    # ------------------------------------------------------------------ ring health

    async def ring_problem(self, members: set[str], model_id: str) -> str | None:
        """Why the ring that started a request cannot finish it (a member left or is gone), or None.

        A member is probed with a TCP connect to its gRPC port, not with exo's health check (which reconnects
        its channel and times out on a merely busy node): a refused connection means the process is gone (a
        SIGKILLed node on the same host or a LAN answers with a reset at once); a member that does not answer
        at all counts as gone after DEAD_AFTER_S. One probe round per HEALTH_INTERVAL_S serves every request."""
        current = {p.node_id for p in node_partitions(self.node, model_id)}
        gone = members - current
        if gone:
            return f"node {', '.join(sorted(gone))} left the ring while the request ran"
        async with self._health_lock:
            checked_at, problem = self._health
            if time.monotonic() - checked_at < HEALTH_INTERVAL_S:
                return problem
            peers = {p.id(): p for p in self.node.peers}
            others = sorted(members - {self.node.id})
            results = await asyncio.gather(*(self._probe(nid, peers.get(nid)) for nid in others))
            dead = [r for r in results if r is not None]
            problem = "; ".join(dead) if dead else None
            self._health = (time.monotonic(), problem)
            return problem

    async def _probe(self, node_id: str, peer: Any) -> str | None:
        if peer is None:
            return f"node {node_id} is no longer connected"
        host, _, port = peer.addr().rpartition(":")
        now = time.monotonic()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), PROBE_TIMEOUT_S)
            writer.close()
            self._silent_since.pop(node_id, None)
            return None
        except asyncio.TimeoutError:
            since = self._silent_since.setdefault(node_id, now)
            if now - since > DEAD_AFTER_S:
                return f"node {node_id} has not answered for {now - since:.0f} s"
            return None
        except OSError as e:
            return f"node {node_id} is gone ({type(e).__name__}: {e.strerror or e})"

    # ------------------------------------------------------------------ the API

    def served_models(self) -> list[str]:
        return sorted(self.served)

    def resolve_model(self, requested: str | None) -> str:
        if requested is None or requested.startswith("gpt-"):
            if self.default_model is not None:
                return self.default_model
            current = getattr(self.engine, "shard", None)
            if current is not None:
                return current.model_id
            raise BadRequest(f'no "model" given and this ring has not served one yet (no --default-model); '
                             f"name one of: {', '.join(self.served_models())}")
        if requested not in self.served:
            raise BadRequest(f"model {requested!r} has no card on this node; models it serves: "
                             f"{', '.join(self.served_models())}")
        return requested

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        try:
            check_body_size(request.content_length)
            chat = parse_chat_request(await request.read())
            model = self.resolve_model(chat.model)
        except BadRequest as e:
            _say(f"rejected request: {e}")
            return web.json_response(error_body(str(e), "invalid_request_error", 400), status=400)
        except web.HTTPRequestEntityTooLarge:
            msg = f"the request body is larger than {MAX_BODY_BYTES} bytes, the most this API accepts"
            return web.json_response(error_body(msg, "invalid_request_error", 400), status=400)
        limit = self.options.engine.limits.max_requests
        if len(self.active) >= limit:
            msg = f"this node's API is serving {len(self.active)} requests (--max-requests {limit}); retry later"
            return web.json_response(error_body(msg, "capacity", 429), status=429, headers={"Retry-After": "1"})

        import exo.api.chatgpt_api as api_mod
        from exo.models import build_base_shard, get_repo

        engine_class = self.api.inference_engine_classname
        shard = build_base_shard(model, engine_class)
        if shard is None:
            msg = f"model {model!r} has no repo for engine {engine_class}"
            return web.json_response(error_body(msg, "invalid_request_error", 400), status=400)
        strategy = self.node.partitioning_strategy
        if isinstance(strategy, MixedRingPartitioning):
            problem = strategy.unservable(self.node.topology, model, shard.n_layers)
            if problem is not None:  # fail now, not after exo's response timeout
                _say(f"refused a request for {model}: {problem}")
                return web.json_response(error_body(problem, "unavailable", 503), status=503)
        tokenizer = await api_mod.resolve_tokenizer(get_repo(model, engine_class))
        messages = [api_mod.Message(m["role"], m["content"]) for m in chat.messages]
        if self.api.system_prompt and not any(m.role == "system" for m in messages):
            messages.insert(0, api_mod.Message("system", self.api.system_prompt))
        prompt = await asyncio.to_thread(api_mod.build_prompt, tokenizer, messages, chat.tools)
        n_prompt = len(await asyncio.to_thread(tokenizer.encode, prompt))
        stop_ids = stop_token_ids(tokenizer)

        request_id = str(uuid.uuid4())
        queue: asyncio.Queue = asyncio.Queue()
        self.active[request_id] = queue
        self.api.token_queues[request_id] = queue  # exo's token callback feeds this queue
        outcome = Outcome()
        response: web.StreamResponse | None = None
        try:
            members = {p.node_id for p in node_partitions(self.node, model)}
            await self.node.broadcast_opaque_status(request_id, json.dumps({
                "type": START_STATUS, "request_id": request_id, "max_tokens": chat.max_tokens,
                "temperature": chat.temperature, "origin": self.node.id}))
            prompt_task = asyncio.create_task(self.node.process_prompt(shard, prompt, request_id=request_id))
            decoder = IncrementalDecoder(tokenizer.decode)
            response = await self._wait(request, chat, model, request_id, queue, prompt_task, members, decoder,
                                        stop_ids, outcome)
        finally:
            self.active.pop(request_id, None)
            self.api.token_queues.pop(request_id, None)
            if not outcome.finished:
                reason = outcome.error[2] if outcome.error else "the client went away"
                asyncio.create_task(self.end(request_id, f"ended by the API: {reason}"))
        if response is not None:
            return response
        finish = "stop" if outcome.tokens and outcome.tokens[-1] in stop_ids else "length"
        text = await asyncio.to_thread(tokenizer.decode, outcome.tokens)
        return web.json_response({
            "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(outcome.tokens),
                      "total_tokens": n_prompt + len(outcome.tokens)},
        })

    async def _wait(self, request: web.Request, chat: ChatRequest, model: str, request_id: str, queue: asyncio.Queue,
                    prompt_task: asyncio.Task, members: set[str], decoder: IncrementalDecoder,
                    stop_ids: set[int], outcome: Outcome) -> web.StreamResponse | None:
        """Collect tokens until the request finishes or fails. Returns the response to send (an error, or the
        finished stream), or None when a non-streaming request finished (the caller builds the JSON)."""
        stream: web.StreamResponse | None = None
        stalled_since = time.monotonic()
        timeout = float(getattr(self.api, "response_timeout", 900))

        def fail(status: int, kind: str, message: str) -> None:
            outcome.error = (status, kind, message)

        while outcome.error is None:
            if request.transport is None or request.transport.is_closing():
                fail(499, "cancelled", "the client disconnected")
                break
            if prompt_task.done() and not prompt_task.cancelled() and prompt_task.exception() is not None:
                e = prompt_task.exception()
                kind = failure_kind(e)
                fail(HTTP_STATUS[kind], kind, f"node {self.node.id}: {type(e).__name__}: {e}")
                break
            try:
                item = await asyncio.wait_for(queue.get(), timeout=HEALTH_INTERVAL_S)
            except asyncio.TimeoutError:
                problem = await self.ring_problem(members, model)
                if problem is not None:
                    fail(503, "unavailable", f"{problem}; the request was stopped (retry once the ring is healthy)")
                elif time.monotonic() - stalled_since > timeout:
                    fail(504, "timeout", f"no token for {timeout:g} s")
                continue
            if isinstance(item, FailureMarker):
                fail(HTTP_STATUS.get(item.kind, 500), item.kind, item.message)
                break
            tokens, is_finished = item
            stalled_since = time.monotonic()
            tokens = [int(t) for t in (tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)]
            outcome.tokens.extend(tokens)
            if chat.max_tokens is not None and len(outcome.tokens) >= chat.max_tokens:
                del outcome.tokens[chat.max_tokens:]  # a last node that ignores max_tokens (stock exo) is cut here
                is_finished = True
            outcome.finished = bool(is_finished)
            if chat.stream:
                piece = decoder.add(tokens)
                try:
                    if stream is None:
                        stream = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                                         "Cache-Control": "no-cache"})
                        await stream.prepare(request)
                    finish = None
                    if outcome.finished:
                        finish = "stop" if outcome.tokens[-1] in stop_ids else "length"
                    await stream.write(_sse(_chunk(request_id, model, piece, finish)))
                    if outcome.finished:
                        await stream.write(b"data: [DONE]\n\n")
                        await stream.write_eof()
                except (ConnectionResetError, RuntimeError):
                    outcome.finished = False
                    fail(499, "cancelled", "the client disconnected")
                    break
            if outcome.finished:
                return stream
        status, kind, message = outcome.error
        if status == 499:
            _say(f"request {request_id}: the client disconnected; generation stopped")
            return stream or web.Response(status=499)
        _say(f"request {request_id} answered {status}: {message}")
        if stream is not None:  # headers are out: the error travels as a last SSE event
            try:
                await stream.write(_sse({"error": error_body(message, kind, status)["error"]}))
                await stream.write_eof()
            except (ConnectionResetError, RuntimeError):
                pass
            return stream
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return web.json_response(error_body(message, kind, status), status=status, headers=headers)


def _chunk(request_id: str, model: str, piece: str, finish: str | None) -> dict[str, Any]:
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                         "logprobs": None, "finish_reason": finish}]}


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
