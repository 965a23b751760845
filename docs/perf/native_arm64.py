"""The native kernel on emulated aarch64: cross-compiles docs/perf/native_arm64.c for armv8.2-a+dotprod,
-mcpu=cortex-a76 (what -march=native gives on the RK3588's big cores), plain armv8-a (all three the NEON smlal path)
and the scalar path, runs random cases under `qemu-aarch64-static -cpu cortex-a76` and compares y with
exo_rknpu.native.reference bit for bit.

    python docs/perf/native_arm64.py            # all formats, several shapes; prints one line per case
Needs `apt-get install gcc-aarch64-linux-gnu qemu-user-static`. Correctness only: emulation says nothing of speed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from exo_rknpu.native import pack, reference

HERE = Path(__file__).resolve().parent
CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64-static"
# build -> (flags, the code path it must compile); "cortex-a76" is what -march=native gives on the RK3588's big cores
TARGETS = {"armv8.2-dotprod": ("-march=armv8.2-a+dotprod", "neon"), "neon": ("-march=armv8-a", "neon"),
           "scalar": ("-march=armv8-a -DEXO_NO_SIMD", "scalar"), "cortex-a76": ("-mcpu=cortex-a76", "neon")}


def missing_tools() -> str | None:
    """Why this cannot run here, or None."""
    for tool in (CROSS_CC, QEMU):
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install gcc-aarch64-linux-gnu qemu-user-static)"
    return None


def build_driver(target: str, folder: Path) -> Path:
    """The static aarch64 driver for one build of TARGETS."""
    out = folder / f"native-arm64-{target}"
    flags = TARGETS[target][0].split() + ["-O3", "-ffp-contract=off", "-static", "-std=c11"]
    subprocess.run([CROSS_CC, *flags, "-o", str(out), str(HERE / "native_arm64.c"), "-lm"], check=True)
    return out


def run_case(driver: Path, fmt: int, d, codes, m, sc, x: np.ndarray, rows: tuple[int, int],
             folder: Path) -> tuple[str, np.ndarray]:
    """(the driver's code path, y[:, rows]) for one case, run under qemu as a Cortex-A76."""
    N, K = codes.shape
    M = x.shape[0]
    src, dst = folder / "in.bin", folder / "out.bin"
    with open(src, "wb") as f:
        f.write(np.array([fmt, N, K, M, *rows], np.int64).tobytes())
        f.write(pack(fmt, d, codes, m, sc).tobytes())
        f.write(np.ascontiguousarray(x, np.float32).tobytes())
    done = subprocess.run([QEMU, "-cpu", "cortex-a76", str(driver), str(src), str(dst)], capture_output=True,
                          text=True, check=True, timeout=600)
    return done.stdout.strip(), np.fromfile(dst, np.float32).reshape(M, rows[1] - rows[0])


def random_case(fmt: int, M: int, N: int, K: int, seed: int):
    """(d, codes, m, sc, x) of one case (Q6_K: K must be a multiple of 256; its d per 256, sc int8 per 16)."""
    rng = np.random.default_rng([fmt, M, N, K, seed])
    lo, hi = {2: (-128, 128), 3: (0, 64)}.get(fmt, (0, 16))
    codes = rng.integers(lo, hi, (N, K)).astype(np.int8 if fmt == 2 else np.uint8)
    d = (rng.standard_normal((N, K // (256 if fmt == 3 else 32))) * 0.02).astype(np.float16)
    m = (rng.standard_normal((N, K // 32)) * 0.05).astype(np.float16) if fmt == 1 else None
    sc = rng.integers(-128, 128, (N, K // 16)).astype(np.int8) if fmt == 3 else None
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, rng.integers(0, K, max(1, K // 200))] *= 40
    if fmt in (2, 3):  # extreme codes and a row all at its block max (Q8_0: integer sums above 2^24)
        codes[::3] = np.where(codes[::3] < (lo + hi) // 2, lo, hi - 1)
        x[0] = np.where(x[0] < 0, -1.0, 1.0)
    return d, codes, m, sc, x


CASES = [(M, N, K) for M in (1, 3, 6, 8) for N, K in ((17, 64), (45, 576), (200, 2048))]


def check(target: str, cases=CASES, folder: Path | None = None) -> list[str]:
    """One line per case; raises AssertionError on the first mismatch."""
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = folder or Path(tmp)
        driver = build_driver(target, work)
        for fmt in (0, 1, 2, 3):
            for M, N, K in cases:
                K = -(-K // 256) * 256 if fmt == 3 else K  # Q6_K: whole super-blocks
                d, codes, m, sc, x = random_case(fmt, M, N, K, 0)
                rows = (16, N) if N > 32 else (0, N)
                isa, y = run_case(driver, fmt, d, codes, m, sc, x, rows, work)
                part = slice(rows[0], rows[1])
                ref = reference.qmatmul(fmt, d[part], codes[part], x, None if m is None else m[part],
                                        None if sc is None else sc[part])
                same = np.array_equal(y.view(np.uint32), ref.view(np.uint32))
                lines.append(f"{target:13s} path={isa:13s} fmt={fmt} M={M} N={N} K={K} rows={rows}: "
                             f"{'identical bits' if same else 'DIFFERENT'}")
                assert isa == TARGETS[target][1], lines[-1]
                assert same, lines[-1]
    return lines


def main() -> int:
    why = missing_tools()
    if why:
        print(why)
        return 1
    for target in TARGETS:
        for line in check(target):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
