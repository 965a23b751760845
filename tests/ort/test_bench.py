"""`exo-rknpu bench` on tiny random models: the JSON it emits, its per-run worker processes, and the ratios.

Figures are never compared with thresholds (this is a shared machine); the tests check that what is reported
is consistent with the runs it reports and with the model's own shape.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from exo_rknpu.bench.harness import plan, run_bench, run_worker
from exo_rknpu.bench.options import BenchOptions
from exo_rknpu.bench.worker import OURS, gguf_bytes_per_token
from exo_rknpu.cli.main import main
from tiny_models import make_tiny_gguf

HAVE_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
REQUIRED = ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb", "roofline_pct")


def bench_json(capsys, *argv: str) -> dict:
    assert main(["bench", "--prompt-tokens", "12", "--gen-tokens", "6", "--threads", "1", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def decode_bytes_from_config(cfg: dict, bytes_per_weight: int = 4) -> int:
    """Weights one decode step reads, counted from config.json alone: every layer matrix and norm, the final
    norm, the head, and one embedding row (the model is untied)."""
    h, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    return bytes_per_weight * (cfg["num_hidden_layers"] * layer + h + v * h + h)


@pytest.mark.parametrize("backend,split", [("numpy", None), ("onnx", None), ("onnx", "0-1,2-4")])
def test_json_report_of_a_tiny_model(capsys, tiny_llama, backend, split):
    argv = ["--model", str(tiny_llama), "--backend", backend, "--weights", "fp32", "--repeat", "2", "--compare", "llama.cpp"]
    r = bench_json(capsys, *argv, *(["--split", split] if split else []))
    for key in REQUIRED:
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["backend"] == backend and r["split"] == (split.split(",") if split else ["0-4"])
    assert r["n_runs"] == 2 and r["complete"] is True
    assert len(r["token_ids"]) == 6 + 1  # first token from the prefill, then exactly --gen-tokens steps
    cfg = json.loads((tiny_llama / "config.json").read_text())
    assert r["weight_bytes_per_token"] == decode_bytes_from_config(cfg)  # --weights fp32: 4 bytes a weight
    assert r["roofline_pct"] == pytest.approx(
        100 * r["decode_tok_s"] * r["weight_bytes_per_token"] / (r["machine"]["bandwidth_gb_s"] * 1e9))
    # llama.cpp cannot read a Hugging Face folder: a one-line note, nothing lost, no ratio
    assert r["peers"]["llama.cpp"]["n_runs"] == 0 and "GGUF" in r["peers"]["llama.cpp"]["note"]
    assert "llama.cpp" not in r["ratios"]
    assert [run["contender"] for run in r["runs"]] == [OURS, "llama.cpp", OURS]


def test_each_run_reports_its_own_peak_rss_not_its_parents(tiny_llama):
    """ru_maxrss of a freshly exec'd child still carries the parent's peak; the worker's figure must not."""
    p = plan(BenchOptions(model=str(tiny_llama), backend="numpy", prompt_tokens=8, gen_tokens=2, threads=1), print)
    ballast = np.ones(768 * 2**20 // 4, np.float32)  # 768 MiB resident in this (parent) process
    figures, error, missing = run_worker(p.job(OURS), timeout_s=300)
    del ballast
    assert error is None and not missing
    weights_mib = decode_bytes_from_config(json.loads((tiny_llama / "config.json").read_text())) / 2**20
    assert weights_mib < figures.peak_rss_mb < 768


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers/torch not installed (pip install 'exo-rknpu[bench]')")
def test_transformers_peer_alternates_and_ratios_are_ratios_of_medians(capsys, tiny_llama):
    r = bench_json(capsys, "--model", str(tiny_llama), "--backend", "onnx", "--weights", "fp32", "--repeat", "3",
                   "--compare", "transformers")
    assert [run["contender"] for run in r["runs"]] == [OURS, "transformers"] * 3
    assert [run["round"] for run in r["runs"]] == [1, 1, 2, 2, 3, 3]
    peer = r["peers"]["transformers"]
    assert peer["n_runs"] == 3 and peer["note"] is None
    for metric in ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb"):
        ours = np.median([run[metric] for run in r["runs"] if run["contender"] == OURS])
        theirs = np.median([run[metric] for run in r["runs"] if run["contender"] == "transformers"])
        assert r[metric] == pytest.approx(ours) and peer[metric] == pytest.approx(theirs)
        assert r["ratios"]["transformers"][metric] == pytest.approx(ours / theirs)
    for run in r["runs"]:
        assert run["peak_rss_mb"] > 0
    # torch counts the same float32 weights from its own parameters
    assert peer["weight_bytes_per_token"] == r["weight_bytes_per_token"]


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers/torch not installed (pip install 'exo-rknpu[bench]')")
def test_a_failing_peer_is_dropped_and_what_was_measured_is_kept(tiny_llama):
    def flaky(job, timeout_s):
        if job.contender == "transformers" and calls.count("transformers") == 1:
            calls.append(job.contender)
            return None, "worker exited with status 1: RuntimeError: boom", False
        calls.append(job.contender)
        return run_worker(job, timeout_s)

    calls: list[str] = []
    p = plan(BenchOptions(model=str(tiny_llama), backend="numpy", prompt_tokens=8, gen_tokens=2, threads=1, repeat=3,
                          compare=("transformers",)), print)
    r = run_bench(p, print, worker=flaky).to_json()
    assert calls == [OURS, "transformers", OURS, "transformers", OURS]
    assert r["n_runs"] == 3 and r["complete"] is True
    assert r["peers"]["transformers"]["n_runs"] == 1 and "boom" in r["peers"]["transformers"]["note"]
    assert "transformers" in r["ratios"]  # from the one run it did finish
    assert any("boom" in n for n in r["notes"])


def test_gguf_bytes_per_token_counts_the_stored_tensors(tmp_path, tiny_llama):
    gguf = make_tiny_gguf(tmp_path / "m.gguf", tiny_llama)  # float32 tensors: the same bytes as the HF folder
    assert gguf_bytes_per_token(str(gguf)) == decode_bytes_from_config(json.loads((tiny_llama / "config.json").read_text()))


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed (pip install 'exo-rknpu[llamacpp]')")
def test_llama_cpp_peer_on_the_same_gguf(capsys, tmp_path, tiny_llama):
    gguf = make_tiny_gguf(tmp_path / "m.gguf", tiny_llama)
    r = bench_json(capsys, "--model", str(gguf), "--backend", "numpy", "--weights", "fp32", "--repeat", "2",
                   "--compare", "llama.cpp")
    peer = r["peers"]["llama.cpp"]
    assert peer["n_runs"] == 2, peer["note"]
    assert peer["peak_rss_mb"] > 0 and peer["weight_bytes_per_token"] == r["weight_bytes_per_token"]
    assert r["ratios"]["llama.cpp"]["decode_tok_s"] == pytest.approx(r["decode_tok_s"] / peer["decode_tok_s"])


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (pip install 'exo-rknpu[bench]')")
def test_the_plot_script_draws_pngs_and_the_table_from_bench_json(capsys, tmp_path, tiny_llama):
    import subprocess
    import sys
    from pathlib import Path

    reports = [bench_json(capsys, "--model", str(tiny_llama), "--backend", b, "--repeat", "2") for b in ("numpy", "onnx")]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in reports))
    doc = tmp_path / "perf.md"
    doc.write_text("# t\n<!-- results:begin (docs/perf/plot.py) -->\nold\n<!-- results:end -->\nafter\n")
    script = Path(__file__).resolve().parents[2] / "docs" / "perf" / "plot.py"
    subprocess.run([sys.executable, str(script), str(results), "--out", str(tmp_path), "--doc", str(doc)], check=True)
    for name in ("decode.png", "memory.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- results:end -->\nafter\n")
    for r in reports:  # each report's median decode speed is in the table
        assert f"| {r['backend']} | {r['weights']} | 0-4 | 1 | " in text and f"| exo-rknpu | 2 | {r['decode_tok_s']:.1f} |" in text


