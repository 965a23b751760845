/* aarch64 NEON path of qmatmul.c (included there). One lane per output row: a 64-byte code chunk is four int8x16
 * vectors of 4 rows x 4 k, each the weight operand of sdot against 4 activation codes broadcast to every lane
 * (__ARM_FEATURE_DOTPROD; without it, smull + pairwise widening adds give the same exact int32 sums).
 * Q4 nibbles (0..15) are already valid s8; Q8_0's stored code + 128 is flipped back to the signed code. */

static inline int32x4_t neon_dot4(int32x4_t acc, int8x16_t w, int8x16_t a) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, w, a);
#else
    const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(a))); /* rows 0,1: k0+k1, k2+k3 */
    const int32x4_t hi = vpaddlq_s16(vmull_high_s8(w, a));                       /* rows 2,3 */
    return vaddq_s32(acc, vpaddq_s32(lo, hi));
#endif
}

static inline int8x16_t neon_bcast4(const int8_t* q) {
    int32_t v;
    memcpy(&v, q, 4);
    return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

/* Rows m0 .. m0+MC-1, lanes 8h .. 8h+7 (two 4-row quads) of one row group. */
static inline __attribute__((always_inline)) void neon_chunk(const int fmt, const int MC, const uint8_t* cg,
                                                             const uint8_t* sg, int64_t nb, const void* qa, int64_t K,
                                                             int64_t m0, float* y, int64_t N, int64_t n0, int h,
                                                             int64_t rows) {
    const int64_t cbb = fmt == EXO_Q8_0 ? 512 : 256, sbb = fmt == EXO_Q4_1 ? 64 : 32;
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : 0;
    const uint8x16_t low4 = vdupq_n_u8(0x0f), flip = vdupq_n_u8(0x80);
    act_row a[4];
    float32x4_t acc[4][2];
    for (int i = 0; i < MC; i++) {
        a[i] = act_of(qa, K, m0 + i);
        acc[i][0] = acc[i][1] = vdupq_n_f32(0.0f);
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* cb = cg + b * cbb + 32 * h;
        const uint8_t* sb = sg + b * sbb + 16 * h;
        int32x4_t isum[4][2];
        for (int i = 0; i < MC; i++) isum[i][0] = isum[i][1] = vdupq_n_s32(bias * a[i].s[b]);
        if (fmt == EXO_Q8_0) {
            for (int c = 0; c < 8; c++) {
                const int8x16_t w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(cb + 64 * c), flip));
                const int8x16_t w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(cb + 64 * c + 16), flip));
                for (int i = 0; i < MC; i++) {
                    const int8x16_t x = neon_bcast4(a[i].q + 32 * b + 4 * c);
                    isum[i][0] = neon_dot4(isum[i][0], w0, x);
                    isum[i][1] = neon_dot4(isum[i][1], w1, x);
                }
            }
        } else {
            for (int c = 0; c < 4; c++) {
                const uint8x16_t v0 = vld1q_u8(cb + 64 * c), v1 = vld1q_u8(cb + 64 * c + 16);
                const int8x16_t lo0 = vreinterpretq_s8_u8(vandq_u8(v0, low4));
                const int8x16_t lo1 = vreinterpretq_s8_u8(vandq_u8(v1, low4));
                const int8x16_t hi0 = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4));
                const int8x16_t hi1 = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));
                for (int i = 0; i < MC; i++) {
                    const int8x16_t xl = neon_bcast4(a[i].q + 32 * b + 4 * c);
                    const int8x16_t xh = neon_bcast4(a[i].q + 32 * b + 16 + 4 * c);
                    isum[i][0] = neon_dot4(neon_dot4(isum[i][0], lo0, xl), hi0, xh);
                    isum[i][1] = neon_dot4(neon_dot4(isum[i][1], lo1, xl), hi1, xh);
                }
            }
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

#define NEON_CHUNKS(F)                                                                      \
    switch (mc) {                                                                           \
        case 1: neon_chunk(F, 1, cg, sg, nb, qa, K, m0, y, N, g * G, h, rows); break;        \
        case 2: neon_chunk(F, 2, cg, sg, nb, qa, K, m0, y, N, g * G, h, rows); break;        \
        case 3: neon_chunk(F, 3, cg, sg, nb, qa, K, m0, y, N, g * G, h, rows); break;        \
        default: neon_chunk(F, 4, cg, sg, nb, qa, K, m0, y, N, g * G, h, rows); break;       \
    }

static void group_neon(int fmt, const uint8_t* codes, const uint8_t* scales, int64_t nb, const void* qa, int64_t K,
                       int64_t M, float* y, int64_t N, int64_t g, int64_t rows) {
    const uint8_t* cg = codes + g * nb * (fmt == EXO_Q8_0 ? 512 : 256);
    const uint8_t* sg = scales + g * nb * (fmt == EXO_Q4_1 ? 64 : 32);
    for (int h = 0; h < 2 && 8 * h < rows; h++)
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mc = (int)(M - m0 < 4 ? M - m0 : 4);
            if (fmt == EXO_Q4_0) {
                NEON_CHUNKS(EXO_Q4_0)
            } else if (fmt == EXO_Q4_1) {
                NEON_CHUNKS(EXO_Q4_1)
            } else {
                NEON_CHUNKS(EXO_Q8_0)
            }
        }
}
