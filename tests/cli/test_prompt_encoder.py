"""One prompt encoder for the CLI and the exo node, adding BOS by the model's own rule.

The model here adds BOS the way Llama 3 does: in tokenizer.json's post-processor, with no add_bos_token in
tokenizer_config.json. transformers' AutoTokenizer, reading the same folder, is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exo_rknpu.cli.main import main
from exo_rknpu.exo.api_tokenizer import ExoApiTokenizer
from exo_rknpu.model.tokenizer import Tokenizer, encode_prompt
from tests.tiny_models import make_tiny_hf

BOS = "<|im_start|>"  # id 1 in the tiny models
TEXTS = ["The capital of France is", "hello, world! 12345", " leading space", "Café 日本語"]


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import processors

    d = make_tiny_hf(tmp_path_factory.mktemp("bos") / "m", n_layers=2)
    t = HfTokenizer.from_file(str(d / "tokenizer.json"))
    t.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)])
    t.save(str(d / "tokenizer.json"))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    del tc["add_bos_token"]  # the post-processor alone decides, as in Llama 3's files
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def test_plain_prompts_get_bos_exactly_as_transformers_encodes_them(bos_model):
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer is transformers': pip install '.[bench]'")
    ref = transformers.AutoTokenizer.from_pretrained(str(bos_model))
    tok = Tokenizer.from_hf_dir(bos_model)
    for text in TEXTS:
        want = ref(text).input_ids
        assert want[0] == 1  # the reference really adds BOS
        assert encode_prompt(tok, text) == want, text


def test_a_model_without_bos_gets_none(tmp_path):
    tok = Tokenizer.from_hf_dir(make_tiny_hf(tmp_path / "m", n_layers=1))
    assert encode_prompt(tok, "The capital") == tok.encode("The capital") and tok.encode("The capital")[0] != 1


def test_a_rendered_chat_template_that_starts_with_bos_gets_no_second_one(bos_model):
    tok = Tokenizer.from_hf_dir(bos_model)
    ids = encode_prompt(tok, f"{BOS}user\nhi")
    assert ids[0] == 1 and ids[1] != 1


def test_the_cli_and_the_exo_node_send_the_same_ids(bos_model, capsys):
    tok = Tokenizer.from_hf_dir(bos_model)
    for text in TEXTS:
        assert main(["generate", "--model", str(bos_model), "--prompt", text, "--backend", "numpy", "--max-tokens", "1",
                     "--max-context", "64", "--json"]) == 0
        cli_ids = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt_ids"]
        assert cli_ids == ExoApiTokenizer(tok).encode(text) == encode_prompt(tok, text)
        assert cli_ids[0] == 1
