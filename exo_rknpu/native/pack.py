"""The packed weight layout of the native kernel (documented at the top of qmatmul.c; this is its one writer).

Rows are interleaved in groups of ROW_GROUP = 16 so that one 32-byte unit holds 2 consecutive k of 16 rows (widened
to 16-bit words: one AVX-512 vpdpwssd operand, two AVX2 vpmaddwd ones; NEON de-interleaves it with ld2); tail rows
are zero padding. Codes come first (every code block a multiple of 64 bytes), then the scales, so both are read as
two sequential streams. Q6_K keeps its 6-bit codes as Q4's nibble units plus 2-bit planes, and its scales as GGUF
does (an fp16 d per super-block of 256, an int8 sc per sub-block of 16): 0.82 bytes per weight, as the file.
"""

from __future__ import annotations

import numpy as np

Q4_0, Q4_1, Q8_0, Q6_K = 0, 1, 2, 3
FORMATS = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0, "Q6_K": Q6_K}
ROW_GROUP = 16  # EXO_ROW_GROUP in qmatmul.h
BLOCK = 32
SUPER_BLOCK = 256  # Q6_K: one fp16 d per 256 weights of a row, one int8 sc per 16 (K must be a multiple of 256)
_ELEMENTS_PER_STEP = 1 << 20  # weights packed at a time (bounds pack's temporaries to ~10 MB)


def _check_fmt(fmt: int) -> None:
    if fmt not in (Q4_0, Q4_1, Q8_0, Q6_K):
        raise ValueError(f"native kernel: unknown format {fmt!r} (0 = Q4_0, 1 = Q4_1, 2 = Q8_0, 3 = Q6_K)")


def k_multiple(fmt: int) -> int:
    """What K must be a multiple of in format fmt: 32, or 256 for Q6_K (its super-blocks)."""
    return SUPER_BLOCK if fmt == Q6_K else BLOCK


def _code_block(fmt: int) -> int:
    return {Q8_0: 512, Q6_K: 384}.get(fmt, 256)


def _scale_block(fmt: int) -> int:
    """Scale bytes per (group, block): Q6_K's 288 per super-block of 8 blocks make 36 on average."""
    return {Q4_1: 64, Q6_K: 36}.get(fmt, 32)


