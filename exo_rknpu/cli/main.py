"""`exo-rknpu` entry point."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from exo_rknpu import __version__
from exo_rknpu.cli.options import Parser
from exo_rknpu.errors import ExoRknpuError, UsageError

# Subcommand modules under exo_rknpu.cli; each defines add_parser(subparsers) and sets func=run.
SUBCOMMANDS = ["generate", "bench", "compile", "toolkit", "inspect", "doctor", "node"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. `command`: a subcommand named on the command line; only its module is imported
    (each imports what it runs: `node` the engine and asyncio, `bench` the harness), else every one (for help)."""
    parser = Parser(prog="exo-rknpu", description="Layer-range LLM slices for RK3588 NPUs and CPUs, as exo nodes.")
    parser.add_argument("--version", action="version", version=f"exo-rknpu {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [command] if command in SUBCOMMANDS else SUBCOMMANDS:
        try:
            module = importlib.import_module(f"exo_rknpu.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"exo_rknpu.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the subcommand is the first word that is not an option (the top-level options take no value)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ExoRknpuError as e:
        print(f"exo-rknpu: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print("exo-rknpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
