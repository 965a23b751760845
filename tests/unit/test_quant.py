"""Compact weights (model/quant.py) against gguf's own quantizer and dequantizer, an implementation independent
of ours: which GGUF blocks map without loss, and how far everything that is re-quantized may move."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from exo_rknpu.model.quant import (NATIVE_FORMATS, check_mode, from_gguf_blocks, native_format, native_parts,
                                   q4_1_exact, q4_1_to_int4, q4_1_to_int8, q6_k_exact, quantize, quantize_q8_0, split8,
                                   split8_input)
from exo_rknpu.native import Q6_K, pack, reference
from exo_rknpu.native.kernel import qmatmul
from tiny_models import quantize_q6_k

RNG = np.random.default_rng(3)
W = RNG.standard_normal((96, 256)).astype(np.float32)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_q4_0_and_q8_0_blocks_map_onto_matmulnbits_without_loss(qtype):
    raw = gguf_quantize(W, GT[qtype])
    reference = gguf_dequantize(raw, GT[qtype])
    q = from_gguf_blocks(raw, qtype, W.shape)
    assert q.bits == (4 if qtype == "Q4_0" else 8) and q.block_size == 32 and q.zero_points is None
    assert np.array_equal(q.dequantize(), reference)


def test_gathered_rows_equal_gguf_rows_exactly():
    raw = gguf_quantize(W, GT.Q8_0)
    reference = gguf_dequantize(raw, GT.Q8_0)
    ids = np.array([[3, 0, 95, 3]])
    assert np.array_equal(from_gguf_blocks(raw, "Q8_0", W.shape).rows(ids), reference[ids])


def _q4_1_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = W.copy()
    w[0, :32] = np.abs(w[0, :32]) + 2.0  # a block of one sign: its zero point cannot be rounded into range
    w[1, 32:64] = 0.0  # a constant block: d == 0
    raw = gguf_quantize(w, GT.Q4_1)
    d = raw.reshape(96, 8, 20)[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # Q4_1's own steps
    return raw, gguf_dequantize(raw, GT.Q4_1), np.repeat(d, 32, axis=1)


def test_q4_1_kept_exactly_as_codes_scale_and_min():
    raw, reference, _ = _q4_1_case()
    q = q4_1_exact(raw, reference.shape)
    assert q.bits == 4 and q.mins is not None and q.kernel == "fp32"
    assert np.array_equal(q.dequantize(), reference)  # d*q + m, blocks of one sign and d == 0 included
    # MatMulNBits' default zero point 8 (its faster kernel): the mins carry m + 8d
    assert q.zero_points is None


def test_q4_1_keeps_zero_point_0_where_m_plus_8d_is_not_a_float32():
    raw, _, _ = _q4_1_case()
    block = raw.reshape(96, 8, 20)
    block[5, 3, 0:2] = np.array([2.0**-24], np.float16).view(np.uint8)  # d: fp16's smallest step
    block[5, 3, 2:4] = np.array([1024.0], np.float16).view(np.uint8)  # m: 1024 + 8 * 2**-24 needs 32 bits
    q = q4_1_exact(raw, (96, 256))
    assert q.zero_points is not None and np.array_equal(q.dequantize(), gguf_dequantize(raw, GT.Q4_1))


def test_q6_k_kept_exactly_as_8_bit_blocks_of_16():
    raw, _ = _q6_k_rows()
    raw[0, 192] = 0  # a sub-block with scale 0
    reference = gguf_dequantize(raw, GT.Q6_K)
    q = q6_k_exact(raw, (8, 512), lambda rows: gguf_dequantize(rows, GT.Q6_K))
    assert q.bits == 8 and q.block_size == 16 and q.kernel == "fp32"
    assert np.array_equal(q.dequantize(), reference)


def _widen64(q) -> np.ndarray:
    """A QTensor's values in float64, decoded from its arrays by the module docstring's rule (not q.dequantize)."""
    n, nb = q.scales.shape
    codes = (np.stack([q.blocks & 15, q.blocks >> 4], axis=-1).reshape(n, nb, -1) if q.bits == 4 else q.blocks)
    if q.zero_points is None:
        zp = np.full((n, nb), 2 ** (q.bits - 1))
    elif q.bits == 4:
        zp = np.stack([q.zero_points & 15, q.zero_points >> 4], axis=-1).reshape(n, -1)[:, :nb]
    else:
        zp = q.zero_points
    return ((codes - zp[..., None].astype(np.float64)) * q.scales[..., None].astype(np.float64)).reshape(n, -1)


def _q6_k_rows() -> tuple[np.ndarray, np.ndarray]:
    """Q6_K rows [8, 420] for an [8, 512] matrix and gguf's decoding of them (gguf-py cannot quantize Q6_K; any
    bytes are valid blocks: ql, qh, int8 scales, then a finite fp16 d)."""
    raw = RNG.integers(0, 256, (8, 2, 210), dtype=np.uint8)
    raw[..., 208:210] = RNG.uniform(-0.1, 0.1, (8, 2, 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(8, 420)
    return raw, gguf_dequantize(raw, GT.Q6_K)


@pytest.mark.parametrize("source, paired", [("Q8_0", False), ("auto 8-bit", True), ("Q6_K", True), ("int8", False)])
def test_8_bit_blocks_split_into_4_bit_blocks_over_k_doubled_give_the_same_product(source, paired):
    """split8: x @ W.T == split8_input(x) @ W4.T, exact in real arithmetic (checked in float64). Zero points that are
    multiples of 17 (auto's own 8-bit blocks, Q6_K) keep one scale per source block; others (Q8_0's 128) two."""
    if source == "Q6_K":
        raw, _ = _q6_k_rows()
        w8 = q6_k_exact(raw, (8, 512), lambda rows: gguf_dequantize(rows, GT.Q6_K))
    elif source == "Q8_0":
        w8 = from_gguf_blocks(gguf_quantize(W, GT.Q8_0), "Q8_0", W.shape, kernel="fp32")
    else:
        w8 = quantize(W, 8, 64, kernel="fp32" if source == "auto 8-bit" else "int8")
    w4 = split8(w8)
    n, k = w8.shape
    assert w4.bits == 4 and w4.shape == (n, 2 * k)
    assert (w4.block_size, w4.n_blocks) == ((2 * w8.block_size, w8.n_blocks) if paired else (w8.block_size, 2 * w8.n_blocks))
    x = RNG.standard_normal((3, k))
    exact = x @ _widen64(w8).T
    assert np.allclose(split8_input(x, w8.block_size) @ _widen64(w4).T, exact, rtol=0, atol=1e-9)


def test_split8_input_is_each_block_times_16_then_itself():
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    assert split8_input(x, 4).tolist() == [[0, 16, 32, 48, 0, 1, 2, 3, 64, 80, 96, 112, 4, 5, 6, 7]]


def test_auto_8_bit_blocks_keep_every_value_within_half_a_step_with_zero_points_pairable_by_split8():
    w = W.copy()
    w[0, :64] = np.abs(w[0, :64]) + 1.0  # all positive: zero point 0
    w[1, :64] = -np.abs(w[1, :64]) - 1.0  # all negative: zero point 255
    w[2, :64] = 0.0  # constant block
    q = quantize(w, 8, 64, kernel="fp32")
    assert not np.any(q.zero_points % 17)
    step = np.repeat(q.scales, 64, axis=1)
    assert np.all(np.abs(q.dequantize() - w) <= step / 2 + 1e-7)
    lo, hi = np.minimum(w.reshape(96, 4, 64).min(-1), 0), np.maximum(w.reshape(96, 4, 64).max(-1), 0)
    assert np.all(q.scales <= np.maximum((hi - lo) / 238, 0) * (1 + 1e-6) + (hi == lo))  # at most 255/238 of the rule's
    assert q.dequantize()[2, :64].tolist() == [0.0] * 64


def test_q4_1_to_int8_moves_each_value_by_at_most_a_34th_of_its_step():
    raw, reference, step = _q4_1_case()
    q = q4_1_to_int8(raw, reference.shape)
    err = np.abs(q.dequantize() - reference)
    ordinary = np.ones_like(err, bool)
    ordinary[0, :32] = ordinary[1, 32:64] = False  # re-quantized blocks: within one int8 step instead
    assert np.all(err[ordinary] <= step[ordinary] / 34 + 1e-6)
    assert np.all(err <= np.repeat(q.scales, 32, axis=1) + 1e-6)
    assert q.dequantize()[1, 32:64].tolist() == [0.0] * 32


def test_q4_1_to_int4_keeps_codes_and_scales_and_moves_each_value_by_at_most_half_a_step():
    raw, reference, _ = _q4_1_case()
    q = q4_1_to_int4(raw, reference.shape)
    step = np.repeat(q.scales, 32, axis=1)
    assert np.all(np.abs(q.dequantize() - reference) <= step / 2 + 1e-6)
    assert q.dequantize()[1, 32:64].tolist() == [0.0] * 32


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_error_is_bounded_by_one_step_of_its_block(bits):
    q = quantize(W, bits)
    step = np.repeat(q.scales, 32, axis=1)
    err = np.abs(q.dequantize() - W)
    assert np.all(err <= step + 1e-7)
    assert np.mean(err <= step / 2 + 1e-7) > 0.99  # only values clipped at the top code exceed half a step


def test_matmul_with_compact_weights_matches_float_reference_within_quantization_error():
    x = RNG.standard_normal((5, 256)).astype(np.float32)
    for bits, bound in ((8, 1e-4), (4, 2e-2)):
        q = quantize(W, bits)
        ref = x @ W.T
        err = np.mean((q.matmul_t(x) - ref) ** 2) / np.mean(ref**2)
        assert err < bound, (bits, err)


def test_unknown_weights_mode_is_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown weights mode 'int3'; choose one of auto, int4, int8, fp32"):
        check_mode("int3")


def test_float_sources_become_the_q8_0_blocks_llama_cpp_writes():
    """--weights native quantizes float sources to GGUF Q8_0 by llama.cpp's recipe: the same codes and fp16 scales
    as gguf-py's quantizer (bit-exact with ggml-quants.c), ties at .5 and all-zero blocks included."""
    w = W.copy()
    w[0, :32] = 0.0  # amax 0: scale 0, codes 0
    w[1, :32] = np.arange(32, dtype=np.float32) - 15.5  # every x/d lands near a .5 tie
    q = quantize_q8_0(w)
    reference = from_gguf_blocks(gguf_quantize(w, GT.Q8_0), "Q8_0", w.shape, kernel="native")
    assert q.kernel == "native" and q.bits == 8 and q.block_size == 32 and q.zero_points is None
    assert np.array_equal(q.blocks, reference.blocks) and np.array_equal(q.scales, reference.scales)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_native_parts_hand_the_kernel_the_gguf_values(qtype):
    """What the native kernel's packer gets (fmt, fp16 d and m, codes) stands for exactly the stored values."""
    raw = gguf_quantize(W, GT[qtype])
    q = q4_1_exact(raw, W.shape, kernel="native") if qtype == "Q4_1" else from_gguf_blocks(raw, qtype, W.shape, "native")
    p = native_parts(q)
    assert p.fmt == NATIVE_FORMATS[qtype] and p.d.dtype == np.float16 and p.codes.shape == W.shape
    ints = p.codes.astype(np.float64) - (8 if qtype == "Q4_0" else 0)
    values = ints * np.repeat(p.d.astype(np.float64), 32, axis=1)
    if p.m is not None:
        values += np.repeat(p.m.astype(np.float64), 32, axis=1)
    assert np.array_equal(values.astype(np.float32), gguf_dequantize(raw, GT[qtype]))


