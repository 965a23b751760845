/* exo-rknpu native quantized matmul (see qmatmul.h for the interface, docs/native.md for the arithmetic).
 *
 * Activations are quantized per call to int16 per block of 32 (amax = max |x|, d = amax / 32767, codes
 * q = rint(x * (32767 / amax)), s = sum q): one step is 3e-5 of the block's max, so a last-bit difference in the ops
 * before the kernel (which differ per CPU) moves a code by at most one such step, as small as float32 rounding.
 * Result: y[m, n] = sum over blocks b, in order, of (dw * da) * (float)isum (+ mw * (da * (float)sa) for Q4_1),
 * float32, no FMA (built with -ffp-contract=off; SIMD code uses separate mul and add). isum is an exact int32 dot
 * product of the weight codes with the int16 activation codes (|isum| <= 32 * 32767 * 128 < 2^31); (float)isum rounds
 * to nearest even above 2^24, the same on every CPU. SIMD runs across output rows (one lane per row n), never across
 * K within a row, so each row's float order is the same everywhere.
 *
 * Packed weight layout (the same bytes on every machine; made by exo_rknpu/native/pack.py):
 *   G = EXO_ROW_GROUP = 16 rows, NG = ceil(N / 16) row groups (rows >= N are zero padding), NB = K / 32 blocks.
 *   Section 1, codes: for g < NG, for b < NB: one code block of CB bytes (CB = 256 for Q4_*, 512 for Q8_0) made of
 *     32-byte units; unit u holds 2 consecutive k of each of the 16 rows: byte [u*32 + r*2 + j] is row 16g+r.
 *     Q4_*: unit u (0..7), byte j: low nibble = code of k = 32b + 2u + j, high nibble = code of k = 32b + 16 + 2u + j.
 *     Q8_0: unit u (0..15), byte j: (uint8)(code + 128) of k = 32b + 2u + j.
 *   Section 2, scales, right after section 1: for g < NG, for b < NB: the 16 rows' fp16 d (little-endian), then for
 *     Q4_1 the 16 rows' fp16 m: SB = 32 bytes (64 for Q4_1).
 *   Total: NG * NB * (CB + SB) bytes. A unit zero-extended to 16-bit words (vpmovzxbw) is one AVX-512 vpdpwssd /
 *   vpmaddwd operand (16 lanes of 2 k), its halves two AVX2 ones (rows 0-7, 8-15); NEON de-interleaves it (ld2).
 *   Codes are unsigned (Q4 nibbles 0..15, Q8_0 code + 128): every path starts the integer sum at -8 * s (Q4_0) or
 *   -128 * s (Q8_0) to get the signed isum; partial sums stay below 32 * 255 * 32767 + 128 * 32 * 32767 < 2^31.
 *
 * Q6_K (EXO_Q6_K; K a multiple of 256): weight = d * sc * (q - 32), q 6-bit, sc int8 per sub-block of 16, d fp16 per
 *   super-block of 256, as GGUF. Result: y[m, n] = sum over blocks b of 32, in order, of
 *     da * (s0 * (float)isum0 + s1 * (float)isum1)
 *   where s0, s1 = (float)d * (float)sc of the block's two sub-blocks (k < 16, k >= 16 of the block; exact: an 11-bit
 *   by an 8-bit mantissa) and isum0, isum1 their exact integer dot products with signed codes q - 32 (|isum| <=
 *   16 * 32 * 32767 < 2^24: (float)isum is exact), float32, no FMA, in this order (reference.py qmatmul_q6_k).
 *   Codes, CB = 384 bytes per (g, b): a code is stored as t = q ^ 32, the 6-bit two's complement of q - 32.
 *     Bytes 0..255: t's low 4 bits in Q4's units (byte u*32 + r*2 + j: low nibble k = 32b + 2u + j, high nibble
 *     k = 32b + 16 + 2u + j). Bytes 256..383: t's high 2 bits in two 64-byte planes h (0: k < 16, 1: k >= 16): the
 *     little-endian 16-bit word 2r + j of plane h (bytes 256 + 64h + 4r + 2j) holds in bits 2u, 2u+1 (u < 8) those of
 *     k = 32b + 16h + 2u + j. Shifting a field to a word's top bits and back arithmetically (by 10) gives the signed
 *     high part times 16, into which the nibble is merged: the signed code word in 3-4 operations, no bias sum.
 *   Scales, per (g, super-block s of 8 blocks): the 16 rows' fp16 d (32 bytes), then per block b of s its 16 rows'
 *     int8 sc of sub-block 2(b % 8), then of 2(b % 8) + 1 (32 bytes): 288 bytes, 36 per block on average.
 *   Total NG * NB * 420 bytes: 0.82 bytes per weight, as GGUF's 210 per 256.
 *
 * Quantized activations (exo_quantize_act), per row m: K int16 codes, then NB float32 d, then NB int32 s (sum of the
 * block's codes): ACT_ROW(K) = 2K + 8 * NB bytes (the buffer must be 4-byte aligned; malloc's and numpy's are).
 * The AMX build appends, for M >= EXO_AMX_MIN_M, each code split into its low byte and its signed high byte
 * (q = 256 * hi + lo, exact), laid out as AMX A tiles (qmatmul_amx.h); exo_act_bytes counts them.
 *
 * Code paths: AVX-512 (qmatmul_avx512.h), AVX2 (qmatmul_avx2.h), NEON (qmatmul_neon.h), scalar (here), chosen at
 * compile time; the AVX-512 build on a CPU with AMX-INT8 (-march=native on Sapphire Rapids and later) also has
 * qmatmul_amx.h, taken from EXO_AMX_MIN_M activation rows (batched decode) when Linux grants tile data. Every path
 * computes the same exact isum and the same float stage in the same order, so all give the reference's bits.
 */
