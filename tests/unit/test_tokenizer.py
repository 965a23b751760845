"""Tokenizers from HF folders and GGUF metadata, chat templates, and streaming decode."""

from __future__ import annotations

import json
import sys

import pytest

from exo_rknpu.config import Paths
from exo_rknpu.errors import UnsupportedModelError
from exo_rknpu.model.loader import load_tokenizer
from exo_rknpu.model.tokenizer import Tokenizer, render_chat_template
from exo_rknpu.model.zoo import ModelSource, resolve_model
from tests.tiny_models import make_tiny_gguf, make_tiny_hf, qwen2_pretokenize_regex

TEXTS = ["The capital of France is Paris.", "hello, world! 12345", "Café naïve 日本語 ü ß", "  spaces\n\nnewlines\t",
         "<|im_start|>user\nhi<|im_end|>", "I'm sure it's THEY'LL don't\r\n\r\n  x", "a1b22c333 !!?? ...\n\tend "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    hf = make_tiny_hf(d / "hf")
    return hf, make_tiny_gguf(d / "m.gguf", hf)


def test_hf_tokenizer_round_trips_text(tiny):
    tok = load_tokenizer(ModelSource("hf", tiny[0], "hf"))
    for text in TEXTS[:4]:
        assert tok.decode(tok.encode(text)) == text


def test_gguf_tokenizer_encodes_like_the_hf_one(tiny):
    hf, gg = (load_tokenizer(ModelSource("x", tiny[0], "hf")), load_tokenizer(ModelSource("x", tiny[1], "gguf")))
    for text in TEXTS:
        assert gg.encode(text) == hf.encode(text), text
    assert gg.vocab_size == hf.vocab_size == 320


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen2_gguf_tokenizer_encodes_like_the_hf_one(tmp_path, arch):
    # The HF side's pre-tokenizer regex is transformers' (tests/tiny_models.py), never a copy of ours.
    if qwen2_pretokenize_regex() is None:
        pytest.skip("the reference qwen2 pre-tokenizer regex comes from transformers: pip install '.[bench]'")
    hf_dir = make_tiny_hf(tmp_path / "hf", arch=arch)
    hf = Tokenizer.from_hf_dir(hf_dir)
    gg = Tokenizer.from_gguf(make_tiny_gguf(tmp_path / "m.gguf", hf_dir))
    for text in TEXTS:
        assert gg.encode(text) == hf.encode(text), text


def test_special_tokens_are_single_ids_and_skipped_when_decoding(tiny):
    tok = load_tokenizer(ModelSource("x", tiny[0], "hf"))
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_special_ids_and_stop_ids(tiny):
    tok = load_tokenizer(ModelSource("x", tiny[0], "hf"))
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == frozenset({0, 2})  # generation_config lists [2, 0]


def test_bos_is_added_only_when_the_model_asks(tiny, tmp_path):
    hf_dir = tiny[0]
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    d = make_tiny_hf(tmp_path / "bos")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**tc, "add_bos_token": True}))
    tok = Tokenizer.from_hf_dir(d)
    assert tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]


def test_chat_template_renders_chatml(tiny):
    for src in (ModelSource("x", tiny[0], "hf"), ModelSource("x", tiny[1], "gguf")):
        tok = load_tokenizer(src)
        assert tok.has_chat_template
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
        assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_environment_matches_transformers():
    # trim_blocks/lstrip_blocks, tojson without HTML escaping, raise_exception, loopcontrols, generation tags.
    tpl = (
        "{% for m in messages %}\n"
        "  {% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}\n"
        "{% generation %}{{ m | tojson }}{% endgeneration %}|{% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{% endfor %}{{ bos_token }}"
    )
    out = render_chat_template(tpl, [{"role": "u", "content": "<a&b>"}, {"role": "x"}, {"role": "y"}], bos_token="<s>")
    assert out == '{"role": "u", "content": "<a&b>"}|{"role": "x"}|<s>'
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no bad roles"):
        render_chat_template(tpl, [{"role": "bad"}])


def test_model_without_chat_template_says_so(tmp_path):
    d = make_tiny_hf(tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = Tokenizer.from_hf_dir(d)
    assert not tok.has_chat_template
    with pytest.raises(UnsupportedModelError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path):
    d = make_tiny_hf(tmp_path / "m")
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_hf_dir(d).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_incremental_decoder_streams_the_same_text_and_holds_back_partial_utf8(tiny):
    tok = load_tokenizer(ModelSource("x", tiny[0], "hf"))
    text = "Café naïve 日本語 ü ß hello, world!"
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # multi-byte characters span several byte-level ids here


def test_unknown_gguf_pre_tokenizer_is_unsupported(tiny):
    from exo_rknpu.model.tokenizer import tokenizer_from_gguf_metadata

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(UnsupportedModelError, match="mystery.*smollm"):
        tokenizer_from_gguf_metadata(lambda k, d=None: meta.get(k, d))
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(UnsupportedModelError, match="llama"):
        tokenizer_from_gguf_metadata(lambda k, d=None: meta.get(k, d))


# ---------------------------------------------------------------- the real bundled model

SMOLLM_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# Rendered once by transformers 5.23.0 (AutoTokenizer.from_pretrained(dir, gguf_file=...).apply_chat_template(
# ..., tokenize=False)) from the GGUF's own template; hard-coded so CI needs no transformers.
TWO_TURNS = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Germany?"}]
TRANSFORMERS_TWO_TURNS = (
    SMOLLM_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
    "<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n"
)
TRANSFORMERS_SYSTEM = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2_tok() -> Tokenizer:
    return load_tokenizer(resolve_model("smollm2-135m", Paths.from_env(), lambda m: print(m, file=sys.stderr)))


@pytest.mark.slow
def test_smollm2_token_ids(smollm2_tok):
    assert smollm2_tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert smollm2_tok.encode("The capital of France is", add_special_tokens=True) == [504, 3575, 282, 4649, 314]
    assert smollm2_tok.decode([7042, 30, 198, 198]) == " Paris.\n\n"
    assert (smollm2_tok.bos_token_id, smollm2_tok.eos_token_id, smollm2_tok.vocab_size) == (1, 2, 49152)


@pytest.mark.slow
def test_smollm2_chat_template_adds_the_default_system_prompt(smollm2_tok):
    text = smollm2_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text == SMOLLM_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smollm2_tok):
    assert smollm2_tok.apply_chat_template(TWO_TURNS) == TRANSFORMERS_TWO_TURNS
    assert smollm2_tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}]) == TRANSFORMERS_SYSTEM


@pytest.mark.slow
def test_smollm2_chat_template_matches_live_transformers_if_installed(smollm2_tok):
    transformers = pytest.importorskip("transformers")
    path = resolve_model("smollm2-135m", Paths.from_env()).path
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for gen in (True, False):
        want = ref.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=gen)
        assert smollm2_tok.apply_chat_template(TWO_TURNS, add_generation_prompt=gen) == want
