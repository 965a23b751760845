"""`exo-rknpu compile`: layer-range slices -> .rknn files + manifests, through the content-addressed cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exo_rknpu.slices.recipe import ALGORITHMS, NAMED_RECIPES, POLICIES, QuantRecipe, named_recipe
from exo_rknpu.cli.options import placement_plan, positive_int, probability, unit_interval
from exo_rknpu.cli.report import format_cpu, slice_order, verified_buckets, worst_cos
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
    p.add_argument("--placement", type=placement_plan, default=None, metavar="PLAN",
                   help="compile exactly the slices this placement puts on an NPU (docs/placement.md), e.g. "
                        "'0-29=npu;attention=cpu'; --layers then defaults to the whole model")
    p.add_argument("--explain", action="store_true", help="with --placement: print the resolved plan and exit")
    p.add_argument("--verify", action="store_true", help="run each new slice in the simulator on real activations vs onnxruntime")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: ~/.cache/exo-rknpu/compiled)")
    p.add_argument("--seq", type=_ints, default=None, help="seq buckets, e.g. 1,16,64")
    p.add_argument("--context", type=_ints, default=None, help="context buckets, e.g. 256,512,1024,2048")
    p.add_argument("--batch", type=_ints, default=None,
                   help="decode batch buckets (requests per call), e.g. 2,4,8 (default: 4, the runtime's for the NPU form; none for w8a8 and qwen3, which have no batch graphs: asking is refused); 1: none")
    p.add_argument("--max-context", type=positive_int, default=None, metavar="N",
                   help="context buckets doubling from 256 up to this (default: what generate/node use, 2048 or the model's limit)")
    p.add_argument("--strict", action="store_true",
                   help="refuse (and do not cache) any slice with an op on the CPU or a compiler error in any bucket")
    p.add_argument("--min-cos", type=probability, default=None, metavar="COS", help="fail --verify below this cosine (default 0.9999 for fp16, none for w8a8)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the results in full (every CPU-placed op, all figures) on the last line of stdout")
    p.add_argument("--agreement", action="store_true",
                   help="instead of compiling: greedy top-1 agreement of the whole model in the simulator (--dtype) vs "
                        "fp32 onnxruntime, teacher-forced over the held-out text, with per-layer figures")
    # the w8a8 recipe (slices/recipe.py::QuantRecipe): the same flags for compiling and for --agreement
    p.add_argument("--recipe", default=None, choices=list(NAMED_RECIPES),
                   help="w8a8 recipe by name (default: default; the flags below change single fields of it): "
                        + "; ".join(f"{r.name}: {r.measured}" for r in NAMED_RECIPES.values()))
    p.add_argument("--fp16-layers", default=None, help="w8a8 recipe: slices kept in fp16, e.g. 0,29,head or 0-2 (default: the recipe's)")
    p.add_argument("--quant-policy", default=None, choices=list(POLICIES), help="w8a8 recipe: which linears are int8 (default: the recipe's)")
    p.add_argument("--smooth-alpha", type=unit_interval, default=None, metavar="ALPHA",
                   help="w8a8 recipe: SmoothQuant-style smoothing strength in [0, 1] (default: the recipe's, 0.7; 0 turns smoothing off)")
    p.add_argument("--rotation", default=None, choices=["none", "hadamard", "orthogonal"],
                   help="w8a8 recipe: rotate the residual stream (measured with --agreement only; default: the recipe's)")
    p.add_argument("--quant-algorithm", default=None, choices=list(ALGORITHMS),
                   help="w8a8 recipe: rknn's activation range algorithm (default: the recipe's)")
    p.add_argument("--calibration-text", type=Path, default=None, help="w8a8 recipe: UTF-8 text file to calibrate on (default: the project's)")
    p.add_argument("--agreement-text", type=Path, default=None, help="with --agreement: UTF-8 text file to measure on (default: the held-out text)")
    p.add_argument("--agreement-seq", type=positive_int, default=64, metavar="N", help="with --agreement: tokens per call (64 = prefill chunks, bounded by the NPU form's largest seq bucket; 1 = decode)")
    p.add_argument("--agreement-tokens", type=positive_int, default=None, metavar="N", help="with --agreement: use only the first N tokens of the text")
    p.set_defaults(func=run)


def _read_text(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag}: cannot read {path}: {e}") from None
    if not text.strip():
        raise UsageError(f"{flag}: {path} is empty")
    return text


# the recipe flags -> their argparse destinations (refused without --dtype w8a8: an fp16 build has no recipe)
RECIPE_FLAGS = {"--recipe": "recipe", "--fp16-layers": "fp16_layers", "--quant-policy": "quant_policy",
                "--smooth-alpha": "smooth_alpha", "--rotation": "rotation", "--quant-algorithm": "quant_algorithm",
                "--calibration-text": "calibration_text"}


def recipe_from_args(args: argparse.Namespace, n_layers: int) -> QuantRecipe:
    """The named w8a8 recipe (--recipe) with the recipe flags applied (a bad value exits with a one-line error)."""
    from exo_rknpu.rknn.agreement import parse_fp16_slices

    given = [flag for flag, value in RECIPE_FLAGS.items() if getattr(args, value) is not None]
    if given and args.dtype != "w8a8":
        raise UsageError(f"{given[0]} is a w8a8 recipe setting; add --dtype w8a8 (--dtype {args.dtype} has no recipe)")
    changes: dict = {}
    if args.quant_policy:
        changes["policy"] = args.quant_policy
    if args.quant_algorithm:
        changes["algorithm"] = args.quant_algorithm
    if args.smooth_alpha is not None:
        changes["smooth_alpha"] = args.smooth_alpha or None
    if args.rotation:
        changes["rotation"] = None if args.rotation == "none" else args.rotation
    text = _read_text(args.calibration_text, "--calibration-text")
    if text:
        changes["calibration_text"] = text
    try:
        if args.fp16_layers is not None:
            layers, head = parse_fp16_slices(args.fp16_layers, n_layers)
            changes.update(fp16_layers=layers, head="fp16" if head else "w8a8")
        return named_recipe(args.recipe or "default", n_layers).but(**changes)
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from exo_rknpu.rknn.compile import compile_range
    from exo_rknpu.slices.spec import Buckets, npu_buckets

    if args.agreement:
        return _agreement(args)
    if args.explain and not args.placement:
        raise UsageError("--explain shows a placement; add --placement PLAN")
    if not args.layers and not args.placement:
        raise UsageError("--layers A-B is required (or use --agreement, or --placement)")
    # The runtime (generate, node) picks buckets with default_buckets; compile the same ones unless told otherwise.
    from exo_rknpu.model.loader import load_args
    from exo_rknpu.model.zoo import resolve_model
    from exo_rknpu.runtime.placement import default_buckets

    margs = load_args(resolve_model(args.model))
    d = npu_buckets(default_buckets(margs, args.max_context), margs)  # as the npu backend runs them
    default_batch = () if args.dtype == "w8a8" else d.batch  # none for w8a8 (compile_range refuses any asked for)
    batch = default_batch if args.batch is None else tuple(b for b in args.batch if b > 1)
    buckets = Buckets(seq=args.seq or d.seq, context=args.context or d.context, batch=batch)
    recipe = recipe_from_args(args, margs.num_hidden_layers)  # before --explain exits: a bad recipe flag is never ignored
    placed = {}
    if args.placement:
        placed = _placed_specs(args, margs, buckets)
        if placed is None:
            return 0
    results = compile_range(args.model, args.layers, platform=args.platform, dtype=args.dtype, buckets=buckets,
                            verify=args.verify, cache_dir=args.cache, min_cos=args.min_cos, recipe=recipe,
                            strict=args.strict, **placed)
    built = [r for r in results if r.status == "built"]
    if not args.json:
        for r in sorted(results, key=lambda r: slice_order(r.name)):
            print(f"{r.name:<12} {r.status:<7} {r.seconds:6.1f} s  {', '.join(Path(f).name for f in r.files)}  "
                  f"min cos {worst_cos(r.verify)}{verified_buckets(r.verify_per_bucket)}  CPU ops: {r.cpu_count}, compiler errors: {r.error_count}  "
                  f"CPU-placed: {format_cpu(r.cpu_ops, r.fallbacks)}")
    if args.json:
        print(json.dumps({"model": args.model, "layers": args.layers, "dtype": args.dtype, "platform": args.platform,
                          "built": [r.name for r in built], "reused": [r.name for r in results if r.status == "reused"],
                          "slices": [r.to_dict() for r in results]}))
    return 0


def _placed_specs(args: argparse.Namespace, margs, buckets) -> dict | None:
    """compile --placement: the plan's NPU slices (and its cut) for compile_range; None after --explain."""
    from exo_rknpu.model.base import LayerRange
    from exo_rknpu.runtime.placement import resolve

    n = margs.num_hidden_layers
    args.layers = args.layers or f"0-{n - 1}"
    # emulate=True: compile only reads which slices the plan puts on the NPU; nothing runs here
    plan = resolve(args.placement, margs, LayerRange.parse(args.layers, n), "onnx", buckets, npu_dtype=args.dtype,
                   emulate=True)
    if args.explain:
        print(plan.explain())
        return None
    specs = plan.on_npu()
    if not specs:
        raise UsageError(f"placement {args.placement} puts no slice of layers {args.layers} on an NPU; nothing to compile")
    if args.dtype == "w8a8" and any(not s.whole for s in specs):
        raise UsageError("w8a8 compiles whole decoder layers (its smoothing and calibration are per layer); "
                         "compile a block-split placement with --dtype fp16")
    return {"specs": specs, "cut": plan.specs}


