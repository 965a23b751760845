"""Two `exo-rknpu node` processes serve the `qwen-3-0.6b` card (a tiny random Qwen3 put at --model-dir under the
card's id, with Qwen3's real chat template) through exo's /v1/chat/completions: the ring answers, the prompt was
rendered with thinking off (the node's default), and the answer is the greedy continuation our own runtime gives.

Skips without exo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exo_helpers import FP32, QUESTION, Ring, chat, needs_exo
from exo_rknpu.exo.api_tokenizer import encode_prompt
from exo_rknpu.model.chat import render_chat
from exo_rknpu.model.loader import load_tokenizer
from exo_rknpu.model.zoo import resolve_model
from helpers import greedy, ring as local_ring
from tiny_models import make_tiny_hf

pytestmark = [needs_exo, pytest.mark.exo, pytest.mark.slow]

MODEL, N, MAX_TOKENS = "qwen-3-0.6b", 28, 6
TEMPLATE = Path(__file__).parent.parent / "fixtures" / "chat_templates" / "qwen3.jinja"


def test_qwen3_card_answers_through_exo_with_thinking_off(tmp_path):
    model_dir = tmp_path / "models"
    # seed 1: a greedy continuation that does not just repeat one token
    path = make_tiny_hf(model_dir / MODEL, arch="qwen3", n_layers=N, head_dim=32, tied=True, seed=1)
    tc = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": TEMPLATE.read_text()}))
    exo_extra = ["--max-generate-tokens", str(MAX_TOKENS)]  # a random model may never say <|im_end|>
    r = Ring(tmp_path, {
        "node-a": {"backend": "numpy", "memory": 3000, "extra": [*FP32, "--model-dir", str(model_dir)], "exo_extra": exo_extra},
        "node-b": {"backend": "onnx", "memory": 2000, "extra": [*FP32, "--model-dir", str(model_dir)], "exo_extra": exo_extra},
    })
    try:
        r.start()
        status, body = chat(r.url("node-a", "/v1/chat/completions"), stream=False, model=MODEL)
        log_a, log_b = r.log("node-a"), r.log("node-b")
    finally:
        r.stop()
    assert status == 200, (body, log_a[-2000:], log_b[-2000:])
    tok = load_tokenizer(resolve_model(str(path)))
    messages = [{"role": "user", "content": QUESTION}]
    prompt = encode_prompt(tok, render_chat(tok, messages))  # thinking off: ends with an empty <think></think>
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert len(encode_prompt(tok, render_chat(tok, messages, enable_thinking=True))) < len(prompt)
    n = body["usage"]["completion_tokens"]
    assert 1 <= n <= MAX_TOKENS + 1
    want = greedy(local_ring(path, "0-13,14-27", "numpy"), prompt, n)
    assert body["choices"][0]["message"]["content"] == tok.decode(want)
    assert len(set(want)) > 2
