/* AMX-INT8 path of qmatmul.c for batched rows (Q4_0 from EXO_AMX_MIN_M = 4 activation rows, Q4_1 and Q8_0 from 6;
 * included there after the AVX-512 path, whose float stage it shares; needs AMX_TILE, AMX_INT8 and GFNI, and Linux's
 * permission to use tile data).
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

/* 0 not asked yet, 1 granted, -1 refused (threads racing on the first call both ask: harmless) */
static int amx_state;

static int amx_usable(void) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_RELAXED);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, EXO_ARCH_REQ_XCOMP_PERM, EXO_XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, s, __ATOMIC_RELAXED);
    }
    return s > 0;
}

/* Activation rows go in chunks of up to 8 (a tile holds 16 rows: 2 blocks x 8). */
#define EXO_AMX_ROWS 8

static int64_t amx_pairs(int64_t K) { return (K / EXO_BLOCK + 1) / 2; }

/* 64 bytes more than the planes: they start at the first 64-byte boundary after the rows (a tile row that
 * straddles two cache lines loads slower; malloc gives 16-byte alignment) */
static int64_t amx_plane_bytes(int64_t M, int64_t K) { return M >= EXO_AMX_MIN_M ? 256 * M * amx_pairs(K) + 64 : 0; }

/* The activation planes after the M rows of qa: for each chunk of mc <= 8 rows from m0, for each pair p of blocks,
 * the A tiles lo then hi, each 2 * mc rows x 64 bytes: row i < mc is row m0 + i's 32 bytes of block 2p then 32
 * zeros, row mc + i is 32 zeros then its 32 bytes of block 2p + 1 (zeros if K has an odd number of blocks). */
static uint8_t* amx_planes_of(const void* qa, int64_t M, int64_t K, int64_t m0) {
    const uintptr_t rows_end = (uintptr_t)qa + (uintptr_t)(M * act_row_bytes(K));
    return (uint8_t*)((rows_end + 63) & ~(uintptr_t)63) + 256 * m0 * amx_pairs(K);
}

static void amx_make_planes(void* qa, int64_t M, int64_t K) {
    if (M < EXO_AMX_MIN_M) return;
    const int64_t nb = K / EXO_BLOCK;
    for (int64_t m0 = 0; m0 < M; m0 += EXO_AMX_ROWS) {
        const int64_t mc = M - m0 < EXO_AMX_ROWS ? M - m0 : EXO_AMX_ROWS;
        uint8_t* planes = amx_planes_of(qa, M, K, m0);
        for (int64_t i = 0; i < mc; i++) {
            const int16_t* q = act_of(qa, K, m0 + i).q;
            for (int64_t b = 0; b < 2 * amx_pairs(K); b++) {
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                if (b < nb) {
                    const __m512i v = _mm512_loadu_si512(q + b * EXO_BLOCK);
                    lo = _mm512_cvtepi16_epi8(v);  /* truncation: q & 0xff */
                    hi = _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8));
                }
                const int h = (int)(b & 1);
                uint8_t* row = planes + (b / 2) * 256 * mc + (h * mc + i) * 64;
                _mm512_storeu_si512(row, h ? _mm512_inserti64x4(_mm512_setzero_si512(), lo, 1)
                                           : _mm512_zextsi256_si512(lo));
                _mm512_storeu_si512(row + 128 * mc, h ? _mm512_inserti64x4(_mm512_setzero_si512(), hi, 1)
                                                      : _mm512_zextsi256_si512(hi));
            }
        }
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* tiles 0, 1: A lo, hi (2 mc rows); 2, 3: B of two row groups (16 rows); 4, 5 and 6, 7: C lo, hi of each group */
static void amx_configure(int mc) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (uint8_t)(t == 2 || t == 3 ? 16 : 2 * mc);
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* B rows 8h .. 8h+7 (bt, 64 bytes each) from one code block: byte 4n + i of row 8h + r = the signed code of output
 * row n at k = 4r + i. A 64-byte load is two units (2 k of 16 rows each); vpermw interleaves their rows' words. */