#include "qmatmul.h"

#include <math.h>
#include <string.h>

#if !defined(EXO_NO_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define EXO_AVX512 1
#include <immintrin.h>
#if !defined(EXO_NO_AMX) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__) && defined(__GFNI__)
#define EXO_AMX 1
#endif
#elif !defined(EXO_NO_SIMD) && defined(__AVX2__) && defined(__F16C__)
#define EXO_AVX2 1
#if defined(__AVXVNNI__)
#define EXO_AVXVNNI 1
#endif
#include <immintrin.h>
#elif !defined(EXO_NO_SIMD) && defined(__aarch64__) && defined(__ARM_NEON)
#define EXO_NEON 1
#include <arm_neon.h>
#endif

#define G EXO_ROW_GROUP
/* Software prefetch distance in the code stream (bytes ahead of the block being read; the scale stream is prefetched
 * proportionally). Measured on the Xeon (docs/native.md): streaming weights, one row +15 %, 8 rows -35 % time. */
#define EXO_PREFETCH 2048

static int64_t code_block_bytes(int fmt) { return fmt == EXO_Q8_0 ? 512 : fmt == EXO_Q6_K ? 384 : 256; }
/* per (group, block); Q6_K's 288 per super-block of 8 blocks are 36 per block (q6k_d, q6k_sc locate a block's) */
static int64_t scale_block_bytes(int fmt) { return fmt == EXO_Q4_1 ? 64 : fmt == EXO_Q6_K ? 36 : 32; }
static int64_t act_row_bytes(int64_t K) { return 2 * K + 8 * (K / EXO_BLOCK); }

/* Whether fmt is a format and K a positive multiple of its block (of 256 for Q6_K). */
static int valid_shape(int fmt, int64_t K) {
    return fmt >= EXO_Q4_0 && fmt <= EXO_Q6_K && K > 0 && K % (fmt == EXO_Q6_K ? EXO_SUPER_BLOCK : EXO_BLOCK) == 0;
}

