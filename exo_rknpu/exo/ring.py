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
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from aiohttp import web

from exo_rknpu.exo.capabilities import plan_problem
from exo_rknpu.exo.cards import CARDS
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
from exo_rknpu.exo.availability import Availability, Prober, model_availability
from exo_rknpu.exo.prompt_tokens import PromptEncoder, UnsafePrompt
from exo_rknpu.exo.request_state import request_state
from exo_rknpu.exo.ring_members import MixedRingPartitioning, layer_ranges, node_partitions, samples_like_rknpu
from exo_rknpu.exo.request_state import sampling_params
from exo_rknpu.exo.stop import stop_index, tail_text, visible_text
from exo_rknpu.runtime.requests import BoundedMap
from exo_rknpu.runtime.sampling import Choice, SamplingParams

log = logging.getLogger(__name__)

START_STATUS = "rknpu_request_start"
END_STATUS = "rknpu_request_end"
FAILURE_STATUS = "rknpu_request_failed"
LOGPROBS_STATUS = "rknpu_logprobs"
HEALTH_INTERVAL_S = 1.0  # how often a waiting request checks that every node of the ring still answers
PROBE_TIMEOUT_S = 2.0
DEAD_AFTER_S = 8.0  # a node that accepts no connection for this long is taken for gone
MAX_TRACKED = 1024
HTTP_STATUS = {"capacity": 429, "unavailable": 503, "context": 400, "model": 404, "error": 500}
LOGPROBS_WAIT_S = 5.0  # a token's log-probabilities are sent before the token; this only bounds a lost message