def _agreement(args: argparse.Namespace) -> int:
    from exo_rknpu.rknn.agreement import measure_agreement
    from exo_rknpu.rknn.calibration import HELDOUT_TEXT
    from exo_rknpu.model.loader import load_args, resolve_model

    n = load_args(resolve_model(args.model)).num_hidden_layers
    recipe = recipe_from_args(args, n)
    text = _read_text(args.agreement_text, "--agreement-text") or HELDOUT_TEXT
    r = measure_agreement(args.model, args.dtype, text=text, recipe=recipe, seq=args.agreement_seq, max_tokens=args.agreement_tokens)
    if not args.json:
        for name, f in r["layers"].items():
            print(f"{name} [{f.pop('dtype')}]: " + " ".join(f"{k}={v:.6f}" for k, v in f.items()))
        print(f"top-1 agreement {r['top1_agreement'] * 100:.2f}% ({r['agree']}/{r['tokens']} tokens, {r['dtype']}, head {r['head_dtype']}"
              f"{', recipe: ' + r['recipe_summary'] if r['recipe_summary'] else ''}); cos logits {r['cos_logits']:.6f}; "
              f"{r['bytes_per_token'] / 1e6:.1f} MB of weights per token; "
              f"{r['builds']} builds in {r['build_seconds']:.0f} s, simulation {r['sim_seconds']:.0f} s, total {r['total_seconds']:.0f} s")
    else:
        print(json.dumps(r))
    return 0
