/* aarch64 NEON path of qmatmul.c (included there). One lane per output row: ld2 de-interleaves the 16 bytes of a
 * 32-byte code unit for rows 8h..8h+7 into those rows' first and second k; each, widened to int16, is multiplied by
 * one int16 activation code (by-element smlal / smlal2 into two int32x4 of 4 rows: exact). Codes are unsigned (Q4
 * nibbles, Q8_0 code + 128), so the sum starts at -8 * s (Q4_0) or -128 * s (Q8_0) as on x86. */

/* Activation rows per pass. gcc 12 (-mcpu=cortex-a76) already spills some vector registers at 2 (42 reloads in the
 * file, 10 at 1, 347 at 3): it hoists the ld2/uxtl of the unrolled block, and by-element smlal takes its int16
 * activation from v0-v15 only. Whether 1 or 2 is faster on a Cortex-A76 needs a board (emulation has no timing). */
#define NEON_MAX_ROWS 2

/* acc[0..1] (rows 0-3, 4-7) + w (8 rows' int16 codes) * lane LANE of x (8 activation codes); LANE a literal. */
#define NEON_MLA(ACC, w, x, LANE)                                  \
    {                                                              \
        ACC[0] = vmlal_laneq_s16(ACC[0], vget_low_s16(w), x, LANE); \
        ACC[1] = vmlal_high_laneq_s16(ACC[1], w, x, LANE);          \
    }

/* Unit U of a Q4 code block: low nibbles k = 2U, 2U+1 (x[U/4], lanes 2(U%4), +1), high nibbles k = 16+2U, +1. */
#define NEON_Q4_UNIT(U)                                                                         \
    {                                                                                           \
        const uint8x8x2_t v = vld2_u8(cb + 32 * (U));                                           \
        const int16x8_t lo0 = vreinterpretq_s16_u16(vmovl_u8(vand_u8(v.val[0], low4)));         \
        const int16x8_t lo1 = vreinterpretq_s16_u16(vmovl_u8(vand_u8(v.val[1], low4)));         \
        const int16x8_t hi0 = vreinterpretq_s16_u16(vmovl_u8(vshr_n_u8(v.val[0], 4)));          \
        const int16x8_t hi1 = vreinterpretq_s16_u16(vmovl_u8(vshr_n_u8(v.val[1], 4)));          \
        for (int i = 0; i < MC; i++) {                                                          \
            NEON_MLA(isum[i], lo0, x[i][(U) / 4], 2 * ((U) % 4))                                \
            NEON_MLA(isum[i], lo1, x[i][(U) / 4], 2 * ((U) % 4) + 1)                            \
            NEON_MLA(isum[i], hi0, x[i][2 + (U) / 4], 2 * ((U) % 4))                            \
            NEON_MLA(isum[i], hi1, x[i][2 + (U) / 4], 2 * ((U) % 4) + 1)                        \
        }                                                                                       \
    }
/* Unit U of a Q8_0 code block: k = 2U, 2U+1 (x[U/4], lanes 2(U%4), +1). */
#define NEON_Q8_UNIT(U)                                                                         \
    {                                                                                           \
        const uint8x8x2_t v = vld2_u8(cb + 32 * (U));                                           \
        const int16x8_t w0 = vreinterpretq_s16_u16(vmovl_u8(v.val[0]));                         \
        const int16x8_t w1 = vreinterpretq_s16_u16(vmovl_u8(v.val[1]));                         \
        for (int i = 0; i < MC; i++) {                                                          \
            NEON_MLA(isum[i], w0, x[i][(U) / 4], 2 * ((U) % 4))                                 \
            NEON_MLA(isum[i], w1, x[i][(U) / 4], 2 * ((U) % 4) + 1)                             \
        }                                                                                       \
    }

/* Q6_K's signed code word (see qmatmul.c): field F of plane words P moved to the top and back arithmetically, bits
 * 0-3 taken from the bytes B widened (their low nibbles: bsl ignores the rest). */
