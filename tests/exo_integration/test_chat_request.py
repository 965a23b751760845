"""The chat-completions request validation and the streaming detokenizer (exo-free; the API tests through a real
ring are in test_ring_load_and_faults.py)."""

from __future__ import annotations

import json

import pytest

from exo_rknpu.exo.chat_request import (
    MAX_BODY_BYTES,
    BadRequest,
    ChatRequest,
    IncrementalDecoder,
    check_body_size,
    error_body,
    parse_chat_request,
)
from exo_rknpu.model.loader import load_tokenizer
from exo_rknpu.model.zoo import resolve_model


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


USER = [{"role": "user", "content": "hi"}]


def test_a_minimal_request():
    assert parse_chat_request(body(messages=USER)) == ChatRequest(model=None, messages=USER)


def test_fields_are_read():
    req = parse_chat_request(body(model="smollm2-135m", messages=USER, stream=True, max_tokens=5, temperature=0.7))
    assert (req.model, req.stream, req.max_tokens, req.temperature) == ("smollm2-135m", True, 5, 0.7)
    assert parse_chat_request(body(messages=USER, max_tokens=9, max_completion_tokens=4)).max_tokens == 4


def test_text_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert parse_chat_request(body(messages=parts)).messages == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize("raw,reason", [
    (b"", "empty"),
    (b"{nope", "not valid JSON"),
    (b"[1]", "JSON object"),
    (body(model="m"), '"messages" is required'),
    (body(messages=[]), "non-empty list"),
    (body(messages="hi"), "non-empty list"),
    (body(messages=["hi"]), r"messages\[0\] must be an object"),
    (body(messages=[{"role": "user", "content": None}]), r"messages\[0\].content is missing or null"),
    (body(messages=[{"role": "user"}]), "missing or null"),
    (body(messages=[{"content": "hi"}]), "role must be one of"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "only text"),
    (body(messages=[{"role": "user", "content": 7}]), "string or a list"),
    (body(messages=USER, model=""), '"model" must be a non-empty string'),
    (body(messages=USER, max_tokens=0), '"max_tokens" must be a positive integer'),
    (body(messages=USER, max_tokens=True), "positive integer"),
    (body(messages=USER, max_tokens="5"), "positive integer"),
    (body(messages=USER, temperature=3), '"temperature" must be a number from 0 to 2'),
    (body(messages=USER, stream="yes"), '"stream" must be true or false'),
    (body(messages=USER, n=2), '"n" must be 1'),
])
def test_bad_bodies_are_refused_with_the_reason(raw, reason):
    with pytest.raises(BadRequest, match=reason):
        parse_chat_request(raw)


def test_size_limit_before_parsing():
    with pytest.raises(BadRequest, match=f"at most {MAX_BODY_BYTES} bytes"):
        check_body_size(MAX_BODY_BYTES + 1)
    check_body_size(None)  # chunked upload: checked after reading
    with pytest.raises(BadRequest, match="at most"):
        parse_chat_request(body(messages=[{"role": "user", "content": "x" * MAX_BODY_BYTES}]))


def test_error_body_speaks_openai_and_exo():
    assert error_body("busy", "capacity", 429) == {"detail": "busy",
                                                  "error": {"message": "busy", "type": "capacity", "code": 429}}


@pytest.mark.slow
def test_streamed_pieces_add_up_to_the_full_decode():
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    text = "Paris — the capital of France, café au lait, 東京 and emoji 🚀 end."
    ids = tok.encode(text, add_special_tokens=False)

    def decode(t):
        return tok.decode(t, skip_special_tokens=True)

    dec = IncrementalDecoder(decode)
    pieces = [dec.add([i]) for i in ids]
    assert "".join(pieces) == decode(ids)  # the reference: one decode of every token
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are never split across pieces
