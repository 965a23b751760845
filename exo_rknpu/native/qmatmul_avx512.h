/* AVX-512 VNNI path of qmatmul.c (included there; needs AVX512F/BW/VNNI and F16C).
 * One zmm lane per output row: a 64-byte code chunk is 16 rows x 4 k, the u8 operand of vpdpbusd, and the s8
 * operand is 4 activation codes broadcast to all lanes. Codes are unsigned (Q4 nibbles 0..15, Q8_0 code + 128), so
 * the integer sum starts at -8 * s (Q4_0) or -128 * s (Q8_0) to give the signed isum exactly. */

static inline __m512i avx512_bcast4(const int8_t* q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
}

/* Rows m0 .. m0+MC-1 of one row group: each loaded code chunk feeds all MC activation rows. */
static inline __attribute__((always_inline)) void avx512_chunk(const int fmt, const int MC, const uint8_t* cg,
                                                               const uint8_t* sg, int64_t nb, const void* qa,
                                                               int64_t K, int64_t m0, float* y, int64_t N,
                                                               int64_t n0, int h, int64_t rows) {
    (void)h; /* 16 lanes: one pass */
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : fmt == EXO_Q8_0 ? -128 : 0;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    act_row a[8];
    __m512 acc[8];
    for (int i = 0; i < MC; i++) {
        a[i] = act_of(qa, K, m0 + i);
        acc[i] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* cb = cg + b * cbb;
        const uint8_t* sb = sg + b * sbb;
        /* prefetches never fault, so reading past the last group is harmless */
        for (int64_t o = 0; o < cbb; o += 64) _mm_prefetch((const char*)(cb + EXO_PREFETCH + o), _MM_HINT_T0);
        _mm_prefetch((const char*)(sb + EXO_PREFETCH * sbb / cbb), _MM_HINT_T0);
        __m512i isum[8];
        for (int i = 0; i < MC; i++) isum[i] = _mm512_set1_epi32(bias * a[i].s[b]);
        if (fmt == EXO_Q8_0) {
            for (int c = 0; c < 8; c++) {
                const __m512i w = _mm512_loadu_si512((const void*)(cb + 64 * c));
                for (int i = 0; i < MC; i++)
                    isum[i] = _mm512_dpbusd_epi32(isum[i], w, avx512_bcast4(a[i].q + 32 * b + 4 * c));
            }
        } else {
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void*)(cb + 64 * c));
                const __m512i lo = _mm512_and_si512(v, low4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int i = 0; i < MC; i++) {
                    isum[i] = _mm512_dpbusd_epi32(isum[i], lo, avx512_bcast4(a[i].q + 32 * b + 4 * c));
                    isum[i] = _mm512_dpbusd_epi32(isum[i], hi, avx512_bcast4(a[i].q + 32 * b + 16 + 4 * c));
                }
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sb));
        for (int i = 0; i < MC; i++) {
            const __m512 t = _mm512_mul_ps(dw, _mm512_set1_ps(a[i].d[b]));
            acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(t, _mm512_cvtepi32_ps(isum[i])));
        }
        if (fmt == EXO_Q4_1) {
            const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sb + 32)));
            for (int i = 0; i < MC; i++) {
                const float das = a[i].d[b] * (float)a[i].s[b];
                acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(mw, _mm512_set1_ps(das)));
            }
        }
    }
    const __mmask16 keep = (__mmask16)(rows >= G ? 0xffffu : (1u << rows) - 1u);
    for (int i = 0; i < MC; i++) _mm512_mask_storeu_ps(y + (m0 + i) * N + n0, keep, acc[i]);
}


EXO_GROUP_FN(group_avx512, avx512_chunk, 16, 8)
