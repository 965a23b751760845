"""`exo-rknpu node`: run this machine as a node of a legacy exo ring, with the rknpu engine.

    exo-rknpu node [--api-host HOST] [--backend numpy|onnx|npu] [--model-dir DIR] -- EXO_ARGS...

Everything after `--` goes to exo unchanged (e.g. --discovery-module manual --discovery-config-path ring.json
--node-id rk1 --node-port 50051 --chatgpt-api-port 52415 --disable-tui). exo itself must be installed
beside exo-rknpu (see docs/exo.md); it is not a dependency of this package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exo_rknpu.engine import HIDDEN_DTYPES, EngineConfig
from exo_rknpu.runtime.requests import RequestLimits

DEFAULT_IDLE_S = 300.0  # far above a decode step or a board's long prefill; only abandoned requests get there


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run as a node of a legacy exo ring (needs exo installed)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api-host", default="0.0.0.0", help="address exo's ChatGPT API binds to (default: 0.0.0.0, as exo)")
    p.add_argument("--backend", default="onnx", help="numpy | onnx | npu (default: onnx; npu on an RK3588 with compiled slices)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="use DIR/<model_id> (HF folder or .gguf) instead of downloading, e.g. DIR/llama-3.2-1b")
    p.add_argument("--hidden-dtype", choices=HIDDEN_DTYPES, default="float32",
                   help="dtype of hidden states sent to the next node (default float32: exact; float16: half the bytes)")
    p.add_argument("--max-context", type=int, default=None, help="largest context per request (default: 2048 or the model's limit)")
    p.add_argument("--max-requests", type=int, default=RequestLimits.max_requests,
                   help=f"concurrent requests this node serves; more are refused with HTTP 429 (default {RequestLimits.max_requests})")
    p.add_argument("--max-kv-mb", type=int, default=RequestLimits.max_bytes >> 20,
                   help=f"KV-cache memory reserved across live requests, MB; each reserves its cache at the largest "
                        f"context, and a request that does not fit is refused (default {RequestLimits.max_bytes >> 20})")
    p.add_argument("--request-idle-s", type=float, default=DEFAULT_IDLE_S,
                   help=f"release a request's cache when it has not advanced for this long (abandoned; default {DEFAULT_IDLE_S:g})")
    p.add_argument("--memory-mb", type=int, default=None,
                   help="cap on the memory reported to exo's partitioner (default: total RAM minus the KV budget and "
                        "the backend's reserve; docs/exo.md §3)")
    p.add_argument("--layers-per-slice", type=int, default=None, help="layers per graph (default: the whole shard in one graph)")
    p.add_argument("--logits", choices=["all", "last"], default="all",
                   help="last shard returns logits for every position (all, exo's contract) or only the last one "
                        "(last: exo samples only that row; saves the head's work and memory on long prompts)")
    p.add_argument("--npu-dtype", default="fp16", help="npu backend: which compiled slices to use, fp16 | w8a8 (as compiled)")
    p.add_argument("--npu-core-mask", default="auto", help="npu backend: NPU cores, auto | 0 | 1 | 2 | 0_1 | 0_1_2 | all")
    p.add_argument("exo_args", nargs=argparse.REMAINDER, help="-- then exo's own arguments")
    p.set_defaults(func=run)


def build_options(args: argparse.Namespace):
    from exo_rknpu.exo.options import NodeOptions

    if args.max_requests < 1 or args.max_kv_mb < 1 or args.request_idle_s <= 0:
        raise SystemExit("exo-rknpu node: --max-requests and --max-kv-mb must be at least 1, --request-idle-s above 0")
    engine = EngineConfig(
        backend=args.backend,
        hidden_dtype=args.hidden_dtype,
        limits=RequestLimits(max_requests=args.max_requests, max_bytes=args.max_kv_mb << 20,
                             idle_seconds=args.request_idle_s),
        max_context=args.max_context,
        layers_per_slice=args.layers_per_slice,
        logits=args.logits,
        backend_options={"dtype": args.npu_dtype, "core_mask": args.npu_core_mask} if args.backend == "npu" else {},
    )
    return NodeOptions(engine=engine, model_dir=args.model_dir, api_host=args.api_host, memory_mb=args.memory_mb)


def run(args: argparse.Namespace) -> int:
    from exo_rknpu.backends.base import BACKENDS
    from exo_rknpu.exo import exo_importable

    if args.backend not in BACKENDS:
        print(f"exo-rknpu node: unknown backend {args.backend!r}; known: {', '.join(sorted(BACKENDS))}", file=sys.stderr)
        return 2
    ok, why = exo_importable()
    if not ok:
        print(f"exo-rknpu node: {why}", file=sys.stderr)
        return 2
    from exo_rknpu.exo.launcher import exo_argv, run_node

    try:
        exo_argv(args.exo_args)
    except ValueError as e:
        print(f"exo-rknpu node: {e}", file=sys.stderr)
        return 2
    return run_node(build_options(args), args.exo_args)