#define NEON_Q6K_WORD(P, F, B) \
    vbslq_s16(low4w, vreinterpretq_s16_u16(vmovl_u8(B)), vshrq_n_s16(vshlq_n_s16(P, 14 - 2 * (F)), 10))
/* Unit U of a Q6_K code block: low nibbles k = 2U, 2U+1 into isum0 (x[U/4]), high nibbles k = 16+2U, +1 into isum1
 * (x[2 + U/4]); p[h][j] the plane words of sub-block h, k parity j. */
#define NEON_Q6K_UNIT(U)                                                                        \
    {                                                                                           \
        const uint8x8x2_t v = vld2_u8(cb + 32 * (U));                                           \
        const int16x8_t lo0 = NEON_Q6K_WORD(p[0][0], U, v.val[0]);                              \
        const int16x8_t lo1 = NEON_Q6K_WORD(p[0][1], U, v.val[1]);                              \
        const int16x8_t hi0 = NEON_Q6K_WORD(p[1][0], U, vshr_n_u8(v.val[0], 4));                \
        const int16x8_t hi1 = NEON_Q6K_WORD(p[1][1], U, vshr_n_u8(v.val[1], 4));                \
        for (int i = 0; i < MC; i++) {                                                          \
            NEON_MLA(isum0[i], lo0, x[i][(U) / 4], 2 * ((U) % 4))                               \
            NEON_MLA(isum0[i], lo1, x[i][(U) / 4], 2 * ((U) % 4) + 1)                           \
            NEON_MLA(isum1[i], hi0, x[i][2 + (U) / 4], 2 * ((U) % 4))                           \
            NEON_MLA(isum1[i], hi1, x[i][2 + (U) / 4], 2 * ((U) % 4) + 1)                       \
        }                                                                                       \
    }

/* Float32 of 4 rows' int8 sub-block scales times their fp16 d: s = d * sc, exact. */
static inline float32x4_t neon_q6k_scale(float32x4_t d, int16x4_t sc) {
    return vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(sc)));
}

/* Q6_K's block b, lanes 8h .. 8h+7 (codes cb0 of the whole block, the group's scales sg) for activation rows
 * a[0..MC-1] with codes x into acc: two exact sums per activation row (sub-blocks), signed code words. */
static inline __attribute__((always_inline)) void neon_block_q6k(const int MC, const uint8_t* cb0, const uint8_t* sg,
                                                                 int64_t b, int h, int16x8_t x[][4],
                                                                 const act_row* a, float32x4_t acc[][2]) {
    const uint16x8_t low4w = vdupq_n_u16(0x0f);
    const uint8_t* cb = cb0 + 16 * h;
    int16x8_t p[2][2]; /* plane words of rows 8h..8h+7: [sub-block][k parity] */
    for (int t = 0; t < 2; t++) {
        const uint16x8x2_t w = vld2q_u16((const uint16_t*)(cb0 + 256 + 64 * t + 32 * h));
        p[t][0] = vreinterpretq_s16_u16(w.val[0]);
        p[t][1] = vreinterpretq_s16_u16(w.val[1]);
    }
    int32x4_t isum0[NEON_MAX_ROWS][2], isum1[NEON_MAX_ROWS][2];
    for (int i = 0; i < MC; i++) isum0[i][0] = isum0[i][1] = isum1[i][0] = isum1[i][1] = vdupq_n_s32(0);
    NEON_Q6K_UNIT(0) NEON_Q6K_UNIT(1) NEON_Q6K_UNIT(2) NEON_Q6K_UNIT(3)
    NEON_Q6K_UNIT(4) NEON_Q6K_UNIT(5) NEON_Q6K_UNIT(6) NEON_Q6K_UNIT(7)
    const uint8_t* dp = q6k_d(sg, b) + 16 * h;
    const float32x4_t d0 = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(dp)));
    const float32x4_t d1 = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(dp + 8)));
    const int16x8_t sc0 = vmovl_s8(vld1_s8((const int8_t*)q6k_sc(sg, b) + 8 * h));
    const int16x8_t sc1 = vmovl_s8(vld1_s8((const int8_t*)q6k_sc(sg, b) + 16 + 8 * h));
    const float32x4_t s00 = neon_q6k_scale(d0, vget_low_s16(sc0)), s01 = neon_q6k_scale(d1, vget_high_s16(sc0));
    const float32x4_t s10 = neon_q6k_scale(d0, vget_low_s16(sc1)), s11 = neon_q6k_scale(d1, vget_high_s16(sc1));
    for (int i = 0; i < MC; i++) {
        const float32x4_t da = vdupq_n_f32(a[i].d[b]);
        const float32x4_t t0 = vaddq_f32(vmulq_f32(s00, vcvtq_f32_s32(isum0[i][0])),
                                         vmulq_f32(s10, vcvtq_f32_s32(isum1[i][0])));
        const float32x4_t t1 = vaddq_f32(vmulq_f32(s01, vcvtq_f32_s32(isum0[i][1])),
                                         vmulq_f32(s11, vcvtq_f32_s32(isum1[i][1])));
        acc[i][0] = vaddq_f32(acc[i][0], vmulq_f32(da, t0));
        acc[i][1] = vaddq_f32(acc[i][1], vmulq_f32(da, t1));
    }
}

