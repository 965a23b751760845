"""exo API routes that exo-rknpu answers itself (installed by the launcher): what exo did with them was wrong for
a board (77 models all "ready", Hugging Face queried for every card on /modelpool, minutes of download retries
and a plain-text 500 on token/encode for a model that is not here)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from exo_rknpu.exo.cards import CARDS
from exo_rknpu.exo.chat_request import BadRequest, check_body_size, error_body, parse_chat_request, parse_json_body
from exo_rknpu.exo.prompt_tokens import UnsafePrompt
from exo_rknpu.exo.ring import RingNode, encode_chat, read_body


async def servable_models(ring: RingNode) -> list[tuple[str, bool]]:
    """(model id, ready) of every model this node can serve now: ready = its files are here; not ready = it
    would be downloaded first. Models neither here nor fetchable, or here but not plannable, are left out."""
    found = await asyncio.gather(*(ring.availability(m) for m in sorted(CARDS)))
    return [(a.model_id, a.local is not None) for a in found
            if a.servable and (a.local is None or await ring.plan_problem(a.model_id) is None)]


async def handle_models(ring: RingNode, request: web.Request) -> web.Response:
    """GET /v1/models (and /models)."""
    data = [{"id": m, "object": "model", "owned_by": "exo-rknpu", "ready": ready}
            for m, ready in await servable_models(ring)]
    return web.json_response({"object": "list", "data": data})


async def handle_modelpool(ring: RingNode, request: web.Request) -> web.StreamResponse:
    """GET /modelpool (exo's web UI): the same as /v1/models in exo's event-stream form, from this node's disk."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for model, ready in await servable_models(ring):
        status = {"downloaded": ready, "download_percentage": 100 if ready else 0, "total_size": None,
                  "total_downloaded": None}
        await response.write(f"data: {json.dumps({model: status})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def handle_token_encode(ring: RingNode, request: web.Request) -> web.Response:
    """POST /v1/chat/token/encode: the prompt a chat request would send and its ids, validated like a chat."""
    try:
        chat = parse_chat_request(await read_body(request))
        model = ring.resolve_model(chat.model)
    except BadRequest as e:
        return web.json_response(error_body(str(e), "invalid_request_error", 400), status=400)
    problem = await ring.model_problem(model)
    if problem is not None:
        return web.json_response(error_body(problem, "model_not_found", 404), status=404)
    import exo.api.chatgpt_api as api_mod
    from exo.models import get_repo

    tokenizer = await api_mod.resolve_tokenizer(get_repo(model, ring.api.inference_engine_classname))
    try:
        prompt, ids = await asyncio.to_thread(encode_chat, tokenizer, chat.messages)
    except UnsafePrompt as e:
        msg = f"{e}: remove special-token text from the messages"
        return web.json_response(error_body(msg, "invalid_request_error", 400), status=400)
    if ids is None:
        ids = await asyncio.to_thread(tokenizer.encode, prompt)
    ids = [int(t) for t in ids]
    return web.json_response({"length": len(prompt), "num_tokens": len(ids), "encoded_tokens": ids,
                              "encoded_prompt": prompt})


def json_body_first(original: Any) -> Any:
    """An exo handler (turned on by --allow-node-control) behind the body checks: a body that is not a JSON object
    within the size limit is a 400 with a reason, not exo's 500."""

    async def handler(self: Any, request: web.Request) -> web.StreamResponse:
        if request.can_read_body:
            try:
                check_body_size(request.content_length)
                parse_json_body(await request.read())  # aiohttp keeps the bytes: exo's request.json() reads them again
            except BadRequest as e:
                return web.json_response(error_body(str(e), "invalid_request_error", 400), status=400)
        return await original(self, request)

    return handler