int64_t exo_packed_bytes(int fmt, int64_t N, int64_t K) {
    if (!valid_shape(fmt, K)) return -1;
    return (N + G - 1) / G * (K / EXO_BLOCK) * (code_block_bytes(fmt) + scale_block_bytes(fmt));
}

/* Q6_K: the fp16 d of block b's super-block (16 rows) and the block's int8 sc (16 rows of sub-block 2(b%8), then 16
 * of 2(b%8)+1), in the scales of one row group sg. */
static inline const uint8_t* q6k_d(const uint8_t* sg, int64_t b) { return sg + (b >> 3) * 288; }
static inline const uint8_t* q6k_sc(const uint8_t* sg, int64_t b) { return sg + (b >> 3) * 288 + 32 + (b & 7) * 32; }

#if defined(EXO_AMX)
/* From this many activation rows a call may take the AMX path (qmatmul_amx.h), which quantization prepares for;
 * Q4_0 takes it from 4 rows, Q4_1 and Q8_0 (more AVX-512 work per block besides the tiles) from 6: below, the
 * AVX-512 path was as fast or faster on this Xeon (docs/native.md). */
#define EXO_AMX_MIN_M 4
#define EXO_AMX_MIN_M_Q4_1_Q8_0 6
typedef struct act_row act_row;
static act_row act_of(const void* qa, int64_t K, int64_t m);
static int64_t amx_plane_bytes(int64_t M, int64_t K);
static void amx_make_planes(void* qa, int64_t M, int64_t K);
#else
#define amx_plane_bytes(M, K) 0
#endif

int64_t exo_act_bytes(int64_t M, int64_t K) { return M * act_row_bytes(K) + amx_plane_bytes(M, K); }

/* Exact fp16 -> float32 (every fp16 value, subnormals included, is a float32). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* One block of 32 activations: codes q, scale *d, returns the codes' sum. amax is exact; a non-finite amax makes d
 * NaN (the output is NaN, as a float matmul's would be); a block so small that 32767 / amax overflows is all zero
 * codes (its contribution is below 1e-34 of the weights). */
static int32_t quantize_block_scalar(const float* xb, int16_t* q, float* d) {
    float amax = 0.0f;
    int finite = 1;
    for (int i = 0; i < EXO_BLOCK; i++) {
        float a = fabsf(xb[i]);
        finite &= a <= 3.40282347e+38f;
        amax = a > amax ? a : amax;
    }
    const float id = 32767.0f / amax;
    if (!finite || amax == 0.0f || !(id <= 3.40282347e+38f)) {
        memset(q, 0, EXO_BLOCK * sizeof(int16_t));
        *d = finite ? 0.0f : NAN;
        return 0;
    }
    int32_t sum = 0;
    for (int i = 0; i < EXO_BLOCK; i++) {
        q[i] = (int16_t)rintf(xb[i] * id);
        sum += q[i];
    }
    *d = amax / 32767.0f;
    return sum;
}

#if defined(EXO_AVX512)
/* The same block with AVX-512: max is exact in any order, vcvtps2dq rounds half to even (the default MXCSR mode,
 * as rintf), and |x * id| < 32767.5 so the int16 narrowing keeps every code. */
static int32_t quantize_block(const float* xb, int16_t* q, float* d) {
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const __m512 a0 = _mm512_abs_ps(x0), a1 = _mm512_abs_ps(x1);
    const __m512 big = _mm512_set1_ps(3.40282347e+38f);
    const __mmask16 ok0 = _mm512_cmp_ps_mask(a0, big, _CMP_LE_OQ), ok1 = _mm512_cmp_ps_mask(a1, big, _CMP_LE_OQ);
    if (ok0 != 0xffff || ok1 != 0xffff) return quantize_block_scalar(xb, q, d);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    const float id = 32767.0f / amax;
    if (amax == 0.0f || !(id <= 3.40282347e+38f)) return quantize_block_scalar(xb, q, d);
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vid)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vid));
    _mm256_storeu_si256((__m256i*)q, _mm512_cvtepi32_epi16(q0));
    _mm256_storeu_si256((__m256i*)(q + 16), _mm512_cvtepi32_epi16(q1));
    *d = amax / 32767.0f;
    return _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}
