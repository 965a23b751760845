"""The native kernel's arithmetic in numpy (notes/native-spec.md), the reference its C code paths must equal bit for
bit. float32 numpy elementwise operations are IEEE single operations, done here in the kernel's order: vectorized
over rows n and m, a loop over blocks. Works on the unpacked (d, codes, m), so it also checks pack().
"""

from __future__ import annotations

import numpy as np

from exo_rknpu.native.pack import BLOCK, Q4_0, Q4_1, Q8_0

F32_MAX = np.float32(np.finfo(np.float32).max)


def quantize_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [M, K] -> (q int8 [M, K], d float32 [M, K/32], s int32 [M, K/32]).

    Per block: d = amax / 127, q = rint(x * (127 / amax)); a block with a non-finite value has d = NaN and zero codes,
    a block whose 127 / amax overflows (or amax == 0) has d = 0 and zero codes.
    """
    M, K = x.shape
    xb = x.astype(np.float32).reshape(M, K // BLOCK, BLOCK)
    a = np.abs(xb)
    finite = (a <= F32_MAX).all(axis=-1)
    amax = np.where(finite, np.where(finite[..., None], a, 0).max(axis=-1), np.float32(0)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(127.0) / amax
        ok = finite & (amax != 0) & (inv <= F32_MAX)
        q = np.where(ok[..., None], np.rint(xb * np.where(ok, inv, 0)[..., None]), 0).astype(np.int8)
    d = np.where(ok, amax / np.float32(127.0), np.where(finite, np.float32(0), np.float32(np.nan))).astype(np.float32)
    s = q.astype(np.int32).sum(axis=-1, dtype=np.int32)
    return q.reshape(M, K), d, s


def weight_ints(fmt: int, codes: np.ndarray) -> np.ndarray:
    """The integer weight of each code: q - 8 (Q4_0), q (Q4_1), the int8 (Q8_0)."""
    w = np.asarray(codes).astype(np.int32)
    return w - 8 if fmt == Q4_0 else w


def qmatmul(fmt: int, d: np.ndarray, codes: np.ndarray, x: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """y float32 [M, N] = x [M, K] times the block-quantized [N, K] weights (d float16 [N, K/32], codes [N, K])."""
    if fmt not in (Q4_0, Q4_1, Q8_0):
        raise ValueError(f"unknown format {fmt}")
    q, da, sa = quantize_act(np.asarray(x, np.float32))
    w = weight_ints(fmt, codes)
    N, K = w.shape
    dw = d.astype(np.float32)  # fp16 -> float32 is exact
    mw = m.astype(np.float32) if fmt == Q4_1 else None
    acc = np.zeros((q.shape[0], N), np.float32)
    for b in range(K // BLOCK):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        isum = q[:, sl].astype(np.int64) @ w[:, sl].T.astype(np.int64)  # exact; |isum| < 2^24
        t = dw[None, :, b] * da[:, b, None]
        acc = acc + t * isum.astype(np.float32)
        if fmt == Q4_1:
            acc = acc + mw[None, :, b] * (da[:, b] * sa[:, b].astype(np.float32))[:, None]
    return acc


def dequantize(fmt: int, d: np.ndarray, codes: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """The float64 weights [N, K] the codes stand for (for sanity bounds, not for the kernel's bits)."""
    w = weight_ints(fmt, codes).astype(np.float64)
    out = w * np.repeat(d.astype(np.float64), BLOCK, axis=1)
    if fmt == Q4_1:
        out += np.repeat(m.astype(np.float64), BLOCK, axis=1)
    return out