static inline __attribute__((always_inline)) void amx_b_block(const int fmt, const uint8_t* cb, int8_t* bt) {
    /* word 2n of a B row = row n's 2 k of the first unit, word 2n + 1 = row n's 2 k of the second */
    const __m512i pair = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                          21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    if (fmt == EXO_Q8_0) {
        for (int r = 0; r < 8; r++) {
            const __m512i v = _mm512_permutexvar_epi16(pair, _mm512_loadu_si512(cb + 64 * r));
            _mm512_store_si512(bt + 64 * r, _mm512_xor_si512(v, flip));  /* code + 128 -> the s8 code */
        }
        return;
    }
    /* One GF(2) affine map per nibble (gf2p8affineqb: output bit i = parity(row i & byte) ^ bit i of the constant, row
     * i = byte 7 - i of the matrix): Q4_0 bits 0..2 the nibble's, bits 3..7 its top bit flipped (nibble - 8 as s8);
     * Q4_1 bits 0..3 the nibble's, 4..7 zero. */
    const __m512i mlo = _mm512_set1_epi64(fmt == EXO_Q4_0 ? 0x0102040808080808ll : 0x0102040800000000ll);
    const __m512i mhi = _mm512_set1_epi64(fmt == EXO_Q4_0 ? 0x1020408080808080ll : 0x1020408000000000ll);
    for (int r = 0; r < 4; r++) {  /* low nibbles: k 0..15, rows 0..3; high nibbles: k 16..31, rows 4..7 */
        const __m512i v = _mm512_permutexvar_epi16(pair, _mm512_loadu_si512(cb + 64 * r));
        if (fmt == EXO_Q4_0) {
            _mm512_store_si512(bt + 64 * r, _mm512_gf2p8affine_epi64_epi8(v, mlo, 0xf8));
            _mm512_store_si512(bt + 64 * (r + 4), _mm512_gf2p8affine_epi64_epi8(v, mhi, 0xf8));
        } else {
            _mm512_store_si512(bt + 64 * r, _mm512_gf2p8affine_epi64_epi8(v, mlo, 0));
            _mm512_store_si512(bt + 64 * (r + 4), _mm512_gf2p8affine_epi64_epi8(v, mhi, 0));
        }
    }
}

