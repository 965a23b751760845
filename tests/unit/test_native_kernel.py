"""The native quantized matmul (exo_rknpu/native): every build this machine can run gives exactly the bits of the
numpy reference (docs/native.md), the reference is a matmul within the int16-activation error, and bad input is
refused in Python before any C call."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.errors import NativeUnavailableError
from exo_rknpu.native import Q4_0, Q4_1, Q6_K, Q8_0, pack, packed_bytes, reference
from exo_rknpu.native.build import X86
from exo_rknpu.native.kernel import Native, load, qmatmul

PERF = Path(__file__).resolve().parents[2] / "docs" / "perf"
FMTS = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0}


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Each build and the CPU flags it needs to run here (x86); the path its exo_isa() must report.
BUILDS = {
    "scalar": (set(), "scalar"),
    "avx2": ({"avx2", "fma", "f16c"}, "avx2"),
    "avxvnni": ({"avx2", "fma", "f16c", "avx_vnni"}, "avx2-vnni"),
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "f16c"}, "avx512vnni"),
    "avx512novnni": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "f16c"}, "avx512"),
    "amx": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "f16c", "gfni", "amx_tile",
             "amx_int8"},
            "avx512vnni-amx"),
    "native": (set(), None),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Native]:
    """The builds this machine can run, compiled into a fresh cache."""
    cache = tmp_path_factory.mktemp("native")
    have = cpu_flags()
    out = {}
    for isa, (needs, _) in BUILDS.items():
        if isa in ("avx2", "avxvnni", "avx512", "avx512novnni", "amx") and not X86 or not needs <= have:
            continue
        out[isa] = load(isa, cache)
    return out


def build(builds: dict[str, Native], isa: str) -> Native:
    if isa not in builds:
        pytest.skip(f"this CPU cannot run the {isa} build (needs {sorted(BUILDS[isa][0])})")
    return builds[isa]


def random_matrix(fmt: int, N: int, K: int, rng: np.random.Generator):
    """Random codes over the format's whole range and fp16 scales of realistic size (some negative)."""
    lo, hi = (-128, 128) if fmt == Q8_0 else (0, 16)
    codes = rng.integers(lo, hi, (N, K)).astype(np.int8 if fmt == Q8_0 else np.uint8)
    d = (rng.standard_normal((N, K // 32)) * 0.02).astype(np.float16)
    m = (rng.standard_normal((N, K // 32)) * 0.05).astype(np.float16) if fmt == Q4_1 else None
    return d, codes, m


def random_q6_k(N: int, K: int, rng: np.random.Generator):
    """Q6_K: fp16 d per 256 (some negative, one super-block 0), int8 sc per 16 over their whole range, codes 0..63."""
    d = (rng.standard_normal((N, K // 256)) * 0.002).astype(np.float16)
    d[N // 2, 0] = 0
    sc = rng.integers(-128, 128, (N, K // 16)).astype(np.int8)
    codes = rng.integers(0, 64, (N, K)).astype(np.uint8)
    return d, sc, codes


def q6_k_matmul(nat: Native, d, sc, codes, x: np.ndarray, n_range=None) -> np.ndarray:
    N, K = codes.shape
    return qmatmul(Q6_K, pack(Q6_K, d, codes, sc=sc), N, K, x, native=nat, n_range=n_range)


def activations(M: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """Activations with outliers and an all-zero block, like a transformer's hidden state."""
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, rng.integers(0, K, max(1, K // 200))] *= 40
    x[0, :32] = 0
    return x


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("isa", list(BUILDS))
def test_each_build_compiles_the_code_path_it_is_named_for(builds, isa):
    nat = build(builds, isa)
    expected = BUILDS[isa][1]
    if expected is None:
        expected = ("avx512vnni-amx" if "amx" in builds else "avx512vnni" if "avx512" in builds
                    else "avx2" if "avx2" in builds else nat.isa)
    assert nat.isa == expected


@pytest.mark.parametrize("isa", list(BUILDS))
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13])  # every chunk size and tail of 4 and 8 rows
@pytest.mark.parametrize("N,K", [(1, 32), (17, 64), (45, 96), (64, 256), (33, 1024)])
def test_library_equals_the_reference_bit_for_bit(builds, isa, fmt, M, N, K):
    nat = build(builds, isa)
    rng = np.random.default_rng([FMTS[fmt], M, N, K])
    d, codes, m = random_matrix(FMTS[fmt], N, K, rng)
    x = activations(M, K, rng)
    y = qmatmul(FMTS[fmt], pack(FMTS[fmt], d, codes, m), N, K, x, native=nat)
    assert same_bits(y, reference.qmatmul(FMTS[fmt], d, codes, x, m))


@pytest.mark.parametrize("isa", list(BUILDS))
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("M,N,K,rows", [
    (1, 192, 576, None), (2, 576, 576, None), (8, 1536, 576, None),
    (3, 49152, 576, (16 * 1500, 16 * 1500 + 700)),  # a thread's slice of smollm2's head, ending mid-group
    (4, 512, 2048, None), (8, 2048, 8192, (0, 160)), (1, 2048, 8192, (1024, 2048)),
    (64, 576, 576, None),  # a prefill
])
def test_library_equals_the_reference_on_the_models_shapes(builds, isa, fmt, M, N, K, rows):
    nat = build(builds, isa)
    rng = np.random.default_rng([FMTS[fmt], M, N, K])
    begin, end = rows or (0, N)
    d, codes, m = random_matrix(FMTS[fmt], N, K, rng)
    x = activations(M, K, rng)
    y = qmatmul(FMTS[fmt], pack(FMTS[fmt], d, codes, m), N, K, x, native=nat, n_range=(begin, end))
    ref = reference.qmatmul(FMTS[fmt], d[begin:end], codes[begin:end], x, None if m is None else m[begin:end])
    assert same_bits(y, ref)


@pytest.mark.parametrize("isa", list(BUILDS))
def test_non_finite_activations_give_nan_rows_and_tiny_blocks_quantize_to_zero(builds, isa):
    nat = build(builds, isa)
    rng = np.random.default_rng(5)
    d, codes, m = random_matrix(Q4_1, 20, 96, rng)
    x = activations(4, 96, rng)
    x[1, 40] = np.inf
    x[2, 70] = np.nan
    x[3, 64:96] = 1e-38  # 32767 / amax overflows: the block is zero
    y = qmatmul(Q4_1, pack(Q4_1, d, codes, m), 20, 96, x, native=nat)
    assert same_bits(y, reference.qmatmul(Q4_1, d, codes, x, m))
    assert np.isnan(y[1:3]).all() and np.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("fmt", list(FMTS))
def test_the_reference_is_a_matmul_within_the_int16_activation_error(fmt):
    """|reference - float64 matmul| <= sum_k |w_k| * (d_b / 2) (rounding x to the int16 grid of its block), plus the
    float32 rounding of the accumulation: within 1e-4 of the output's largest magnitude (int8 activations were 5e-3)."""
    rng = np.random.default_rng(FMTS[fmt])
    N, K, M = 40, 512, 3
    d, codes, m = random_matrix(FMTS[fmt], N, K, rng)
    x = activations(M, K, rng)
    w = reference.dequantize(FMTS[fmt], d, codes, m)
    exact = x.astype(np.float64) @ w.T
    step = np.abs(x).reshape(M, K // 32, 32).max(-1).astype(np.float64) / 32767  # the int16 grid of each block
    bound = (np.repeat(step, 32, axis=1) / 2) @ np.abs(w).T + 1e-5 * (np.abs(x) @ np.abs(w).T)
    err = np.abs(reference.qmatmul(FMTS[fmt], d, codes, x, m) - exact)
    assert (err <= bound).all()
    assert err.max() > 0  # the activations really are quantized
    assert err.max() <= 1e-4 * np.abs(exact).max()


@pytest.mark.parametrize("isa", list(BUILDS))
def test_integer_sums_above_2_to_the_24_round_alike_in_every_build(builds, isa):
    """Extreme codes (Q8_0 -128/127, activations at the block max) give |isum| up to 32 * 32767 * 128, whose float32
    conversion rounds: every build rounds it as the reference does."""
    nat = build(builds, isa)
    rng = np.random.default_rng(12)
    N, K, M = 37, 256, 5
    d, codes, _ = random_matrix(Q8_0, N, K, rng)
    codes = np.where(rng.random((N, K)) < 0.5, -128, 127).astype(np.int8)
    x = np.where(rng.random((M, K)) < 0.5, -1.0, 1.0).astype(np.float32) * np.float32(3.7)
    x[1] = 1.0  # every code 32767: isum = 32767 * sum(w) per block
    y = qmatmul(Q8_0, pack(Q8_0, d, codes), N, K, x, native=nat)
    ref = reference.qmatmul(Q8_0, d, codes, x)
    assert same_bits(y, ref)
    q, _, _ = reference.quantize_act(x)
    isum = q[:, :32].astype(np.int64) @ codes[:, :32].T.astype(np.int64)
    assert np.abs(isum).max() > 2**24 and (isum.astype(np.float32).astype(np.int64) != isum).any()


ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1022, 0x1023, 18, 158


def test_the_amx_build_multiplies_with_tiles_where_linux_grants_them(builds):
    """From 4 rows the amx build asks Linux for AMX tile data and, granted, takes the tile path: afterwards the
    process holds the permission (ARCH_GET_XCOMP_PERM), so the bit-exact tests above ran tiles, not the fallback.
    Where Linux refuses (asked again here), the build's AVX-512 fallback was right and there is nothing to check."""
    nat = build(builds, "amx")
    rng = np.random.default_rng(3)
    d, codes, _ = random_matrix(Q4_0, 40, 96, rng)
    x = activations(4, 96, rng)
    assert same_bits(qmatmul(Q4_0, pack(Q4_0, d, codes), 40, 96, x, native=nat), reference.qmatmul(Q4_0, d, codes, x))
    libc = ctypes.CDLL(None, use_errno=True)
    perm = ctypes.c_uint64(0)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(perm)) != 0:
        pytest.skip(f"this kernel has no ARCH_GET_XCOMP_PERM (errno {ctypes.get_errno()}): AMX cannot be used")
    if not perm.value >> XFEATURE_XTILEDATA & 1:
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
            pytest.skip(f"Linux refuses AMX tile data here (errno {ctypes.get_errno()}): the build fell back to AVX-512")
        pytest.fail("Linux grants AMX tile data, but the amx build did not ask for it: its tile path never ran")


@pytest.mark.parametrize("isa", list(BUILDS))
@pytest.mark.parametrize("M", range(1, 10))
@pytest.mark.parametrize("N,K", [(1, 256), (17, 256), (45, 512), (64, 2048)])
def test_q6_k_equals_the_reference_bit_for_bit(builds, isa, M, N, K):
    nat = build(builds, isa)
    rng = np.random.default_rng([Q6_K, M, N, K])
    d, sc, codes = random_q6_k(N, K, rng)
    x = activations(M, K, rng)
    assert same_bits(q6_k_matmul(nat, d, sc, codes, x), reference.qmatmul(Q6_K, d, codes, x, sc=sc))


@pytest.mark.parametrize("isa", list(BUILDS))
def test_q6_k_extremes_and_a_threads_slice_equal_the_reference(builds, isa):
    """Codes 0 and 63, sc -128 and 127, the largest and subnormal fp16 d, activations at their block max (the
    largest sub-block sums, 16 * 32 * 32767), non-finite and tiny activation blocks; then a thread's rows of a head."""
    nat = build(builds, isa)
    rng = np.random.default_rng(63)
    N, K, M = 37, 768, 6
    d, sc, codes = random_q6_k(N, K, rng)
    codes = np.where(rng.random((N, K)) < 0.5, 0, 63).astype(np.uint8)
    sc[::2] = np.where(sc[::2] < 0, -128, 127)
    d[0], d[1], d[2] = np.float16(65504), np.float16(6e-8), np.float16(-2.0**-14)
    x = np.where(rng.random((M, K)) < 0.5, -1.0, 1.0).astype(np.float32) * np.float32(3.7)
    x[1] = 1.0
    x[3, 40], x[4, 300] = np.inf, np.nan
    x[5, 256:288] = 1e-38
    y = q6_k_matmul(nat, d, sc, codes, x)
    assert same_bits(y, reference.qmatmul(Q6_K, d, codes, x, sc=sc))
    assert np.isnan(y[3:5]).all() and np.isfinite(y[[0, 1, 2, 5]]).all()
    N, K = 16 * 40 + 5, 2048
    d, sc, codes = random_q6_k(N, K, rng)
    for M in (3, 8):  # fewer rows than AMX takes, and a batch
        x = activations(M, K, rng)
        y = q6_k_matmul(nat, d, sc, codes, x, n_range=(16 * 25, N))
        assert same_bits(y, reference.qmatmul(Q6_K, d[400:], codes[400:], x, sc=sc[400:]))


def test_q6_k_reference_is_a_matmul_within_the_int16_activation_error():
    rng = np.random.default_rng(6)
    N, K, M = 40, 512, 3
    d, sc, codes = random_q6_k(N, K, rng)
    x = activations(M, K, rng)
    w = reference.dequantize(Q6_K, d, codes, sc=sc)
    exact = x.astype(np.float64) @ w.T
    step = np.abs(x).reshape(M, K // 32, 32).max(-1).astype(np.float64) / 32767
    bound = (np.repeat(step, 32, axis=1) / 2) @ np.abs(w).T + 1e-5 * (np.abs(x) @ np.abs(w).T)
    err = np.abs(reference.qmatmul(Q6_K, d, codes, x, sc=sc) - exact)
    assert (err <= bound).all() and 0 < err.max() <= 1e-4 * np.abs(exact).max()


def test_q6_k_pack_puts_each_code_and_scale_where_the_layout_says():
    """Row 16g+r, k = 32b + 16h + 2u + j: t = q ^ 32; its low 4 bits in byte u*32 + r*2 + j of code block (g, b)
    (low nibble for h = 0), its high 2 bits at bits 2u of the 16-bit word at byte 256 + 64h + 4r + 2j; per (g,
    super-block s) 32 bytes of fp16 d, then per block 16 sc of sub-block 2(b%8) and 16 of 2(b%8)+1."""
    N, K = 20, 512
    rng = np.random.default_rng(3)
    d, sc, codes = random_q6_k(N, K, rng)
    p = pack(Q6_K, d, codes, sc=sc)
    nb, ns = K // 32, K // 256
    assert p.size == packed_bytes(Q6_K, N, K) == 2 * (nb * 384 + ns * 288)
    scales = p[2 * nb * 384:]
    for n, k in [(0, 0), (5, 17), (19, 511), (16, 300), (3, 46)]:
        g, r, b, kk = n // 16, n % 16, k // 32, k % 32
        h, u, j = kk // 16, kk % 16 // 2, kk % 2
        block = p[(g * nb + b) * 384:(g * nb + b + 1) * 384]
        low = block[u * 32 + r * 2 + j] >> (4 * h) & 15
        word = int(block[256 + 64 * h + 4 * r + 2 * j]) | int(block[256 + 64 * h + 4 * r + 2 * j + 1]) << 8
        assert (low | (word >> (2 * u) & 3) << 4) == codes[n, k] ^ 32
        sup = scales[(g * ns + b // 8) * 288:]
        assert sup[2 * r:2 * r + 2].view(np.float16)[0] == d[n, b // 8]
        assert sup[32 + (b % 8) * 32 + 16 * h + r].astype(np.int8) == sc[n, k // 16]


def test_pack_puts_each_code_where_the_layout_says():
    """Q4_0, row 16g+r, k = 32b + 2u + j: byte u*32 + r*2 + j of code block (g, b), low nibble for k%32 < 16."""
    N, K = 20, 64
    rng = np.random.default_rng(0)
    d, codes, _ = random_matrix(Q4_0, N, K, rng)
    p = pack(Q4_0, d, codes)
    nb = K // 32
    for n, k in [(0, 0), (5, 17), (19, 63), (16, 35)]:
        g, r, b, kk = n // 16, n % 16, k // 32, k % 32
        byte = p[(g * nb + b) * 256 + (kk % 16 // 2) * 32 + r * 2 + kk % 2]
        assert (byte >> 4 if kk >= 16 else byte & 15) == codes[n, k]
        scale_at = 2 * 256 * nb + ((g * nb + b) * 16 + r) * 2
        assert p[scale_at:scale_at + 2].view(np.float16)[0] == d[n, b]
    assert p.size == packed_bytes(Q4_0, N, K) == 2 * nb * (256 + 32)


@pytest.mark.parametrize("call,message", [
    (lambda p, x: qmatmul(Q4_0, p, 20, 64, x[:, :48]), "x must be float32 \\[M, 64\\]"),
    (lambda p, x: qmatmul(Q4_0, p, 20, 48, x[:, :48]), "K a positive multiple of 32"),
    (lambda p, x: qmatmul(Q4_0, p[:-1], 20, 64, x), "packed must be 1-D uint8 of 1152 bytes"),
    (lambda p, x: qmatmul(Q8_0, p, 20, 64, x), "packed must be 1-D uint8 of 2176 bytes"),
    (lambda p, x: qmatmul(Q4_0, p, 20, 64, x[:0]), "M = 0 rows"),
    (lambda p, x: qmatmul(Q4_0, p, 20, 64, x.astype(np.float64)), "x must be float32"),
    (lambda p, x: qmatmul(7, p, 20, 64, x), "unknown format 7"),
    (lambda p, x: qmatmul(Q4_0, p, 20, 64, x, n_range=(8, 20)), "begin a multiple of 16"),
    (lambda p, x: qmatmul(Q6_K, p, 20, 64, x), "K a positive multiple of 256"),
])
def test_bad_input_is_refused_before_the_c_call(call, message):
    rng = np.random.default_rng(1)
    d, codes, _ = random_matrix(Q4_0, 20, 64, rng)
    with pytest.raises(ValueError, match=message):
        call(pack(Q4_0, d, codes), activations(2, 64, rng))


@pytest.mark.parametrize("args,message", [
    ((Q4_0, np.zeros((2, 2), np.float16), np.full((2, 64), 16, np.uint8)), "codes must be integers in 0..15"),
    ((Q8_0, np.zeros((2, 2), np.float64), np.zeros((2, 64), np.int8)), "d must be float16"),
    ((Q8_0, np.zeros((2, 2), np.float32), np.zeros((2, 64), np.int8)), "d must be float16"),
    ((Q4_1, np.zeros((2, 2), np.float16), np.zeros((2, 64), np.uint8)), "m must be float16"),
    ((Q4_0, np.zeros((2, 1), np.float16), np.zeros((2, 48), np.uint8)), "K a positive multiple of 32"),
    ((Q6_K, np.zeros((2, 2), np.float16), np.zeros((2, 64), np.uint8)), "K a positive multiple of 256"),
    ((Q6_K, np.zeros((2, 1), np.float16), np.zeros((2, 256), np.uint8)), "sc must be int8 \\[N, K/16\\]"),
    ((Q6_K, np.zeros((2, 1), np.float16), np.full((2, 256), 64, np.uint8), None, np.zeros((2, 16), np.int8)),
     "codes must be integers in 0..63"),
    ((Q4_0, np.zeros((2, 8), np.float16), np.zeros((2, 256), np.uint8), None, np.zeros((2, 16), np.int8)),
     "sc \\(sub-block scales\\) is only for Q6_K"),
])
def test_pack_refuses_what_the_format_cannot_hold(args, message):
    with pytest.raises(ValueError, match=message):
        pack(*args)


def test_no_compiler_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(NativeUnavailableError, match="no C compiler found .*apt-get install gcc"):
        load("scalar", tmp_path / "fresh")


def test_a_build_says_so_on_stderr_once_and_a_built_library_is_silent(capfd, tmp_path):
    from exo_rknpu.native.build import library

    first = library("scalar", tmp_path)
    assert capfd.readouterr().err == "exo-rknpu: building the native kernel for the scalar code path (once, ~30 s) ...\n"
    assert library("scalar", tmp_path) == first and capfd.readouterr().err == ""


def test_a_clang_build_gives_the_same_bits(monkeypatch, tmp_path):
    if not shutil.which("clang"):
        pytest.skip("clang is not installed")
    monkeypatch.setenv("CC", "clang")
    nat = load("native", tmp_path)
    rng = np.random.default_rng(9)
    for fmt in FMTS.values():
        d, codes, m = random_matrix(fmt, 70, 576, rng)
        x = activations(5, 576, rng)
        assert same_bits(qmatmul(fmt, pack(fmt, d, codes, m), 70, 576, x, native=nat),
                         reference.qmatmul(fmt, d, codes, x, m))
    d, sc, codes = random_q6_k(70, 768, rng)
    x = activations(5, 768, rng)
    assert same_bits(q6_k_matmul(nat, d, sc, codes, x), reference.qmatmul(Q6_K, d, codes, x, sc=sc))


def _arm64_script():
    spec = importlib.util.spec_from_file_location("native_arm64", PERF / "native_arm64.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", ["armv8.2-dotprod", "cortex-a76", "neon", "scalar"])
def test_emulated_aarch64_builds_equal_the_reference_bit_for_bit(target, tmp_path):
    """docs/perf/native_arm64.py: the sdot path (armv8.2-a+dotprod, and -mcpu=cortex-a76 as the RK3588 builds it),
    the plain NEON path and the scalar path, cross-compiled and run under qemu as a Cortex-A76."""
    arm64 = _arm64_script()
    why = arm64.missing_tools()
    if why:
        pytest.skip(why)
    cases = [(1, 45, 576), (3, 17, 64), (6, 200, 2048)]
    lines = arm64.check(target, cases, tmp_path)
    assert len(lines) == 4 * len(cases)  # Q4_0, Q4_1, Q8_0, Q6_K


def test_calls_on_whole_row_groups_from_several_threads_fill_in_the_one_call_result(builds):
    """How the onnxruntime op splits N: each thread its own whole row groups, all writing one y at once (ctypes
    releases the GIL, so the calls really overlap)."""
    nat = builds["native"]
    rng = np.random.default_rng(11)
    N, K, M = 16 * 37 + 5, 576, 8
    d, codes, m = random_matrix(Q4_1, N, K, rng)
    x = activations(M, K, rng)
    packed = pack(Q4_1, d, codes, m)
    qa = np.empty(nat.lib.exo_act_bytes(M, K), np.uint8)
    nat.lib.exo_quantize_act(x.ctypes.data, M, K, qa.ctypes.data)
    y = np.full((M, N), np.nan, np.float32)
    cuts = [0, 16 * 5, 16 * 6, 16 * 20, 16 * 36, N]

    def run(begin: int, end: int) -> None:
        for _ in range(20):
            nat.lib.exo_qmatmul_rows(Q4_1, packed.ctypes.data, N, K, qa.ctypes.data, M, y.ctypes.data, begin, end)

    threads = [threading.Thread(target=run, args=(b, e)) for b, e in zip(cuts, cuts[1:])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same_bits(y, qmatmul(Q4_1, packed, N, K, x, native=nat))


def test_pack_in_steps_of_row_groups_gives_the_bytes_of_one_step(monkeypatch):
    """pack() bounds its temporaries by packing a few row groups at a time; the bytes do not depend on the step."""
    pack_module = importlib.import_module("exo_rknpu.native.pack")  # the module (the package exports the function)
    rng = np.random.default_rng(4)
    for fmt in FMTS.values():
        d, codes, m = random_matrix(fmt, 16 * 9 + 3, 128, rng)
        whole = pack(fmt, d, codes, m)
        monkeypatch.setattr(pack_module, "_ELEMENTS_PER_STEP", 16 * 128 * 2)  # two groups a step, five steps
        assert np.array_equal(pack(fmt, d, codes, m), whole)
        monkeypatch.undo()
    d, sc, codes = random_q6_k(16 * 9 + 3, 256, rng)
    whole = pack(Q6_K, d, codes, sc=sc)
    monkeypatch.setattr(pack_module, "_ELEMENTS_PER_STEP", 16 * 256 * 2)
    assert np.array_equal(pack(Q6_K, d, codes, sc=sc), whole)


@pytest.mark.parametrize("isa", list(BUILDS))
def test_a_rows_result_does_not_depend_on_the_other_rows_of_the_call(builds, isa):
    """Batched decode: row m of an M-row call equals the one-row call on that row alone, bit for bit."""
    nat = build(builds, isa)
    rng = np.random.default_rng(12)
    for fmt in FMTS.values():
        d, codes, m = random_matrix(fmt, 100, 576, rng)
        packed = pack(fmt, d, codes, m)
        x = activations(13, 576, rng)
        together = qmatmul(fmt, packed, 100, 576, x, native=nat)
        for row in (0, 5, 12):
            assert same_bits(together[row:row + 1], qmatmul(fmt, packed, 100, 576, x[row:row + 1], native=nat))
    d, sc, codes = random_q6_k(100, 512, rng)
    packed = pack(Q6_K, d, codes, sc=sc)
    x = activations(13, 512, rng)
    together = qmatmul(Q6_K, packed, 100, 512, x, native=nat)
    for row in (0, 5, 12):
        assert same_bits(together[row:row + 1], qmatmul(Q6_K, packed, 100, 512, x[row:row + 1], native=nat))
