"""Measure docs/performance.md's figures and redraw its plots: one command.

    python docs/perf/measure.py                     # the whole matrix below, then docs/perf/plot.py
    python docs/perf/measure.py --backends onnx --splits 'none;0-14,15-29' --weights auto,int4 --repeat 5

Each cell of the matrix (backend x weights x split) is one `exo-rknpu bench --json` run in which our runtime and
the peers alternate; its report is appended to --out as soon as it finishes (nothing measured is lost if a later
cell fails or is interrupted). A cell that fails is reported on stderr and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's exo_rknpu, also when it is not the installed one

from exo_rknpu.model.quant import WEIGHT_MODES  # noqa: E402


def default_weights() -> str:
    """Every weights form the runtime accepts (--weights)."""
    return ",".join(WEIGHT_MODES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backends", default="onnx,numpy")
    ap.add_argument("--weights", default=default_weights(), help=f"default here: {default_weights()}")
    ap.add_argument("--splits", default="none;0-9,10-19,20-29", help="';'-separated --split values; 'none' = one shard")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also-threads", default="1",
                    help="extra thread counts measured for the first backend, unsplit, each weights form (default: 1): "
                         "on a shared machine spin-waiting threads suffer most from other jobs ('' for none)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", default="transformers,llama.cpp")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "perf" / "results.jsonl")
    ap.add_argument("--append", action="store_true", help="add to --out instead of starting it afresh")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    splits = [None if s.strip() == "none" else s.strip() for s in a.splits.split(";") if s.strip()]
    backends, weights = a.backends.split(","), a.weights.split(",")
    cells = [(b, w, s, a.threads) for b in backends for w in weights for s in splits]
    cells += [(backends[0], w, None, int(t)) for t in a.also_threads.split(",") if t.strip() for w in weights]
    if not a.append:
        a.out.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    failed = 0
    for i, (backend, form, split, threads) in enumerate(cells, 1):
        argv_ = ["--model", a.model, "--backend", backend, "--weights", form, "--threads", str(threads),
                 "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--repeat", str(a.repeat),
                 "--compare", a.compare, "--json", *(["--split", split] if split else [])]
        print(f"[{i}/{len(cells)}] exo-rknpu bench {' '.join(argv_)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "exo_rknpu.cli.main", "bench", *argv_], stdout=subprocess.PIPE,
                              text=True, env=env)
        lines = proc.stdout.strip().splitlines()
        report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        if report is None or not report.get("n_runs"):
            print(f"  cell failed (status {proc.returncode}); skipped", file=sys.stderr)
            failed += 1
            continue
        with a.out.open("a") as f:
            f.write(json.dumps(report) + "\n")
    if not a.no_plot:
        subprocess.run([sys.executable, str(ROOT / "docs" / "perf" / "plot.py"), str(a.out)], check=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
