/* AMX-INT8 path of qmatmul.c for M >= EXO_AMX_MIN_M activation rows (included there after the AVX-512 path, whose
 * float stage it shares; needs AMX_TILE and AMX_INT8, and Linux's permission to use tile data).
 *
 * Exactness. An int16 activation code q splits exactly into q = 256 * hi + lo with lo = q & 0xff (u8, 0..255) and
 * hi = q >> 8 (arithmetic, s8, -128..127). With signed weight codes w (s8: Q4_0 nibble - 8, Q4_1 nibble, Q8_0 code)
 *     isum = 256 * sum(hi * w) + sum(lo * w)
 * where TDPBSSD gives sum(hi * w) and TDPBUSD (A unsigned, B signed) sum(lo * w), both exact int32 (|sum(hi * w)| <=
 * 32 * 128 * 128, |sum(lo * w)| <= 32 * 255 * 128), and the shift and add are exact because |isum| < 2^31: the same
 * integer as the AVX-512 path's, which then goes through the same float stage in the same order per output.
 *
 * Tiles (palette 1), one block of 32 k per tile product (the float stage needs each block's sums apart):
 *   tile 0, 1: C = isum halves lo, hi: MC rows x 16 int32 (one per output row of the group)
 *   tile 2, 3: A = the activations' lo / hi bytes of one block: MC rows x 32 bytes (the planes made at quantization)
 *   tile 4:    B = one code block of 16 output rows as signed bytes in AMX's layout: 8 rows (4 k each) x 64 bytes,
 *              byte 4n + i of row r = w of output row n at k = 4r + i; made per block in a stack buffer from two
 *              packed units (vpermw interleaves their 16-bit row pairs) and, for Q4, their low / high nibbles.
 * The C tiles go through a stack buffer into zmm registers (one lane per output row, as the AVX-512 path).
 *
 * Process state: amx_state, the outcome of asking Linux for tile data (arch_prctl(ARCH_REQ_XCOMP_PERM,
 * XFEATURE_XTILEDATA), once per process) is the kernel's only one; refused (an old kernel, a seccomp filter), every
 * call takes the AVX-512 path. Each call that uses tiles configures them first and releases them at its end, as
 * onnxruntime may run each call on any of its pool's threads. */
#include <sys/syscall.h>

extern long syscall(long number, ...); /* unistd.h declares it only with _GNU_SOURCE / _DEFAULT_SOURCE */

#define EXO_ARCH_REQ_XCOMP_PERM 0x1023
#define EXO_XFEATURE_XTILEDATA 18

static int amx_state; /* 0 not asked yet, 1 granted, -1 refused (threads racing on the first call ask twice: harmless) */

static int amx_usable(void) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_RELAXED);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, EXO_ARCH_REQ_XCOMP_PERM, EXO_XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, s, __ATOMIC_RELAXED);
    }
    return s > 0;
}

static int64_t amx_plane_bytes(int64_t M, int64_t K) { return M >= EXO_AMX_MIN_M ? 2 * M * K : 0; }

/* The activation planes after the M rows of qa: per block b, M rows of 32 lo bytes, then M rows of 32 hi bytes. */
static uint8_t* amx_planes_of(const void* qa, int64_t M, int64_t K) {
    return (uint8_t*)qa + M * act_row_bytes(K);
}

