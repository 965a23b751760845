"""Compact (block-quantized) weight matrices: the form linear weights travel in from the loader to the backend.

A `QTensor` is an [N, K] matrix (HF [out, in] layout) cut into blocks of `block_size` along K. Each block has a
float32 scale and an integer zero point; an element is `(code - zero_point) * scale`. The byte layout is exactly
the one onnxruntime's `MatMulNBits` (com.microsoft) takes, so the onnx backend hands the arrays over as they are:

  blocks       uint8 [N, K/block, block*bits/8]   4-bit codes two per byte, element 2j in the low nibble of byte j
  scales       float32 [N, K/block]
  zero_points  uint8 [N, ceil(K/block/2)] (4-bit, two per byte, low nibble first) or [N, K/block] (8-bit);
               None means the default 2**(bits-1) (8 for 4-bit, 128 for 8-bit)
  mins         float32 [N, K/block] or None: a per-block offset, element = (code - zero_point) * scale + min
               (GGUF Q4_1 kept exactly; the onnx export adds min . blocksum(x) to MatMulNBits' result)

GGUF Q4_0 and Q8_0 blocks map onto this without re-quantizing (`from_gguf_blocks`): Q4_0 is value = d*(q-8) with
q in 0..15, i.e. scale d, zero point 8 (only the nibble order is rearranged); Q8_0 is value = d*q with q an int8,
i.e. code q+128 with zero point 128; Q4_1 is value = d*q + m, i.e. scale d, zero point 8, min m + 8d (`q4_1_exact`).
The fp16 scale d widens to float32 exactly. Everything else is quantized from float32 by `quantize` (asymmetric
min/max per block, zero always representable; see its docstring).

`QTensor.kernel` says which kernel multiplies it (KERNELS): onnxruntime's MatMulNBits with activations quantized
to int8 inside it ("int8": fast, rounded differently per instruction set) or kept float32 ("fp32": the same answers
on every CPU up to float32 summation order), or our own QMatMul ("native", exo_rknpu.native: activations quantized
to int16 by one fixed recipe, integer dot products, a fixed float order -- the same bits on every CPU). A native
QTensor holds GGUF's Q4_0, Q4_1 or Q8_0 blocks of 32 with fp16 scales, or GGUF Q6_K as `q6_k_exact`'s 8-bit blocks
of 16 (scales d*sc, exact; `native_parts` splits them back into fp16 d and int8 sc) and hands them to the kernel's
packer; it is still a valid MatMulNBits-layout QTensor, so every other path (dequantize, rows) reads it as usual.

What each `--weights` mode makes of each source is decided in one place, `form_for` (+ `GGUFFile.linear` for GGUF's
exact block types); docs/design.md#weights has the table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

BLOCK = 32  # block size for quantizing at load (GGUF's block size; MatMulNBits accepts 16..256, powers of two)
# auto's 8-bit blocks quantized from float sources: 64 elements per float32 scale keeps them at 1.07 bytes per weight
# in onnxruntime's form (split8, one scale and a 4-bit zero point per block), against 1.14 at 32; an 8-bit step of
# a 64-element block is still about 1/255 of its range
AUTO_BLOCK = 64
# auto's largest form in onnxruntime: GGUF Q8_0's blocks of 32 split into two 4-bit blocks (split8: zero point 128 is
# not a multiple of 17): a byte of codes, two float32 scales and two 4-bit zero points per 32 weights. GGUF Q6_K's
# blocks of 16 (one scale and zero point each in split8) take the same, 1.28 per weight; float sources 1.07
AUTO_MAX_BYTES_PER_WEIGHT = 1 + 2 * 4 / 32 + 2 * 0.5 / 32
WEIGHT_MODES = ("auto", "int4", "int8", "fp32", "native")
DEFAULT_WEIGHTS = "native"  # the --weights mode when none is asked (CLI, engine, bench, loader, placement)
KERNELS = ("int8", "fp32", "native")  # QTensor.kernel: what multiplies it (module docstring)
_ROWS_PER_STEP = 1 << 22  # elements widened at a time (16 MB of float32): bounds temporaries while converting


@dataclass
class QTensor:
    """A block-quantized [N, K] matrix in MatMulNBits layout (see the module docstring)."""

    bits: int
    shape: tuple[int, int]
    block_size: int
    blocks: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None
    origin: str = ""  # how it was made, e.g. "Q4_0 (exact)" or "Q4_1 -> int4": for messages and docs
    kernel: str = "int8"  # what multiplies it: one of KERNELS (module docstring)
    mins: np.ndarray | None = None  # float32 [N, n_blocks]: element = (code - zero_point) * scale + min

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r} is not one of {KERNELS}")
        n, k = self.shape
        nb = -(-k // self.block_size)
        if self.blocks.shape != (n, nb, self.block_size * self.bits // 8) or self.blocks.dtype != np.uint8:
            raise ValueError(f"blocks {self.blocks.shape} {self.blocks.dtype} do not fit a {self.bits}-bit {self.shape} matrix")
        if self.scales.shape != (n, nb) or self.scales.dtype != np.float32:
            raise ValueError(f"scales {self.scales.shape} {self.scales.dtype} do not fit {self.shape} in blocks of {self.block_size}")
        if self.mins is not None and (self.mins.shape != self.scales.shape or self.mins.dtype != np.float32):
            raise ValueError(f"mins {self.mins.shape} {self.mins.dtype} do not fit scales {self.scales.shape}")

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.blocks, self.scales, self.zero_points, self.mins) if a is not None)

    @property
    def dtype(self) -> str:
        return f"int{self.bits}"

    def _zeros(self, rows: slice | np.ndarray) -> np.ndarray:
        """Zero points of `rows` as float32 [r, n_blocks]."""
        nb = self.n_blocks
        if self.zero_points is None:
            count = len(np.arange(self.shape[0])[rows])
            return np.full((count, nb), 2 ** (self.bits - 1), np.float32)
        z = self.zero_points[rows]
        if self.bits == 4:
            z = np.stack([z & 15, z >> 4], axis=-1).reshape(z.shape[0], -1)[:, :nb]
        return z.astype(np.float32)

    def _widen(self, rows: slice | np.ndarray) -> np.ndarray:
        b = self.blocks[rows]
        codes = np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], b.shape[1], -1) if self.bits == 4 else b
        w = (codes.astype(np.float32) - self._zeros(rows)[..., None]) * self.scales[rows][..., None]
        if self.mins is not None:
            w += self.mins[rows][..., None]
        return w.reshape(b.shape[0], -1)[:, : self.shape[1]]

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 [N, K] (a new array)."""
        out = np.empty(self.shape, np.float32)
        step = max(1, _ROWS_PER_STEP // max(1, self.shape[1]))
        for r in range(0, self.shape[0], step):
            out[r : r + step] = self._widen(slice(r, r + step))
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (any integer shape) as float32 [*ids.shape, K]: only the gathered rows are widened."""
        ids = np.asarray(ids)
        return self._widen(ids.reshape(-1)).reshape(*ids.shape, self.shape[1])

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x [..., K], widening at most a bounded number of rows of W at a time."""
        out = np.empty((*x.shape[:-1], self.shape[0]), np.float32)
        step = max(1, _ROWS_PER_STEP // max(1, self.shape[1]))
        for r in range(0, self.shape[0], step):
            out[..., r : r + step] = x @ self._widen(slice(r, r + step)).T
        return out

    def take_rows(self, order: np.ndarray) -> "QTensor":
        """The same matrix with its rows reordered (a permutation of output features; codes are untouched)."""
        zp = None if self.zero_points is None else self.zero_points[order]
        mins = None if self.mins is None else self.mins[order]
        return replace(self, blocks=self.blocks[order], scales=self.scales[order], zero_points=zp, mins=mins)

    def hash_into(self, h: "hashlib._Hash") -> None:
        """Feed layout and bytes to a hash without copying them."""
        h.update(f"q{self.bits}:{self.shape}:{self.block_size}:{self.zero_points is not None}:"
                 f"{self.kernel}:{self.mins is not None};".encode())
        for a in (self.blocks, self.scales, self.zero_points, self.mins):
            if a is not None:
                h.update(memoryview(np.ascontiguousarray(a)).cast("B"))


Weight = np.ndarray | QTensor  # a linear weight: float32 [N, K] or compact


def pack4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 [..., 2m] -> bytes [..., m], element 2j in the low nibble of byte j."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def quantize(w: np.ndarray, bits: int, block_size: int = BLOCK, origin: str = "", kernel: str = "int8") -> QTensor:
    """Quantize float [N, K] (K a multiple of block_size) to `bits` (4 or 8), per block of `block_size` along K.

    Rule: lo = min(block, 0), hi = max(block, 0), scale = (hi - lo) / (2**bits - 1), zero point = round(-lo/scale),
    code = clip(round(x/scale) + zero point). Including 0 in the range keeps an exact zero and avoids a zero scale
    for constant blocks (an all-zero block gets scale 1). Error per element <= scale (<= scale/2 unless clipped at
    the top code). 8-bit blocks multiplied with float32 activations (kernel "fp32", run as `split8`) take zero points that are
    multiples of 17 instead (`_pairable_scales`), which lets split8 keep one scale per block: each element within
    half a step, the step at most 255/238 of the rule's.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    nb, qmax = k // block_size, 2**bits - 1
    pairable = bits == 8 and kernel == "fp32"
    blocks = np.empty((n, nb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zeros = np.empty((n, nb), np.uint8)
    step = max(1, _ROWS_PER_STEP // k)
    for r in range(0, n, step):
        x = np.asarray(w[r : r + step], dtype=np.float32).reshape(-1, nb, block_size)
        lo = np.minimum(x.min(axis=-1), 0.0)
        hi = np.maximum(x.max(axis=-1), 0.0)
        if pairable:
            s, z = _pairable_scales(lo, hi)
        else:
            s = ((hi - lo) / qmax).astype(np.float32)
            s[s == 0] = 1.0
            z = np.clip(np.rint(-lo / s), 0, qmax)
        q = np.clip(np.rint(x / s[..., None]) + z[..., None], 0, qmax).astype(np.uint8)
        blocks[r : r + step] = pack4(q) if bits == 4 else q
        scales[r : r + step] = s
        zeros[r : r + step] = z
    zp = pack4(np.pad(zeros, ((0, 0), (0, nb % 2)))) if bits == 4 else zeros
    return QTensor(bits, (n, k), block_size, blocks, scales, zp, origin or f"float -> int{bits}", kernel)


def _pairable_scales(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit scales and zero points z = 17zz (zz 0..15) for blocks spanning [lo, hi] (lo <= 0 <= hi): of the two
    multiples of 17 around the rule's zero point, the one giving the smaller scale that still covers the block
    (lo >= -z.s, hi <= (255 - z).s). An all-zero block gets scale 1."""
    z0 = np.where(hi > lo, -lo / np.where(hi > lo, hi - lo, 1) * 255, 0)
    least = np.where(lo < 0, 1, 0)  # a negative value needs z > 0, a positive one z < 255
    most = np.where(hi > 0, 14, 15)
    best_s = best_z = None
    for zz in (np.floor(z0 / 17), np.ceil(z0 / 17)):
        z = np.clip(zz, least, most) * 17
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.maximum(np.where(lo < 0, -lo / z, 0), np.where(hi > 0, hi / (255 - z), 0)).astype(np.float32)
        if best_s is None:
            best_s, best_z = s, z
        else:
            better = s < best_s
            best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    best_s[best_s == 0] = 1.0
    return best_s, best_z


def from_gguf_blocks(raw: np.ndarray, qtype_name: str, shape: tuple[int, int], kernel: str = "int8") -> QTensor:
    """Q4_0 / Q8_0 rows (uint8 [N, n_blocks * block_bytes], as stored) -> QTensor without re-quantizing.

    Q4_0 block: fp16 d, 16 bytes; byte j holds element j (low nibble) and element j+16 (high nibble); value = d*(q-8).
    Q8_0 block: fp16 d, 32 int8 q; value = d*q = d*((q+128) - 128).
    `raw` may be anything that yields uint8 rows when sliced (gguf.StoredRows reads them from the file): a bounded
    number of rows is converted at a time, so no more than that of the stored bytes is resident next to the result.
    """
    n, k = shape
    if qtype_name not in ("Q4_0", "Q8_0"):
        raise ValueError(f"{qtype_name} blocks do not map onto MatMulNBits without re-quantizing")
    bits, size = (4, 18) if qtype_name == "Q4_0" else (8, 34)
    blocks = np.empty((n, k // 32, 32 * bits // 8), np.uint8)
    scales = np.empty((n, k // 32), np.float32)
    step = max(1, _ROWS_PER_STEP // max(1, k))
    for r in range(0, n, step):
        b = np.asarray(raw[r : r + step]).reshape(-1, k // 32, size)
        scales[r : r + step] = b[..., :2].copy().view(np.float16)[..., 0]
        qs = b[..., 2:]
        # Q4_0: elements 0..15 then 16..31 (low nibbles, then high), repacked two per byte in element order
        blocks[r : r + step] = pack4(np.concatenate([qs & 15, qs >> 4], axis=-1)) if bits == 4 else qs ^ np.uint8(0x80)
    return QTensor(bits, (n, k), 32, blocks, scales, None, f"{qtype_name} (exact)", kernel)


def _q4_1_parts(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 rows -> (codes uint8 [N, nb, 32] in element order, d float32 [N, nb], m float32 [N, nb]).
    Block: fp16 d, fp16 m, 16 bytes; byte j holds element j (low nibble) and j+16 (high); value = d*q + m."""
    n, k = shape
    b = raw.reshape(n, k // 32, 20)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 4:]
    return np.concatenate([qs & 15, qs >> 4], axis=-1), d, m


def _requantize_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray, z: np.ndarray, bad: np.ndarray, bits: int,
                       code_scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks flagged `bad` re-quantized from their values by `quantize`'s rule; returns (codes, scales)."""
    codes = codes * np.uint8(code_scale)
    scales = d / code_scale
    if bad.any():
        r, c = np.nonzero(bad)
        fixed = quantize(codes[r, c].astype(np.float32) * scales[r, c, None] + m[r, c, None], bits, 32)
        fixed_codes = fixed.blocks[:, 0]
        if bits == 4:
            fixed_codes = np.stack([fixed_codes & 15, fixed_codes >> 4], axis=-1).reshape(len(r), 32)
            z[r, c] = fixed.zero_points[:, 0] & 15
        else:
            z[r, c] = fixed.zero_points[:, 0]
        codes[r, c], scales[r, c] = fixed_codes, fixed.scales[:, 0]
    return codes, scales


def q4_1_to_int8(raw: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """GGUF Q4_1 rows -> int8 blocks of 32, each value within d/34 of the stored one (what --weights auto does).

    value = d*q + m is written as (d/17) * (17q - z) with z = round(-17m/d): codes 17q span 0..255 exactly and
    every element of a block moves by the same |m + d*z/17| <= d/34 (a 34th of the block's own step). MatMulNBits'
    fast kernels take integer zero points only (float ones run a dequantize-everything fallback, measured ~50x
    slower), which is why Q4_1 cannot stay 4-bit exactly. Blocks where z falls outside 0..255 (all values of one
    sign beyond the range) or d == 0 are re-quantized from their values by `quantize`'s rule.
    """
    codes, d, m = _q4_1_parts(raw, shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.rint(-17 * m / d)
    bad = ~((d > 0) & (z >= 0) & (z <= 255))
    z = np.where(bad, 0, z).astype(np.uint8)
    codes, scales = _requantize_blocks(codes, d, m, z, bad, 8, 17)
    return QTensor(8, shape, 32, codes, scales, z, "Q4_1 -> int8 (within d/34)")


def q4_1_to_int4(raw: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """GGUF Q4_1 rows -> int4 keeping each block's codes and scale (--weights int4).

    value = d*q + m = d*(q - (-m/d)); the zero point must be an integer, so z = round(-m/d) and every element of
    a block moves by the same d*|z + m/d| <= d/2 (half of the block's own step: measurably worse than int8, see
    docs/design.md). Blocks where z falls outside 0..15 or d == 0 are re-quantized from their values.
    """
    codes, d, m = _q4_1_parts(raw, shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.rint(-m / d)
    bad = ~((d > 0) & (z >= 0) & (z <= 15))
    z = np.where(bad, 0, z).astype(np.uint8)
    codes, scales = _requantize_blocks(codes, d, m, z, bad, 4, 1)
    nb = shape[1] // 32
    zp = pack4(np.pad(z, ((0, 0), (0, nb % 2))))
    return QTensor(4, shape, 32, pack4(codes), scales, zp, "Q4_1 -> int4 (codes and scales kept, zero point rounded)")


def q4_1_exact(raw: np.ndarray, shape: tuple[int, int], kernel: str = "fp32") -> QTensor:
    """GGUF Q4_1 rows -> 4-bit blocks holding exactly the stored values (what --weights auto and native do),
    multiplied with float32 activations by MatMulNBits (kernel "fp32": it takes only integer zero points at full
    speed, so the export adds mins . blocksum(x)) or by the native kernel (which takes d and m: `native_parts`).

    Codes and scale d as stored, no zero-point array (MatMulNBits' default 8: its kernel without zero points runs
    ~8 % faster) and mins m + 8d, so value = (q - 8)*d + (m + 8d) = d*q + m. That needs m + 8d exact in float32
    (fp16 m and d: true unless their exponents are far apart); a tensor where it is not keeps zero point 0 and
    mins m (value = (q - 0)*d + m). Either way the values are the stored ones, bit for bit."""
    codes, d, m = _q4_1_parts(raw, shape)
    n, nb = d.shape
    shifted = m + np.float32(8) * d
    if np.array_equal(shifted.astype(np.float64), m.astype(np.float64) + 8 * d.astype(np.float64)):
        return QTensor(4, shape, 32, pack4(codes), d, None, "Q4_1 (exact)", kernel, shifted)
    zeros = np.zeros((n, -(-nb // 2)), np.uint8)
    return QTensor(4, shape, 32, pack4(codes), d, zeros, "Q4_1 (exact)", kernel, m)


def q6_k_exact(raw: np.ndarray, shape: tuple[int, int], widen: Callable[[np.ndarray], np.ndarray],
               kernel: str = "fp32") -> QTensor:
    """GGUF Q6_K rows -> 8-bit blocks of 16 holding exactly the stored values (what --weights auto and native do),
    multiplied with float32 activations by MatMulNBits (kernel "fp32", as `split8`) or by the native kernel (its
    Q6_K format: `native_parts` gives back GGUF's d and sc).

    Q6_K: super-blocks of 256 = 16 sub-blocks of 16, value = d * sc_j * (q - 32) with q 6-bit, sc_j int8, d fp16:
    code q + 2, zero point 34, scale d*sc_j (exact in float32: 11 + 8 bits). The codes are read back from `widen` (the
    format's reference decoder, a few rows at a time) and checked to reproduce its values exactly.
    """
    n, k = shape
    nsb = k // 16
    b = raw.reshape(n, k // 256, 210)  # ql[128], qh[64], int8 scales[16], fp16 d
    scales = (b[..., 208:210].copy().view(np.float16).astype(np.float32) * b[..., 192:208].view(np.int8)).reshape(n, nsb)
    codes = np.empty((n, nsb, 16), np.uint8)
    step = max(1, _ROWS_PER_STEP // max(1, k))
    # codes q + 34 with zero point 34 = 2*17 rather than q + 32 and 32: split8 then keeps one scale per block
    for r in range(0, n, step):
        v = np.asarray(widen(np.asarray(raw[r : r + step])), np.float32).reshape(-1, nsb, 16)
        s = scales[r : r + step, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s != 0, np.rint(v / s), 0)
        if not np.array_equal(q * s, v) or q.min(initial=0) < -32 or q.max(initial=0) > 31:
            raise ValueError("Q6_K blocks do not decode as d*sc*(q-32); cannot keep them exactly")
        codes[r : r + step] = (q + 34).astype(np.uint8)
    return QTensor(8, shape, 16, codes, scales, np.full((n, nsb), 34, np.uint8), "Q6_K (exact)", kernel)


def split8(w: QTensor) -> QTensor:
    """An 8-bit QTensor as a 4-bit one over K doubled, equal in real arithmetic (for MatMulNBits' float32-activation
    kernel, which onnxruntime 1.32 has for 4-bit blocks only: 8-bit ones dequantize the whole matrix per call).

    Code c = 16h + l and zero point z = 16zh + zl give (c - z)s = (h - zh)s.16 + (l - zl)s, so x @ W.T =
    split8_input(x) @ W4.T: block j of the source (B codes) becomes 2B 4-bit codes [its high nibbles | its low
    nibbles], multiplied with [16 x_j | x_j]. 16x is exact in float32, so (h - zh)s.(16x) is the float32 product
    (h - zh)(16s).x. When every zero point is a multiple of 17 (z = 17zz, so zh = zl = zz: what `quantize` makes
    for float32 activations, and Q6_K) the 2B codes are one 4-bit block with the source's one scale and zero point:
    1 + 4.5/B bytes per weight. Otherwise (GGUF Q8_0: z = 128, zh = 8, zl = 0) they are two blocks of B, the scale
    s stored twice and zero points zh, zl: 1 + 9/B. Made a bounded number of rows at a time.
    """
    if w.bits != 8 or w.mins is not None or w.shape[1] != w.n_blocks * w.block_size:
        raise ValueError(f"split8 takes plain 8-bit blocks filling K, not {w.origin} ({w.bits}-bit {w.shape})")
    n, k = w.shape
    nb, half = w.n_blocks, w.block_size // 2
    paired = w.zero_points is not None and not np.any(w.zero_points % 17)
    blocks = np.empty((n, nb, 2 * half), np.uint8)  # per source block: [high nibbles | low nibbles], 4-bit packed
    scales = np.empty((n, nb) if paired else (n, 2 * nb), np.float32)
    zeros = np.empty((n, -(-nb // 2)) if paired else (n, nb), np.uint8)
    step = max(1, _ROWS_PER_STEP // max(1, k))
    for r in range(0, n, step):
        c = w.blocks[r : r + step]
        blocks[r : r + step, :, :half] = pack4(c >> 4)
        blocks[r : r + step, :, half:] = pack4(c & 15)
        s = w.scales[r : r + step]
        z = np.full(s.shape, 128, np.uint8) if w.zero_points is None else w.zero_points[r : r + step]
        if paired:
            scales[r : r + step] = s
            zeros[r : r + step] = pack4(np.pad(z // 17, ((0, 0), (0, nb % 2))))
        else:
            scales[r : r + step] = np.repeat(s, 2, axis=1)
            zeros[r : r + step] = pack4(np.stack([z >> 4, z & 15], axis=-1).reshape(len(z), 2 * nb))
    size = 2 * w.block_size if paired else w.block_size
    return QTensor(4, (n, 2 * k), size, blocks.reshape(n, -1, size // 2), scales, zeros,
                   f"{w.origin} as 4-bit over 2K", w.kernel)


def split8_input(x: np.ndarray, block_size: int) -> np.ndarray:
    """The input split8's 4-bit form multiplies: x [..., K] as [16 x_j | x_j] for each block j of `block_size`
    (the exporter builds the same with Reshape, Mul, Concat)."""
    xb = x.reshape(*x.shape[:-1], -1, block_size)
    return np.concatenate([xb * np.float32(16), xb], axis=-1).reshape(*x.shape[:-1], 2 * x.shape[-1])


def quantize_q8_0(w: np.ndarray, origin: str = "float -> Q8_0") -> QTensor:
    """Float [N, K] (K a multiple of 32) -> GGUF Q8_0 blocks for the native kernel, llama.cpp's recipe
    (quantize_row_q8_0_ref): per block of 32, amax = max |x|, d = amax / 127 (float32), q = roundf(x * (1 / d))
    (half away from zero, as C's roundf; 0 where amax is 0), the scale stored as fp16(d) -- the bytes llama.cpp and
    gguf-py write for the same values. Kept as code q + 128 with the default zero point 128, like a GGUF Q8_0 tensor
    (`from_gguf_blocks`). Made a bounded number of rows at a time."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"K={k} is not a multiple of {BLOCK}")
    nb = k // BLOCK
    blocks = np.empty((n, nb, BLOCK), np.uint8)
    scales = np.empty((n, nb), np.float32)
    step = max(1, _ROWS_PER_STEP // k)
    for r in range(0, n, step):
        x = np.asarray(w[r : r + step], dtype=np.float32).reshape(-1, nb, BLOCK)
        d = np.abs(x).max(axis=-1) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        a = np.abs(x * inv[..., None])  # <= 127
        whole = np.floor(a)  # roundf without adding 0.5 (which rounds 0.49999997 up): every step below is exact
        q = (np.sign(x) * (whole + np.floor(2 * (a - whole)))).astype(np.int8)
        blocks[r : r + step] = q.view(np.uint8) ^ np.uint8(0x80)
        scales[r : r + step] = d.astype(np.float16).astype(np.float32)
    return QTensor(8, (n, k), BLOCK, blocks, scales, None, origin, "native")


NATIVE_FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q6_K": 3}  # exo_rknpu.native's fmt numbers (native/pack.py)
Q6_K_SUPER = 256  # Q6_K: one fp16 d per 256 weights of a row, one int8 sc per sub-block of 16


@dataclass(frozen=True)
class NativeParts:
    """A native QTensor as the kernel's packer takes it (exo_rknpu.native.pack): fmt (NATIVE_FORMATS), per-block
    scales d and (Q4_1) offsets m, float16 [N, K/32], and the codes [N, K] in element order (uint8 0..15 for
    Q4_0/Q4_1: weight d*(q-8) or d*q + m; int8 for Q8_0: weight d*q). Q6_K: d float16 [N, K/256], sc int8
    [N, K/16], codes uint8 0..63: weight d*sc*(q-32)."""

    fmt: int
    d: np.ndarray
    codes: np.ndarray
    m: np.ndarray | None = None
    sc: np.ndarray | None = None


def _q6_k_split(scales: np.ndarray, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K's sub-block scales s = d*sc (float32 [N, K/16], q6_k_exact) -> (d float16 [N, K/256], sc int8): some fp16 d
    per super-block and int8 sc with d*sc == s exactly, so the kernel's float32 d*sc is s bit for bit. Tried per
    super-block: sc = v at its largest |s| for v = -128 (what llama.cpp's quantizer writes there), 127, -127, ... 1,
    -1; the file's own (d, sc) is among the candidates, so a Q6_K tensor always splits (only -128 is tried unless
    some super-block needs more)."""
    n, nsub = scales.shape
    sb = scales.reshape(n, nsub // 16, 16)
    if not np.isfinite(sb).all():
        raise ValueError(f"{origin}: Q6_K scales are not all finite; the native kernel cannot take them")
    big = np.take_along_axis(sb, np.abs(sb).argmax(-1)[..., None], -1)[..., 0]  # the largest |s| of each
    d = np.zeros(big.shape, np.float16)
    sc = np.zeros(sb.shape, np.int8)
    todo = np.nonzero(big != 0)  # an all-zero super-block is d = 0, sc = 0
    for v in [-128] + [x for c in range(127, 0, -1) for x in (c, -c)]:
        if not todo[0].size:
            return d, sc.reshape(n, nsub)
        s, cand = sb[todo], (big[todo] / np.float32(v)).astype(np.float32)
        q = np.rint(s / cand[:, None]).astype(np.float32)
        with np.errstate(over="ignore"):  # a candidate beyond fp16's range becomes inf: refused
            fp16 = cand.astype(np.float16).astype(np.float32) == cand
        ok = fp16 & ((q >= -128) & (q <= 127) & (cand[:, None] * q == s)).all(-1)
        d[todo[0][ok], todo[1][ok]] = cand[ok]
        sc[todo[0][ok], todo[1][ok]] = q[ok]
        todo = (todo[0][~ok], todo[1][~ok])
    if todo[0].size:
        raise ValueError(f"{origin}: scales are not fp16 d times int8 sc; not a Q6_K form the native kernel takes")
    return d, sc.reshape(n, nsub)


def _is_q6_k(w: QTensor) -> bool:
    """Whether w is q6_k_exact's form for the native kernel (8-bit blocks of 16, zero point 34, whole super-blocks)."""
    return (w.kernel == "native" and w.bits == 8 and w.block_size == 16 and w.shape[1] % Q6_K_SUPER == 0
            and w.mins is None and w.zero_points is not None and bool(np.all(w.zero_points == 34)))


def native_parts(w: QTensor, owned: bool = False) -> NativeParts:
    """The GGUF block form of a native QTensor (one made by from_gguf_blocks, q4_1_exact, q6_k_exact or
    quantize_q8_0). Q4_1's m comes back exactly: q4_1_exact stores mins = m + 8d only where that sum is exact in
    float32, so mins - 8d is m (or mins = m itself with zero point 0); Q6_K's d and sc from their exact products
    (_q6_k_split). Anything else is refused (the native kernel has no other format).
    `owned`: w is the caller's own copy (a stacked one), its Q8_0 / Q6_K blocks turned into codes in place (no second
    copy)."""
    n, k = w.shape
    if _is_q6_k(w):
        d, sc = _q6_k_split(w.scales, w.origin)
        codes = np.subtract(w.blocks, np.uint8(2), out=w.blocks if owned else None)  # q6_k_exact's q + 2 -> q
        return NativeParts(NATIVE_FORMATS["Q6_K"], d, codes.reshape(n, k), sc=sc)
    if w.kernel != "native" or w.block_size != BLOCK or k % BLOCK:
        raise ValueError(f"{w.origin} is not a native QTensor in blocks of {BLOCK}")
    d = _fp16(w.scales, w.origin, "scales")
    if w.bits == 8 and w.zero_points is None and w.mins is None:
        codes = np.bitwise_xor(w.blocks, np.uint8(0x80), out=w.blocks if owned else None)
        return NativeParts(NATIVE_FORMATS["Q8_0"], d, codes.view(np.int8).reshape(n, k))
    codes = np.stack([w.blocks & 15, w.blocks >> 4], axis=-1).reshape(n, k) if w.bits == 4 else None
    if codes is not None and w.zero_points is None and w.mins is None:
        return NativeParts(NATIVE_FORMATS["Q4_0"], d, codes)
    if codes is not None and w.mins is not None:
        zeros = w._zeros(slice(None))
        if np.all(zeros == 8):
            return NativeParts(NATIVE_FORMATS["Q4_1"], d, codes, _fp16(w.mins - np.float32(8) * w.scales, w.origin, "m"))
        if np.all(zeros == 0):
            return NativeParts(NATIVE_FORMATS["Q4_1"], d, codes, _fp16(w.mins, w.origin, "m"))
    raise ValueError(f"{w.origin} ({w.bits}-bit) is not a Q4_0, Q4_1, Q8_0 or Q6_K block form")


def native_format(w: QTensor) -> int:
    """native_parts(w).fmt, without making the parts where the block form alone decides it (8-bit blocks of 32 or
    of 16 with zero point 34, and 4-bit without mins; native_parts checks them when it packs); a Q4_1 candidate is
    checked whole."""
    if w.kernel == "native" and w.zero_points is None and w.mins is None and w.bits in (4, 8) and w.block_size == BLOCK:
        return NATIVE_FORMATS["Q8_0" if w.bits == 8 else "Q4_0"]
    if _is_q6_k(w):
        return NATIVE_FORMATS["Q6_K"]
    return native_parts(w).fmt


def _fp16(a: np.ndarray, origin: str, what: str) -> np.ndarray:
    """`a` as float16, refused unless every value is one (the native kernel's scales are GGUF's fp16 ones)."""
    h = a.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), a):
        raise ValueError(f"{origin}: the native kernel takes fp16 {what}; these are not all fp16 values")
    return h


@dataclass(frozen=True)
class Form:
    """How a linear weight is stored: `bits` (None: float32), its block size, and which kernel multiplies it
    (QTensor.kernel); `mapped_embedding`: the embedding stays in the model file and only looked-up rows are widened
    (weights.RowTable) instead of being loaded in this form."""

    bits: int | None
    block_size: int = BLOCK
    kernel: str = "int8"
    mapped_embedding: bool = False


def form_for(mode: str) -> Form:
    """The form `mode` gives a source with no exact block form (HF floats, GGUF K-quants and floats; GGUF Q4_0,
    Q4_1, Q8_0 and Q6_K keep their own blocks where the mode allows, see gguf.py). auto: 8-bit blocks of AUTO_BLOCK
    multiplied with float32 activations -- the same answers on every CPU, within half an 8-bit step of the
    source's values, at ~1.07 bytes per weight in onnxruntime -- and the embedding left in the file (its rows
    exact). native: Q8_0 blocks of 32 (quantize_q8_0) for the native kernel, the embedding left in the file."""
    return {"fp32": Form(None), "int4": Form(4), "int8": Form(8),
            "auto": Form(8, AUTO_BLOCK, "fp32", mapped_embedding=True),
            "native": Form(8, BLOCK, "native", mapped_embedding=True)}[check_mode(mode)]


def check_mode(mode: str) -> str:
    """Validate a --weights value (one-line error for anything else)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {mode!r}; choose one of {', '.join(WEIGHT_MODES)}")
    return mode


def check_available(mode: str) -> str:
    """`mode` if this machine can run it, else one clear error before anything heavy loads: native needs the native
    library, built on first use with the system C compiler (NativeUnavailableError naming the fix without one)."""
    if check_mode(mode) == "native":
        from exo_rknpu.native.build import library

        library()
    return mode


def cpu_independent(mode: str) -> bool:
    """Whether `mode` gives the same answers on every CPU: auto and fp32 compute with float32 activations
    (auto's compact blocks included); native quantizes activations by one fixed recipe and sums in a fixed order
    (its fallbacks for K-quants other than Q6_K are auto's float32 form); int4 and int8 let onnxruntime quantize
    activations to int8, whose rounding differs between instruction sets (AVX2, AVX-512 VNNI, AMX, aarch64 with or
    without i8mm)."""
    return check_mode(mode) in ("auto", "fp32", "native")


def compact(w: np.ndarray, form: Form, origin: str = "") -> Weight:
    """float [N, K] -> QTensor in `form`, or float32 if form.bits is None or K is not a multiple of its block size.
    `w` may be anything with .shape that yields float rows when sliced (read a few rows at a time)."""
    if form.bits is None or w.shape[-1] % form.block_size:
        return np.asarray(w[:], dtype=np.float32)
    if form.kernel == "native":
        return quantize_q8_0(w, origin or "float -> Q8_0")
    return quantize(w, form.bits, form.block_size, origin, form.kernel)
