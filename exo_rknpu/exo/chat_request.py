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

from exo_rknpu.runtime.sampling import MAX_STOP, MAX_TOP_LOGPROBS, SamplingParams

MAX_BODY_BYTES = 1 << 20  # a chat that fits a 2k-8k token context is a few tens of kB; this leaves room to spare
ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(ValueError):
    """The request body is not a valid chat-completions request (HTTP 400)."""


@dataclass(frozen=True)
class ChatRequest:
    model: str | None  # None: the model this ring serves
    messages: list[dict[str, Any]]  # {"role": str, "content": str}
    stream: bool = False
    sampling: SamplingParams = SamplingParams()  # temperature 0 here when the request gave none (see below)
    temperature_given: bool = False  # False: the node's --default-temp applies
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    @property
    def max_tokens(self) -> int | None:  # None: the node's --max-generate-tokens (and the context) bound it
        return self.sampling.max_tokens

    @property
    def temperature(self) -> float | None:
        return self.sampling.temperature if self.temperature_given else None


# Fields read and honoured (or checked to be a value this API honours), and fields refused with a reason.
# Anything else is refused as unknown: an unsupported parameter is never silently dropped.
HONOURED = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
            "top_p", "top_k", "seed", "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
            "top_logprobs", "stop", "response_format", "tools", "tool_choice", "parallel_tool_calls", "user",
            "store", "metadata", "service_tier")
REFUSED = {
    "functions": "function calling is not supported by this API",
    "function_call": "function calling is not supported by this API",
    "audio": "audio output is not supported; this API answers with text",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "web_search_options": "web search is not supported",
    "modalities": None,  # checked below: ["text"] is fine
    "best_of": "best_of is not supported (one choice per request)",
    "echo": "echo is not supported by chat completions",
    "suffix": "suffix is not supported by chat completions",
}
MESSAGE_KEYS = ("role", "content", "name")
MESSAGE_NULL_KEYS = ("refusal", "audio", "tool_calls", "function_call", "annotations", "tool_call_id")  # null only


def check_body_size(n_bytes: int | None, limit: int = MAX_BODY_BYTES) -> None:
    if n_bytes is not None and n_bytes > limit:
        raise BadRequest(f"the request body is {n_bytes} bytes; this API accepts at most {limit} bytes")


