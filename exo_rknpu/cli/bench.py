"""`exo-rknpu bench`: decode and prefill speed of our backends, and of Hugging Face transformers (torch, CPU)
as a reference, measured in one run on one machine so the ratio means something.

The reference needs the `bench` extra (transformers + torch); it is never used by the runtime.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from exo_rknpu.cli.generate import add_model_args, backend_options, progress
from exo_rknpu.model.base import LayerRange, parse_split
from exo_rknpu.model.loader import load_args, load_tokenizer
from exo_rknpu.model.zoo import ModelSource, resolve_model
from exo_rknpu.runtime.pipeline import LocalRing, Timings
from exo_rknpu.runtime.sampling import Sampler
from exo_rknpu.runtime.session import default_buckets, open_shard

BENCH_PROMPT = "The capital of France is"


@dataclass
class BenchResult:
    name: str
    prefill_s: float
    decode_tokens: int
    decode_tokens_per_s: float
    token_ids: list[int]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode/prefill speed (optionally against transformers)", description=__doc__)
    add_model_args(p)
    p.set_defaults(backend=None)
    p.add_argument("--backends", default="onnx", help="comma-separated backends to measure (default: onnx)")
    p.add_argument("--split", default=None, help="layer ranges to run as a local ring (default: one shard)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps to time")
    p.add_argument("--repeats", type=int, default=3, help="runs per contender; the best is reported")
    p.add_argument("--reference", choices=["transformers", "none"], default="transformers")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every contender (default: all cores)")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="with --placement: N requests at once, pipelined per device vs one call at a time (cli/bench_pipeline.py)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _ours(src: ModelSource, backend: str, split: str | None, args: argparse.Namespace, prompt_ids: list[int]) -> BenchResult:
    margs = load_args(src)
    ranges = parse_split(split, margs.num_hidden_layers) if split else [LayerRange.full(margs.num_hidden_layers)]
    opts = backend_options(argparse.Namespace(**{**vars(args), "backend": backend}), src)
    if backend == "onnx" and args.threads:
        opts["threads"] = args.threads
    shards = [open_shard(src, r, backend, default_buckets(margs, args.max_context), args.layers_per_slice, backend_options=opts,
                         placement=args.placement) for r in ranges]
    ring = LocalRing(shards)
    best: BenchResult | None = None
    try:
        for _ in range(args.repeats):
            t = Timings()
            # no stop ids: always time exactly `tokens` decode steps
            ids = list(ring.generate(uuid.uuid4().hex, prompt_ids, args.tokens + 1, Sampler(), frozenset(), t))
            r = BenchResult(f"exo-rknpu/{backend}" + (f" split {split}" if split else "") + placement_label(shards), t.prefill_s, len(t.decode_s), t.decode_tokens_per_s, ids)
            best = r if best is None or r.decode_tokens_per_s > best.decode_tokens_per_s else best
    finally:
        ring.close()
    assert best is not None
    return best


def placement_label(shards) -> str:
    """' placement P (emulated)' for a contender run under a plan: its speed is never an NPU's when emulated."""
    plans = [s.placement for s in shards if s.placement is not None]
    if not plans:
        return ""
    return f" placement {plans[0].plan}" + (" (emulated)" if any(p.emulated for p in plans) else "")


