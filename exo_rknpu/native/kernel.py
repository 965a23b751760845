"""ctypes calls into the native library, for tests and benchmarks (the runtime calls it from an onnxruntime op).

Inputs are checked here, before any C call, each failure one clear line: the C code trusts its arguments.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exo_rknpu.native.build import library
from exo_rknpu.native.pack import FORMATS, ROW_GROUP, k_multiple, packed_bytes


@dataclass(frozen=True)
class Native:
    """A loaded build of the library."""

    path: Path
    lib: ctypes.CDLL

    @property
    def isa(self) -> str:
        """The code path this build compiled ("avx512vnni-amx", "avx512vnni", "avx512", "avx2-vnni", "avx2",
        "neon", "scalar")."""
        return self.lib.exo_isa().decode()


def load(isa: str = "native", cache: Path | None = None) -> Native:
    """Builds (if needed) and loads the library for `isa` (see build.library)."""
    path = library(isa, cache)
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.exo_act_bytes.argtypes, lib.exo_act_bytes.restype = [i64, i64], i64
    lib.exo_quantize_act.argtypes, lib.exo_quantize_act.restype = [ptr, i64, i64, ptr], None
    lib.exo_qmatmul_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, i64, i64]
    lib.exo_qmatmul_rows.restype = None
    lib.exo_packed_bytes.argtypes, lib.exo_packed_bytes.restype = [ctypes.c_int, i64, i64], i64
    lib.exo_isa.argtypes, lib.exo_isa.restype = [], ctypes.c_char_p
    return Native(path, lib)


def check_args(fmt: int, packed: np.ndarray, N: int, K: int, x: np.ndarray) -> None:
    """Raises ValueError (one line) unless the arguments are what exo_qmatmul_rows trusts them to be."""
    if fmt not in FORMATS.values():
        raise ValueError(f"native qmatmul: unknown format {fmt!r} (0 = Q4_0, 1 = Q4_1, 2 = Q8_0, 3 = Q6_K)")
    if N <= 0 or K <= 0 or K % k_multiple(fmt):
        raise ValueError(f"native qmatmul: N={N}, K={K}: need N > 0 and K a positive multiple of {k_multiple(fmt)}")
    want = packed_bytes(fmt, N, K)
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != want:
        got = (getattr(packed, "dtype", type(packed).__name__), getattr(packed, "shape", None))
        raise ValueError(f"native qmatmul: packed must be 1-D uint8 of {want} bytes for N={N}, K={K}, got {got}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != K:
        got = (getattr(x, "dtype", type(x).__name__), getattr(x, "shape", None))
        raise ValueError(f"native qmatmul: x must be float32 [M, {K}], got {got}")
    if x.shape[0] == 0:
        raise ValueError("native qmatmul: x has M = 0 rows")


def qmatmul(fmt: int, packed: np.ndarray, N: int, K: int, x: np.ndarray, native: Native | None = None,
            n_range: tuple[int, int] | None = None) -> np.ndarray:
    """y float32 [M, N] = x float32 [M, K] times the packed [N, K] weights, on one thread.

    n_range = (begin, end) computes only output rows begin..end-1 (begin a multiple of ROW_GROUP) and returns
    [M, end - begin], as one thread of a split call would.
    """
    check_args(fmt, packed, N, K, x)
    begin, end = n_range if n_range is not None else (0, N)
    if not (0 <= begin < end <= N) or begin % ROW_GROUP:
        raise ValueError(f"native qmatmul: n_range {begin}..{end} must lie in 0..{N}, begin a multiple of {ROW_GROUP}")
    nat = native if native is not None else load()
    x = np.ascontiguousarray(x)
    packed = np.ascontiguousarray(packed)
    M = x.shape[0]
    qa = np.empty(nat.lib.exo_act_bytes(M, K), np.uint8)
    y = np.full((M, N), np.nan, np.float32)
    nat.lib.exo_quantize_act(x.ctypes.data, M, K, qa.ctypes.data)
    nat.lib.exo_qmatmul_rows(fmt, packed.ctypes.data, N, K, qa.ctypes.data, M, y.ctypes.data, begin, end)
    return y[:, begin:end]
