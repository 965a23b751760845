"""Argument parsing shared by the subcommands: one-line errors, typed, range-checked option values, and the options
several commands share (model, backend, weights, placement) with the one `backend_options()` they all build from.

Every check here is cheap (no model, no runtime): bad input is refused before anything heavy happens.
Checks that need the model's own limits (its context length) are made from its config, before its weights load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from exo_rknpu.backends.base import BACKENDS
from exo_rknpu.errors import UsageError
from exo_rknpu.model.quant import check_mode


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `exo-rknpu: error: ...`, instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"exo-rknpu: error: {message} (see: {self.prog} --help)\n")


def _number(kind: type, name: str, ok: Callable[[float], bool]) -> Callable[[str], int | float]:
    """An argparse `type` that parses `kind` and refuses values for which `ok` is false, naming what is allowed."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                             f"expected {name}") from None
        if not ok(value) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {name}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: 0 < v < float("inf"))
non_negative_float = _number(float, "a finite number >= 0", lambda v: 0 <= v < float("inf"))
probability = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)

unit_interval = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by commands that run a model."""
    p.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file, or alias (default: smollm2-135m)")
    p.add_argument("--backend", default="onnx", choices=sorted(BACKENDS), metavar="BACKEND",
                   help=f"where slices run: {' | '.join(sorted(BACKENDS))} (default: onnx)")
    p.add_argument("--backend-dtype", choices=["fp16", "w8a8"], default=None,
                   help="compiled dtype for npu / rknn-sim (default: fp16)")
    p.add_argument("--max-context", type=positive_int, default=None, metavar="N",
                   help="largest context bucket, prompt and new tokens together; at most the model's limit "
                        "(default: 2048 or the model's limit if smaller)")
    p.add_argument("--layers-per-slice", type=positive_int, default=None, metavar="N",
                   help="layers per graph, >= 1 (default: the whole shard in one graph; npu/rknn-sim: 1)")
    add_weights_arg(p)
    add_placement_args(p)


def add_placement_args(p: argparse.ArgumentParser, explain: bool = True) -> None:
    """--placement (runtime/placement.py), --emulate and --explain."""
    p.add_argument("--placement", type=placement_plan, default=None, metavar="PLAN",
                   help="which device runs which layers and blocks: RANGE=DEVICE[,...][;BLOCK=DEVICE,...] or a .toml "
                        "file, e.g. 0-9=npu0,10-19=npu1,20-29=npu2 or 0-29=npu;attention=cpu (docs/placement.md); "
                        "npu devices need a usable NPU here, or --emulate")
    p.add_argument("--emulate", action="store_true",
                   help="with --placement: where the NPU cannot run, run its slices on the CPU backend (the same "
                        "graphs; every output says emulated). Without it such a plan is refused with the reason")
    if explain:
        p.add_argument("--explain", action="store_true",
                       help="print the resolved placement (every slice, its device, buckets, estimated weight bytes) and exit")


def placement_plan(value: str):
    """argparse type for --placement: a malformed plan is a one-line usage error before anything loads."""
    from exo_rknpu.runtime.placement import PlacementError, PlacementPlan

    try:
        return PlacementPlan.load(value)
    except PlacementError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def explain_placement(src, ranges, args: argparse.Namespace, buckets) -> list:
    """The resolved plan of every shard (raises PlacementError for an impossible one); printed with --explain."""
    from exo_rknpu.runtime.placement import resolve_placement

    dtype = getattr(args, "backend_dtype", None) or "fp16"
    plans = [resolve_placement(src, r, args.placement, args.backend, buckets, args.layers_per_slice, args.weights, dtype,
                               emulate=args.emulate) for r in ranges]
    if getattr(args, "explain", False):
        for plan in plans:
            print(plan.explain())
    return plans


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    """--weights: the form linear weights are kept in (model/quant.py)."""
    p.add_argument("--weights", default="auto", type=weights_mode,
                   help="auto | int4 | int8 | fp32: form of the linear weights (default auto: GGUF Q4_0/Q8_0 as "
                        "stored, everything else int8; fp32 widens everything)")


def weights_mode(value: str) -> str:
    """argparse type for --weights: an unknown value is a one-line usage error before anything loads."""
    try:
        return check_mode(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def backend_options(args: argparse.Namespace, src=None) -> dict:
    """Backend options from add_model_args' flags (rknn-sim w8a8 also gets the default w8a8 recipe bound to `src`)."""
    dtype = getattr(args, "backend_dtype", None)
    if dtype and args.backend not in ("npu", "rknn-sim"):
        raise UsageError(f"--backend-dtype applies to npu and rknn-sim, not {args.backend}")
    opts: dict = {"dtype": dtype} if dtype else {}
    if args.backend == "rknn-sim" and dtype == "w8a8":
        from exo_rknpu.rknn.recipe import RecipeBuild

        opts["recipe_build"] = RecipeBuild(src if src is not None else args.model)  # compile's default w8a8 recipe
    return opts


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
