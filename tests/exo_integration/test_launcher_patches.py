"""The launcher's patches on legacy exo, checked in a fresh interpreter (they change exo's modules for good)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from exo_helpers import needs_exo
from tiny_models import make_tiny_hf

pytestmark = [needs_exo, pytest.mark.exo]

SCRIPT = textwrap.dedent(
    r"""
    import asyncio, json, sys
    from pathlib import Path
    from exo_rknpu.engine import EngineConfig
    from exo_rknpu.exo.options import NodeOptions
    from exo_rknpu.exo.launcher import install_patches

    model_dir = Path(sys.argv[1])
    import exo.models
    from exo_rknpu.exo.cards import CARDS
    exo_layers_before = {m: exo.models.model_cards.get(m, {}).get("layers") for m in CARDS}
    import exo.api.chatgpt_api as api_before

    class RecordingTokenizer:  # stands in for the transformers tokenizer exo's resolver would download
        eos_token_id = 7

        def apply_chat_template(self, conversation, **kw):
            return json.dumps(kw, sort_keys=True)

    async def exos_resolver(repo_id):
        return RecordingTokenizer()

    api_before.resolve_tokenizer = exos_resolver
    install_patches(NodeOptions(engine=EngineConfig(backend="numpy"), model_dir=model_dir, api_host="127.0.0.1",
                                memory_mb=1234))
    import exo.inference.inference_engine as ie
    import exo.orchestration.node as node_mod
    import exo.models as models
    import exo.api.chatgpt_api as api_mod
    from exo.download.shard_download import NoopShardDownloader
    from exo.inference.shard import Shard
    from exo.topology.device_capabilities import device_capabilities

    out = {}
    eng = ie.get_inference_engine("rknpu", NoopShardDownloader())
    out["engine"] = type(eng).__name__
    out["node_engine"] = type(node_mod.get_inference_engine("rknpu", NoopShardDownloader())).__name__
    try:
        ie.get_inference_engine("nonsense", NoopShardDownloader())
    except ValueError as e:
        out["other_names"] = str(e)
    out["classes"] = ie.inference_engine_classes["rknpu"]
    out["base_shard"] = models.build_base_shard("smollm2-135m", "RKNPUInferenceEngine").to_dict()
    out["llama_repo"] = models.get_repo("llama-3.2-1b", "RKNPUInferenceEngine")
    out["tinygrad_repo_kept"] = models.get_repo("llama-3.2-1b", "TinygradDynamicShardInferenceEngine")
    out["supported"] = models.get_supported_models([["rknpu"]])
    out["cards"] = {m: {"before": exo_layers_before[m], "layers": models.model_cards[m]["layers"],
                        "repos": models.model_cards[m]["repo"]} for m in CARDS}

    async def main():
        caps = await device_capabilities()
        out["caps"] = caps.model_dump()
        node = node_mod.Node("n1", None, eng, None, NoopShardDownloader())
        await node.select_best_inference_engine()
        out["engine_after_select"] = type(node.inference_engine).__name__
        out["engine_kept"] = node.inference_engine is eng
        tok = await api_mod.resolve_tokenizer("unsloth/Llama-3.2-1B-Instruct")  # served from --model-dir
        out["tokenizer"] = type(tok).__name__
        out["prompt"] = api_mod.build_prompt(tok, [api_mod.Message("user", "hi")])
        out["eos"] = tok.eos_token_id
        downloaded = await api_mod.resolve_tokenizer("Qwen/Qwen3-0.6B")  # a card without a local copy
        out["downloaded_prompt_options"] = json.loads(api_mod.build_prompt(downloaded, [api_mod.Message("user", "hi")]))
        out["downloaded_eos"] = downloaded.eos_token_id
        eng.core.close()

    asyncio.run(main())
    out["tinygrad_imported"] = "tinygrad" in sys.modules
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models")
    make_tiny_hf(model_dir / "llama-3.2-1b", n_layers=16, hidden=64, vocab=320)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_engine_is_registered_in_both_modules(patched):
    assert patched["engine"] == patched["node_engine"] == "RKNPUInferenceEngine"
    assert patched["classes"] == "RKNPUInferenceEngine"
    assert "Unsupported inference engine" in patched["other_names"]  # other names still go to exo


def test_model_cards(patched):
    assert patched["base_shard"] == {"model_id": "smollm2-135m", "start_layer": 0, "end_layer": 0, "n_layers": 30}
    assert patched["llama_repo"] == patched["tinygrad_repo_kept"] == "unsloth/Llama-3.2-1B-Instruct"
    assert {"smollm2-135m", "llama-3.2-1b", "llama-3.2-3b"} <= set(patched["supported"])


def test_qwen_cards_use_exos_ids_and_keep_its_other_engines(patched):
    cards = patched["cards"]
    for size, repo in (("0.5b", "Qwen2.5-0.5B-Instruct"), ("1.5b", "Qwen2.5-1.5B-Instruct"), ("3b", "Qwen2.5-3B-Instruct")):
        c = cards[f"qwen-2.5-{size}"]  # legacy exo's own id: MLX nodes and ours agree on it
        assert c["repos"] == {"MLXDynamicShardInferenceEngine": f"mlx-community/{repo}-4bit",
                              "RKNPUInferenceEngine": f"Qwen/{repo}"}
    assert cards["qwen-2.5-1.5b"]["layers"] == cards["qwen-2.5-1.5b"]["before"] == 28
    assert cards["qwen-2.5-3b"]["layers"] == cards["qwen-2.5-3b"]["before"] == 36
    assert cards["qwen-2.5-0.5b"]["before"] == 28 and cards["qwen-2.5-0.5b"]["layers"] == 24  # exo's card is wrong
    for m, n in (("qwen-3-0.6b", 28), ("qwen-3-1.7b", 28), ("qwen-3-4b", 36)):  # new to exo
        assert cards[m]["before"] is None and cards[m]["layers"] == n and list(cards[m]["repos"]) == ["RKNPUInferenceEngine"]
    assert set(cards) <= set(patched["supported"])


def test_exos_own_tokenizer_renders_with_thinking_off(patched):
    """Downloaded repos keep exo's (transformers) tokenizer, which gets our chat template default."""
    assert patched["downloaded_prompt_options"] == {"add_generation_prompt": True, "enable_thinking": False,
                                                    "tokenize": False}
    assert patched["downloaded_eos"] == 7


def test_engine_is_not_swapped_for_tinygrad(patched):
    assert patched["engine_after_select"] == "RKNPUInferenceEngine" and patched["engine_kept"]


def test_capabilities_without_tinygrad(patched):
    assert patched["caps"]["memory"] == 1234
    assert "(exo-rknpu, rknpu/numpy; serves " in patched["caps"]["model"] and "smollm2-135m" in patched["caps"]["model"]
    assert not patched["tinygrad_imported"]


def test_api_tokenizer_from_model_dir(patched):
    assert patched["tokenizer"] == "ExoApiTokenizer"
    assert patched["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert patched["eos"] == 2
