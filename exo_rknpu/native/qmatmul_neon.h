/* aarch64 NEON path of qmatmul.c (included there). One lane per output row: a 64-byte code chunk is four int8x16
 * vectors of 4 rows x 4 k, each the weight operand of sdot against 4 activation codes (one lane of the block's
 * codes, broadcast by the by-element form; __ARM_FEATURE_DOTPROD). Without dotprod, smull + pairwise widening adds
 * give the same exact int32 sums.
 * Q4 nibbles (0..15) are already valid s8; Q8_0's stored code + 128 is flipped back to the signed code. */

/* Activation rows per pass: with 3 or 4, gcc 12 spills vector registers in the block loop (counted in its output). */
#define NEON_MAX_ROWS 2

/* acc + the 4-byte dot products of w's 4 rows with lane LANE (4 activation codes) of x; LANE a literal. */
#if defined(__ARM_FEATURE_DOTPROD)
#define NEON_DOT(acc, w, x, LANE) vdotq_laneq_s32(acc, w, x, LANE)
#else
#define NEON_DOT(acc, w, x, LANE) neon_dot4(acc, w, vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x), LANE)))
static inline int32x4_t neon_dot4(int32x4_t acc, int8x16_t w, int8x16_t a) {
    const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(a))); /* rows 0,1: k0+k1, k2+k3 */
    const int32x4_t hi = vpaddlq_s16(vmull_high_s8(w, a));                       /* rows 2,3 */
    return vaddq_s32(acc, vpaddq_s32(lo, hi));
}
#endif

/* Chunk C of a Q4 code block: low nibbles with k = 4C.. (lane C of x0), high nibbles with k = 16+4C.. (of x1). */
#define NEON_Q4_CHUNK(C)                                                                       \
    {                                                                                          \
        const uint8x16_t v0 = vld1q_u8(cb + 64 * (C)), v1 = vld1q_u8(cb + 64 * (C) + 16);      \
        const int8x16_t lo0 = vreinterpretq_s8_u8(vandq_u8(v0, low4));                         \
        const int8x16_t lo1 = vreinterpretq_s8_u8(vandq_u8(v1, low4));                         \
        const int8x16_t hi0 = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4));                          \
        const int8x16_t hi1 = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));                          \
        for (int i = 0; i < MC; i++) {                                                         \
            isum[i][0] = NEON_DOT(NEON_DOT(isum[i][0], lo0, x0[i], C), hi0, x1[i], C);         \
            isum[i][1] = NEON_DOT(NEON_DOT(isum[i][1], lo1, x0[i], C), hi1, x1[i], C);         \
        }                                                                                      \
    }
/* Chunk C of a Q8_0 code block (k = 4C..4C+3: lane C & 3 of x0 or x1). */
#define NEON_Q8_CHUNK(C, X)                                                                              \
    {                                                                                                    \
        const int8x16_t w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(cb + 64 * (C)), flip));               \
        const int8x16_t w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(cb + 64 * (C) + 16), flip));          \
        for (int i = 0; i < MC; i++) {                                                                   \
            isum[i][0] = NEON_DOT(isum[i][0], w0, X[i], (C) & 3);                                        \
            isum[i][1] = NEON_DOT(isum[i][1], w1, X[i], (C) & 3);                                        \
        }                                                                                                \
    }

/* Rows m0 .. m0+MC-1, lanes 8h .. 8h+7 (two 4-row quads) of one row group. */
static inline __attribute__((always_inline)) void neon_chunk(const int fmt, const int MC, const uint8_t* cg,
                                                             const uint8_t* sg, int64_t nb, const void* qa, int64_t K,
                                                             int64_t m0, float* y, int64_t N, int64_t n0, int h,
                                                             int64_t rows) {
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : 0;
    const uint8x16_t low4 = vdupq_n_u8(0x0f), flip = vdupq_n_u8(0x80);
    act_row a[NEON_MAX_ROWS];
    float32x4_t acc[NEON_MAX_ROWS][2];
    for (int i = 0; i < MC; i++) {
        a[i] = act_of(qa, K, m0 + i);
        acc[i][0] = acc[i][1] = vdupq_n_f32(0.0f);
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* cb = cg + b * cbb + 32 * h;
        const uint8_t* sb = sg + b * sbb + 16 * h;
        int32x4_t isum[NEON_MAX_ROWS][2];
        for (int i = 0; i < MC; i++) isum[i][0] = isum[i][1] = vdupq_n_s32(bias * a[i].s[b]);
        int8x16_t x0[NEON_MAX_ROWS], x1[NEON_MAX_ROWS]; /* the block's 32 activation codes of each row */
        for (int i = 0; i < MC; i++) {
            x0[i] = vld1q_s8(a[i].q + 32 * b);
            x1[i] = vld1q_s8(a[i].q + 32 * b + 16);
        }
        if (fmt == EXO_Q8_0) {
            NEON_Q8_CHUNK(0, x0) NEON_Q8_CHUNK(1, x0) NEON_Q8_CHUNK(2, x0) NEON_Q8_CHUNK(3, x0)
            NEON_Q8_CHUNK(4, x1) NEON_Q8_CHUNK(5, x1) NEON_Q8_CHUNK(6, x1) NEON_Q8_CHUNK(7, x1)
        } else {
            NEON_Q4_CHUNK(0) NEON_Q4_CHUNK(1) NEON_Q4_CHUNK(2) NEON_Q4_CHUNK(3)
        }
        const float32x4_t dw0 = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(sb)));
        const float32x4_t dw1 = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(sb + 8)));
        for (int i = 0; i < MC; i++) {
            const float32x4_t da = vdupq_n_f32(a[i].d[b]);
            acc[i][0] = vaddq_f32(acc[i][0], vmulq_f32(vmulq_f32(dw0, da), vcvtq_f32_s32(isum[i][0])));
            acc[i][1] = vaddq_f32(acc[i][1], vmulq_f32(vmulq_f32(dw1, da), vcvtq_f32_s32(isum[i][1])));
        }
        if (fmt == EXO_Q4_1) {
            const float32x4_t mw0 = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(sb + 32)));
            const float32x4_t mw1 = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(sb + 40)));
            for (int i = 0; i < MC; i++) {
                const float32x4_t das = vdupq_n_f32(a[i].d[b] * (float)a[i].s[b]);
                acc[i][0] = vaddq_f32(acc[i][0], vmulq_f32(mw0, das));
                acc[i][1] = vaddq_f32(acc[i][1], vmulq_f32(mw1, das));
            }
        }
    }
    const int64_t lanes = rows - 8 * h;
    for (int i = 0; i < MC; i++) {
        float tmp[8];
        vst1q_f32(tmp, acc[i][0]);
        vst1q_f32(tmp + 4, acc[i][1]);
        store_rows(y + (m0 + i) * N + n0 + 8 * h, tmp, lanes < 8 ? lanes : 8);
    }
}


EXO_GROUP_FN(group_neon, neon_chunk, 8, NEON_MAX_ROWS)
