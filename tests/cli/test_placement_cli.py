"""--placement on the command line: same tokens as the unsplit run, `emulated` said, plans explained, bad plans refused."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tests.tiny_models import make_tiny_hf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("cli") / "m", n_layers=5)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exo_rknpu.cli.main", *args], capture_output=True, text=True, timeout=300)


def generate(model, *extra: str) -> dict:
    p = cli("generate", "--model", str(model), "--prompt", "hello there", "--max-tokens", "6", "--max-context", "64",
            "--json", *extra)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]) | {"stderr": p.stderr}


def test_generate_under_a_plan_gives_the_unsplit_tokens_and_says_emulated(model):
    want = generate(model)
    got = generate(model, "--placement", "0-1=npu0,2-3=npu1,4=npu2", "--emulate")
    assert got["token_ids"] == want["token_ids"] and got["emulated"] is True and want["emulated"] is False
    assert "emulated" in got["stderr"] and got["placement"] == "0-1=npu0,2-3=npu1,4=npu2"


def test_explain_prints_every_slice_and_loads_nothing(model):
    p = cli("generate", "--model", str(model), "--prompt", "x", "--placement", "0-4=npu;attention=cpu", "--emulate", "--explain")
    assert p.returncode == 0, p.stderr
    rows = [line.split()[0] for line in p.stdout.splitlines()[2:] if line.startswith("  layers") or line.startswith("  embed") or line.startswith("  head")]
    assert rows[:4] == ["embed", "layers.0.attn_norm+qkv", "layers.0.attention", "layers.0.o_proj+mlp"] and rows[-1] == "head"
    assert "MB" in p.stdout and "emulated" in p.stdout and "prepared slice" not in p.stderr


@pytest.mark.parametrize("plan,message", [
    ("0-9=npu", "placement range 0-9=npu is outside the model: it has layers 0-4"),
    ("0-4=tpu", "unknown device 'tpu'"),
    ("0-2=npu0,2-4=npu1", "overlap (layer 2)"),
    ("0-4=npu;embedding=npu", "the npu backend cannot run the embedding block"),
])
def test_impossible_plans_are_one_line_errors_before_loading(model, plan, message):
    p = cli("generate", "--model", str(model), "--prompt", "x", "--placement", plan)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2 and "Traceback" not in p.stderr and "loading" not in p.stderr


def test_compile_explains_exactly_the_npu_slices(model):
    p = cli("compile", "--model", str(model), "--placement", "0-4=cpu;mlp=npu", "--explain")
    assert p.returncode == 0, p.stderr
    # five ffn slices (the head follows layer 4, on the cpu); the rest of each layer is one cpu slice
    assert "layers.0.ffn" in p.stdout and "layers.0.attn+mlp_norm" in p.stdout and "NPU: 5 slices" in p.stdout


def test_engine_config_and_node_options_carry_the_plan_and_refuse_a_bad_one():
    from exo_rknpu.engine import EngineConfig
    from exo_rknpu.runtime.placement import PlacementError

    assert EngineConfig(placement="0-9=npu0,10-19=npu1").placement == "0-9=npu0,10-19=npu1"
    with pytest.raises(PlacementError, match="unknown device 'gpu'"):
        EngineConfig(placement="0-9=gpu")
    p = cli("node", "--placement", "0-9=npu0,0-3=npu1", "--", "--help")
    assert p.returncode != 0 and "overlap (layer 0)" in p.stderr


@pytest.mark.skipif(platform.machine() == "aarch64", reason="checks the refusal on machines without an NPU")
def test_npu_devices_without_an_npu_are_refused_with_the_reason_unless_emulate_is_asked_for(model):
    """No silent CPU: a plan naming NPU devices, or the npu backend, on a machine where the NPU cannot run is a
    one-line error naming why; --emulate (only with a plan) runs the plan on the CPU and says so (test above)."""
    p = cli("generate", "--model", str(model), "--prompt", "x", "--placement", "0-4=npu0")
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "puts slices on npu0, but the NPU cannot run here: this machine is" in p.stderr and "--emulate" in p.stderr
    p = cli("generate", "--model", str(model), "--prompt", "x", "--emulate")
    assert p.returncode != 0 and "--emulate runs a placement's NPU devices on the CPU; add --placement" in p.stderr
    for argv in (["--placement", "0-4=npu1"], ["--backend", "npu"]):  # the exo node refuses at start, not at a request
        p = cli("node", *argv, "--", "--help")
        assert p.returncode != 0 and ("NPU cannot run here" in p.stderr or "npu backend cannot run here" in p.stderr), p.stderr
        assert "Traceback" not in p.stderr