@dataclass
class Outcome:
    """How a request served by this node's API ended."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = False  # the answer is complete (the ring finished it, or max_tokens / a stop string here)
    ring_finished: bool = False  # the node that samples said so (else the API ends the request on the ring)
    stopped: bool = False  # at a stop string
    ended: str = ""  # why the API ended a request the ring had not finished
    text: str = ""  # decoded so far
    visible: str = ""  # the text that may be shown so far (what could still become a stop string is held back)
    shown: str = ""  # streamed so far
    logprobs: list[Choice] = field(default_factory=list)
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


@runtime_checkable
class RequestEngine(Protocol):
    """What the ring asks an engine about its requests (exo_rknpu.exo.inference_engine, and the tinygrad engine as
    stock_engines.py patches it); the request records themselves are runtime/requests.py::RequestLog."""

    def announce(self, request_id: str) -> None:
        """The API is about to start it: a one-token prefill for it is a start."""

    def release(self, request_id: str, reason: str) -> None:
        """It is over: free its cache; later steps for it fail."""

    def take_failure(self, request_id: str) -> tuple[str, str] | None:
        """(kind, message) of the error that made it fail here, once."""

    def positions_left(self, request_id: str) -> int | None:
        """Tokens its cache can still take here (None: no bound known here)."""


class RingNode:
    def __init__(self, node: Any, api: Any, options: NodeOptions, default_model: str | None,
                 served: tuple[str, ...]) -> None:
        self.node, self.api, self.options = node, api, options
        self.default_model = default_model
        self.served = served  # the model ids this node's API serves
        self.params: BoundedMap[str, SamplingParams] = BoundedMap(MAX_TRACKED)  # as announced by the API (fallback)
        self.logprobs: dict[str, dict[int, Choice]] = {}  # requests this node's API serves with logprobs
        self.rng = np.random.default_rng()  # unseeded requests sampled on this node
        self.prober = Prober()
        self.active: dict[str, asyncio.Queue] = {}  # requests this node's API is serving
        self._health: tuple[float, str | None] = (0.0, None)
        self._health_lock = asyncio.Lock()
        self._silent_since: dict[str, float] = {}
        self._plan_problems: dict[str, str | None] = {}  # plan_problem's answers (models whose files are here)
        node.rknpu_ring = self
        node.on_opaque_status.register("exo-rknpu-requests").on_next(self._on_status)
        node.on_token.register("exo-rknpu-finished").on_next(self._on_token)

    # ------------------------------------------------------------------ lifecycle messages

    @property
    def engine(self) -> Any:
        return self.node.inference_engine

    @property
    def request_engine(self) -> RequestEngine | None:
        """The engine as the ring asks it about requests, or None for a stock engine that keeps no record of them."""
        eng = self.engine
        return eng if isinstance(eng, RequestEngine) else None

    def _release(self, request_id: str, reason: str) -> None:
        if self.request_engine is not None:
            self.request_engine.release(request_id, reason)
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
            if self.request_engine is not None:
                self.request_engine.announce(rid)
            try:
                self.params[rid] = SamplingParams.from_json(data.get("sampling") or {})
            except (TypeError, ValueError) as e:
                _say(f"request {rid}: ignored malformed sampling parameters from node {data.get('origin')}: {e}")
        elif kind == LOGPROBS_STATUS:
            slots = self.logprobs.get(rid)
            if slots is not None:
                try:
                    slots[int(data["index"])] = Choice(int(data["token"]), float(data["logprob"]),
                                                       tuple((int(t), float(lp)) for t, lp in data.get("top") or ()))
                except (KeyError, TypeError, ValueError):
                    _say(f"request {rid}: malformed log-probabilities from node {data.get('node_id')}")
        elif kind == END_STATUS:
            self._release(rid, str(data.get("reason") or "ended by the API"))
            self._forget(rid)
        elif kind == FAILURE_STATUS:
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

    def announced(self, request_id: str | None) -> bool:
        """True if an exo-rknpu API (of any node the launcher started) announced this live request: its API hears
        of the ring's failure reports. A plain stock node's API announces nothing."""
        return request_id in self.params

    def sampling(self, request_id: str, inference_state: Any) -> SamplingParams:
        """The request's parameters on the node that samples: those carried in inference_state, else those its
        API announced, else exo's defaults (--default-temp) for a request exo-rknpu's API did not start."""
        params = sampling_params(inference_state)
        if params is None:
            params = self.params.get(request_id)
        return params or SamplingParams(temperature=float(self.node.default_sample_temperature))

    def finish_decision(self, request_id: str, tokens: list[int], params: SamplingParams) -> bool:
        """On the last node, after sampling tokens[-1]: is the request done (EOS, max_tokens, exo's cap, a stop
        string in the text, a full cache)?"""
        eng, node = self.engine, self.node
        stop = stop_token_ids(eng.tokenizer)
        cap = node.max_generate_tokens if params.max_tokens is None else min(node.max_generate_tokens, params.max_tokens)
        left = self.request_engine.positions_left(request_id) if self.request_engine is not None else None
        if tokens[-1] in stop or len(tokens) >= cap or (left is not None and left < 1):
            return True
        return bool(params.stop) and stop_index(tail_text(eng.tokenizer.decode, tokens, params.stop), params.stop) >= 0

    async def send_logprobs(self, request_id: str, index: int, choice: Choice) -> None:
        """The log-probabilities of a request's token `index`, to every node (its API node keeps them)."""
        await self.node.broadcast_opaque_status(request_id, json.dumps({
            "type": LOGPROBS_STATUS, "request_id": request_id, "node_id": self.node.id, "index": index,
            "token": choice.token, "logprob": choice.logprob, "top": [list(t) for t in choice.top]}))

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

    async def availability(self, model: str) -> Availability:
        """Whether this node has `model`'s files or can fetch them now (bounded: at most one short probe)."""
        return await asyncio.to_thread(model_availability, CARDS[model], self.options.model_dir, self.prober)

    async def model_problem(self, model: str) -> str | None:
        """Why this node's API refuses `model` at once (its files are neither here nor fetchable, or here but it
        cannot plan them), or None."""
        if self.options.stock_engine is not None:
            return None  # exo's own engine: its files come through exo's downloader (docs/exo.md §9)
        found = await self.availability(model)
        if not found.servable:
            return found.reason
        return await self.plan_problem(model) if found.local is not None else None

    async def plan_problem(self, model: str) -> str | None:
        """Why this node cannot plan `model`, whose files are here (capabilities.plan_problem: the reason its start-up
        log gave), or None; worked out once per model."""
        if model not in self._plan_problems:
            self._plan_problems[model] = await asyncio.to_thread(plan_problem, self.options, model)
        return self._plan_problems[model]

    def stock_problem(self, params: SamplingParams, needs_prompt_ids: bool, model: str) -> str | None:
        """Why a node of the ring that does not run exo-rknpu's sampling would answer this request wrongly, or
        None. A stock exo node that samples knows only exo's own --default-temp (it would drop every other
        parameter); a stock first node would encode the prompt string itself (content specials as control tokens)."""
        partitions = node_partitions(self.node, model)
        if not partitions:
            return None

        def stock(nid: str) -> bool:
            caps = self.node.topology.get_node(nid)
            return nid != self.node.id and not (caps is not None and samples_like_rknpu(str(caps.model)))

        last, first = partitions[-1].node_id, partitions[0].node_id
        if params.needs_sampler() and stock(last):
            return (f"node {last} samples for this ring and runs stock exo, which samples only at its own "
                    "--default-temp; this request's sampling parameters (temperature, top_p, top_k, seed, penalties, "
                    "logit_bias, logprobs) cannot be honoured: leave them out")
        if needs_prompt_ids and stock(first):
            return (f"node {first} encodes prompts for this ring and runs stock exo, which would read special-token "
                    "text inside a message as control tokens; remove it from the message")
        return None

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        try:
            chat = parse_chat_request(await read_body(request))
            model = self.resolve_model(chat.model)
        except BadRequest as e:
            _say(f"rejected request: {e}")
            return web.json_response(error_body(str(e), "invalid_request_error", 400), status=400)
        # Admission before anything heavy (templating, tokenizing): the slot is taken before the next await.
        limit = self.options.engine.limits.max_requests
        if len(self.active) >= limit:
            msg = f"this node's API is serving {len(self.active)} requests (--max-requests {limit}); retry later"
            _say(f"refused a request (429): {msg}")
            return web.json_response(error_body(msg, "capacity", 429), status=429, headers={"Retry-After": "1"})
        request_id = str(uuid.uuid4())
        queue: asyncio.Queue = asyncio.Queue()
        self.active[request_id] = queue
        outcome, started = Outcome(), False
        try:
            refused = await self._prepare(chat, model)
            if isinstance(refused, web.Response):
                return refused
            tokenizer, prompt, ids, params = refused
            n_prompt = len(ids) if ids is not None else len(await asyncio.to_thread(tokenizer.encode, prompt))
            self.api.token_queues[request_id] = queue  # exo's token callback feeds this queue
            if params.logprobs:
                self.logprobs[request_id] = {}
            members = {p.node_id for p in node_partitions(self.node, model)}
            started = True
            await self.node.broadcast_opaque_status(request_id, json.dumps({
                "type": START_STATUS, "request_id": request_id, "sampling": params.to_json(), "origin": self.node.id}))
            shard = self._base_shard(model)
            prompt_task = asyncio.create_task(self.node.process_prompt(
                shard, prompt, request_id=request_id, inference_state=request_state(params, ids)))
            prompt_task.add_done_callback(_quiet_task)
            call = _Call(request_id, model, chat, params, tokenizer, n_prompt)
            response = await self._wait(request, call, queue, prompt_task, members, outcome)
        finally:
            self.active.pop(request_id, None)
            self.api.token_queues.pop(request_id, None)
            self.logprobs.pop(request_id, None)
            if started and not outcome.ring_finished:
                reason = outcome.error[2] if outcome.error else (outcome.ended or "the client went away")
                asyncio.create_task(self.end(request_id, f"ended by the API: {reason}"))
        if response is not None:
            return response
        return web.json_response(await asyncio.to_thread(call.completion, outcome))

    def _base_shard(self, model: str) -> Any:
        from exo.models import build_base_shard

        return build_base_shard(model, self.api.inference_engine_classname)

    async def _prepare(self, chat: ChatRequest, model: str) -> web.Response | tuple:
        """The checks that need the model (files here, the ring's nodes) and the prompt: an error response, or
        (tokenizer, prompt, prompt ids or None, sampling parameters)."""
        import exo.api.chatgpt_api as api_mod
        from exo.models import get_repo

        problem = await self.model_problem(model)
        if problem is not None:
            _say(f"refused a request (404): {problem}")
            return web.json_response(error_body(problem, "model_not_found", 404), status=404)
        engine_class = self.api.inference_engine_classname
        shard = self._base_shard(model)
        if shard is None:
            msg = f"model {model!r} has no repo for engine {engine_class}"
            return web.json_response(error_body(msg, "invalid_request_error", 400), status=400)
        strategy = self.node.partitioning_strategy
        if isinstance(strategy, MixedRingPartitioning):
            problem = strategy.unservable(self.node.topology, model, shard.n_layers)
            if problem is not None:  # fail now, not after exo's response timeout
                _say(f"refused a request for {model} (503): {problem}")
                return web.json_response(error_body(problem, "unavailable", 503), status=503)
        params = chat.sampling
        if not chat.temperature_given:
            params = dataclasses.replace(params, temperature=float(self.node.default_sample_temperature))
        tokenizer = await api_mod.resolve_tokenizer(get_repo(model, engine_class))
        messages = list(chat.messages)
        if self.api.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.api.system_prompt})
        try:
            prompt, ids = await asyncio.to_thread(encode_chat, tokenizer, messages)
            problem = self.stock_problem(params, ids is not None, model)
        except UnsafePrompt as e:
            problem = f"{e}: remove special-token text from the messages"
        if problem is not None:
            _say(f"rejected request: {problem}")
            return web.json_response(error_body(problem, "invalid_request_error", 400), status=400)
        return tokenizer, prompt, ids, params

    async def _wait(self, request: web.Request, call: "_Call", queue: asyncio.Queue, prompt_task: asyncio.Task,
                    members: set[str], outcome: Outcome) -> web.StreamResponse | None:
        """Collect tokens until the request finishes or fails. Returns the response to send (an error, or the
        finished stream), or None when a non-streaming request finished (the caller builds the JSON)."""
        stream: web.StreamResponse | None = None
        stalled_since = time.monotonic()
        timeout = float(getattr(self.api, "response_timeout", 900))
        decoder = IncrementalDecoder(call.tokenizer.decode)

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
                problem = await self.ring_problem(members, call.model)
                if problem is not None:
                    fail(503, "unavailable", f"{problem}; the request was stopped (retry once the ring is healthy)")
                elif time.monotonic() - stalled_since > timeout:
                    fail(504, "timeout", f"no token for {timeout:g} s")
                continue
            if isinstance(item, FailureMarker):
                fail(HTTP_STATUS.get(item.kind, 500), item.kind, item.message)
                break
            stalled_since = time.monotonic()
            first = len(outcome.tokens)
            missing = await self._take_tokens(call, outcome, decoder, *item)
            if missing:
                fail(500, "error", missing)
                break
            if call.chat.stream:
                try:
                    stream = await self._stream_step(request, stream, call, outcome, outcome.visible, first)
                except (ConnectionResetError, RuntimeError):
                    outcome.finished = False
                    fail(499, "cancelled", "the client disconnected")
                    break
            if outcome.finished:
                return stream
        return await self._fail_response(request, call.request_id, stream, outcome)

    async def _take_tokens(self, call: "_Call", outcome: Outcome, decoder: IncrementalDecoder, tokens: Any,
                           is_finished: bool) -> str | None:
        """Add tokens from the ring to `outcome`: cut at the request's max_tokens, with their log-probabilities, and
        its text (outcome.visible: up to a stop string). Returns why log-probabilities are missing, or None."""
        tokens = [int(t) for t in (tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)]
        first = len(outcome.tokens)
        outcome.tokens.extend(tokens)
        outcome.ring_finished = bool(is_finished)
        if call.params.max_tokens is not None and len(outcome.tokens) >= call.params.max_tokens:
            del outcome.tokens[call.params.max_tokens:]  # a last node that ignores max_tokens (stock exo) is cut here
            is_finished = True
        if call.params.logprobs:
            missing = await self._collect_logprobs(call.request_id, first, len(outcome.tokens), outcome)
            if missing:
                return missing
        outcome.text += decoder.add(outcome.tokens[first:])
        outcome.visible, stopped = visible_text(outcome.text, call.params.stop, final=bool(is_finished))
        if stopped:
            outcome.stopped, is_finished = True, True
            if not outcome.ring_finished:
                outcome.ended = "a stop string was reached"
        outcome.finished = bool(is_finished)
        return None

    async def _collect_logprobs(self, request_id: str, start: int, end: int, outcome: Outcome) -> str | None:
        """Move the log-probabilities of tokens [start, end) into outcome (sent before each token; waits only
        for a message still in flight). Returns why they are missing, or None."""
        slots = self.logprobs.get(request_id, {})
        deadline = time.monotonic() + LOGPROBS_WAIT_S
        for i in range(start, end):
            while i not in slots and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if i not in slots:
                return f"the node that samples sent no log-probabilities for token {i}"
            outcome.logprobs.append(slots.pop(i))
        return None

    async def _stream_step(self, request: web.Request, stream: web.StreamResponse | None, call: "_Call",
                           outcome: Outcome, shown: str, first: int) -> web.StreamResponse:
        if stream is None:
            stream = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                             "Cache-Control": "no-cache"})
            await stream.prepare(request)
        piece, outcome.shown = shown[len(outcome.shown):], shown
        finish = call.finish_reason(outcome) if outcome.finished else None
        logprobs = call.logprobs_json(outcome.logprobs[first:]) if call.params.logprobs else None
        await stream.write(_sse(_chunk(call.request_id, call.model, piece, finish, logprobs)))
        if outcome.finished:
            if call.chat.include_usage:
                await stream.write(_sse({**_chunk(call.request_id, call.model, "", None, None), "choices": [],
                                         "usage": call.usage(outcome)}))
            await stream.write(b"data: [DONE]\n\n")
            await stream.write_eof()
        return stream

    async def _fail_response(self, request: web.Request, request_id: str, stream: web.StreamResponse | None,
                             outcome: Outcome) -> web.StreamResponse:
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


