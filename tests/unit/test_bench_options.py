"""`exo-rknpu bench` refuses bad options with one line on stderr before it loads or measures anything."""

import pytest

from exo_rknpu.backends.base import BACKENDS
from exo_rknpu.cli import bench as bench_cli
from exo_rknpu.cli.main import main

NO_MODEL = "/nonexistent/model.gguf"  # an option error must be reported before the model is even looked up


def fails_with(capsys, argv: list[str]) -> str:
    """Run `bench argv`; it must stop with a usage error (status 2) whose message is one line; returns it."""
    try:
        rc = main(["bench", *argv])
    except SystemExit as e:  # argparse's own checks (types, choices) print usage first, then one error line
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("exo-rknpu") and "error: " in err
    return err


def test_an_unknown_backend_fails_at_once_naming_the_known_ones(capsys):
    err = fails_with(capsys, ["--model", NO_MODEL, "--backend", "nosuch"])
    assert "'nosuch'" in err
    for name in BACKENDS:
        assert name in err


def test_an_unknown_weights_form_is_refused(capsys):
    err = fails_with(capsys, ["--model", NO_MODEL, "--weights", "int3"])
    assert "int3" in err and "auto, int4, int8, fp32" in err


@pytest.mark.parametrize("flag,value", [
    ("--prompt-tokens", "0"), ("--gen-tokens", "-3"), ("--repeat", "0"), ("--threads", "0"), ("--threads", "100000"),
    ("--max-context", "0"), ("--layers-per-slice", "-1"),
])
def test_nonsense_numbers_are_refused(capsys, flag, value):
    err = fails_with(capsys, ["--model", NO_MODEL, flag, value])
    assert flag in err and value in err


def test_a_non_number_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", NO_MODEL, "--gen-tokens", "many"])
    assert e.value.code == 2
    assert "--gen-tokens" in capsys.readouterr().err


def test_an_unknown_peer_is_refused_naming_the_known_ones(capsys):
    err = fails_with(capsys, ["--model", NO_MODEL, "--compare", "transformers,vllm"])
    assert "vllm" in err and "transformers, llama.cpp" in err


def test_backend_dtype_only_applies_to_compiled_backends(capsys):
    err = fails_with(capsys, ["--model", NO_MODEL, "--backend", "onnx", "--backend-dtype", "w8a8"])
    assert "npu" in err and "onnx" in err


@pytest.fixture
def no_measuring(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("bench started measuring despite a bad option")

    monkeypatch.setattr(bench_cli, "run_bench", refuse)


def test_a_bad_split_is_refused_before_measuring(capsys, tiny_llama, no_measuring):
    err = fails_with(capsys, ["--model", str(tiny_llama), "--split", "0-0,2-2"])
    assert "0-0,2-2" in err


def test_a_prompt_past_the_context_limit_is_refused_before_measuring(capsys, tiny_llama, no_measuring):
    err = fails_with(capsys, ["--model", str(tiny_llama), "--max-context", "256", "--prompt-tokens", "250", "--gen-tokens", "10"])
    assert "256" in err and "--max-context" in err


def test_the_prompt_is_exactly_n_deterministic_tokens(tiny_llama):
    from exo_rknpu.bench.harness import PROMPT_TEXT, prompt_ids
    from exo_rknpu.model.loader import load_tokenizer
    from exo_rknpu.model.zoo import resolve_model

    tok = load_tokenizer(resolve_model(str(tiny_llama)))
    base = tok.encode(PROMPT_TEXT)
    for n in (1, len(base) - 1, len(base), 3 * len(base) + 7):
        ids = prompt_ids(tok, n)
        assert len(ids) == n
        assert ids == [base[i % len(base)] for i in range(n)]


@pytest.mark.parametrize("argv,message", [
    (["--concurrency", "0"], "--concurrency must be an integer from 1 to 64"),
    (["--concurrency", "65"], "--concurrency must be an integer from 1 to 64"),
    (["--concurrency", "2", "--compare", "llama.cpp"], "drop --compare"),
    (["--placement", "0-1=npu0", "--concurrency", "1"], "give 2 to 64"),
    (["--placement", "0-1=npu0", "--concurrency", "2", "--compare", "transformers"], "drop --compare"),
])
def test_concurrency_is_one_to_64_requests_and_two_with_a_placement(capsys, argv, message):
    assert message in fails_with(capsys, ["--model", NO_MODEL, *argv])


def test_an_impossible_placement_is_refused_before_measuring(capsys, tiny_llama, no_measuring):
    err = fails_with(capsys, ["--model", str(tiny_llama), "--placement", "0-9=npu"])
    assert "0-9=npu is outside the model" in err
