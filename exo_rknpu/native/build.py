"""Builds the native kernel (qmatmul.c) into a shared library in the cache, on first use.

The library is compiled for the machine that runs it (-march=native) with -ffp-contract=off (no FMA contraction:
the float order is the spec's). Its file name carries a hash of the sources, flags, compiler version and machine, so
a changed source or compiler builds anew; the file is written atomically (tmp + rename), so concurrent first uses
are safe. `isa` picks a narrower code path for tests: every build must give the same bits.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from exo_rknpu.config import Paths
from exo_rknpu.errors import NativeUnavailableError

# the kernel, the onnxruntime custom op that calls it (ort_op.c: QMatMul, the runtime's entry point) and the
# ops it registers besides: attention (attention.c: Attention) and the norms (norm.c: RMSNorm, AddRMSNorm)
SOURCES = ("qmatmul.c", "ort_op.c", "attention.c", "norm.c")
COMMON_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c11")
X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = {
    "native": ("-march=native",),
    # No SIMD intrinsics path (compilers may still auto-vectorize the scalar loops: IEEE either way).
    "scalar": ("-march=x86-64" if X86 else "-march=armv8-a", "-DEXO_NO_SIMD"),
    "avx2": ("-march=haswell",),
    "avxvnni": ("-march=haswell", "-mavxvnni"),  # AVX2 with 256-bit vpdpbusd (CPUs with AVX-VNNI, no AVX-512)
    "avx512": ("-march=x86-64-v4", "-mavx512vnni"),  # no AMX: the AVX-512 path alone, even on AMX CPUs
    # AMX-INT8 (with GFNI, as every AMX CPU has) for batched rows (Q4_0 from 4, Q4_1 / Q8_0 from 6), else AVX-512;
    # tuned as -march=native tunes on an AMX CPU (with generic tuning the AMX path ran 5-15 % slower)
    "amx": ("-march=x86-64-v4", "-mavx512vnni", "-mgfni", "-mamx-tile", "-mamx-int8", "-mtune=sapphirerapids"),
    "native-noamx": ("-march=native", "-DEXO_NO_AMX"),  # this machine's build without its AMX path (benchmarks)
    "avx512novnni": ("-march=x86-64-v4",),  # AVX-512 without VNNI (Skylake-X): vpmaddwd + vpaddd
}

X86_ONLY = frozenset({"avx2", "avxvnni", "avx512", "avx512novnni", "amx"})  # their -march values are x86-64's


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def compiler() -> list[str]:
    """The C compiler command: $CC, else cc, else clang, else gcc (NativeUnavailableError when none is found)."""
    env = os.environ.get("CC", "").strip()
    candidates = [shlex.split(env)] if env else [["cc"], ["clang"], ["gcc"]]
    for cmd in candidates:
        if cmd and shutil.which(cmd[0]):
            return cmd
    tried = env if env else "cc, clang, gcc"
    raise NativeUnavailableError(f"native kernel: no C compiler found (tried {tried}); install one: apt-get install gcc")


def _identity(cc: list[str], flags: list[str]) -> str:
    """The compiler's version and its predefined macros under these flags (the target features -march selects)."""
    try:
        ver = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=60)
        macros = subprocess.run(cc + flags + ["-E", "-dM", "-x", "c", os.devnull], capture_output=True, text=True,
                                timeout=60)
    except OSError as e:
        raise NativeUnavailableError(f"native kernel: cannot run the C compiler {cc[0]}: {e}; apt-get install gcc")
    return ver.stdout + macros.stdout


def library(isa: str = "native", cache: Path | None = None) -> Path:
    """The path of the built shared library for `isa` (a key of ISA_FLAGS), building it if needed.

    cache defaults to the exo-rknpu cache's native/ folder. Raises NativeUnavailableError when no compiler is found
    or the compiler fails (its first error line is in the message).
    """
    if isa not in ISA_FLAGS or (isa in X86_ONLY and not X86):
        raise ValueError(f"native kernel: isa {isa!r} is not one of {sorted(ISA_FLAGS)} for {platform.machine()}")
    cc = compiler()
    flags = list(COMMON_FLAGS) + list(ISA_FLAGS[isa])
    h = hashlib.sha256()
    for path in sorted(source_dir().glob("*.[ch]")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr((cc, flags, _identity(cc, flags), platform.machine())).encode())
    folder = cache if cache is not None else Paths.from_env().native
    out = folder / f"libexoqmm-{isa}-{h.hexdigest()[:16]}.so"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    # once per machine and source change, 2-40 s: said, or a first `generate` looks hung (silent when built)
    where = "this CPU" if isa == "native" else f"the {isa} code path"
    print(f"exo-rknpu: building the native kernel for {where} (once, ~30 s) ...", file=sys.stderr, flush=True)
    tmp = folder / f".{out.name}.{os.getpid()}.tmp"
    cmd = cc + flags + ["-o", str(tmp), *(str(source_dir() / name) for name in SOURCES), "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except OSError as e:
        raise NativeUnavailableError(f"native kernel: cannot run the C compiler {cc[0]}: {e}; apt-get install gcc")
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise NativeUnavailableError(f"native kernel: the C compiler failed ({' '.join(cmd[:1] + flags)}): {first}")
    os.replace(tmp, out)
    return out