/* Rows m0 .. m0+MC-1, lanes 8h .. 8h+7 (two 4-row quads) of one row group. */
static inline __attribute__((always_inline)) void neon_chunk(const int fmt, const int MC, const uint8_t* cg,
                                                             const uint8_t* sg, int64_t nb, const void* qa, int64_t K,
                                                             int64_t m0, float* y, int64_t N, int64_t n0, int h,
                                                             int64_t rows) {
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : fmt == EXO_Q8_0 ? -128 : 0;
    const uint8x8_t low4 = vdup_n_u8(0x0f);
    act_row a[NEON_MAX_ROWS];
    float32x4_t acc[NEON_MAX_ROWS][2];
    for (int i = 0; i < MC; i++) {
        a[i] = act_of(qa, K, m0 + i);
        acc[i][0] = acc[i][1] = vdupq_n_f32(0.0f);
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* cb = cg + b * cbb + 16 * h;
        const uint8_t* sb = sg + b * sbb + 16 * h;
        int32x4_t isum[NEON_MAX_ROWS][2];
        for (int i = 0; i < MC; i++) isum[i][0] = isum[i][1] = vdupq_n_s32(bias * a[i].s[b]);
        int16x8_t x[NEON_MAX_ROWS][4]; /* the block's 32 activation codes of each row */
        for (int i = 0; i < MC; i++)
            for (int j = 0; j < 4; j++) x[i][j] = vld1q_s16(a[i].q + 32 * b + 8 * j);
        if (fmt == EXO_Q6_K) {
            neon_block_q6k(MC, cg + b * cbb, sg, b, h, x, a, acc);
            continue;
        }
        if (fmt == EXO_Q8_0) {
            NEON_Q8_UNIT(0) NEON_Q8_UNIT(1) NEON_Q8_UNIT(2) NEON_Q8_UNIT(3)
            NEON_Q8_UNIT(4) NEON_Q8_UNIT(5) NEON_Q8_UNIT(6) NEON_Q8_UNIT(7)
            NEON_Q8_UNIT(8) NEON_Q8_UNIT(9) NEON_Q8_UNIT(10) NEON_Q8_UNIT(11)
            NEON_Q8_UNIT(12) NEON_Q8_UNIT(13) NEON_Q8_UNIT(14) NEON_Q8_UNIT(15)
        } else {
            NEON_Q4_UNIT(0) NEON_Q4_UNIT(1) NEON_Q4_UNIT(2) NEON_Q4_UNIT(3)
            NEON_Q4_UNIT(4) NEON_Q4_UNIT(5) NEON_Q4_UNIT(6) NEON_Q4_UNIT(7)
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