static void amx_make_planes(void* qa, int64_t M, int64_t K) {
    if (M < EXO_AMX_MIN_M) return;
    uint8_t* planes = amx_planes_of(qa, M, K);
    for (int64_t m = 0; m < M; m++) {
        const int16_t* q = act_of(qa, K, m).q;
        for (int64_t b = 0; b < K / EXO_BLOCK; b++) {
            const __m512i v = _mm512_loadu_si512(q + b * EXO_BLOCK);
            uint8_t* lo = planes + b * 64 * M + m * 32;
            _mm256_storeu_si256((__m256i*)lo, _mm512_cvtepi16_epi8(v));  /* truncation: q & 0xff */
            _mm256_storeu_si256((__m256i*)(lo + 32 * M), _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
        }
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

static void amx_configure(int mc) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 4; t++) {
        c.rows[t] = (uint8_t)mc;
        c.colsb[t] = t < 2 ? 64 : 32;
    }
    c.rows[4] = 8;
    c.colsb[4] = 64;
    _tile_loadconfig(&c);
}

/* Rows m0 .. m0+MC-1 of row groups g0 .. g1-1 (the tiles configured for MC rows). */
static inline __attribute__((always_inline)) void amx_chunk(const int fmt, const int MC, const uint8_t* codes,
                                                            const uint8_t* scales, int64_t nb, const void* qa,
                                                            const uint8_t* planes, int64_t K, int64_t M, int64_t m0,
                                                            float* y, int64_t N, int64_t g0, int64_t g1,
                                                            int64_t n_end) {
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    /* word 2n of a B row = row n's 2 k of the first unit, word 2n + 1 = row n's 2 k of the second */
    const __m512i pair = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                          21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i low4 = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8), flip = _mm512_set1_epi8((char)0x80);
    _Alignas(64) int8_t bt[8 * 64];
    _Alignas(64) int32_t clo[8 * 16], chi[8 * 16];
    act_row a[8];
    for (int i = 0; i < MC; i++) a[i] = act_of(qa, K, m0 + i);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t* cg = codes + g * nb * cbb;
        const uint8_t* sg = scales + g * nb * sbb;
        __m512 acc[8];
        for (int i = 0; i < MC; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* cb = cg + b * cbb;
            const uint8_t* sb = sg + b * sbb;
            for (int64_t o = 0; o < cbb; o += 64) _mm_prefetch((const char*)(cb + EXO_PREFETCH + o), _MM_HINT_T0);
            _mm_prefetch((const char*)(sb + EXO_PREFETCH * sbb / cbb), _MM_HINT_T0);
            if (fmt == EXO_Q8_0) {
                for (int r = 0; r < 8; r++) {
                    const __m512i v = _mm512_permutexvar_epi16(pair, _mm512_loadu_si512(cb + 64 * r));
                    _mm512_store_si512(bt + 64 * r, _mm512_xor_si512(v, flip));
                }
            } else {
                for (int r = 0; r < 4; r++) {
                    const __m512i v = _mm512_permutexvar_epi16(pair, _mm512_loadu_si512(cb + 64 * r));
                    __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                    if (fmt == EXO_Q4_0) {
                        lo = _mm512_sub_epi8(lo, eight);
                        hi = _mm512_sub_epi8(hi, eight);
                    }
                    _mm512_store_si512(bt + 64 * r, lo);
                    _mm512_store_si512(bt + 64 * (r + 4), hi);
                }
            }
            const uint8_t* pb = planes + b * 64 * M + m0 * 32;
            _tile_loadd(4, bt, 64);
            _tile_loadd(2, pb, 32);
            _tile_loadd(3, pb + 32 * M, 32);
            _tile_zero(0);
            _tile_zero(1);
            _tile_dpbusd(0, 2, 4);
            _tile_dpbssd(1, 3, 4);
            _tile_stored(0, clo, 64);
            _tile_stored(1, chi, 64);
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sb));
            for (int i = 0; i < MC; i++) {
                const __m512i isum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(chi + 16 * i), 8),
                                                      _mm512_load_si512(clo + 16 * i));
                const __m512 t = _mm512_mul_ps(dw, _mm512_set1_ps(a[i].d[b]));
                acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(t, _mm512_cvtepi32_ps(isum)));
            }
            if (fmt == EXO_Q4_1) {
                const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sb + 32)));
                for (int i = 0; i < MC; i++) {
                    const float das = a[i].d[b] * (float)a[i].s[b];
                    acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(mw, _mm512_set1_ps(das)));
                }
            }
        }
        const int64_t rows = n_end - g * G < G ? n_end - g * G : G;
        const __mmask16 keep = (__mmask16)(rows >= G ? 0xffffu : (1u << rows) - 1u);
        for (int i = 0; i < MC; i++) _mm512_mask_storeu_ps(y + (m0 + i) * N + g * G, keep, acc[i]);
    }
}

#define EXO_AMX_CHUNK(F, MC) \
    amx_chunk(F, MC, packed, scales, nb, qa, planes, K, M, m0, y, N, n_begin / G, (n_end + G - 1) / G, n_end)
#define EXO_AMX_SWITCH(F)                            \
    switch (mc) {                                    \
        case 1: EXO_AMX_CHUNK(F, 1); break;          \
        case 2: EXO_AMX_CHUNK(F, 2); break;          \
        case 3: EXO_AMX_CHUNK(F, 3); break;          \
        case 4: EXO_AMX_CHUNK(F, 4); break;          \
        case 5: EXO_AMX_CHUNK(F, 5); break;          \
        case 6: EXO_AMX_CHUNK(F, 6); break;          \
        case 7: EXO_AMX_CHUNK(F, 7); break;          \
        default: EXO_AMX_CHUNK(F, 8); break;         \
    }

/* exo_qmatmul_rows with tiles (Q4_0, Q4_1, Q8_0; M >= EXO_AMX_MIN_M, so qa holds the planes): chunks of up to 8
 * activation rows, each over all the call's row groups (the tiles are configured once per chunk size). */
static void amx_rows(int fmt, const uint8_t* packed, int64_t N, int64_t K, const void* qa, int64_t M, float* y,
                     int64_t n_begin, int64_t n_end) {
    const int64_t nb = K / EXO_BLOCK, ng = (N + G - 1) / G;
    const uint8_t* scales = packed + ng * nb * code_block_bytes(fmt);
    const uint8_t* planes = amx_planes_of(qa, M, K);
    int configured = 0;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int mc = (int)(M - m0 < 8 ? M - m0 : 8);
        if (mc != configured) amx_configure(configured = mc);
        if (fmt == EXO_Q4_0) {
            EXO_AMX_SWITCH(EXO_Q4_0)
        } else if (fmt == EXO_Q4_1) {
            EXO_AMX_SWITCH(EXO_Q4_1)
        } else {
            EXO_AMX_SWITCH(EXO_Q8_0)
        }
    }
    _tile_release();
}
