#!/usr/bin/env bash
# Issue 19's figures in one alternating run (docs/performance.md "Where issue 19 stands"): decode and peak memory
# against llama.cpp (1 thread, medians of 3 rounds), batched decode by concurrency (2 threads), the 1B shape from
# bf16 safetensors cold and warm under /usr/bin/time, and the two-node ring. From the repository's root:
#   PY=.venv/bin/python PERF=/tmp/perf OUT=/tmp/issue19 bash docs/perf/issue19_run.sh
# PERF holds the 1B-shaped files made by docs/perf/make_1b.py (1b-q4_0.gguf, 1b-q8_0.gguf, the 1b-bf16 folder);
# llama.cpp = llama-cpp-python (docs/performance.md "Rerun" says how it was built). Say the machine's load with the
# figures: every section prints `uptime` as it starts.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PERF=${PERF:-/tmp/perf}
OUT=${OUT:-/tmp/issue19}
mkdir -p "$OUT"
cli() { "$PY" -m exo_rknpu.cli.main "$@"; }
models=(smollm2-135m "$PERF/1b-q4_0.gguf" "$PERF/1b-q8_0.gguf")
for m in "${models[@]}"; do  # fill the prepared-slice cache: the figures are a warm start's
  cli generate --model "$m" --prompt "warm" --max-tokens 2 >/dev/null 2>&1
done
for m in "${models[@]}"; do
  g=32; [ "$m" = smollm2-135m ] || g=16
  echo "== $m $(uptime)"
  "$PY" docs/perf/measure.py --append --no-plot --out "$OUT/results.jsonl" --model "$m" --backends onnx \
    --weights native --splits none --also-threads '' --threads 1 --prompt-tokens 32 --gen-tokens $g --repeat 3 \
    --compare llama.cpp
done
for m in "$PERF/1b-q4_0.gguf" smollm2-135m; do
  echo "== concurrency $m $(uptime)"
  cli bench --model "$m" --threads 2 --concurrency 8 --prompt-tokens 16 --gen-tokens 8 --repeat 1 --json \
    | tail -1 >> "$OUT/concurrency.jsonl"
done
echo "== bf16 $(uptime)"
rm -rf "$OUT/cold-home" && mkdir -p "$OUT/cold-home"
for run in cold warm; do  # EXO_RKNPU_HOME empty at first: the kernel is built and the slices prepared
  /usr/bin/time -f "bf16 $run maxrss_kb=%M elapsed=%e" env EXO_RKNPU_HOME="$OUT/cold-home" taskset -c 0 \
    "$PY" -m exo_rknpu.cli.main generate --model "$PERF/1b-bf16" --max-tokens 8 --prompt "Once upon a time" >/dev/null
done
echo "== ring $(uptime)"
PYTHONPATH=. "$PY" docs/perf/ring_batching.py
echo "== plots: $PY docs/perf/plot.py $OUT/results.jsonl --concurrency $OUT/concurrency.jsonl --out $OUT --no-doc"
