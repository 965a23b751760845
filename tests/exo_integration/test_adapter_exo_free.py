"""Parts of the exo adapter that do not import exo: shard conversion, capabilities, cards, API tokenizer, argv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from exo_rknpu.errors import LayerRangeError, UnknownModelError
from exo_rknpu.exo.api_tokenizer import ExoApiTokenizer, encode_prompt
from exo_rknpu.exo.capabilities import (
    RK3588_NPU_INT8_TOPS,
    BACKEND_RESERVE_MB,
    RUNTIME_RESERVE_MB,
    MemoryRule,
    detect,
    mem_total_mb,
    rockchip_soc,
)
from exo_rknpu.exo.cards import CARDS, card_for_repo, get_card, local_override
from exo_rknpu.exo.chat_request import FailureMarker, RequestFailed
from exo_rknpu.exo.launcher import exo_argv
from exo_rknpu.exo.shards import shard_to_range
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_tokenizer
from exo_rknpu.model.zoo import resolve_model


@dataclass(frozen=True)
class FakeShard:  # the fields of exo's Shard (inclusive ends)
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int


# ---------------------------------------------------------------- Shard <-> LayerRange

@pytest.mark.parametrize("start,end,n,expect", [
    (0, 29, 30, LayerRange(0, 30, 30)),
    (0, 14, 30, LayerRange(0, 15, 30)),
    (15, 29, 30, LayerRange(15, 30, 30)),
    (7, 7, 16, LayerRange(7, 8, 16)),
])
def test_shard_to_range(start, end, n, expect):
    lr = shard_to_range(FakeShard("m", start, end, n))
    assert lr == expect
    assert lr.is_first == (start == 0) and lr.is_last == (end == n - 1)  # exo's is_first_layer / is_last_layer
    assert len(lr) == end - start + 1  # exo's get_layer_count


@pytest.mark.parametrize("start,end,n", [(0, 30, 30), (-1, 3, 30), (5, 4, 30), (0, 0, 0), (3, 40, 16)])
def test_shard_outside_the_model_is_rejected(start, end, n):
    with pytest.raises(LayerRangeError, match="outside the model|empty"):
        shard_to_range(FakeShard("smollm2-135m", start, end, n))


def test_exo_base_shard_is_a_single_layer():
    # The API's "base shard" Shard(model, 0, 0, n) is never run, but it is a valid one-layer range.
    assert shard_to_range(FakeShard("m", 0, 0, 30)) == LayerRange(0, 1, 30)


# ---------------------------------------------------------------- capabilities

def fake_root(tmp_path: Path, compatible: bytes | None, model: bytes | None, avail_kb: int = 8_000_000,
              total_kb: int = 16_000_000) -> Path:
    dt = tmp_path / "proc/device-tree"
    dt.mkdir(parents=True)
    if compatible is not None:
        (dt / "compatible").write_bytes(compatible)
    if model is not None:
        (dt / "model").write_bytes(model)
    (tmp_path / "proc/meminfo").write_text(f"MemTotal: {total_kb} kB\nMemFree: 1000 kB\nMemAvailable: {avail_kb} kB\n")
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Test CPU 3000\n")
    return tmp_path


def rule(backend: str, kv_bytes: int = 0, per_weight: float = 2.0, memory_mb: int | None = None) -> MemoryRule:
    """A node with no served model's files at hand: its weight form's bytes per weight decide (float16: 2.0, the
    unit exo's memory is in). test_reported_memory.py covers the rule with models."""
    return MemoryRule(backend, kv_bytes, per_weight, memory_mb=memory_mb)


def test_rk3588_board_report(tmp_path):
    root = fake_root(tmp_path, b"radxa,rock-5b\x00rockchip,rk3588\x00", b"Radxa ROCK 5B\x00")
    caps = detect(rule("npu", kv_bytes=1 << 30), proc_root=root)
    assert caps.chip == "Rockchip RK3588"
    assert caps.model.startswith("Radxa ROCK 5B") and "npu" in caps.model
    assert caps.int8 == RK3588_NPU_INT8_TOPS == 6.0
    # MemTotal - runtime reserve - the npu runtime's reserve - KV budget, in float16 MB (its form is float16)
    assert caps.memory == 16_000_000 // 1024 - RUNTIME_RESERVE_MB - BACKEND_RESERVE_MB["npu"] - 1024


def test_rk3588s_and_other_rockchips(tmp_path):
    root = fake_root(tmp_path, b"orangepi,orangepi-5\x00rockchip,rk3588s\x00", b"Orange Pi 5\x00")
    assert rockchip_soc(root) == "RK3588S"
    assert detect(rule("onnx"), proc_root=root).int8 == 6.0


def test_non_rockchip_report_is_sane(tmp_path):
    root = fake_root(tmp_path, None, None, total_kb=4_000_000)
    caps = detect(rule("onnx", per_weight=4.0), proc_root=root)
    assert caps.chip == "Test CPU 3000" and "(exo-rknpu, rknpu/onnx; serves " in caps.model
    assert caps.int8 == caps.fp16 == caps.fp32 == 0.0
    # float32 weights: half as many float16 MB as it has
    assert caps.memory == (4_000_000 // 1024 - RUNTIME_RESERVE_MB - BACKEND_RESERVE_MB["onnx"]) // 2
    assert rockchip_soc(root) is None


def test_reported_memory_does_not_follow_what_is_free_at_start(tmp_path):
    # The same machine, once idle and once with most memory in use: the same report, so the same partition.
    idle = detect(rule("onnx", 2 << 30), proc_root=fake_root(tmp_path / "idle", None, None, avail_kb=15_000_000))
    busy = detect(rule("onnx", 2 << 30), proc_root=fake_root(tmp_path / "busy", None, None, avail_kb=900_000))
    assert idle.memory == busy.memory == 16_000_000 // 1024 - 2048 - RUNTIME_RESERVE_MB - BACKEND_RESERVE_MB["onnx"]


def test_memory_override_caps_and_floor(tmp_path):
    root = fake_root(tmp_path, None, None, total_kb=1000)
    assert detect(rule("numpy", 2 << 30), proc_root=root).memory == 1  # never 0: exo divides by the total
    big = fake_root(tmp_path / "big", None, None)
    assert detect(rule("numpy", memory_mb=3000), proc_root=big).memory == 3000  # --memory-mb caps the rule
    assert detect(rule("numpy", memory_mb=10**6), proc_root=big).memory == 16_000_000 // 1024 - RUNTIME_RESERVE_MB
    assert detect(rule("numpy", memory_mb=3000), proc_root=tmp_path / "nowhere").memory == 3000  # no meminfo
    assert mem_total_mb(tmp_path / "nowhere") == 0


# ---------------------------------------------------------------- cards

def test_cards():
    assert get_card("smollm2-135m").n_layers == 30 and get_card("smollm2-135m").zoo_alias == "smollm2-135m"
    # the same Hugging Face repos as exo's tinygrad engine uses
    assert get_card("llama-3.2-1b").repo == "unsloth/Llama-3.2-1B-Instruct" and get_card("llama-3.2-1b").n_layers == 16
    assert get_card("llama-3.2-3b").repo == "unsloth/Llama-3.2-3B-Instruct" and get_card("llama-3.2-3b").n_layers == 28
    assert card_for_repo("exo-rknpu/smollm2-135m") is CARDS["smollm2-135m"] and card_for_repo("x/y") is None
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        get_card("qwen-2.5-7b")
    # Qwen's own repos (bf16 safetensors), layer counts from their config.json files
    qwen = {m: (c.repo, c.n_layers) for m, c in CARDS.items() if m.startswith("qwen")}
    assert qwen == {
        "qwen-2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", 24), "qwen-2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", 28),
        "qwen-2.5-3b": ("Qwen/Qwen2.5-3B-Instruct", 36), "qwen-3-0.6b": ("Qwen/Qwen3-0.6B", 28),
        "qwen-3-1.7b": ("Qwen/Qwen3-1.7B", 28), "qwen-3-4b": ("Qwen/Qwen3-4B", 36)}


