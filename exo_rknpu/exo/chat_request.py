"""The OpenAI chat-completions request, validated before anything heavy happens (exo-free).

exo's own handler indexes the body blindly (a missing "messages" is a plain-text 500, a missing "model" silently
becomes llama-3.2-1b, "max_tokens" is ignored). `parse_chat_request` turns a body into a ChatRequest or raises
BadRequest with a one-line reason, which the API answers with HTTP 400.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

MAX_BODY_BYTES = 1 << 20  # a chat that fits a 2k-8k token context is a few tens of kB; this leaves room to spare
ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(ValueError):
    """The request body is not a valid chat-completions request (HTTP 400)."""


@dataclass(frozen=True)
class ChatRequest:
    model: str | None  # None: the model this ring serves
    messages: list[dict[str, Any]]  # {"role": str, "content": str}
    stream: bool = False
    max_tokens: int | None = None  # None: the node's --max-generate-tokens (and the context) bound it
    temperature: float | None = None  # None: the node's --default-temp
    tools: list[Any] | None = None


def check_body_size(n_bytes: int | None, limit: int = MAX_BODY_BYTES) -> None:
    if n_bytes is not None and n_bytes > limit:
        raise BadRequest(f"the request body is {n_bytes} bytes; this API accepts at most {limit} bytes")


def parse_chat_request(body: bytes, limit: int = MAX_BODY_BYTES) -> ChatRequest:
    """Validate a /v1/chat/completions body (bytes) or raise BadRequest naming the first problem."""
    check_body_size(len(body), limit)
    if not body.strip():
        raise BadRequest('the request body is empty; send a JSON object with "messages"')
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(data).__name__}")
    messages = data.get("messages")
    if messages is None:
        raise BadRequest('"messages" is required: a non-empty list of {"role": ..., "content": ...}')
    if not isinstance(messages, list) or not messages:
        raise BadRequest('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise BadRequest('"model" must be a non-empty string (or left out for the model this ring serves)')
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest('"stream" must be true or false')
    n = data.get("n")
    if n is not None and n != 1:
        raise BadRequest('"n" must be 1: this API generates one choice per request')
    max_tokens = _positive_int(data, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _positive_int(data, "max_tokens")
    temperature = _number(data, "temperature", 0.0, 2.0)
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest('"tools" must be a list')
    return ChatRequest(model=model, messages=[_message(i, m) for i, m in enumerate(messages)], stream=stream,
                       max_tokens=max_tokens, temperature=temperature, tools=tools or None)


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f'{where} must be an object with "role" and "content"')
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
    if "content" not in m or m["content"] is None:
        raise BadRequest(f"{where}.content is missing or null; every message needs text content")
    content = m["content"]
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise BadRequest(f'{where}.content[{j}] must be {{"type": "text", "text": ...}}; only text is supported')
            parts.append(p["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts")
    return {"role": role, "content": content}


def _positive_int(data: dict, key: str) -> int | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadRequest(f'"{key}" must be a positive integer; got {v!r}')
    return v


def _number(data: dict, key: str, lo: float, hi: float) -> float | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise BadRequest(f'"{key}" must be a number from {lo:g} to {hi:g}; got {v!r}')
    return float(v)


class RequestFailed(RuntimeError):
    """Raised where exo's own code unpacks a token-queue item that is a FailureMarker."""


class FailureMarker:
    """Put into exo's per-request token queue when a node reports that the request failed; unpacking it
    (`tokens, is_finished = ...`, what exo's code does with a queue item) raises RequestFailed."""

    def __init__(self, message: str, kind: str = "error") -> None:
        self.message, self.kind = message, kind

    def __iter__(self):
        raise RequestFailed(self.message)


def error_body(message: str, kind: str, status: int) -> dict[str, Any]:
    """An error answer both OpenAI clients ("error") and exo's clients ("detail") understand."""
    return {"detail": message, "error": {"message": message, "type": kind, "code": status}}


class IncrementalDecoder:
    """Text of a growing token list, piece by piece, without re-decoding everything each step: decodes a window
    from the last emitted boundary and holds back a piece that ends in an incomplete UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into emitted text

    def add(self, tokens: list[int]) -> str:
        self.tokens.extend(int(t) for t in tokens)
        before = self.decode(self.tokens[self._prefix:self._read])
        after = self.decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before):]
