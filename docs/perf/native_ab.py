"""A/B of two versions of the native kernel: another checkout's (OLD_TREE, e.g. a worktree of an earlier commit) and
this tree's, both loaded in one process and timed alternately (docs/perf/native_kernel.py's `native_call` and
`alternate`), each on its own packed copies of the same random weights, one thread.

    python docs/perf/native_ab.py OLD_TREE [--fmts Q4_0,Q4_1,Q8_0] [--stream-mb 600]

--stream-mb rotates over copies totalling about that many MB (as a decode step streams every weight); 1 calls one
matrix again and again. Shapes: K=2048,N=8192 and K=576,N=49152 at M = 1 and 8. Prints `uptime` before and after.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from native_kernel import alternate, native_call, random_weights  # noqa: E402

from exo_rknpu.native.kernel import Native, load  # noqa: E402

SHAPES = [(2048, 8192), (576, 49152)]


def load_old(tree: Path) -> tuple[Native, object]:
    """OLD_TREE's native build (compiled by its own build.py) and its pack module."""
    code = "from exo_rknpu.native.build import library; print(library('native'))"
    env = dict(os.environ, PYTHONPATH=str(tree))
    path = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                          check=True).stdout.strip()  # cwd: python -c puts the current folder first on sys.path
    lib = ctypes.CDLL(path)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.exo_act_bytes.argtypes, lib.exo_act_bytes.restype = [i64, i64], i64
    lib.exo_quantize_act.argtypes, lib.exo_quantize_act.restype = [ptr, i64, i64, ptr], None
    lib.exo_qmatmul_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, i64, i64]
    lib.exo_qmatmul_rows.restype = None
    lib.exo_isa.argtypes, lib.exo_isa.restype = [], ctypes.c_char_p
    spec = importlib.util.spec_from_file_location("old_pack", tree / "exo_rknpu" / "native" / "pack.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    return Native(Path(path), lib), pack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old_tree", type=Path)
    p.add_argument("--fmts", default="Q4_0,Q4_1,Q8_0")
    p.add_argument("--stream-mb", type=float, default=600.0)
    args = p.parse_args()
    old, old_pack = load_old(args.old_tree)
    new, new_pack = load("native"), importlib.import_module("exo_rknpu.native.pack")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"old {old.isa} ({old.path.name}), new {new.isa} ({new.path.name}); {uptime}")
    print("| fmt | K × N | M | old ms | new ms | new / old |\n|---|---|---|---|---|---|")
    for K, N in SHAPES:
        for name in args.fmts.split(","):
            fmt = new_pack.FORMATS[name]
            w = random_weights(fmt, K, N, np.random.default_rng(0))
            packs = [mod.pack(fmt, w.d, w.codes, w.m) for mod in (old_pack, new_pack)]
            copies = max(1, int(args.stream_mb * 2**20 // packs[1].nbytes))
            rotations = [[pk.copy() for _ in range(copies)] for pk in packs]
            for M in (1, 8):
                x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
                calls = [native_call(nat, fmt, rot, N, K, x) for nat, rot in zip((old, new), rotations)]
                t_old, t_new = alternate(calls, 9, max(3, copies))
                print(f"| {name} | {K} × {N} | {M} | {t_old * 1e3:.3f} | {t_new * 1e3:.3f} | {t_new / t_old:.2f} |", flush=True)
            del rotations
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
