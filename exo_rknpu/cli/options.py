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
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.quant import DEFAULT_WEIGHTS, check_mode
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.rknn.options import backend_options
from exo_rknpu.slices.spec import Buckets


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
    add_backend_dtype_arg(p)
    p.add_argument("--max-context", type=positive_int, default=None, metavar="N",
                   help="largest context bucket, prompt and new tokens together; at most the model's limit "
                        "(default: 2048 or the model's limit if smaller)")
    p.add_argument("--layers-per-slice", type=positive_int, default=None, metavar="N",
                   help="layers per graph, >= 1 (default: the whole shard in one graph; npu/rknn-sim: 1)")
    add_weights_arg(p)
    add_placement_args(p)


def add_backend_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--backend-dtype, the one name on every command (`node` called it --npu-dtype: kept as an alias)."""
    p.add_argument("--backend-dtype", "--npu-dtype", dest="backend_dtype", choices=["fp16", "w8a8"], default=None,
                   help="compiled dtype for npu / rknn-sim, fp16 | w8a8 (default: fp16; --npu-dtype is an old name "
                        "for it)")


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


def check_emulate(args: argparse.Namespace) -> None:
    """--emulate only means something with a plan: alone it is a one-line usage error."""
    if args.emulate and not args.placement:
        raise UsageError("--emulate runs a placement's NPU devices on the CPU; add --placement PLAN")


def placement_plan(value: str):
    """argparse type for --placement: a malformed plan is a one-line usage error before anything loads."""
    from exo_rknpu.runtime.placement import PlacementError, PlacementPlan

    try:
        return PlacementPlan.load(value)
    except PlacementError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def shard_plans(margs: ModelArgs, ranges: list[LayerRange], args: argparse.Namespace, buckets: Buckets) -> list:
    """The resolved plan of every shard (runtime/placement.py::plan_shards; no --placement: the default plan), from
    the config read once; printed with --explain. Raises PlacementError, one line, for a plan that cannot run."""
    from exo_rknpu.runtime.placement import plan_shards

    plans = plan_shards(args.placement, margs, ranges, args.backend, buckets, layers_per_slice=args.layers_per_slice,
                        weights=args.weights, npu_dtype=args.backend_dtype or "fp16", emulate=args.emulate)
    if getattr(args, "explain", False):
        for plan in plans:
            print(plan.explain())
    return plans


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    """--weights: the form linear weights are kept in (model/quant.py)."""
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, type=weights_mode,
                   help=f"native | auto | fp32 | int4 | int8: form of the linear weights (default {DEFAULT_WEIGHTS}). "
                        "native: GGUF Q4_0, Q4_1, Q8_0 and Q6_K kept exactly, float sources as Q8_0, other GGUF types "
                        "as auto; multiplied by exo-rknpu's own kernel (int16 activations, the same kernel bits on "
                        "every CPU; built once with the system C compiler). auto: compact blocks multiplied in "
                        "float32 by onnxruntime (no compiler needed, slower). fp32: everything widened (the "
                        "reference). int4/int8: onnxruntime's int8 activations, whose answers depend on the CPU")


def weights_mode(value: str) -> str:
    """argparse type for --weights: an unknown value is a one-line usage error before anything loads."""
    try:
        return check_mode(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cli_backend_options(args: argparse.Namespace, src: ModelSource | None = None) -> dict:
    """rknn/options.py::backend_options from the shared flags a command has (--backend-dtype, --threads,
    --npu-core-mask), for the model `src` (default: --model)."""
    return backend_options(args.backend, dtype=getattr(args, "backend_dtype", None), threads=getattr(args, "threads", None),
                           core_mask=getattr(args, "npu_core_mask", None),
                           model=src if src is not None else getattr(args, "model", None))



def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
