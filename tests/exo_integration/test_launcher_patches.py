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


SAMPLING_SCRIPT = textwrap.dedent(
    r"""
    import asyncio, json, types
    import numpy as np
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
    from exo.networking.grpc.grpc_server import GRPCServer

    from exo_rknpu.engine import EngineConfig
    from exo_rknpu.exo.launcher import install_patches
    from exo_rknpu.exo.options import NodeOptions
    from exo_rknpu.exo.request_state import request_state, sampling_params
    from exo_rknpu.runtime.sampling import SamplingParams

    out = {}
    params = SamplingParams(temperature=0.7, top_k=5, seed=3, logit_bias=((1, 50.0),), stop=("END",), max_tokens=4)
    state = request_state(params, [1, 2, 3])
    try:
        GRPCPeerHandle.serialize_inference_state(None, state)
        out["stock_serializer"] = "ok"
    except TypeError as e:
        out["stock_serializer"] = f"TypeError: {e}"
    install_patches(NodeOptions(engine=EngineConfig(backend="numpy")))
    import exo.orchestration.node as node_mod
    proto = GRPCPeerHandle.serialize_inference_state(None, state)
    back = GRPCServer.deserialize_inference_state(None, proto)  # exo's own reader
    out["round_trip"] = sampling_params(back) == params and back["rknpu_prompt_ids"] == [1, 2, 3]

    class Ring:
        rng = np.random.default_rng(0)
        failures = []

        def sampling(self, request_id, inference_state):
            return sampling_params(inference_state) or SamplingParams()

        def finish_decision(self, request_id, tokens, params):
            return len(tokens) >= 2

        async def report_failure(self, request_id, message, kind="error"):
            self.failures.append((request_id, message, kind))

        async def send_logprobs(self, *a):
            pass

    class Engine:  # a stock-like engine: no sample_request, so the launcher samples with runtime/sampling.py
        pass

    forwarded = []

    async def forward_tensor(shard, tensor, request_id, index, inference_state):
        forwarded.append((tensor.tolist(), inference_state is not None))

    async def broadcast_result(*a):
        pass

    def node():
        return types.SimpleNamespace(rknpu_ring=Ring(), buffered_token_output={}, outstanding_requests={},
                                     inference_engine=Engine(), trigger_on_token_callbacks=lambda *a: None,
                                     broadcast_result=broadcast_result, forward_tensor=forward_tensor,
                                     get_partition_index=lambda offset=0, model_id=None: 0)

    class Shard:
        model_id = "smollm2-135m"

        def is_last_layer(self):
            return True

    async def main():
        n = node()
        logits = np.zeros((1, 2, 8), np.float32)
        logits[0, -1, 3] = 10.0  # greedy would pick 3; the request's logit_bias makes it 1
        await node_mod.Node.process_inference_result(n, Shard(), logits, "r1", state)
        out["token"] = n.buffered_token_output["r1"][0]
        out["forwarded"] = forwarded
        bad = node()
        logits[0, -1, 5] = np.nan
        await node_mod.Node.process_inference_result(bad, Shard(), logits, "r2", state)
        out["nan_failures"] = bad.rknpu_ring.failures
        out["nan_forwarded"] = len(forwarded)

    asyncio.run(main())
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sampling_patched():
    res = subprocess.run([sys.executable, "-c", SAMPLING_SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_sampling_parameters_cross_exos_grpc_state(sampling_patched):
    assert sampling_patched["stock_serializer"].startswith("TypeError")  # why the launcher replaces it
    assert sampling_patched["round_trip"]


def test_the_node_that_samples_applies_the_carried_parameters(sampling_patched):
    assert sampling_patched["token"] == [1]
    assert sampling_patched["forwarded"] == [[[[1]], True]]  # the token goes on with the state


def test_nan_logits_fail_the_request_at_once(sampling_patched):
    (rid, message, kind), = sampling_patched["nan_failures"]
    assert rid == "r2" and "NaN" in message and kind == "error"
    assert sampling_patched["nan_forwarded"] == 1  # nothing more was sent on


STOCK_SCRIPT = textwrap.dedent(
    r"""
    import asyncio, json
    import exo.topology.device_capabilities as dc
    from exo_rknpu.engine import EngineConfig
    from exo_rknpu.exo.options import NodeOptions
    from exo_rknpu.exo.launcher import install_patches

    exos = asyncio.run(dc.linux_device_capabilities())  # exo's own report, before any patch
    install_patches(NodeOptions(engine=EngineConfig(backend="numpy"), stock_engine="tinygrad", memory_mb=1234))
    import exo.models as models
    import exo.orchestration.node as node_mod
    from exo.inference.tinygrad.inference import TinygradDynamicShardInferenceEngine as Engine
    from exo.inference.tinygrad.models.llama import TransformerShard

    caps = asyncio.run(dc.device_capabilities())
    print(json.dumps({
        "exo_model": exos.model, "exo_chip": exos.chip, "caps": caps.model_dump(),
        "smollm2_repo": models.get_repo("smollm2-135m", "TinygradDynamicShardInferenceEngine"),
        "lifecycle": [callable(getattr(Engine, m, None)) for m in ("announce", "release", "take_failure", "positions_left")],
        "shard_fixed_by": TransformerShard.forward.__module__,
        "select_by": node_mod.Node.select_best_inference_engine.__module__,
    }))
    """
)


@pytest.fixture(scope="module")
def stock_patched():
    from exo_rknpu.exo.stock_engines import check_engine_importable

    why = check_engine_importable("tinygrad")
    if why is not None:
        pytest.skip(why)
    res = subprocess.run([sys.executable, "-c", STOCK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_stock_tinygrad_node_keeps_exos_report_with_the_mark(stock_patched):
    caps = stock_patched["caps"]
    assert caps["model"].startswith(stock_patched["exo_model"] + " (exo-rknpu, tinygrad; serves ")
    assert "smollm2-135m" in caps["model"] and "llama-3.2-1b" in caps["model"]
    assert caps["chip"] == stock_patched["exo_chip"]  # exo's report, not the board report of an exo-rknpu node
    assert caps["memory"] == 1234  # --memory-mb replaces it


def test_a_stock_tinygrad_node_gets_the_engine_fixes_and_the_shared_patches(stock_patched):
    assert stock_patched["smollm2_repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert all(stock_patched["lifecycle"])
    assert stock_patched["shard_fixed_by"] == "exo_rknpu.exo.stock_engines"
    assert stock_patched["select_by"] == "exo_rknpu.exo.launcher"  # its engine is kept too