def test_when_our_backend_cannot_run_the_report_still_comes_out(capsys, tiny_llama):
    """No RK3588 here: the npu backend fails in its worker; bench says why, emits its JSON and exits 1."""
    rc = main(["bench", "--model", str(tiny_llama), "--backend", "npu", "--prompt-tokens", "4", "--gen-tokens", "2",
               "--compare", "transformers", "--json"])
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])
    assert rc == 1 and r["n_runs"] == 0 and r["complete"] is False
    assert all(r[key] is None for key in REQUIRED)
    assert "BackendUnavailableError" in r["notes"][0]
    assert r["peers"]["transformers"]["n_runs"] == 0 and "not run" in r["peers"]["transformers"]["note"]


def test_a_busy_machine_is_noted_from_the_recorded_load(tiny_llama):
    from exo_rknpu.bench.harness import Run

    p = plan(BenchOptions(model=str(tiny_llama), backend="numpy", prompt_tokens=4, gen_tokens=2, threads=1, repeat=1), print)
    report = run_bench(p, print)
    assert report.runs[0].load_1m is not None  # recorded as the run started
    cpus = os.cpu_count()
    report.runs = [Run(1, OURS, report.runs[0].figures, load_1m=cpus + 3.0)]
    assert any(n.startswith(f"busy machine: median load average {cpus + 3.0:.1f}") for n in report.to_json()["notes"])
    report.runs = [Run(1, OURS, report.runs[0].figures, load_1m=cpus / 4)]
    assert not any(n.startswith("busy machine") for n in report.to_json()["notes"])


