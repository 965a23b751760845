"""`exo-rknpu generate`: run a model, optionally split into shards handing hidden states across like a ring."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from exo_rknpu.model.base import LayerRange, parse_split
from exo_rknpu.model.loader import load_args, load_tokenizer
from exo_rknpu.model.tokenizer import IncrementalDecoder
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing, Timings
from exo_rknpu.runtime.sampling import Sampler, SamplingParams
from exo_rknpu.runtime.session import default_buckets, open_shard


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by commands that run a model."""
    p.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file, or alias (default: smollm2-135m)")
    p.add_argument("--backend", default="onnx", help="numpy | onnx | npu | rknn-sim (default: onnx)")
    p.add_argument("--backend-dtype", choices=["fp16", "w8a8"], default=None,
                   help="compiled dtype for npu / rknn-sim (default: fp16)")
    p.add_argument("--max-context", type=int, default=None, help="largest context bucket (default: 2048 or the model's limit)")
    p.add_argument("--layers-per-slice", type=int, default=None, help="layers per graph (default: the whole shard in one graph)")


def backend_options(args: argparse.Namespace, src=None) -> dict:
    """Backend options from add_model_args' flags (rknn-sim w8a8 also gets the compiler's calibration of `src`)."""
    dtype = getattr(args, "backend_dtype", None)
    if dtype and args.backend not in ("npu", "rknn-sim"):
        raise SystemExit(f"--backend-dtype applies to npu and rknn-sim, not {args.backend}")
    opts: dict = {"dtype": dtype} if dtype else {}
    if args.backend == "rknn-sim" and dtype == "w8a8":
        from exo_rknpu.compiler.recipe import RecipeBuild

        opts["recipe_build"] = RecipeBuild(src if src is not None else args.model)  # compile's default w8a8 recipe
    return opts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text, optionally split into shards", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--split", default=None, help="layer ranges, e.g. 0-9,10-19,20-29 (default: one shard)")
    p.add_argument("--wire-dtype", choices=["float32", "float16"], default="float32", help="dtype of hidden states between shards")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=run)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    src = resolve_model(args.model, progress=progress)
    margs = load_args(src)
    tok = load_tokenizer(src)
    ranges = parse_split(args.split, margs.num_hidden_layers) if args.split else [LayerRange.full(margs.num_hidden_layers)]
    buckets = default_buckets(margs, args.max_context)
    sampler = Sampler(SamplingParams(args.temperature, args.top_k, args.top_p, args.seed))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = args.prompt
    prompt_ids = tok.encode(text)
    opts = backend_options(args, src)  # one calibration object: captured once, shared by the shards
    shards = [open_shard(src, r, args.backend, buckets, args.layers_per_slice, backend_options=opts) for r in ranges]
    ring = LocalRing(shards, wire_dtype=args.wire_dtype)
    load_s = time.perf_counter() - t0
    timings = Timings()
    new_ids: list[int] = []
    decoder = IncrementalDecoder(tok)
    try:
        for token in ring.generate(uuid.uuid4().hex, prompt_ids, args.max_tokens, sampler, tok.eos_token_ids, timings):
            new_ids.append(token)
            if not args.json:
                piece = decoder.push(token)
                if piece:
                    print(piece, end="", flush=True)
    finally:
        ring.close()
    text_out = tok.decode(new_ids)
    if args.json:
        result = {
            "text": text_out,
            "token_ids": new_ids,
            "prompt_ids": prompt_ids,
            "model": src.name,
            "backend": args.backend,
            "split": [str(r) for r in ranges],
            "timings": {"load_s": round(load_s, 3), **timings.to_dict()},
        }
        print(json.dumps(result))
    else:
        rest = decoder.flush()
        print(rest, flush=True)
        t = timings.to_dict()
        progress(f"[{len(new_ids)} tokens; prefill {t['prefill_s']:.3f}s; decode {t['decode_tokens_per_s']:.1f} tok/s; "
                 f"shards {', '.join(str(r) for r in ranges)} on {args.backend}]")
    return 0