#else
#define quantize_block quantize_block_scalar
#endif

void exo_quantize_act(const float* x, int64_t M, int64_t K, void* qa) {
    const int64_t nb = K / EXO_BLOCK;
    for (int64_t m = 0; m < M; m++) {
        int16_t* q = (int16_t*)((uint8_t*)qa + m * act_row_bytes(K));
        float* d = (float*)(q + K);
        int32_t* s = (int32_t*)(d + nb);
        for (int64_t b = 0; b < nb; b++) s[b] = quantize_block(x + m * K + b * EXO_BLOCK, q + b * EXO_BLOCK, d + b);
    }
#if defined(EXO_AMX)
    amx_make_planes(qa, M, K);
#endif
}

/* The activation codes, scales and sums of row m. */
typedef struct act_row {
    const int16_t* q;
    const float* d;
    const int32_t* s;
} act_row;

static act_row act_of(const void* qa, int64_t K, int64_t m) {
    act_row a;
    a.q = (const int16_t*)((const uint8_t*)qa + m * act_row_bytes(K));
    a.d = (const float*)(a.q + K);
    a.s = (const int32_t*)(a.d + K / EXO_BLOCK);
    return a;
}

/* Integer dot products of the 16 rows of one code block with one block of activation codes (exact). */
static void block_isums(int fmt, const uint8_t* cb, const int16_t* q, int32_t isum[G]) {
    for (int r = 0; r < G; r++) isum[r] = 0;
    if (fmt == EXO_Q8_0) {
        for (int u = 0; u < 16; u++)
            for (int r = 0; r < G; r++)
                for (int j = 0; j < 2; j++) isum[r] += ((int32_t)cb[u * 32 + r * 2 + j] - 128) * q[2 * u + j];
        return;
    }
    const int32_t off = fmt == EXO_Q4_0 ? 8 : 0;
    for (int u = 0; u < 8; u++)
        for (int r = 0; r < G; r++)
            for (int j = 0; j < 2; j++) {
                uint8_t v = cb[u * 32 + r * 2 + j];
                isum[r] += ((int32_t)(v & 15) - off) * q[2 * u + j] + ((int32_t)(v >> 4) - off) * q[16 + 2 * u + j];
            }
}

/* Q6_K: the two sub-block sums (k < 16, k >= 16) of the 16 rows of one code block, with signed codes (exact). */
static void block_isums_q6k(const uint8_t* cb, const int16_t* q, int32_t isum0[G], int32_t isum1[G]) {
    for (int r = 0; r < G; r++) isum0[r] = isum1[r] = 0;
    for (int h = 0; h < 2; h++)
        for (int u = 0; u < 8; u++)
            for (int r = 0; r < G; r++)
                for (int j = 0; j < 2; j++) {
                    const int k = 16 * h + 2 * u + j;
                    const uint8_t nib = cb[u * 32 + r * 2 + j];
                    const int32_t lo4 = h ? nib >> 4 : nib & 15;
                    const int32_t hi2 = (cb[256 + 64 * h + 4 * r + 2 * j + (u >> 2)] >> (2 * (u & 3))) & 3;
                    const int32_t t = lo4 | hi2 << 4; /* q ^ 32 */
                    const int32_t w = t >= 32 ? t - 64 : t; /* q - 32 */
                    (h ? isum1 : isum0)[r] += w * q[k];
                }
}

static void store_rows(float* y, const float* acc, int64_t rows) {
    for (int64_t r = 0; r < rows; r++) y[r] = acc[r];
}