@dataclass
class _Call:
    """One chat request being served by this node's API."""

    request_id: str
    model: str
    chat: ChatRequest
    params: SamplingParams
    tokenizer: Any
    n_prompt: int

    def stop_ids(self) -> set[int]:
        return stop_token_ids(self.tokenizer)

    def finish_reason(self, outcome: Outcome) -> str:
        return "stop" if outcome.stopped or (outcome.tokens and outcome.tokens[-1] in self.stop_ids()) else "length"

    def usage(self, outcome: Outcome) -> dict[str, int]:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": len(outcome.tokens),
                "total_tokens": self.n_prompt + len(outcome.tokens)}

    def logprobs_json(self, choices: list[Choice]) -> dict[str, Any]:
        """OpenAI's choice.logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        stop_ids = self.stop_ids()  # the end-of-turn token is not part of the text, nor of its logprobs (as OpenAI)
        return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in c.top]}
                            for c in choices if c.token not in stop_ids], "refusal": None}

    def completion(self, outcome: Outcome) -> dict[str, Any]:
        """The non-streaming answer (blocking: decodes)."""
        text, _ = visible_text(self.tokenizer.decode(outcome.tokens), self.params.stop, final=True)
        return {
            "id": f"chatcmpl-{self.request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": self.logprobs_json(outcome.logprobs) if self.params.logprobs else None,
                         "finish_reason": self.finish_reason(outcome)}],
            "usage": self.usage(outcome),
        }


async def read_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused (BadRequest) as soon as it outgrows `limit`: from Content-Length before reading, and
    while reading a chunked body (aiohttp's own limit is exo's 100 MB)."""
    check_body_size(request.content_length, limit)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is larger than {limit} bytes, the most this API accepts")
        chunks.append(chunk)
    return b"".join(chunks)


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[int] | None]:
    """The rendered prompt, and its ids when a message holds special-token text (encoded as text; None when the
    prompt's plain encoding is already right). Blocking."""
    import exo.api.chatgpt_api as api_mod

    prompt = api_mod.build_prompt(tokenizer, [api_mod.Message(m["role"], m["content"]) for m in messages])
    encoder = prompt_encoder(tokenizer)
    if encoder is None or not encoder.has_special_text(messages):
        return prompt, None
    return prompt, encoder.encode(messages, prompt)


