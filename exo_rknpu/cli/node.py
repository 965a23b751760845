"""`exo-rknpu node`: run this machine as a node of a legacy exo ring, with the rknpu engine.

    exo-rknpu node [--api-host HOST] [--backend numpy|onnx|rknn-sim|npu] [--model-dir DIR] -- EXO_ARGS...
    exo-rknpu node --engine tinygrad|mlx [--api-host HOST] [--memory-mb MB] -- EXO_ARGS...

`--engine tinygrad` (or mlx, on Apple silicon) runs one of exo's own engines instead, with the fixes a mixed ring
of exo-rknpu and stock nodes needs (docs/exo.md, "Mixed clusters").

Everything after `--` goes to exo unchanged (e.g. --discovery-module manual --discovery-config-path ring.json
--node-id rk1 --node-port 50051 --chatgpt-api-port 52415 --disable-tui). exo itself must be installed
beside exo-rknpu (see docs/exo.md); it is not a dependency of this package.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from exo_rknpu.backends.base import BACKENDS
from exo_rknpu.backends.board import CORE_MASKS
from exo_rknpu.cli.options import (add_backend_dtype_arg, add_placement_args, add_weights_arg, check_emulate,
                                   cli_backend_options, positive_float, positive_int)
from exo_rknpu.engine import HIDDEN_DTYPES, EngineConfig
from exo_rknpu.exo.options import API_KEY_ENV
from exo_rknpu.errors import UsageError
from exo_rknpu.runtime.requests import RequestLimits

DEFAULT_IDLE_S = 300.0  # far above a decode step or a board's long prefill; only abandoned requests get there


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run as a node of a legacy exo ring (needs exo installed)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="rknpu", choices=["rknpu", "tinygrad", "mlx"],
                   help="rknpu (default): exo-rknpu's engine; tinygrad / mlx: exo's own engine with the launcher's "
                        "fixes for a mixed ring (the --backend/--weights/... options then do not apply)")
    p.add_argument("--api-host", default="127.0.0.1",
                   help="address exo's ChatGPT API binds to (default: 127.0.0.1, this machine only; 0.0.0.0 or a LAN "
                        "address to serve other machines, see docs/exo.md 'Security')")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every API request (default: ${API_KEY_ENV} if set, "
                        "else no key)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (e.g. https://chat.example.org) allowed to call the API from a browser; "
                        "repeatable (default: none)")
    p.add_argument("--allow-node-control", action="store_true",
                   help="turn on exo's routes that change the node: POST /quit, DELETE /models/ID, POST /download, "
                        "image generation, /create_animation (default: off, answered 403)")
    p.add_argument("--backend", default="onnx", choices=sorted(BACKENDS), metavar="BACKEND",
                   help=f"where slices run: {' | '.join(sorted(BACKENDS))} (default: onnx; npu on an RK3588 with "
                        "compiled slices; rknn-sim is the x86 simulator, for verification)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="use DIR/<model_id> (HF folder or .gguf) instead of downloading, e.g. DIR/llama-3.2-1b")
    p.add_argument("--hidden-dtype", choices=HIDDEN_DTYPES, default="float32",
                   help="dtype of hidden states sent to the next node (default float32: exact; float16: half the bytes)")
    p.add_argument("--max-context", type=positive_int, default=None, metavar="N",
                   help="largest context per request, at most the model's limit (default: 2048 or the model's limit)")
    p.add_argument("--max-requests", type=positive_int, metavar="N", default=RequestLimits.max_requests,
                   help=f"concurrent requests this node serves; more are refused with HTTP 429 (default {RequestLimits.max_requests})")
    p.add_argument("--max-kv-mb", type=positive_int, metavar="MB", default=RequestLimits.max_bytes >> 20,
                   help=f"KV-cache memory reserved across live requests, MB; each reserves its cache at the largest "
                        f"context, and a request that does not fit is refused (default {RequestLimits.max_bytes >> 20})")
    p.add_argument("--request-idle-s", type=positive_float, metavar="S", default=DEFAULT_IDLE_S,
                   help=f"release a request's cache when it has not advanced for this long (abandoned; default {DEFAULT_IDLE_S:g})")
    p.add_argument("--memory-mb", type=positive_int, metavar="MB", default=None,
                   help="cap on the memory reported to exo's partitioner (default: what this node can hold, in "
                        "float16 MB of layers, printed at start; docs/exo.md §3); with --engine tinygrad|mlx: replaces "
                        "exo's own report (total RAM or VRAM), to order a mixed ring")
    p.add_argument("--layers-per-slice", type=positive_int, default=None, metavar="N",
                   help="layers per graph, >= 1 (default: the whole shard in one graph; npu/rknn-sim: 1)")
    p.add_argument("--logits", choices=["all", "last"], default="all",
                   help="last shard returns logits for every position (all, exo's contract) or only the last one "
                        "(last: exo samples only that row; saves the head's work and memory on long prompts)")
    add_backend_dtype_arg(p)
    p.add_argument("--npu-core-mask", default=None, choices=list(CORE_MASKS), metavar="MASK",
                   help=f"npu backend: NPU cores, {' | '.join(CORE_MASKS)} (default: auto)")
    p.add_argument("--thinking", action="store_true",
                   help="chat prompts let Qwen3 think first (enable_thinking=True; default off, see docs/models.md)")
    add_weights_arg(p)
    add_placement_args(p, explain=False)
    p.add_argument("exo_args", nargs=argparse.REMAINDER, help="-- then exo's own arguments")
    p.set_defaults(func=run)


def build_options(args: argparse.Namespace):
    from exo_rknpu.exo.options import NodeOptions
    engine = EngineConfig(
        backend=args.backend,
        hidden_dtype=args.hidden_dtype,
        limits=RequestLimits(max_requests=args.max_requests, max_bytes=args.max_kv_mb << 20,
                             idle_seconds=args.request_idle_s),
        max_context=args.max_context,
        layers_per_slice=args.layers_per_slice,
        logits=args.logits,
        weights=args.weights,
        placement=str(args.placement) if args.placement else None,
        emulate=args.emulate,
        backend_options=cli_backend_options(args),
    )
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    return NodeOptions(engine=engine, model_dir=args.model_dir, api_host=args.api_host, memory_mb=args.memory_mb,
                       enable_thinking=args.thinking, api_key=api_key, cors_origins=tuple(args.cors_origin),
                       allow_node_control=args.allow_node_control,
                       stock_engine=None if args.engine == "rknpu" else args.engine)


def run(args: argparse.Namespace) -> int:
    from exo_rknpu.exo import exo_importable

    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key, or leave the option out for no key")
    for origin in args.cors_origin:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise UsageError(f"--cors-origin {origin!r} is not an origin; give scheme://host[:port], e.g. "
                             "https://chat.example.org")

    if args.model_dir is not None and not args.model_dir.expanduser().is_dir():
        raise UsageError(f"--model-dir {args.model_dir} is not a folder; give the folder that holds <model_id> "
                         "subfolders (or .gguf files), or leave it out to let exo download")
    check_emulate(args)
    ok, why = exo_importable()
    if not ok:
        print(f"exo-rknpu: error: {why}", file=sys.stderr)
        return 2
    from exo_rknpu.engine import check_npu
    from exo_rknpu.exo.launcher import exo_argv, run_node

    if args.engine != "rknpu":
        from exo_rknpu.exo.stock_engines import check_engine_importable

        why = check_engine_importable(args.engine)
        if why is not None:
            print(f"exo-rknpu: error: {why}", file=sys.stderr)
            return 2
    else:
        check_npu(build_options(args).engine)  # an NPU that cannot run here is refused now, not at the first request

    try:
        exo_argv(args.exo_args, args.engine)
    except ValueError as e:
        print(f"exo-rknpu: error: {e}", file=sys.stderr)
        return 2
    return run_node(build_options(args), args.exo_args)
