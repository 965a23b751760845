"""The packed weight layout of the native kernel (documented at the top of qmatmul.c; this is its one writer).

Rows are interleaved in groups of ROW_GROUP = 16 so that one 64-byte load holds 4 consecutive k of 16 rows (one
AVX-512 vpdpbusd, two AVX2 or four NEON sdot operands); tail rows are zero padding. Codes come first (every code
block a multiple of 64 bytes), then the fp16 scales, so both are read as two sequential streams.
"""

from __future__ import annotations

import numpy as np

Q4_0, Q4_1, Q8_0 = 0, 1, 2
FORMATS = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0}
ROW_GROUP = 16  # EXO_ROW_GROUP in qmatmul.h
BLOCK = 32
_ELEMENTS_PER_STEP = 1 << 20  # weights packed at a time (bounds pack's temporaries to ~10 MB)


def _check_fmt(fmt: int) -> None:
    if fmt not in (Q4_0, Q4_1, Q8_0):
        raise ValueError(f"native kernel: unknown format {fmt!r} (0 = Q4_0, 1 = Q4_1, 2 = Q8_0)")


def _code_block(fmt: int) -> int:
    return 512 if fmt == Q8_0 else 256


def _scale_block(fmt: int) -> int:
    return 64 if fmt == Q4_1 else 32


def packed_bytes(fmt: int, N: int, K: int) -> int:
    """Size in bytes of the packed N x K matrix (K a multiple of 32)."""
    _check_fmt(fmt)
    if K <= 0 or K % BLOCK or N <= 0:
        raise ValueError(f"native kernel: shape N={N}, K={K}: need N > 0 and K a positive multiple of {BLOCK}")
    groups = -(-N // ROW_GROUP)
    return groups * (K // BLOCK) * (_code_block(fmt) + _scale_block(fmt))


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """[N, ...] -> [groups, ROW_GROUP, ...] with zero rows appended."""
    pad = groups * ROW_GROUP - a.shape[0]
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape((groups, ROW_GROUP) + a.shape[1:])


def _half(name: str, s: np.ndarray | None, N: int, nb: int) -> np.ndarray:
    """s, checked to be float16 [N, nb] (the formats' scales are fp16; a caller holding float32 converts exactly,
    model/quant.py native_parts)."""
    if not isinstance(s, np.ndarray) or s.shape != (N, nb) or s.dtype != np.float16:
        got = None if s is None else (getattr(s, "dtype", type(s).__name__), getattr(s, "shape", None))
        raise ValueError(f"native kernel: {name} must be float16 [N, K/32] = [{N}, {nb}], got {got}")
    return s


def _pack_groups(fmt: int, codes: np.ndarray, scales: list[np.ndarray], groups: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """The code bytes and scale bytes of `groups` row groups (codes [<= 16*groups, K], scales [same rows, nb])."""
    # [groups, 16 rows, nb, 32 k] -> per (g, b): [chunk, row, 4 k]
    if fmt == Q8_0:
        u = codes.astype(np.int8).view(np.uint8) ^ np.uint8(0x80)  # code + 128
        code_bytes = _grouped(u, groups).reshape(groups, ROW_GROUP, nb, 8, 4).transpose(0, 2, 3, 1, 4)
    else:
        u = _grouped(codes.astype(np.uint8), groups).reshape(groups, ROW_GROUP, nb, BLOCK)
        nib = u[..., :16] | (u[..., 16:] << 4)  # k and k + 16 share a byte
        code_bytes = nib.reshape(groups, ROW_GROUP, nb, 4, 4).transpose(0, 2, 3, 1, 4)  # g, b, chunk, row, j
    scale_bytes = np.stack([_grouped(s, groups).transpose(0, 2, 1) for s in scales], axis=2)  # g, b, which, row
    return (np.ascontiguousarray(code_bytes).reshape(-1),
            np.ascontiguousarray(scale_bytes.astype("<f2")).view(np.uint8).reshape(-1))


def pack(fmt: int, d: np.ndarray, codes: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """The packed bytes (1-D uint8, packed_bytes(fmt, N, K) long) of an N x K block-quantized matrix.

    d: float16 [N, K/32] block scales; m: float16 [N, K/32] block minimums (Q4_1 only); codes: [N, K] integers, one per weight: 0..15 for Q4_0
    (weight = d * (q - 8)) and Q4_1 (weight = d * q + m), -128..127 for Q8_0 (d * q).
    Layout per group g of 16 rows and block b of 32 k: codes in 64-byte chunks c, byte c*64 + r*4 + j holding row
    16g+r's k = 32b+4c+j (Q8_0, as code + 128) or k = 32b+4c+j (low nibble) and 32b+16+4c+j (high nibble) (Q4_*);
    after all codes, per (g, b) the 16 rows' fp16 d, then (Q4_1) their fp16 m.
    """
    _check_fmt(fmt)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"native kernel: codes must be 2-D [N, K], got shape {codes.shape}")
    N, K = codes.shape
    packed_bytes(fmt, N, K)  # validates the shape
    nb = K // BLOCK
    lo, hi = (-128, 127) if fmt == Q8_0 else (0, 15)
    if not np.issubdtype(codes.dtype, np.integer) or (codes.size and (codes.min() < lo or codes.max() > hi)):
        raise ValueError(f"native kernel: codes must be integers in {lo}..{hi} for this format")
    if fmt != Q4_1 and m is not None:
        raise ValueError("native kernel: m (block minimums) is only for Q4_1")
    scales = [_half("d", d, N, nb)] + ([_half("m", m, N, nb)] if fmt == Q4_1 else [])
    groups = -(-N // ROW_GROUP)
    out = np.empty(packed_bytes(fmt, N, K), np.uint8)
    code_size = groups * nb * _code_block(fmt)
    # a bounded number of groups at a time: the temporaries take several bytes per weight, so a 49152 x 576 head
    # packed at once cost ~250 MB on top of its source (packing is part of a slice's first start)
    step = max(1, _ELEMENTS_PER_STEP // (ROW_GROUP * K))
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        rows = slice(g0 * ROW_GROUP, g1 * ROW_GROUP)
        code_bytes, scale_bytes = _pack_groups(fmt, codes[rows], [s[rows] for s in scales], g1 - g0, nb)
        out[g0 * nb * _code_block(fmt) : g1 * nb * _code_block(fmt)] = code_bytes
        out[code_size + g0 * nb * _scale_block(fmt) : code_size + g1 * nb * _scale_block(fmt)] = scale_bytes
    return out