/* The float stage of one block (the AVX-512 path's, same order): isum = 256 * hi + lo from the stored C tiles. */
static inline __attribute__((always_inline)) void amx_block_float(const int fmt, const int MC, const int32_t* clo,
                                                                  const int32_t* chi, const uint8_t* sb,
                                                                  const act_row* a, int64_t b, __m512* acc) {
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

/* The B tiles of pair p of blocks for groups g .. g+NG-1 (the second half zero if block 2p + 1 is past K). */
static inline __attribute__((always_inline)) void amx_b_pair(const int fmt, const int NG, const uint8_t* codes,
                                                             const uint8_t* scales, int64_t nb, int64_t g, int64_t p,
                                                             int8_t (*bt)[16 * 64]) {
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    for (int j = 0; j < NG; j++) {
        const uint8_t* cb = codes + ((g + j) * nb + 2 * p) * cbb;
        for (int64_t o = 0; o < 2 * cbb; o += 64) _mm_prefetch((const char*)(cb + EXO_PREFETCH + o), _MM_HINT_T0);
        _mm_prefetch((const char*)(scales + ((g + j) * nb + 2 * p) * sbb + EXO_PREFETCH * sbb / cbb), _MM_HINT_T0);
        amx_b_block(fmt, cb, bt[j]);
        if (2 * p + 1 < nb) amx_b_block(fmt, cb + cbb, bt[j] + 8 * 64);
    }
}

/* Rows m0 .. m0+MC-1 of row groups g .. g+NG-1 (NG = 1 or 2; tiles configured for MC rows): per pair of blocks, one
 * tile product per group and activation half covers both blocks (each C row holds one row's sums of one block). */
static inline __attribute__((always_inline)) void amx_groups(const int fmt, const int MC, const int NG,
                                                             const uint8_t* codes, const uint8_t* scales, int64_t nb,
                                                             const void* qa, const uint8_t* planes, int64_t K,
                                                             int64_t m0, float* y, int64_t N, int64_t g,
                                                             int64_t n_end) {
    const int64_t sbb = scale_block_bytes(fmt);
    _Alignas(64) int8_t bt[2][2][16 * 64];      /* pair parity, group: B */
    _Alignas(64) int32_t cs[2][2][2][16 * 16];  /* pair parity, group, lo / hi: C, 2 MC rows x 16 */
    act_row a[EXO_AMX_ROWS];
    __m512 acc[2][EXO_AMX_ROWS];
    for (int i = 0; i < MC; i++) {
        a[i] = act_of(qa, K, m0 + i);
        acc[0][i] = acc[1][i] = _mm512_setzero_ps();
    }
    if (nb & 1) { /* the last pair's second half of B stays zero */
        for (int q = 0; q < 2; q++)
            for (int j = 0; j < NG; j++) memset(bt[q][j] + 8 * 64, 0, 8 * 64);
    }
    /* Software-pipelined by one pair: B of pair p + 1 is made and C of pair p - 1 read while the tiles of pair p
     * run, so no tile load waits for the stores just made, nor a zmm load for the tile store just issued. */
    const int64_t np = (nb + 1) / 2;
    amx_b_pair(fmt, NG, codes, scales, nb, g, 0, bt[0]);
    for (int64_t p = 0; p <= np; p++) {
        if (p < np) {
            const uint8_t* pa = planes + p * 256 * MC;
            int8_t(*b)[16 * 64] = bt[p & 1];
            int32_t(*c)[2][16 * 16] = cs[p & 1];
            _tile_loadd(0, pa, 64);
            _tile_loadd(1, pa + 128 * MC, 64);
            _tile_loadd(2, b[0], 64);
            _tile_zero(4);
            _tile_zero(5);
            _tile_dpbusd(4, 0, 2);
            _tile_dpbssd(5, 1, 2);
            if (NG == 2) {
                _tile_loadd(3, b[1], 64);
                _tile_zero(6);
                _tile_zero(7);
                _tile_dpbusd(6, 0, 3);
                _tile_dpbssd(7, 1, 3);
            }
            _tile_stored(4, c[0][0], 64);
            _tile_stored(5, c[0][1], 64);
            if (NG == 2) {
                _tile_stored(6, c[1][0], 64);
                _tile_stored(7, c[1][1], 64);
            }
            if (p + 1 < np) amx_b_pair(fmt, NG, codes, scales, nb, g, p + 1, bt[(p + 1) & 1]);
        }
        if (p > 0) {
            const int64_t q = p - 1;
            int32_t(*c)[2][16 * 16] = cs[q & 1];
            for (int j = 0; j < NG; j++) {
                const uint8_t* sb = scales + ((g + j) * nb + 2 * q) * sbb;
                amx_block_float(fmt, MC, c[j][0], c[j][1], sb, a, 2 * q, acc[j]);
                if (2 * q + 1 < nb)
                    amx_block_float(fmt, MC, c[j][0] + 16 * MC, c[j][1] + 16 * MC, sb + sbb, a, 2 * q + 1, acc[j]);
            }
        }
    }
    for (int j = 0; j < NG; j++) {
        const int64_t n0 = (g + j) * G, rows = n_end - n0 < G ? n_end - n0 : G;
        const __mmask16 keep = (__mmask16)(rows >= G ? 0xffffu : (1u << rows) - 1u);
        for (int i = 0; i < MC; i++) _mm512_mask_storeu_ps(y + (m0 + i) * N + n0, keep, acc[j][i]);
    }
}

/* One chunk of MC activation rows over the call's row groups g0 .. g1-1, two groups at a time. */
static inline __attribute__((always_inline)) void amx_chunk(const int fmt, const int MC, const uint8_t* codes,
                                                            const uint8_t* scales, int64_t nb, const void* qa,
                                                            const uint8_t* planes, int64_t K, int64_t m0, float* y,
                                                            int64_t N, int64_t g0, int64_t g1, int64_t n_end) {
    int64_t g = g0;
    for (; g + 1 < g1; g += 2) amx_groups(fmt, MC, 2, codes, scales, nb, qa, planes, K, m0, y, N, g, n_end);
    if (g < g1) amx_groups(fmt, MC, 1, codes, scales, nb, qa, planes, K, m0, y, N, g, n_end);
}

#define EXO_AMX_CHUNK(F, MC) \
    amx_chunk(F, MC, packed, scales, nb, qa, amx_planes_of(qa, M, K, m0), K, m0, y, N, n_begin / G, \
              (n_end + G - 1) / G, n_end)
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
    int configured = 0;
    for (int64_t m0 = 0; m0 < M; m0 += EXO_AMX_ROWS) {
        const int mc = (int)(M - m0 < EXO_AMX_ROWS ? M - m0 : EXO_AMX_ROWS);
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
