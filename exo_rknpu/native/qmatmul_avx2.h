/* AVX2 path of qmatmul.c (included there; needs AVX2 and F16C). One ymm lane per output row: the 16 bytes of a
 * 32-byte code unit for rows 8h..8h+7 (8 rows x 2 k) zero-extended to words (vpmovzxbw) are one vpmaddwd operand
 * (int16 pairs to int32, exact: no pair reaches -32768 * -32768), added with vpaddd; with AVX-VNNI (EXO_AVXVNNI, e.g.
 * Alder Lake without AVX-512) the 256-bit vpdpwssd does both. The other operand is the pair of int16 activation codes
 * broadcast to all lanes. Unsigned codes, so the sum starts at -8 * s (Q4_0) or -128 * s (Q8_0) as in AVX-512. */

static inline __m256i avx2_bcast2(const int16_t* q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm256_set1_epi32(v);
}

static inline __m256i avx2_dot2(__m256i acc, __m256i w, __m256i a) {
#if defined(EXO_AVXVNNI)
    return _mm256_dpwssd_avx_epi32(acc, w, a);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, a));
#endif
}

/* Q6_K's signed code words (see AVX512_Q6K_WORD): the 2-bit field F of the plane words p moved to the top and back
 * arithmetically, its low bits (other fields) cleared, merged with the nibbles nib (0..15 in each word). */
#define AVX2_Q6K_WORD(p, F, nib) \
    _mm256_or_si256(nib, _mm256_andnot_si256(low4, _mm256_srai_epi16(_mm256_slli_epi16(p, 14 - 2 * (F)), 10)))

/* Q6_K's block b, lanes 8h .. 8h+7 (codes cb, the group's scales sg) for activation rows a[0..MC-1] into acc: two
 * exact sums per activation row (sub-blocks), signed code words. */
static inline __attribute__((always_inline)) void avx2_block_q6k(const int MC, const uint8_t* cb, const uint8_t* sg,
                                                                 int64_t b, int h, const act_row* a, __m256* acc) {
    const __m256i low4 = _mm256_set1_epi16(0x0f);
    const __m256i p0 = _mm256_loadu_si256((const __m256i*)(cb + 256 + 32 * h));
    const __m256i p1 = _mm256_loadu_si256((const __m256i*)(cb + 320 + 32 * h));
    __m256i isum0[4], isum1[4];
    for (int i = 0; i < MC; i++) isum0[i] = isum1[i] = _mm256_setzero_si256();
    for (int u = 0; u < 8; u++) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(cb + 32 * u + 16 * h)));
        const __m256i lo = AVX2_Q6K_WORD(p0, u, _mm256_and_si256(v, low4));
        const __m256i hi = AVX2_Q6K_WORD(p1, u, _mm256_srli_epi16(v, 4));
        for (int i = 0; i < MC; i++) {
            isum0[i] = avx2_dot2(isum0[i], lo, avx2_bcast2(a[i].q + 32 * b + 2 * u));
            isum1[i] = avx2_dot2(isum1[i], hi, avx2_bcast2(a[i].q + 32 * b + 16 + 2 * u));
        }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(q6k_d(sg, b) + 16 * h)));
    const uint8_t* sc = q6k_sc(sg, b) + 8 * h;
    const __m256 s0 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)sc))));
    const __m256 s1 =
        _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(sc + 16)))));
    for (int i = 0; i < MC; i++) {
        const __m256 t = _mm256_add_ps(_mm256_mul_ps(s0, _mm256_cvtepi32_ps(isum0[i])),
                                       _mm256_mul_ps(s1, _mm256_cvtepi32_ps(isum1[i])));
        acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_set1_ps(a[i].d[b]), t));
    }
}

/* Rows m0 .. m0+MC-1, lanes 8h .. 8h+7 of one row group. */
static inline __attribute__((always_inline)) void avx2_chunk(const int fmt, const int MC, const uint8_t* cg,
                                                             const uint8_t* sg, int64_t nb, const void* qa, int64_t K,
                                                             int64_t m0, float* y, int64_t N, int64_t n0, int h,
                                                             int64_t rows) {
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : fmt == EXO_Q8_0 ? -128 : 0;
    const __m256i low4 = _mm256_set1_epi16(0x0f);
    act_row a[4];
    __m256 acc[4];
    for (int i = 0; i < MC; i++) {
        a[i] = act_of(qa, K, m0 + i);
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* cb = cg + b * cbb + 16 * h;
        const uint8_t* sb = sg + b * sbb + 16 * h;
        for (int64_t o = 0; o < cbb; o += 64) _mm_prefetch((const char*)(cb + EXO_PREFETCH + o), _MM_HINT_T0);
        _mm_prefetch((const char*)(sb + EXO_PREFETCH * sbb / cbb), _MM_HINT_T0);
        if (fmt == EXO_Q6_K) {
            avx2_block_q6k(MC, cg + b * cbb, sg, b, h, a, acc);
            continue;
        }
        __m256i isum[4];
        for (int i = 0; i < MC; i++) isum[i] = _mm256_set1_epi32(bias * a[i].s[b]);
        if (fmt == EXO_Q8_0) {
            for (int u = 0; u < 16; u++) {
                const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(cb + 32 * u)));
                for (int i = 0; i < MC; i++)
                    isum[i] = avx2_dot2(isum[i], w, avx2_bcast2(a[i].q + 32 * b + 2 * u));
            }
        } else {
            for (int u = 0; u < 8; u++) {
                const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(cb + 32 * u)));
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_srli_epi16(v, 4);
                for (int i = 0; i < MC; i++) {
                    isum[i] = avx2_dot2(isum[i], lo, avx2_bcast2(a[i].q + 32 * b + 2 * u));
                    isum[i] = avx2_dot2(isum[i], hi, avx2_bcast2(a[i].q + 32 * b + 16 + 2 * u));
                }
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)sb));
        for (int i = 0; i < MC; i++) {
            const __m256 t = _mm256_mul_ps(dw, _mm256_set1_ps(a[i].d[b]));
            acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(t, _mm256_cvtepi32_ps(isum[i])));
        }
        if (fmt == EXO_Q4_1) {
            const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sb + 32)));
            for (int i = 0; i < MC; i++) {
                const float das = a[i].d[b] * (float)a[i].s[b];
                acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(mw, _mm256_set1_ps(das)));
            }
        }
    }
    const int64_t lanes = rows - 8 * h;
    for (int i = 0; i < MC; i++) {
        float* out = y + (m0 + i) * N + n0 + 8 * h;
        if (lanes >= 8) {
            _mm256_storeu_ps(out, acc[i]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc[i]);
            store_rows(out, tmp, lanes);
        }
    }
}


EXO_GROUP_FN(group_avx2, avx2_chunk, 8, 4)
