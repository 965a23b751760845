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
from exo_rknpu.exo.stop import stop_index, tail_text, visible_text
from exo_rknpu.model.loader import load_tokenizer
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.sampling import SamplingParams


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


# ---------------------------------------------------------------------- every OpenAI field honoured or refused


def test_every_sampling_field_reaches_the_sampling_parameters():
    req = parse_chat_request(body(messages=USER, temperature=0.3, top_p=0.5, top_k=4, seed=11, presence_penalty=1,
                                  frequency_penalty=-0.5, logit_bias={"12": -100, "7": 2.5}, logprobs=True,
                                  top_logprobs=3, stop=["a", "bc"], max_completion_tokens=6, n=1,
                                  response_format={"type": "text"}, tools=[], tool_choice="none", user="u",
                                  stream=True, stream_options={"include_usage": True}))
    assert req.sampling == SamplingParams(temperature=0.3, top_p=0.5, top_k=4, seed=11, presence_penalty=1.0,
                                          frequency_penalty=-0.5, logit_bias=((12, -100.0), (7, 2.5)), logprobs=True,
                                          top_logprobs=3, stop=("a", "bc"), max_tokens=6)
    assert req.temperature_given and req.include_usage
    assert parse_chat_request(body(messages=USER, stop="x")).sampling.stop == ("x",)
    assert not parse_chat_request(body(messages=USER)).temperature_given


@pytest.mark.parametrize("fields,reason", [
    ({"top_p": 5}, "top_p"), ({"top_p": -1}, "top_p"), ({"top_p": 0}, "top_p"), ({"top_k": "x"}, "top_k"),
    ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed"), ({"seed": "1"}, "seed"), ({"n": 2}, '"n" must be 1'),
    ({"n": True}, '"n"'), ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency"),
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 2}, "needs"), ({"logprobs": True, "top_logprobs": 21}, "0 to 20"),
    ({"stop": ""}, "stop"), ({"stop": ["a"] * 5}, "stop"), ({"stop": [3]}, "stop"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"), ({"response_format": {"type": "json_object"}}, "does not constrain"),
    ({"tools": [{"type": "function"}]}, "tool calling"), ({"tool_choice": "auto"}, "tool calling"),
    ({"functions": []}, "function calling"), ({"frobnicate": 1}, "not a parameter"), ({"store": True}, "store"),
    ({"stream_options": {"include_usage": True}}, "only allowed"), ({"temperature": float("nan")}, "temperature"),
    ({"modalities": ["audio"]}, "only text"), ({"user": 1}, "user"),
])
def test_each_unsupported_or_out_of_range_field_is_refused(fields, reason):
    with pytest.raises(BadRequest, match=reason):
        parse_chat_request(body(messages=USER, **fields))


def test_fields_a_client_echoes_back_as_null_are_fine_but_tool_calls_are_refused():
    msg = {"role": "assistant", "content": "x", "refusal": None, "tool_calls": None, "audio": None}
    assert parse_chat_request(body(messages=[msg]))
    with pytest.raises(BadRequest, match="tool calling"):
        parse_chat_request(body(messages=[{**msg, "tool_calls": [{"id": "1"}]}]))
    with pytest.raises(BadRequest, match="not a message field"):
        parse_chat_request(body(messages=[{**msg, "weird": 1}]))


@pytest.mark.parametrize("raw,reason", [
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udc00"}', "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8"),
])
def test_hostile_json_is_a_400_not_a_500(raw, reason):
    with pytest.raises(BadRequest, match=reason):
        parse_chat_request(raw)


# ---------------------------------------------------------------------- stop strings


def test_stop_text_ends_before_the_first_stop_and_streaming_holds_back_a_possible_start():
    assert visible_text("The capital of France", ("France", "capital"), final=False) == ("The ", True)
    assert visible_text("The cap", ("capital",), final=False) == ("The ", False)  # "cap" may become "capital"
    assert visible_text("The cap", ("capital",), final=True) == ("The cap", False)
    assert visible_text("abc", (), final=False) == ("abc", False)
    assert stop_index("xaby", ("b", "ab")) == 1


def test_the_sampling_node_sees_a_stop_completed_by_the_last_token():
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    ids = tok.encode("The capital of France is Paris.")
    hits = [stop_index(tail_text(tok.decode, ids[:n], ("Paris",)), ("Paris",)) >= 0 for n in range(1, len(ids) + 1)]
    first = hits.index(True)
    assert "Paris" in tok.decode(ids[:first + 1]) and "Paris" not in tok.decode(ids[:first])
