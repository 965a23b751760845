"""`exo-rknpu bench`: prefill/decode speed, time to first token, load time, peak resident memory and the share
of the machine's memory bandwidth our runtime reaches, optionally against Hugging Face transformers (torch CPU,
fp32) and llama.cpp (llama-cpp-python) on the same model, prompt and thread count. Contenders alternate run by
run, each in its own process; the figures are medians and the comparisons ratios of medians.

Peers need extras: transformers `pip install 'exo-rknpu[bench]'`, llama.cpp `pip install 'exo-rknpu[llamacpp]'`
(compiles llama.cpp). A peer that is not installed is noted and skipped.
"""

from __future__ import annotations

import argparse
import json

from exo_rknpu.bench.harness import METRICS, Report, plan, run_bench
from exo_rknpu.bench.options import BenchOptions, parse_compare
from exo_rknpu.model.quant import DEFAULT_WEIGHTS, WEIGHT_MODES
from exo_rknpu.bench.worker import OURS
from exo_rknpu.cli.options import add_model_args, progress


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure speed and peak memory (optionally against transformers, llama.cpp)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--split", default=None, help="layer ranges to run as a local ring, e.g. 0-14,15-29 (default: one shard)")
    _add_unless_shared(p, "--weights", default=DEFAULT_WEIGHTS,
                       help=f"{' | '.join(WEIGHT_MODES)}: the form our runtime keeps weights in (default: {DEFAULT_WEIGHTS})")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default: 128)")
    p.add_argument("--gen-tokens", type=int, default=64, help="timed greedy decode steps, EOS ignored (default: 64)")
    _add_unless_shared(p, "--threads", type=int, default=None,
                       help="CPU threads for every contender (default: the CPUs this process may use)")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds; figures are medians over them (default: 3)")
    p.add_argument("--compare", default=None, help="peers to run in the same rounds: transformers,llama.cpp")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for each run (default: 900)")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="N requests at once, in this process: their decode steps batched vs one request after "
                        "another, for 1, 2, 4 .. N requests (cli/bench_batch.py); with --placement: pipelined per "
                        "device vs one call at a time (cli/bench_pipeline.py; docs/placement.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=run)


def _add_unless_shared(p: argparse.ArgumentParser, flag: str, **kw) -> None:
    """Add `flag` unless add_model_args (shared with generate) already defines it; bench validates it either way."""
    if not any(flag in a.option_strings for a in p._actions):
        p.add_argument(flag, **kw)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        model=args.model, backend=args.backend, split=args.split, weights=args.weights,
        prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, threads=args.threads, repeat=args.repeat,
        compare=parse_compare(args.compare), backend_dtype=args.backend_dtype, max_context=args.max_context,
        layers_per_slice=args.layers_per_slice, timeout_s=args.timeout,
        placement=str(args.placement) if args.placement else None, concurrency=args.concurrency,
        emulate=args.emulate,
    )


SHORT = {"decode_tok_s": "decode", "prefill_tok_s": "prefill", "ttft_s": "TTFT", "load_s": "load", "peak_rss_mb": "peak RSS"}


def _fmt(v: float | int | None, spec: str) -> str:
    """`v` formatted by `spec`, or a dash of the same width."""
    return format(v, spec) if v is not None else format("-", f">{spec.split('.')[0]}")


def print_table(report: Report) -> None:
    r = report.to_json()
    print(f"model {r['model']} ({r['model_format']}), prompt {r['prompt_tokens']} tokens, {r['gen_tokens']} decode "
          f"steps, {r['threads']} thread(s), {r['repeat']} alternating round(s); medians")
    print(f"memory read bandwidth {r['machine']['bandwidth_gb_s']:.1f} GB/s ({r['machine']['bandwidth_method']})")
    head = f"{'contender':62s} {'runs':>4s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'TTFT s':>7s} {'load s':>7s} " \
           f"{'peak MiB':>8s} {'MB/token':>8s} {'roofline':>8s}"
    print(head)
    rows = [(r["label"], r)] + [(p["label"], p) for p in r["peers"].values()]
    n_runs = [r["n_runs"]] + [p["n_runs"] for p in r["peers"].values()]
    for (name, f), n in zip(rows, n_runs):
        if not n:
            print(f"{name:62s} {n:4d}  not measured")
            continue
        mb = f.get("weight_bytes_per_token")
        print(f"{name:62s} {n:4d} {_fmt(f.get('decode_tok_s'), '12.1f')} {_fmt(f.get('prefill_tok_s'), '13.1f')} "
              f"{_fmt(f.get('ttft_s'), '7.3f')} {_fmt(f.get('load_s'), '7.2f')} {_fmt(f.get('peak_rss_mb'), '8.0f')} "
              f"{_fmt(mb / 1e6 if mb else None, '8.1f')} {_fmt(f.get('roofline_pct'), '7.1f')}%")
    for peer, rat in r["ratios"].items():
        parts = ", ".join(f"{SHORT[m]} {rat[m]:.2f}x" for m in METRICS if m in rat)
        print(f"ours / {peer} (ratio of medians): {parts}; first {r['peers'][peer]['agreeing_tokens']} greedy tokens agree")
    for note in r["notes"]:
        print(f"note: {note}")


def run(args: argparse.Namespace) -> int:
    p = plan(options_from_args(args), progress)
    if args.explain:  # --placement's resolved slices, as generate --explain prints them
        for resolved in p.placements:
            print(resolved.explain())
        return 0
    if p.options.concurrency and p.options.placement:
        from exo_rknpu.cli.bench_pipeline import run_pipelining

        return run_pipelining(p, args.json)
    if p.options.concurrency:
        from exo_rknpu.cli.bench_batch import run_batching

        return run_batching(p, args.json)
    report = run_bench(p, progress)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print_table(report)
    if not report.summaries[OURS].runs:
        return 1
    return 0 if report.complete else 130 if any(n.startswith("interrupted") for n in report.notes) else 1
