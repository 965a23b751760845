"""`exo-rknpu compile`: layer-range slices -> .rknn files + manifests, through the content-addressed cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exo_rknpu.cli.options import positive_int, probability, unit_interval
from exo_rknpu.cli.report import format_cpu, slice_order, worst_cos
from exo_rknpu.errors import UsageError


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or list(values) != sorted(set(values)) or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected ascending positive integers, e.g. 1,16,64; got {text!r}")
    return values


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compile", help="compile a layer range to RKNN (.rknn) slices for the NPU",
                              description="Compile a layer range of a model to RKNN (.rknn) slices for the RK3588 NPU, "
                                          "through the content-addressed cache (slices already built are reused), "
                                          "optionally verified in the rknn-toolkit2 simulator. Needs: exo-rknpu toolkit "
                                          "install. With --agreement, measures the whole model's top-1 agreement instead.")
    p.add_argument("--model", required=True, help="model alias (e.g. smollm2-135m), HF folder or .gguf")
    p.add_argument("--layers", default=None, help="layer range A-B (inclusive), e.g. 4-5 (required unless --agreement)")
    p.add_argument("--platform", default="rk3588", choices=["rk3588"],
                   help="target SoC passed to rknn-toolkit2 (default and only one supported: rk3588)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "w8a8"],
                   help="fp16: weights and activations in float16; w8a8: int8 weights and activations, calibrated "
                        "on real activations of the model (default: fp16)")
    p.add_argument("--verify", action="store_true", help="run each new slice in the simulator on real activations vs onnxruntime")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: ~/.cache/exo-rknpu/compiled)")
    p.add_argument("--seq", type=_ints, default=None, help="seq buckets, e.g. 1,16,64")
    p.add_argument("--context", type=_ints, default=None, help="context buckets, e.g. 256,512,1024,2048")
    p.add_argument("--max-context", type=positive_int, default=None, metavar="N",
                   help="context buckets doubling from 256 up to this (default: what generate/node use, 2048 or the model's limit)")
    p.add_argument("--min-cos", type=probability, default=None, metavar="COS", help="fail --verify below this cosine (default 0.9999 for fp16, none for w8a8)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the results in full (every CPU-placed op, all figures) on the last line of stdout")
    p.add_argument("--agreement", action="store_true",
                   help="instead of compiling: greedy top-1 agreement of the whole model in the simulator (--dtype) vs "
                        "fp32 onnxruntime, teacher-forced over the held-out text, with per-layer figures")
    p.add_argument("--fp16-layers", default=None, help="with --agreement: slices kept in fp16, e.g. 0,29,head or 0-2")
    p.add_argument("--quant-policy", default=None, help="with --agreement: w8a8 hybrid policy to measure (linear | linear-fp16-down | linear-fp16-gate-down | mlp-gate-up; default: the compiler's)")
    p.add_argument("--smooth-alpha", type=unit_interval, default=None, metavar="ALPHA",
                   help="w8a8: SmoothQuant-style smoothing strength in [0, 1] (default: the compiler's, 0.7; 0 turns smoothing off)")
    p.add_argument("--quant-algorithm", default=None, choices=["normal", "mmse", "kl_divergence"],
                   help="with --agreement: rknn's activation range algorithm for w8a8 (default: normal, as the compiler)")
    p.add_argument("--agreement-seq", type=positive_int, default=64, metavar="N", help="with --agreement: tokens per call (64 = prefill chunks, 1 = decode)")
    p.add_argument("--agreement-tokens", type=positive_int, default=None, metavar="N", help="with --agreement: use only the first N held-out tokens")
    p.set_defaults(func=run)


def _smoothing(args: argparse.Namespace) -> dict:
    """--smooth-alpha as keyword arguments: absent -> the compiler's default, 0 -> off."""
    if args.smooth_alpha is None:
        return {}
    return {"smooth_alpha": args.smooth_alpha or None}


def run(args: argparse.Namespace) -> int:
    from exo_rknpu.compiler.compile import compile_range
    from exo_rknpu.slices.spec import Buckets

    if args.agreement:
        return _agreement(args)
    if not args.layers:
        raise UsageError("--layers A-B is required (or use --agreement)")
    # The runtime (generate, node) picks buckets with default_buckets; compile the same ones unless told otherwise.
    from exo_rknpu.model.loader import load_args
    from exo_rknpu.model.zoo import resolve_model
    from exo_rknpu.runtime.session import default_buckets

    d = default_buckets(load_args(resolve_model(args.model)), args.max_context)
    buckets = Buckets(seq=args.seq or d.seq, context=args.context or d.context)
    results = compile_range(args.model, args.layers, platform=args.platform, dtype=args.dtype, buckets=buckets,
                            verify=args.verify, cache_dir=args.cache, min_cos=args.min_cos, **_smoothing(args))
    built = [r for r in results if r.status == "built"]
    if not args.json:
        for r in sorted(results, key=lambda r: slice_order(r.name)):
            print(f"{r.name:<12} {r.status:<7} {r.seconds:6.1f} s  {', '.join(Path(f).name for f in r.files)}  "
                  f"min cos {worst_cos(r.verify)}  CPU-placed: {format_cpu(r.cpu_ops, r.fallbacks)}")
    if args.json:
        print(json.dumps({"model": args.model, "layers": args.layers, "dtype": args.dtype, "platform": args.platform,
                          "built": [r.name for r in built], "reused": [r.name for r in results if r.status == "reused"],
                          "slices": [r.to_dict() for r in results]}))
    return 0


def _agreement(args: argparse.Namespace) -> int:
    from exo_rknpu.compiler.agreement import measure_agreement, parse_fp16_slices
    from exo_rknpu.model.loader import load_args, resolve_model

    n = load_args(resolve_model(args.model)).num_hidden_layers
    try:
        keep = parse_fp16_slices(args.fp16_layers, n)
    except ValueError as e:
        raise UsageError(str(e)) from None
    r = measure_agreement(args.model, args.dtype, seq=args.agreement_seq, max_tokens=args.agreement_tokens, fp16_slices=keep,
                          quant_policy=args.quant_policy, quantized_algorithm=args.quant_algorithm, **_smoothing(args))
    if not args.json:
        for name, f in r["layers"].items():
            print(f"{name} [{f.pop('dtype')}]: " + " ".join(f"{k}={v:.6f}" for k, v in f.items()))
        print(f"top-1 agreement {r['top1_agreement'] * 100:.2f}% ({r['agree']}/{r['tokens']} tokens, {r['dtype']}, head {r['head_dtype']}"
              f"{', policy ' + r['quant_policy'] if r['quant_policy'] else ''}{', fp16: ' + ','.join(r['fp16_slices']) if r['fp16_slices'] else ''}); cos logits {r['cos_logits']:.6f}; "
              f"{r['builds']} builds in {r['build_seconds']:.0f} s, simulation {r['sim_seconds']:.0f} s, total {r['total_seconds']:.0f} s")
    else:
        print(json.dumps(r))
    return 0
