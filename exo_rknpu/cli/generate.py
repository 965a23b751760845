"""`exo-rknpu generate`: run a model, optionally split into shards handing hidden states across like a ring."""

from __future__ import annotations

import argparse
import json
import time
import uuid

from exo_rknpu.cli.options import (add_model_args, check_emulate, cli_backend_options, non_negative_float, non_negative_int,
                                   positive_int, probability, progress, shard_plans)
from exo_rknpu.errors import ArtifactError, UsageError, name_model
from exo_rknpu.model.base import LayerRange, parse_split
from exo_rknpu.model.chat import render_chat
from exo_rknpu.model.loader import load_header, load_tokenizer
from exo_rknpu.model.tokenizer import IncrementalDecoder, encode_prompt
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing, Timings
from exo_rknpu.runtime.sampling import Sampler, SamplingParams
from exo_rknpu.runtime.placement import default_buckets, open_plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text, optionally split into shards", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message); not empty")
    p.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template")
    p.add_argument("--system", default=None, help="system message (needs --chat)")
    p.add_argument("--thinking", action="store_true",
                   help="with --chat: let Qwen3 think first (enable_thinking=True; default off, see docs/models.md)")
    p.add_argument("--split", default=None, help="layer ranges, e.g. 0-9,10-19,20-29 (default: one shard)")
    p.add_argument("--wire-dtype", choices=["float32", "float16"], default="float32", help="dtype of hidden states between shards")
    p.add_argument("--max-tokens", type=positive_int, default=64, metavar="N",
                   help="new tokens to generate at most, >= 1; prompt + N must fit the context (default: 64)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="sampling temperature, >= 0; 0 is greedy (default: 0)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="sample only from the K most likely tokens, >= 0; 0 is off (default: 0)")
    p.add_argument("--top-p", type=probability, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P, in (0, 1]; 1 is off (default: 1)")
    p.add_argument("--seed", type=non_negative_int, default=None, metavar="S",
                   help="random seed for sampling, >= 0 (default: a fresh one each run)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=run)


def check_prompt_fits(prompt_tokens: int, max_tokens: int, max_context: int, model_limit: int) -> None:
    """Refuse, before generating, a request whose prompt plus new tokens cannot fit the largest context bucket.

    Refused up front rather than cut short: the user asked for max_tokens tokens, and a run that stops early
    would look like a complete answer. The last new token is never fed back, hence the - 1.
    """
    needed = prompt_tokens + max_tokens - 1
    if needed <= max_context:
        return
    fixes = [f"--max-tokens {max_context - prompt_tokens + 1} or fewer"] if prompt_tokens <= max_context else []
    fixes.append("a shorter prompt")
    if max_context < model_limit and needed <= model_limit:
        fixes.append(f"--max-context {min(model_limit, _next_fit(needed))} (this model allows up to {model_limit})")
    fix = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"
    raise UsageError(f"the prompt is {prompt_tokens} token(s); with --max-tokens {max_tokens} it needs {needed} positions "
                     f"but the context limit is {max_context}; use {fix}")


def _next_fit(needed: int) -> int:
    """The smallest power of two holding `needed` (context buckets double)."""
    return 1 << (needed - 1).bit_length()


def _prompt_text(args: argparse.Namespace, tok) -> str:
    """--prompt as the model reads it: with --chat, rendered by its chat template (with --system, --thinking)."""
    if not args.chat:
        return args.prompt
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    return render_chat(tok, messages, enable_thinking=args.thinking)


def check_options(args: argparse.Namespace) -> None:
    """Options that need no model, checked first: nothing is resolved, downloaded or loaded for bad input."""
    if not args.prompt:
        raise UsageError("--prompt is empty; give the text to continue")
    if args.system is not None and not args.chat:
        raise UsageError("--system is a chat message; add --chat (or drop --system)")
    if args.thinking and not args.chat:
        raise UsageError("--thinking is a chat template option; add --chat (or drop --thinking)")
    check_emulate(args)


def run(args: argparse.Namespace) -> int:
    """Plan every shard, open them, generate, print (text as it comes, or one JSON object)."""
    check_options(args)
    t0 = time.perf_counter()
    src = resolve_model(args.model, progress=progress)
    header = load_header(src)  # config (and a GGUF file's header, parsed once for the whole start): no weights yet
    margs = header.args
    ranges = parse_split(args.split, margs.num_hidden_layers) if args.split else [LayerRange.full(margs.num_hidden_layers)]
    buckets = default_buckets(margs, args.max_context)
    plans = shard_plans(margs, ranges, args, buckets)
    if args.explain:
        return 0
    emulated = any(p.emulated for p in plans)
    if emulated:
        progress("placement emulated: no NPU here, NPU slices run on the CPU backend (no NPU speed is claimed)")
    opts = cli_backend_options(args, src)  # one recipe build: calibrated and smoothed once, shared by the shards
    tok = load_tokenizer(header)
    sampler = Sampler(SamplingParams(args.temperature, args.top_k, args.top_p, args.seed))
    prompt_ids = encode_prompt(tok, _prompt_text(args, tok))
    check_prompt_fits(len(prompt_ids), args.max_tokens, buckets.max_context, margs.max_position_embeddings)
    try:
        shards = [open_plan(header, plan, backend_options=opts, progress=progress) for plan in plans]
    except ArtifactError as e:
        raise ArtifactError(name_model(str(e), args.model)) from e
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
    if args.json:
        print(json.dumps({"text": tok.decode(new_ids), "token_ids": new_ids, "prompt_ids": prompt_ids, "model": src.name,
                          "backend": args.backend, "split": [str(r) for r in ranges],
                          "placement": str(args.placement) if args.placement else None, "emulated": emulated,
                          "timings": {"load_s": round(load_s, 3), **timings.to_dict()}}))
    else:
        print(decoder.flush(), flush=True)
        t = timings.to_dict()
        progress(f"[{len(new_ids)} tokens; prefill {t['prefill_s']:.3f}s; decode {t['decode_tokens_per_s']:.1f} tok/s; "
                 f"shards {', '.join(str(r) for r in ranges)} on {args.backend}"
                 + (f"; placement {args.placement}" + (" (emulated)" if emulated else "") if args.placement else "") + "]")
    return 0
