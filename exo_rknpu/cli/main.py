"""`exo-rknpu` entry point."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import sys

from exo_rknpu import __version__
from exo_rknpu.cli.options import Parser
from exo_rknpu.errors import ExoRknpuError, UsageError

# glibc's malloc backs its heap with transparent huge pages when this tunable is set at process start (glibc 2.35+):
# onnxruntime packs the weights into that heap, and 2 MiB pages instead of 4 KiB ones spare the decode step most of
# its TLB misses (smollm2 at 1 thread: 5-8 % less CPU per step, alternating processes; docs/performance.md).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_env(environ: dict[str, str], libc: tuple[str, str]) -> dict[str, str] | None:
    """The environment to re-run this program in so that glibc's heap uses huge pages, or None when there is
    nothing to do: not glibc 2.35+, or GLIBC_TUNABLES already says how (the user's choice is kept)."""
    name, version = libc
    if name != "glibc" or tuple(int(v) for v in version.split(".")[:2] if v.isdigit()) < (2, 35):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (current, HUGE_PAGES_TUNABLE) if t)}


def rerun_with_huge_pages() -> None:
    """Replace this process by the same command with HUGE_PAGES_TUNABLE set (glibc reads tunables only at start);
    returns where it cannot (other libc, exec refused). Nothing has been read or printed yet, so nothing is lost."""
    env = huge_pages_env(dict(os.environ), platform.libc_ver()) if sys.platform == "linux" else None
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return


# Subcommand modules under exo_rknpu.cli; each defines add_parser(subparsers) and sets func=run.
SUBCOMMANDS = ["generate", "bench", "compile", "toolkit", "inspect", "doctor", "node"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="exo-rknpu", description="Layer-range LLM slices for RK3588 NPUs and CPUs, as exo nodes.")
    parser.add_argument("--version", action="version", version=f"exo-rknpu {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"exo_rknpu.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"exo_rknpu.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The program (argv None: this process's own command line, which it may re-run with huge pages first) or one
    command given as `argv` (in-process callers: tests; the process is left as it is)."""
    if argv is None:
        rerun_with_huge_pages()
    parser = build_parser()
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