def packed_bytes(fmt: int, N: int, K: int) -> int:
    """Size in bytes of the packed N x K matrix (K a multiple of 32; of 256 for Q6_K)."""
    _check_fmt(fmt)
    step = k_multiple(fmt)
    if K <= 0 or K % step or N <= 0:
        raise ValueError(f"native kernel: shape N={N}, K={K}: need N > 0 and K a positive multiple of {step}")
    groups = -(-N // ROW_GROUP)
    return groups * (K // BLOCK) * (_code_block(fmt) + _scale_block(fmt))


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """[N, ...] -> [groups, ROW_GROUP, ...] with zero rows appended."""
    pad = groups * ROW_GROUP - a.shape[0]
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape((groups, ROW_GROUP) + a.shape[1:])


def _scales(name: str, s: np.ndarray | None, dtype: type, N: int, per: int, K: int) -> np.ndarray:
    """s, checked to be `dtype` [N, K/per] (the formats' scales are fp16, Q6_K's sub-block scales int8; a caller
    holding float32 converts exactly, model/quant.py native_parts)."""
    if not isinstance(s, np.ndarray) or s.shape != (N, K // per) or s.dtype != dtype:
        got = None if s is None else (getattr(s, "dtype", type(s).__name__), getattr(s, "shape", None))
        raise ValueError(f"native kernel: {name} must be {np.dtype(dtype).name} [N, K/{per}] = [{N}, {K // per}], "
                         f"got {got}")
    return s


def _q6_k_groups(codes: np.ndarray, d: np.ndarray, sc: np.ndarray, groups: int,
                 nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K's code and scale bytes of `groups` row groups (layout: qmatmul.c). A code q (0..63) is stored as the
    6-bit two's complement of q - 32, t = q ^ 32: its low 4 bits in Q4's nibble units, its high 2 bits in two 64-byte
    planes per block (k < 16, k >= 16), where the 16-bit word 2r + j holds k = 2u + j of row r in bits 2u, 2u + 1."""
    t = _grouped(codes.astype(np.uint8) ^ np.uint8(32), groups).reshape(groups, ROW_GROUP, nb, BLOCK)
    nib = (t[..., :16] & 15) | ((t[..., 16:] & 15) << 4)
    low = nib.reshape(groups, ROW_GROUP, nb, 8, 2).transpose(0, 2, 3, 1, 4).reshape(groups, nb, 256)
    top = (t >> 4).astype(np.uint16).reshape(groups, ROW_GROUP, nb, 2, 8, 2)  # g, r, b, half, u, j
    words = np.zeros((groups, ROW_GROUP, nb, 2, 2), np.uint16)
    for u in range(8):
        words |= top[:, :, :, :, u, :] << np.uint16(2 * u)
    high = np.ascontiguousarray(words.transpose(0, 2, 3, 1, 4).astype("<u2")).view(np.uint8).reshape(groups, nb, 128)
    code_bytes = np.concatenate([low, high], axis=2)
    ns = nb // 8
    d_bytes = np.ascontiguousarray(_grouped(d, groups).transpose(0, 2, 1).astype("<f2")).view(np.uint8)
    sc_bytes = _grouped(sc, groups).reshape(groups, ROW_GROUP, ns, 8, 2).transpose(0, 2, 3, 4, 1).view(np.uint8)
    scale_bytes = np.concatenate([d_bytes.reshape(groups, ns, 32), sc_bytes.reshape(groups, ns, 256)], axis=2)
    return code_bytes.reshape(-1), np.ascontiguousarray(scale_bytes).reshape(-1)


def _pack_groups(fmt: int, codes: np.ndarray, scales: list[np.ndarray], groups: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """The code bytes and scale bytes of `groups` row groups (codes [<= 16*groups, K], scales [same rows, nb])."""
    if fmt == Q6_K:
        return _q6_k_groups(codes, scales[0], scales[1], groups, nb)
    # [groups, 16 rows, nb, 32 k] -> per (g, b): [unit, row, 2 k]
    if fmt == Q8_0:
        u = codes.astype(np.int8).view(np.uint8) ^ np.uint8(0x80)  # code + 128
        code_bytes = _grouped(u, groups).reshape(groups, ROW_GROUP, nb, 16, 2).transpose(0, 2, 3, 1, 4)
    else:
        u = _grouped(codes.astype(np.uint8), groups).reshape(groups, ROW_GROUP, nb, BLOCK)
        nib = u[..., :16] | (u[..., 16:] << 4)  # k and k + 16 share a byte
        code_bytes = nib.reshape(groups, ROW_GROUP, nb, 8, 2).transpose(0, 2, 3, 1, 4)  # g, b, unit, row, j
    scale_bytes = np.stack([_grouped(s, groups).transpose(0, 2, 1) for s in scales], axis=2)  # g, b, which, row
    return (np.ascontiguousarray(code_bytes).reshape(-1),
            np.ascontiguousarray(scale_bytes.astype("<f2")).view(np.uint8).reshape(-1))


def pack(fmt: int, d: np.ndarray, codes: np.ndarray, m: np.ndarray | None = None,
         sc: np.ndarray | None = None) -> np.ndarray:
    """The packed bytes (1-D uint8, packed_bytes(fmt, N, K) long) of an N x K block-quantized matrix.

    d: float16 [N, K/32] block scales ([N, K/256] super-block scales for Q6_K); m: float16 [N, K/32] block minimums
    (Q4_1 only); sc: int8 [N, K/16] sub-block scales (Q6_K only); codes: [N, K] integers, one per weight: 0..15 for
    Q4_0 (weight = d * (q - 8)) and Q4_1 (weight = d * q + m), -128..127 for Q8_0 (d * q), 0..63 for Q6_K
    (d * sc * (q - 32), sc that of the weight's sub-block of 16).
    Layout per group g of 16 rows and block b of 32 k: codes in 32-byte units u, byte u*32 + r*2 + j holding row
    16g+r's k = 32b+2u+j (Q8_0, as code + 128) or k = 32b+2u+j (low nibble) and 32b+16+2u+j (high nibble) (Q4_*,
    and Q6_K's low 4 bits, followed by its 2-bit planes); after all codes, per (g, b) the 16 rows' fp16 d, then
    (Q4_1) their fp16 m; Q6_K per (g, super-block) the 16 rows' fp16 d, then per block their two sc (qmatmul.c).
    """
    _check_fmt(fmt)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"native kernel: codes must be 2-D [N, K], got shape {codes.shape}")
    N, K = codes.shape
    packed_bytes(fmt, N, K)  # validates the shape
    nb = K // BLOCK
    lo, hi = {Q8_0: (-128, 127), Q6_K: (0, 63)}.get(fmt, (0, 15))
    if not np.issubdtype(codes.dtype, np.integer) or (codes.size and (codes.min() < lo or codes.max() > hi)):
        raise ValueError(f"native kernel: codes must be integers in {lo}..{hi} for this format")
    if fmt != Q4_1 and m is not None:
        raise ValueError("native kernel: m (block minimums) is only for Q4_1")
    if fmt != Q6_K and sc is not None:
        raise ValueError("native kernel: sc (sub-block scales) is only for Q6_K")
    if fmt == Q6_K:
        scales = [_scales("d", d, np.float16, N, SUPER_BLOCK, K), _scales("sc", sc, np.int8, N, 16, K)]
    else:
        scales = [_scales("d", d, np.float16, N, BLOCK, K)]
        scales += [_scales("m", m, np.float16, N, BLOCK, K)] if fmt == Q4_1 else []
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
