"""The native kernel's arithmetic in numpy (docs/native.md), the reference its C code paths must equal bit for
bit. float32 numpy elementwise operations are IEEE single operations, done here in the kernel's order: vectorized
over rows n and m, a loop over blocks. Works on the unpacked (d, codes, m), so it also checks pack().
"""

from __future__ import annotations

import numpy as np

from exo_rknpu.native.pack import BLOCK, Q4_0, Q4_1, Q6_K, Q8_0, SUPER_BLOCK

F32_MAX = np.float32(np.finfo(np.float32).max)


def quantize_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [M, K] -> (q int16 [M, K], d float32 [M, K/32], s int32 [M, K/32]).

    Per block: d = amax / 32767, q = rint(x * (32767 / amax)); a block with a non-finite value has d = NaN and zero
    codes, a block whose 32767 / amax overflows (or amax == 0) has d = 0 and zero codes.
    """
    M, K = x.shape
    xb = x.astype(np.float32).reshape(M, K // BLOCK, BLOCK)
    a = np.abs(xb)
    finite = (a <= F32_MAX).all(axis=-1)
    amax = np.where(finite, np.where(finite[..., None], a, 0).max(axis=-1), np.float32(0)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(32767.0) / amax
        ok = finite & (amax != 0) & (inv <= F32_MAX)
        q = np.where(ok[..., None], np.rint(xb * np.where(ok, inv, 0)[..., None]), 0).astype(np.int16)
    d = np.where(ok, amax / np.float32(32767.0), np.where(finite, np.float32(0), np.float32(np.nan))).astype(np.float32)
    s = q.astype(np.int32).sum(axis=-1, dtype=np.int32)
    return q.reshape(M, K), d, s


def weight_ints(fmt: int, codes: np.ndarray) -> np.ndarray:
    """The integer weight of each code: q - 8 (Q4_0), q (Q4_1), the int8 (Q8_0), q - 32 (Q6_K)."""
    w = np.asarray(codes).astype(np.int32)
    return w - 8 if fmt == Q4_0 else w - 32 if fmt == Q6_K else w


def sub_block_scales(d: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """Q6_K's float32 scale of each sub-block of 16, s = d * sc [N, K/16]: exact (an 11-bit by an 8-bit mantissa)."""
    return np.repeat(d.astype(np.float32), SUPER_BLOCK // 16, axis=1) * sc.astype(np.float32)


def qmatmul_q6_k(d: np.ndarray, sc: np.ndarray, codes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Q6_K's y float32 [M, N] (d float16 [N, K/256], sc int8 [N, K/16], codes 0..63 [N, K]). Per block b of 32,
    the sums of its two sub-blocks apart (each |isum| <= 16 * 32 * 32767 < 2^24, so (float)isum is exact):
    acc = acc + da_b * (s_2b * (float)isum_2b + s_2b+1 * (float)isum_2b+1)."""
    q, da, _ = quantize_act(np.asarray(x, np.float32))
    w = weight_ints(Q6_K, codes)
    s = sub_block_scales(d, sc)
    acc = np.zeros((q.shape[0], w.shape[0]), np.float32)
    for b in range(w.shape[1] // BLOCK):
        part = []
        for j in (2 * b, 2 * b + 1):
            sl = slice(16 * j, 16 * j + 16)
            isum = (q[:, sl].astype(np.int64) @ w[:, sl].T.astype(np.int64)).astype(np.int32)
            part.append(s[None, :, j] * isum.astype(np.float32))
        acc = acc + da[:, b, None] * (part[0] + part[1])
    return acc


def qmatmul(fmt: int, d: np.ndarray, codes: np.ndarray, x: np.ndarray, m: np.ndarray | None = None,
            sc: np.ndarray | None = None) -> np.ndarray:
    """y float32 [M, N] = x [M, K] times the block-quantized [N, K] weights (d float16 [N, K/32], codes [N, K];
    Q6_K: d [N, K/256] and sc int8 [N, K/16], see qmatmul_q6_k)."""
    if fmt not in (Q4_0, Q4_1, Q8_0, Q6_K):
        raise ValueError(f"unknown format {fmt}")
    if fmt == Q6_K:
        return qmatmul_q6_k(d, sc, codes, x)
    q, da, sa = quantize_act(np.asarray(x, np.float32))
    w = weight_ints(fmt, codes)
    N, K = w.shape
    dw = d.astype(np.float32)  # fp16 -> float32 is exact
    mw = m.astype(np.float32) if fmt == Q4_1 else None
    acc = np.zeros((q.shape[0], N), np.float32)
    for b in range(K // BLOCK):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        isum = (q[:, sl].astype(np.int64) @ w[:, sl].T.astype(np.int64)).astype(np.int32)  # exact; |isum| < 2^31
        t = dw[None, :, b] * da[:, b, None]
        acc = acc + t * isum.astype(np.float32)  # rounds to nearest even above 2^24, as the C conversion
        if fmt == Q4_1:
            acc = acc + mw[None, :, b] * (da[:, b] * sa[:, b].astype(np.float32))[:, None]
    return acc


def dequantize(fmt: int, d: np.ndarray, codes: np.ndarray, m: np.ndarray | None = None,
               sc: np.ndarray | None = None) -> np.ndarray:
    """The float64 weights [N, K] the codes stand for (for sanity bounds, not for the kernel's bits)."""
    w = weight_ints(fmt, codes).astype(np.float64)
    if fmt == Q6_K:
        return w * np.repeat(sub_block_scales(d, sc).astype(np.float64), 16, axis=1)
    out = w * np.repeat(d.astype(np.float64), BLOCK, axis=1)
    if fmt == Q4_1:
        out += np.repeat(m.astype(np.float64), BLOCK, axis=1)
    return out


def _f32(v: float) -> np.float32:
    return np.float32(v)


def exp_nonpos(v: np.ndarray) -> np.ndarray:
    """expf.h's e^v for v <= 0 (float32 [...]): below -87 as -87, n = v / ln2 rounded by the 1.5 * 2^23 trick, the
    polynomial in r = v - n ln2 (two parts), times 2^n built in the exponent bits."""
    v = np.where(v < _f32(-87.0), _f32(-87.0), v).astype(np.float32)
    k = (v * _f32(1.44269504088896341) + _f32(12582912.0)) - _f32(12582912.0)
    r = v - k * _f32(0.693359375)
    r = r - k * _f32(-2.12194440e-4)
    z = r * r
    y = np.full_like(r, _f32(1.9875691500e-4))
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * r + _f32(c)
    y = y * z + r + _f32(1.0)
    with np.errstate(invalid="ignore"):  # (a NaN's n: its bits do not matter, y is NaN)
        n = np.where(np.isnan(k), 0, k).astype(np.int32)
    return y * ((n + 127) << 23).astype(np.int32).view(np.float32)


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """QMatMulSwiGLU's activation of the products g, u (float32, same shape): silu(g) * u = g * s * u, the sigmoid s
    from e = e^-|g| (exp_nonpos) as e / (1 + e) where g's sign bit is set, else 1 / (1 + e)."""
    e = exp_nonpos(-np.abs(g))
    s = np.where(np.signbit(g), e, _f32(1.0)) / (_f32(1.0) + e)
    return g * s * u