def _pipelining(src: ModelSource, args: argparse.Namespace, prompt_ids: list[int]) -> int:
    """bench --placement P --concurrency N: pipelined vs serial throughput, and the board estimate."""
    from exo_rknpu.cli.bench_pipeline import board_estimate, measure
    from exo_rknpu.errors import UsageError
    from exo_rknpu.runtime.session import resolve_placement

    if not args.placement or args.concurrency < 2:
        raise UsageError("--concurrency N needs --placement PLAN and N >= 2 (requests in flight at once)")
    margs = load_args(src)
    backend = args.backends.split(",")[0].strip()
    full = LayerRange.full(margs.num_hidden_layers)
    open_ = lambda: open_shard(src, full, backend, default_buckets(margs, args.max_context), args.layers_per_slice,
                               placement=args.placement)
    prompts = [prompt_ids + [prompt_ids[-1]] * i for i in range(args.concurrency)]  # distinct requests
    figs = measure(open_(), open_(), prompts, args.tokens, args.repeats)
    plan = resolve_placement(src, full, args.placement, backend, default_buckets(margs, args.max_context), args.layers_per_slice)
    board = board_estimate(plan)
    report = {"model": src.name, "placement": str(args.placement), "concurrency": args.concurrency, "tokens": args.tokens,
              "repeats": args.repeats, **figs.__dict__, "board_estimate": board}
    if args.json:
        print(json.dumps(report))
        return 0
    tag = " (emulated: NPU devices are CPU threads here; no NPU speed is claimed)" if figs.emulated else ""
    print(f"{src.name}, placement {args.placement}, {args.concurrency} requests x {args.tokens} tokens, median of {args.repeats}{tag}")
    devices = list(dict.fromkeys(st.split(":")[0] for st in figs.stages))
    print(f"  stages: {' -> '.join(figs.stages)}" if len(figs.stages) <= 6 else
          f"  stages: {len(figs.stages)}, alternating over devices {', '.join(devices)}")
    print(f"  one call at a time: {figs.serial_tokens_per_s:.1f} tok/s; pipelined per device: "
          f"{figs.pipelined_tokens_per_s:.1f} tok/s; gain {figs.gain:.2f}x; same tokens: {'yes' if figs.same_tokens else 'NO'}")
    if board:
        print(f"  board estimate (assumed bandwidths, not measured): decode step {board['serial_step_ms']:.1f} ms serial, "
              f"slowest stage {board['slowest_stage_ms']:.1f} ms, gain {board['gain']:.2f}x")
    return 0


def _transformers(src: ModelSource, args: argparse.Namespace, prompt_ids: list[int]) -> BenchResult:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SystemExit(f"the transformers reference needs the bench extra: pip install 'exo-rknpu[bench]' ({e})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if src.format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name, torch_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src.path), torch_dtype=torch.float32)
    model.eval()
    best: BenchResult | None = None
    with torch.inference_mode():
        for _ in range(args.repeats):
            x = torch.tensor([prompt_ids])
            t0 = time.perf_counter()
            out = model(x, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            prefill = time.perf_counter() - t0
            ids, steps = [tok], []
            for _ in range(args.tokens):
                t0 = time.perf_counter()
                out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
                steps.append(time.perf_counter() - t0)
                ids.append(tok)
            r = BenchResult("transformers/torch-cpu fp32", prefill, len(steps), len(steps) / sum(steps), ids)
            best = r if best is None or r.decode_tokens_per_s > best.decode_tokens_per_s else best
    assert best is not None
    return best


def run(args: argparse.Namespace) -> int:
    src = resolve_model(args.model, progress=progress)
    tok = load_tokenizer(src)
    prompt_ids = tok.encode(BENCH_PROMPT)
    if args.concurrency:
        return _pipelining(src, args, prompt_ids)
    results: list[BenchResult] = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        progress(f"measuring {backend} ...")
        results.append(_ours(src, backend, args.split, args, prompt_ids))
    if args.reference == "transformers":
        progress("measuring transformers (torch, CPU, fp32) ...")
        results.append(_transformers(src, args, prompt_ids))
    ref = results[-1] if args.reference == "transformers" else None
    report = {
        "model": src.name,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "prompt_tokens": len(prompt_ids),
        "decode_tokens": args.tokens,
        "results": [asdict(r) | {"vs_reference": round(r.decode_tokens_per_s / ref.decode_tokens_per_s, 3) if ref else None} for r in results],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"model {src.name}, prompt {len(prompt_ids)} tokens, {args.tokens} decode steps, best of {args.repeats}")
    print(f"{'contender':40s} {'prefill s':>10s} {'decode tok/s':>13s} {'vs ref':>7s}  same tokens as ref")
    for r, row in zip(results, report["results"]):
        same = "-" if ref is None else ("yes" if r.token_ids == ref.token_ids else f"first {np.argmin(np.array(r.token_ids) == np.array(ref.token_ids[:len(r.token_ids)]))} equal")
        vs = f"{row['vs_reference']:.2f}x" if row["vs_reference"] is not None else "-"
        print(f"{r.name:40s} {r.prefill_s:10.3f} {r.decode_tokens_per_s:13.1f} {vs:>7s}  {same}")
    return 0