/* Q6_K's group_scalar: cg, sg the group's codes and scales, y its first column. */
static __attribute__((unused)) void group_scalar_q6k(const uint8_t* cg, const uint8_t* sg, int64_t nb, const void* qa,
                                                     int64_t K, int64_t M, float* y, int64_t N, int64_t rows) {
    for (int64_t m = 0; m < M; m++) {
        act_row a = act_of(qa, K, m);
        float acc[G] = {0};
        int32_t isum0[G], isum1[G];
        for (int64_t b = 0; b < nb; b++) {
            block_isums_q6k(cg + b * 384, a.q + b * EXO_BLOCK, isum0, isum1);
            const uint8_t *dp = q6k_d(sg, b), *sc = q6k_sc(sg, b);
            for (int r = 0; r < G; r++) {
                uint16_t h;
                memcpy(&h, dp + 2 * r, 2);
                const float d = half_to_float(h);
                const float s0 = d * (float)(int8_t)sc[r], s1 = d * (float)(int8_t)sc[16 + r];
                acc[r] = acc[r] + a.d[b] * (s0 * (float)isum0[r] + s1 * (float)isum1[r]);
            }
        }
        store_rows(y + m * N, acc, rows);
    }
}

/* One row group g (rows 16g .. 16g+rows-1), all M activation rows: the reference order, one lane at a time. */
/* (unused in SIMD builds, which have their own) */
static __attribute__((unused)) void group_scalar(int fmt, const uint8_t* codes, const uint8_t* scales, int64_t nb,
                                                 const void* qa, int64_t K, int64_t M, float* y, int64_t N, int64_t g,
                                                 int64_t rows) {
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    if (fmt == EXO_Q6_K) {
        group_scalar_q6k(codes + g * nb * cbb, scales + g * nb * sbb, nb, qa, K, M, y + g * G, N, rows);
        return;
    }
    for (int64_t m = 0; m < M; m++) {
        act_row a = act_of(qa, K, m);
        float acc[G] = {0};
        int32_t isum[G];
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* sb = scales + (g * nb + b) * sbb;
            block_isums(fmt, codes + (g * nb + b) * cbb, a.q + b * EXO_BLOCK, isum);
            const float da = a.d[b];
            const float das = da * (float)a.s[b];
            for (int r = 0; r < G; r++) {
                uint16_t h;
                memcpy(&h, sb + 2 * r, 2);
                float t = half_to_float(h) * da;
                acc[r] = acc[r] + t * (float)isum[r];
                if (fmt == EXO_Q4_1) {
                    memcpy(&h, sb + 32 + 2 * r, 2);
                    acc[r] = acc[r] + half_to_float(h) * das;
                }
            }
        }
        store_rows(y + m * N + g * G, acc, rows);
    }
}

/* A SIMD path's group function: LANES rows of the group per pass h, up to MAXR activation rows per CHUNK call, each
 * call specialized (always_inline, constant format and row count) so its row loops unroll into registers. */
#define EXO_CHUNK(CHUNK, F, MAXR, MC) \
    CHUNK(F, (MC) < (MAXR) ? (MC) : (MAXR), cg, sg, nb, qa, K, m0, y, N, g * G, h, rows)
#define EXO_CHUNK_SWITCH(CHUNK, F, MAXR)                                 \
    switch (mc) {                                                        \
        case 1: EXO_CHUNK(CHUNK, F, MAXR, 1); break;                     \
        case 2: EXO_CHUNK(CHUNK, F, MAXR, 2); break;                     \
        case 3: EXO_CHUNK(CHUNK, F, MAXR, 3); break;                     \
        case 4: EXO_CHUNK(CHUNK, F, MAXR, 4); break;                     \
        case 5: EXO_CHUNK(CHUNK, F, MAXR, 5); break;                     \
        case 6: EXO_CHUNK(CHUNK, F, MAXR, 6); break;                     \
        case 7: EXO_CHUNK(CHUNK, F, MAXR, 7); break;                     \
        default: EXO_CHUNK(CHUNK, F, MAXR, 8); break;                    \
    }
