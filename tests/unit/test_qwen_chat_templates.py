"""Qwen2.5 and Qwen3 chat templates render exactly as transformers' AutoTokenizer.apply_chat_template renders them,
and exo-rknpu's template option (enable_thinking off unless asked) reaches both our tokenizer and exo's own.

The templates in tests/fixtures/chat_templates are Qwen's (Qwen/Qwen3-0.6B, Qwen/Qwen2.5-7B-Instruct, the same
for the 0.5B-3B Instruct models), as vendored by llama.cpp in models/templates/. The vocabulary is the tiny
byte-level BPE of tests/tiny_models.py with Qwen's special tokens; one test also uses Qwen2's real vocabulary when
llama.cpp's ggml-vocab-qwen2.gguf has been extracted (see the skip reason). Skipped without transformers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from exo_rknpu.config import Paths
from exo_rknpu.exo.api_tokenizer import ExoApiTokenizer, TemplateOptionsTokenizer, encode_prompt
from exo_rknpu.model.chat import render_chat
from exo_rknpu.model.tokenizer import Tokenizer
from tiny_models import train_tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b> ünïcödé 日本"}],
    "history with thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ],
    "reasoning_content field": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
    ],
    "tool calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"rain\": false}"},
    ],
}


def qwen_folder(path: Path, template: str) -> Path:
    """A tokenizer folder shaped like Qwen's: no BOS, eos <|im_end|>, pad <|endoftext|>, <think> tokens not special."""
    path.mkdir(parents=True)
    tok = train_tokenizer(400, "qwen2")
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "errors": "replace", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 40960,
        "chat_template": (TEMPLATES / template).read_text(encoding="utf-8")}))
    return path


@pytest.fixture(scope="module", params=["qwen3.jinja", "qwen2_5.jinja"])
def folder(request, tmp_path_factory) -> Path:
    return qwen_folder(tmp_path_factory.mktemp("tok") / request.param.split(".")[0], request.param)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return qwen_folder(tmp_path_factory.mktemp("tok") / "qwen3", "qwen3.jinja")


@functools.cache
def hf_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_render(folder: Path, messages, **kw) -> str:
    return hf_tokenizer(folder).apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_templates_render_as_transformers(folder, conversation, thinking, generation_prompt):
    messages = CONVERSATIONS[conversation]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    ours = Tokenizer.from_hf_dir(folder).apply_chat_template(messages, add_generation_prompt=generation_prompt, **kw)
    assert ours == hf_render(folder, messages, add_generation_prompt=generation_prompt, **kw)


def test_qwen3_thinking_is_off_by_default_in_generate_and_the_exo_api(qwen3):
    messages = CONVERSATIONS["user"]
    tok = Tokenizer.from_hf_dir(qwen3)
    off = hf_render(qwen3, messages, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith(EMPTY_THINK)  # Qwen's switch: an empty think block, the model answers directly
    assert render_chat(tok, messages) == off
    assert ExoApiTokenizer(tok).apply_chat_template(messages, add_generation_prompt=True) == off
    on = hf_render(qwen3, messages, add_generation_prompt=True)  # transformers' default: the model thinks first
    assert render_chat(tok, messages, enable_thinking=True) == on and not on.endswith(EMPTY_THINK)
    assert ExoApiTokenizer(tok, enable_thinking=True).apply_chat_template(messages) == on


def test_exos_own_tokenizer_gets_the_same_default(qwen3):
    """For downloaded repos exo's API keeps its transformers tokenizer; the launcher wraps it with our options."""
    hf_tok = hf_tokenizer(qwen3)
    messages = CONVERSATIONS["system+user"]
    wrapped = TemplateOptionsTokenizer(hf_tok)  # exo calls apply_chat_template(conversation=..., tokenize=False, ...)
    got = wrapped.apply_chat_template(conversation=messages, tokenize=False, add_generation_prompt=True)
    assert got == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert wrapped.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True) == \
        hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert wrapped.eos_token_id == hf_tok.eos_token_id and wrapped.decode([5, 6]) == hf_tok.decode([5, 6])
    assert wrapped._tokenizer is hf_tok._tokenizer  # exo probes this attribute of transformers tokenizers


def test_rendered_prompt_encodes_as_transformers_encodes_it(qwen3):
    tok = Tokenizer.from_hf_dir(qwen3)
    hf_tok = hf_tokenizer(qwen3)
    for messages in CONVERSATIONS.values():
        text = render_chat(tok, messages)
        assert encode_prompt(tok, text) == hf_tok(text)["input_ids"]


def test_qwen2_5_template_ignores_enable_thinking_and_adds_its_default_system_prompt(tmp_path):
    folder = qwen_folder(tmp_path / "q25", "qwen2_5.jinja")
    tok = Tokenizer.from_hf_dir(folder)
    messages = CONVERSATIONS["user"]
    text = render_chat(tok, messages)
    assert text == hf_render(folder, messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


QWEN2_VOCAB = Paths.from_env().home / "vocab" / "ggml-vocab-qwen2.gguf"


@pytest.mark.slow  # transformers converts the 151,936-token GGUF vocabulary in ~25 s
@pytest.mark.skipif(not QWEN2_VOCAB.exists(), reason=(
    f"{QWEN2_VOCAB} absent: `pip download --no-deps llama-cpp-python==0.3.36` and extract "
    "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf from the sdist to that path"))
def test_real_qwen2_vocab_encodes_chat_prompts_as_transformers(qwen3):
    """Qwen2's real 151,936-token vocabulary (llama.cpp's vocab-only GGUF): a Qwen3 chat prompt (with <|im_start|>,
    <|im_end|> and the empty think block) gives the ids transformers' GGUF tokenizer gives."""
    ours = Tokenizer.from_gguf(QWEN2_VOCAB)
    ref = transformers.AutoTokenizer.from_pretrained(str(QWEN2_VOCAB.parent), gguf_file=QWEN2_VOCAB.name)
    template = Tokenizer.from_hf_dir(qwen3).chat_template
    for messages in CONVERSATIONS.values():
        text = Tokenizer(ours.backend, special_tokens=ours.special_tokens, chat_template=template).apply_chat_template(
            messages, enable_thinking=False)
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert {ours.backend.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")} <= ours.eos_token_ids