def test_a_placement_run_gives_the_unplaced_tokens_and_says_emulated(capsys, tiny_llama):
    """bench --placement: our contender runs the plan (in its worker process) and its label says the NPU devices
    are emulated here; greedy tokens equal the run without a plan."""
    common = ["--model", str(tiny_llama), "--backend", "onnx", "--weights", "fp32", "--repeat", "1"]
    want = bench_json(capsys, *common)
    got = bench_json(capsys, *common, "--placement", "0-1=npu0,2-4=npu1;attention=cpu", "--emulate")
    assert got["token_ids"] == want["token_ids"] and got["n_runs"] == 1
    assert got["placement"] == "0-1=npu0,2-4=npu1;attention=cpu" and got["emulated"] is True
    assert got["label"].endswith("placement 0-1=npu0,2-4=npu1;attention=cpu (emulated)")
    assert want["placement"] is None and "placement" not in want["label"]


def test_concurrency_measures_pipelined_against_serial_with_the_same_tokens(capsys, tiny_llama):
    r = bench_json(capsys, "--model", str(tiny_llama), "--placement", "0-1=npu0,2-3=npu1,4=npu2", "--emulate", "--concurrency", "2",
                   "--repeat", "1")
    assert r["concurrency"] == 2 and r["same_tokens"] is True and r["emulated"] is True
    assert r["serial_tokens_per_s"] > 0 and r["pipelined_tokens_per_s"] > 0
    assert r["gain"] == pytest.approx(r["pipelined_tokens_per_s"] / r["serial_tokens_per_s"])
    # the embedding on the host, one stage per core, the head after the last layer on its core
    assert [s.split(":")[0] for s in r["stages"]] == ["onnx", "npu0", "npu1", "npu2", "npu2"]


def test_concurrency_without_placement_measures_batched_against_sequential_decode(capsys, tiny_llama):
    r = bench_json(capsys, "--model", str(tiny_llama), "--backend", "onnx", "--weights", "fp32", "--concurrency", "3",
                   "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1")
    assert [lv["requests"] for lv in r["levels"]] == [1, 2, 3]
    for lv in r["levels"]:
        assert lv["same_tokens"] is True  # each batched request decodes exactly its sequential tokens
        assert lv["gain"] == pytest.approx(lv["batched_tok_s"] / lv["sequential_tok_s"])
        assert lv["latency_ratio"] == pytest.approx(lv["batched_latency_ms"] / lv["sequential_latency_ms"])
        # the same in CPU time (what a shared machine's other jobs stretch least)
        assert lv["sequential_cpu_ms"] > 0 and lv["batched_cpu_ms"] > 0
        assert lv["cpu_gain"] == pytest.approx(lv["requests"] * lv["sequential_cpu_ms"] / lv["batched_cpu_ms"])
        assert lv["cpu_latency_ratio"] == pytest.approx(lv["batched_cpu_ms"] / lv["sequential_cpu_ms"])
