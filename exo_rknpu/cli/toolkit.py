"""`exo-rknpu toolkit install|status`: the rknn-toolkit2 environment the compiler runs in."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("toolkit", help="install or check the rknn-toolkit2 environment (needed by compile)",
                              description=__doc__)
    p.add_argument("action", choices=["install", "status"],
                   help="install: create the rknn-toolkit2 venv (once; needs PyPI); status: check the existing one")
    p.add_argument("--force", action="store_true", help="reinstall even if a working environment exists")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exo_rknpu.rknn import toolkit

    log = (lambda m: print(m, file=sys.stderr, flush=True))
    if args.action == "install":
        st = toolkit.install(force=args.force, log=log)
    else:
        st = toolkit.status(probe=True)
    if args.json:
        print(json.dumps(st.to_dict()))
    elif st.ok:
        print(f"toolkit OK at {st.path}: " + ", ".join(f"{k} {v}" for k, v in st.versions.items()))
    else:
        print(f"toolkit not usable: {st.problem}")
    return 0 if st.ok else 1