def prompt_encoder(tokenizer: Any) -> PromptEncoder | None:
    """The tokenizer's PromptEncoder (made once per tokenizer), or None for one without a `tokenizers` backend."""
    encoder = getattr(tokenizer, "_rknpu_prompt_encoder", None)
    if encoder is not None:
        return encoder
    import exo.api.chatgpt_api as api_mod

    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "backend"):  # exo-rknpu's tokenizer (ExoApiTokenizer)
        backend, bos = inner.backend, (inner.bos_token_id if inner.add_bos else None)
    elif getattr(tokenizer, "backend_tokenizer", None) is not None:  # a transformers fast tokenizer
        backend, bos = tokenizer.backend_tokenizer, None
    else:
        return None

    def render(messages: list[dict[str, Any]]) -> str:
        return api_mod.build_prompt(tokenizer, [api_mod.Message(m["role"], m["content"]) for m in messages])

    encoder = PromptEncoder(backend, render, bos)
    try:
        tokenizer._rknpu_prompt_encoder = encoder
    except AttributeError:
        pass
    return encoder


def _quiet_task(task: asyncio.Task) -> None:
    """Retrieve a background task's exception (reported to the client through the ring already), so asyncio
    does not print "Task exception was never retrieved" with a traceback."""
    if not task.cancelled():
        task.exception()


def _chunk(request_id: str, model: str, piece: str, finish: str | None, logprobs: Any) -> dict[str, Any]:
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                         "logprobs": logprobs, "finish_reason": finish}]}


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