#define EXO_GROUP_FN(NAME, CHUNK, LANES, MAXR)                                                                  \
    static void NAME(int fmt, const uint8_t* codes, const uint8_t* scales, int64_t nb, const void* qa, int64_t K, \
                     int64_t M, float* y, int64_t N, int64_t g, int64_t rows) {                                  \
        const uint8_t* cg = codes + g * nb * code_block_bytes(fmt);                                              \
        const uint8_t* sg = scales + g * nb * scale_block_bytes(fmt);                                            \
        for (int h = 0; h * (LANES) < rows; h++)                                                                 \
            for (int64_t m0 = 0; m0 < M; m0 += (MAXR)) {                                                         \
                const int mc = (int)(M - m0 < (MAXR) ? M - m0 : (MAXR));                                         \
                if (fmt == EXO_Q4_0) {                                                                           \
                    EXO_CHUNK_SWITCH(CHUNK, EXO_Q4_0, MAXR)                                                      \
                } else if (fmt == EXO_Q4_1) {                                                                    \
                    EXO_CHUNK_SWITCH(CHUNK, EXO_Q4_1, MAXR)                                                      \
                } else if (fmt == EXO_Q6_K) {                                                                    \
                    EXO_CHUNK_SWITCH(CHUNK, EXO_Q6_K, MAXR)                                                      \
                } else {                                                                                         \
                    EXO_CHUNK_SWITCH(CHUNK, EXO_Q8_0, MAXR)                                                      \
                }                                                                                                \
            }                                                                                                    \
    }

#if defined(EXO_AVX512)
#include "qmatmul_avx512.h"
#define GROUP_FN group_avx512
#if defined(EXO_AMX)
#include "qmatmul_amx.h"
#define ISA_NAME "avx512vnni-amx"
#elif defined(__AVX512VNNI__)
#define ISA_NAME "avx512vnni"
#else
#define ISA_NAME "avx512"
#endif
#elif defined(EXO_AVX2)
#include "qmatmul_avx2.h"
#define GROUP_FN group_avx2
#if defined(EXO_AVXVNNI)
#define ISA_NAME "avx2-vnni"
#else
#define ISA_NAME "avx2"
#endif
#elif defined(EXO_NEON)
#include "qmatmul_neon.h"
#define GROUP_FN group_neon
#define ISA_NAME "neon"
#else
#define GROUP_FN group_scalar
#define ISA_NAME "scalar"
#endif

const char* exo_isa(void) { return ISA_NAME; }

void exo_qmatmul_rows(int fmt, const uint8_t* packed, int64_t N, int64_t K, const void* qa, int64_t M, float* y,
                      int64_t n_begin, int64_t n_end) {
    if (!valid_shape(fmt, K) || M <= 0 || n_begin % G) return;
    if (n_end > N) n_end = N;
    const int64_t nb = K / EXO_BLOCK, ng = (N + G - 1) / G;
    const uint8_t* scales = packed + ng * nb * code_block_bytes(fmt);
#if defined(EXO_AMX)
    if ((fmt == EXO_Q4_0 ? M >= EXO_AMX_MIN_M : (fmt == EXO_Q4_1 || fmt == EXO_Q8_0) && M >= EXO_AMX_MIN_M_Q4_1_Q8_0)
        && amx_usable()) {
        amx_rows(fmt, packed, N, K, qa, M, y, n_begin, n_end);
        return;
    }
#endif
    for (int64_t g = n_begin / G; g * G < n_end; g++) {
        const int64_t rows = n_end - g * G < G ? n_end - g * G : G;
        GROUP_FN(fmt, packed, scales, nb, qa, K, M, y, N, g, rows);
    }
}