def parse_json_body(body: bytes, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """A request body as a JSON object, or BadRequest: empty, too large, not UTF-8, not JSON, nested too deep for
    the parser, or holding text that is not valid Unicode (a lone surrogate such as "\\ud800")."""
    check_body_size(len(body), limit)
    if not body.strip():
        raise BadRequest('the request body is empty; send a JSON object')
    try:
        data = json.loads(body)
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise BadRequest("the request body nests JSON too deeply") from None
    except ValueError as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the request body holds a string that is not valid Unicode (a lone surrogate such as "
                         "\\ud800)") from None
    except RecursionError:
        raise BadRequest("the request body nests JSON too deeply") from None
    return data


def parse_chat_request(body: bytes, limit: int = MAX_BODY_BYTES) -> ChatRequest:
    """Validate a /v1/chat/completions body (bytes) or raise BadRequest naming the first problem."""
    data = parse_json_body(body, limit)
    _check_fields(data)
    messages = data.get("messages")
    if messages is None:
        raise BadRequest('"messages" is required: a non-empty list of {"role": ..., "content": ...}')
    if not isinstance(messages, list) or not messages:
        raise BadRequest('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    model = parse_model(data)
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest('"stream" must be true or false')
    include_usage = _stream_options(data.get("stream_options"), stream)
    n = data.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise BadRequest('"n" must be 1: this API generates one choice per request')
    temperature = _number(data, "temperature", 0.0, 2.0)
    return ChatRequest(model=model, messages=[_message(i, m) for i, m in enumerate(messages)], stream=stream,
                       sampling=_sampling(data, temperature), temperature_given=temperature is not None,
                       include_usage=include_usage)


def parse_model(data: dict[str, Any]) -> str | None:
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise BadRequest('"model" must be a non-empty string (or left out for the model this ring serves)')
    return model


def _check_fields(data: dict[str, Any]) -> None:
    for key, value in data.items():
        if key in HONOURED or value is None:
            continue
        if key == "modalities" and value == ["text"]:
            continue
        if key in REFUSED:
            raise BadRequest(f'"{key}": {REFUSED[key] or "only text output is supported"}')
        raise BadRequest(f'"{key}" is not a parameter this API supports; supported: {", ".join(HONOURED)}')
    tools = data.get("tools")
    if tools is not None and (not isinstance(tools, list) or tools):
        raise BadRequest('"tools": tool calling is not supported by this API (send no tools)')
    if data.get("tool_choice") not in (None, "none"):
        raise BadRequest('"tool_choice": tool calling is not supported by this API (only "none")')
    if data.get("parallel_tool_calls") not in (None, True, False):
        raise BadRequest('"parallel_tool_calls" must be true or false')
    fmt = data.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise BadRequest(f'"response_format" {kind!r} is not supported: this API does not constrain its output '
                         'to JSON (only {"type": "text"})')
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise BadRequest('"user" must be a string')
    if data.get("store") not in (None, False):
        raise BadRequest('"store": this API stores no completions (only false)')
    metadata = data.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise BadRequest('"metadata" must be an object of strings')
    if data.get("service_tier") not in (None, "auto", "default"):
        raise BadRequest('"service_tier" must be "auto" or "default"')


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise BadRequest('"stream_options" is only allowed with "stream": true')
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise BadRequest('"stream_options" must be {"include_usage": true|false}')
    return bool(options.get("include_usage", False))


def _sampling(data: dict[str, Any], temperature: float | None) -> SamplingParams:
    max_tokens = _int(data, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(data, "max_tokens", 1)
    top_p = _number(data, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise BadRequest('"top_p" must be more than 0 and at most 1; got 0')
    logprobs = data.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest('"logprobs" must be true or false')
    top_logprobs = _int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise BadRequest('"top_logprobs" needs "logprobs": true')
    try:
        return SamplingParams(
            temperature=temperature or 0.0,
            top_k=_int(data, "top_k", 0) or 0,
            top_p=1.0 if top_p is None else top_p,
            seed=_int(data, "seed", 0, 2**63 - 1),
            presence_penalty=_number(data, "presence_penalty", -2.0, 2.0) or 0.0,
            frequency_penalty=_number(data, "frequency_penalty", -2.0, 2.0) or 0.0,
            logit_bias=_logit_bias(data.get("logit_bias")),
            logprobs=bool(logprobs),
            top_logprobs=top_logprobs or 0,
            stop=_stop(data.get("stop")),
            max_tokens=max_tokens,
        )
    except ValueError as e:  # the checks above cover every field; this is the type's own last word
        raise BadRequest(str(e)) from None


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_STOP or \
            not all(isinstance(s, str) and s for s in items):
        raise BadRequest(f'"stop" must be a non-empty string or a list of 1 to {MAX_STOP} non-empty strings')
    return tuple(items)


def _logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise BadRequest('"logit_bias" must be an object mapping token ids to numbers from -100 to 100')
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or isinstance(value, bool) or \
                not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequest(f'"logit_bias" maps token ids (digits) to numbers from -100 to 100; got {key!r}: {value!r}')
        out.append((int(key), float(value)))
    return tuple(out)


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f'{where} must be an object with "role" and "content"')
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
    for key, value in m.items():
        if key in MESSAGE_KEYS or (key in MESSAGE_NULL_KEYS and value in (None, [])):
            continue
        if key in MESSAGE_NULL_KEYS:
            raise BadRequest(f"{where}.{key}: tool calling and audio are not supported by this API")
        raise BadRequest(f"{where}.{key} is not a message field this API supports ({', '.join(MESSAGE_KEYS)})")
    if role == "tool":
        raise BadRequest(f"{where}: tool messages are not supported (this API does no tool calling)")
    if "content" not in m or m["content"] is None:
        raise BadRequest(f"{where}.content is missing or null; every message needs text content")
    if m.get("name") is not None and not isinstance(m["name"], str):
        raise BadRequest(f"{where}.name must be a string")
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


def _int(data: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        if lo == 1 and hi is None:
            raise BadRequest(f'"{key}" must be a positive integer; got {v!r}')
        span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise BadRequest(f'"{key}" must be an integer {span}; got {v!r}')
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