def test_local_override(tmp_path):
    card = get_card("llama-3.2-1b")
    assert local_override(card, None) is None and local_override(card, tmp_path) is None
    (tmp_path / "llama-3.2-1b").mkdir()
    assert local_override(card, tmp_path) == tmp_path / "llama-3.2-1b"


# ---------------------------------------------------------------- API tokenizer

def test_api_tokenizer_renders_encodes_and_decodes(tiny_llama):
    tok = load_tokenizer(resolve_model(str(tiny_llama)))
    api_tok = ExoApiTokenizer(tok)
    conv = [{"role": "user", "content": "The capital of France?"}]
    text = api_tok.apply_chat_template(conversation=conv, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nThe capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = api_tok.encode(text)
    assert ids[0] == tok.backend.token_to_id("<|im_start|>")  # special tokens kept whole, no BOS added twice
    assert api_tok.decode(ids) == "user\nThe capital of France?\nassistant\n"  # specials skipped
    assert api_tok.apply_chat_template(conversation=conv, tokenize=True) == ids
    assert api_tok.eos_token_id == tok.eos_token_id == 2
    parts = [{"role": "user", "content": [{"type": "text", "text": "The capital of France?"}]}]
    assert api_tok.apply_chat_template(conversation=parts) == text
    assert encode_prompt(tok, "hello") == tok.encode("hello")


# ---------------------------------------------------------------- launcher helpers

def test_exo_argv():
    assert exo_argv(["--", "--disable-tui"]) == ["exo", "--disable-tui", "--inference-engine", "rknpu"]
    assert exo_argv(["--inference-engine", "rknpu"]) == ["exo", "--inference-engine", "rknpu"]
    with pytest.raises(ValueError, match="tinygrad"):
        exo_argv(["--inference-engine=tinygrad"])
    # `exo-rknpu node --engine tinygrad`: exo's own engine, named once
    assert exo_argv(["--", "--disable-tui"], "tinygrad") == ["exo", "--disable-tui", "--inference-engine", "tinygrad"]
    with pytest.raises(ValueError, match="exo-rknpu node --engine"):
        exo_argv(["--inference-engine", "dummy"], "tinygrad")


def test_failure_marker_fails_exos_unpacking():
    with pytest.raises(RequestFailed, match="boom"):
        tokens, is_finished = FailureMarker("boom")  # what exo's API does with a queue item


def test_node_cli_parses_and_reports_missing_exo(monkeypatch, capsys):
    from exo_rknpu.cli import main as cli_main
    import exo_rknpu.exo as adapter

    parser = cli_main.build_parser()
    args = parser.parse_args(["node", "--api-host", "127.0.0.1", "--backend", "numpy", "--hidden-dtype", "float16",
                              "--", "--node-id", "a", "--disable-tui"])
    assert args.exo_args[-3:] == ["--node-id", "a", "--disable-tui"]
    from exo_rknpu.cli.node import build_options

    opts = build_options(args)
    assert opts.api_host == "127.0.0.1" and opts.engine.backend == "numpy" and opts.engine.hidden_dtype == "float16"
    monkeypatch.setattr(adapter, "exo_importable", lambda: (False, "legacy exo is not importable (test)"))
    assert args.func(args) == 2
    assert "not importable" in capsys.readouterr().err