@pytest.mark.parametrize("source", ["llama.cpp-style", "any bytes"])
def test_native_q6_k_parts_are_exactly_the_gguf_values(source):
    """GGUF Q6_K reaches the native kernel as stored: its parts (fp16 d, int8 sc, 6-bit codes) stand for exactly
    gguf-py's decoding of the bytes, and the kernel on their packed form equals the reference on those parts, bit for
    bit. llama.cpp's quantizer puts sc = -128 at each super-block's largest scale (its d and sc come back as stored);
    arbitrary bytes need another split of d*sc, which is found and exact too."""
    raw = quantize_q6_k(RNG.standard_normal((8, 512)).astype(np.float32)) if source == "llama.cpp-style" \
        else _q6_k_rows()[0]
    raw[1, 192:208] = 0  # a super-block's scales all 0
    stored = gguf_dequantize(raw, GT.Q6_K)
    q = q6_k_exact(raw, (8, 512), lambda rows: gguf_dequantize(rows, GT.Q6_K), kernel="native")
    p = native_parts(q)
    assert p.fmt == native_format(q) == NATIVE_FORMATS["Q6_K"] == Q6_K
    assert p.d.dtype == np.float16 and p.sc.dtype == np.int8 and p.codes.max() <= 63
    assert np.array_equal(reference.dequantize(Q6_K, p.d, p.codes, sc=p.sc).astype(np.float32), stored)
    if source == "llama.cpp-style":
        blocks = raw.reshape(8, 2, 210)
        d = blocks[..., 208:210].copy().view(np.float16)[..., 0]
        d[1, 0] = 0  # the all-zero super-block is d = 0
        assert np.array_equal(p.d, d)
        assert np.array_equal(p.sc, blocks[..., 192:208].view(np.int8).reshape(8, 32))
    x = RNG.standard_normal((3, 512)).astype(np.float32)
    y = qmatmul(Q6_K, pack(Q6_K, p.d, p.codes, sc=p.sc), 8, 512, x)
    assert np.array_equal(y, reference.qmatmul(Q6_K, p.d, p.codes, x, sc=p.sc))


def test_native_q6_k_refuses_scales_that_are_not_fp16_times_int8():
    raw, _ = _q6_k_rows()
    q = q6_k_exact(raw, (8, 512), lambda rows: gguf_dequantize(rows, GT.Q6_K), kernel="native")
    scales = q.scales.copy()
    scales[2, 3] = np.float32(1 / 3)  # no fp16 d and int8 sc make it
    with pytest.raises(ValueError, match="not fp16 d times int8 sc"):
        native_parts(replace(q, scales=scales))


def test_native_parts_refuse_what_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="not a native QTensor"):
        native_parts(quantize(W, 8, 32, kernel="fp32"))
    with pytest.raises(ValueError, match="takes fp16 scales"):
        native_parts(replace(quantize(W, 8, 32), kernel="native"))  # float32 scales
    q4 = from_gguf_blocks(gguf_quantize(W, GT.Q4_0), "Q4_0", W.shape, "native")
    with pytest.raises(ValueError, match="not a Q4_0, Q4_1, Q8_0 or Q6_K"):  # a zero point the kernel has no format for
        native_parts(replace(q4, zero_points=np.full((96, 4), 0x55, np.uint8)))
