"""The command line refuses bad input with one line, `exo-rknpu: error: ...`, before any model is loaded.

Every test here makes loading impossible (the loader is replaced by one that fails the test), so an option that
is checked only after loading shows up as a failure, not as a slow pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exo_rknpu.cli import generate as gen_cli
from exo_rknpu.cli.main import build_parser, main
from tests.tiny_models import make_tiny_hf


@pytest.fixture(scope="module")
def tiny_8192(tmp_path_factory) -> Path:
    """A tiny llama whose context limit is 8192, like smollm2's."""
    d = make_tiny_hf(tmp_path_factory.mktemp("tiny8192") / "m", n_layers=2)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 8192}))
    return d


@pytest.fixture
def no_loading(monkeypatch):
    """Weights may not be loaded (and for pure option errors, the model may not even be resolved)."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were validated")

    monkeypatch.setattr(gen_cli, "open_plan", refuse)
    return refuse


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits on its own errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exo-rknpu: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("option, allowed", [
    (["--temperature", "-1"], ">= 0"),
    (["--temperature", "nan"], ">= 0"),
    (["--top-p", "2"], "(0, 1]"),
    (["--top-p", "0"], "(0, 1]"),
    (["--top-k", "-3"], ">= 0"),
    (["--max-tokens", "-1"], ">= 1"),
    (["--max-tokens", "0"], ">= 1"),
    (["--max-context", "0"], ">= 1"),
    (["--layers-per-slice", "0"], ">= 1"),
    (["--seed", "-1"], ">= 0"),
    (["--backend", "nosuch"], "rknn-sim"),
    (["--max-tokens", "many"], "integer"),
])
def test_out_of_range_options_are_refused_before_the_model_is_even_resolved(option, allowed, monkeypatch, capsys):
    monkeypatch.setattr(gen_cli, "resolve_model", lambda *a, **k: pytest.fail("the model was resolved"))
    code, _, err = run_cli(["generate", "--prompt", "hi", *option], capsys)
    assert_one_line_error(code, err, option[0], allowed)


def test_max_context_beyond_the_models_limit_is_refused_before_loading(tiny_8192, no_loading, capsys):
    code, _, err = run_cli(["generate", "--model", str(tiny_8192), "--prompt", "hi", "--max-context", "100000"], capsys)
    assert_one_line_error(code, err, "--max-context 100000", "8192")


def test_empty_prompt_is_refused_before_the_model_is_resolved(monkeypatch, capsys):
    monkeypatch.setattr(gen_cli, "resolve_model", lambda *a, **k: pytest.fail("the model was resolved"))
    code, _, err = run_cli(["generate", "--prompt", ""], capsys)
    assert_one_line_error(code, err, "--prompt is empty")


def test_system_without_chat_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(gen_cli, "resolve_model", lambda *a, **k: pytest.fail("the model was resolved"))
    code, _, err = run_cli(["generate", "--prompt", "hi", "--system", "be brief"], capsys)
    assert_one_line_error(code, err, "--chat")


def test_backend_dtype_on_a_cpu_backend_is_refused_before_loading(tiny_8192, no_loading, capsys):
    code, _, err = run_cli(["generate", "--model", str(tiny_8192), "--prompt", "hi", "--backend", "numpy",
                            "--backend-dtype", "w8a8"], capsys)
    assert_one_line_error(code, err, "--backend-dtype", "npu and rknn-sim")


def test_prompt_plus_new_tokens_beyond_the_context_is_refused_up_front_with_the_fix(tiny_8192, no_loading, capsys):
    code, _, err = run_cli(["generate", "--model", str(tiny_8192), "--prompt", "The capital of France is " * 12,
                            "--max-context", "64", "--max-tokens", "32"], capsys)
    assert_one_line_error(code, err, "context limit is 64", "--max-tokens", "--max-context 128")


def prompt_tokens(model: Path, text: str) -> int:
    from exo_rknpu.model.loader import load_tokenizer
    from exo_rknpu.model.tokenizer import encode_prompt
    from exo_rknpu.model.zoo import resolve_model

    return len(encode_prompt(load_tokenizer(resolve_model(str(model))), text))


def test_a_request_that_exactly_fits_the_context_runs_and_one_more_token_is_refused(tiny_8192, capsys):
    # The runtime is the judge of "fits": the boundary the CLI refuses at must be the one the shards overflow at.
    text = "The capital of France is Paris."
    n = prompt_tokens(tiny_8192, text)
    ctx = 32
    base = ["generate", "--model", str(tiny_8192), "--prompt", text, "--backend", "numpy", "--max-context", str(ctx), "--json"]
    code, out, err = run_cli([*base, "--max-tokens", str(ctx - n + 1)], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["prompt_ids"]) == n and 1 <= len(result["token_ids"]) <= ctx - n + 1
    code, _, err = run_cli([*base, "--max-tokens", str(ctx - n + 2)], capsys)
    assert_one_line_error(code, err, f"needs {ctx + 1} positions", f"--max-tokens {ctx - n + 1} or fewer")


def test_the_runtime_overflows_one_position_past_the_cli_limit(tiny_8192):
    # What the refusal above protects against: the shard itself cannot take ctx + 1 positions.
    import numpy as np

    from exo_rknpu.errors import ContextOverflowError
    from exo_rknpu.model.base import LayerRange
    from exo_rknpu.model.loader import load_args
    from exo_rknpu.model.zoo import resolve_model
    from exo_rknpu.runtime.placement import default_buckets, open_shard

    src = resolve_model(str(tiny_8192))
    shard = open_shard(src, LayerRange.full(2), "numpy", default_buckets(load_args(src), 32))
    shard.forward("r", np.array([list(range(3, 35))]))  # 32 positions: fits
    with pytest.raises(ContextOverflowError):
        shard.forward("r", np.array([[5]]))


@pytest.mark.parametrize("option, fragment", [
    (["--backend", "nosuch"], "rknn-sim"),
    (["--max-context", "0"], ">= 1"),
    (["--layers-per-slice", "0"], ">= 1"),
    (["--max-requests", "0"], ">= 1"),
    (["--max-kv-mb", "-5"], ">= 1"),
    (["--npu-core-mask", "7"], "0_1_2"),
])
def test_node_options_are_refused_before_exo_is_started(option, fragment, capsys):
    code, _, err = run_cli(["node", *option, "--", "--disable-tui"], capsys)
    assert_one_line_error(code, err, option[0], fragment)


def test_node_model_dir_that_is_not_a_folder_is_refused_before_exo_is_imported(tmp_path, monkeypatch, capsys):
    import exo_rknpu.exo as adapter

    monkeypatch.setattr(adapter, "exo_importable", lambda: pytest.fail("exo was looked for before the options were checked"))
    code, _, err = run_cli(["node", "--model-dir", str(tmp_path / "missing"), "--", "--disable-tui"], capsys)
    assert_one_line_error(code, err, "--model-dir", "not a folder")


@pytest.mark.parametrize("option, fragment", [
    (["--max-context", "0"], ">= 1"),
    (["--min-cos", "2"], "(0, 1]"),
    (["--smooth-alpha", "-0.5"], "[0, 1]"),
    (["--seq", "16,1"], "ascending"),
    (["--batch", "8,4"], "ascending"),
    (["--platform", "rk3566"], "rk3588"),
])
def test_compile_options_are_refused_before_the_toolkit_runs(option, fragment, capsys):
    code, _, err = run_cli(["compile", "--model", "smollm2-135m", "--layers", "4-5", *option], capsys)
    assert_one_line_error(code, err, option[0], fragment)


@pytest.mark.parametrize("arch, dtype, why", [
    ("llama", "w8a8", "w8a8 has none"),
    ("qwen3", "fp16", "per-head q/k norms"),
])
def test_compile_refuses_batch_buckets_a_form_has_no_batch_graph_for(arch, dtype, why, tmp_path, monkeypatch, capsys):
    """w8a8 slices and qwen3's layers have no decode batch graph: asking for batch buckets is refused in one line,
    before the toolkit is looked for or a weight is read (not recorded in the manifest and silently left unbuilt)."""
    from exo_rknpu.model import loader
    from exo_rknpu.rknn import toolkit

    model = make_tiny_hf(tmp_path / "m", arch=arch, n_layers=2)
    monkeypatch.setattr(toolkit, "status", lambda *a, **k: pytest.fail("the toolkit was looked for"))
    monkeypatch.setattr(loader, "load_shard", lambda *a, **k: pytest.fail("weights were read"))
    code, _, err = run_cli(["compile", "--model", str(model), "--layers", "0-0", "--dtype", dtype, "--batch", "2,4",
                            "--cache", str(tmp_path / "c")], capsys)
    assert_one_line_error(code, err, "--batch 2,4", why, "without --batch")
    assert not list((tmp_path / "c").glob("slices/*/*/manifest.json"))


def test_compile_without_layers_is_a_one_line_error(capsys):
    code, _, err = run_cli(["compile", "--model", "smollm2-135m"], capsys)
    assert_one_line_error(code, err, "--layers")


# ---------------------------------------------------------------- help

# `bench` is being rewritten on its own branch, with its own help.
HELP_EXEMPT = {"bench"}


def subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


def test_every_subcommand_has_a_description_and_every_option_a_help_text():
    missing = []
    for name, p in subparsers().items():
        if name in HELP_EXEMPT:
            continue
        if not p.description:
            missing.append(f"{name}: description")
        for a in p._actions:
            if a.dest != "help" and not (a.help or "").strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def test_node_help_lists_every_backend(capsys):
    from exo_rknpu.backends.base import BACKENDS

    code, out, _ = run_cli(["node", "--help"], capsys)
    assert code == 0
    help_text = " ".join(out.split())
    for name in BACKENDS:
        assert name in help_text.split("--backend BACKEND where slices run:", 1)[1].split("--model-dir", 1)[0], name


def test_a_subcommand_imports_only_its_own_module():
    """`generate` never imports what `node` (the engine, asyncio) or `bench` (the harness) run: ~3 MiB resident;
    help with no subcommand still lists every one."""
    import subprocess
    import sys

    others = ("exo_rknpu.cli.node", "exo_rknpu.cli.bench", "exo_rknpu.engine", "exo_rknpu.bench.harness", "asyncio")
    code = ("import json, sys\nfrom exo_rknpu.cli.main import build_parser\n"
            "build_parser('generate').parse_args(['generate', '--model', 'm', '--prompt', 'p'])\n"
            f"print(json.dumps([m for m in {others!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    assert set(subparsers()) == {"generate", "bench", "compile", "toolkit", "inspect", "doctor", "node"}
