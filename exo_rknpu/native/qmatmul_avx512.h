/* AVX-512 path of qmatmul.c (included there; needs AVX512F/BW and F16C; AVX512_VNNI for vpdpwssd).
 * One zmm lane per output row: a 32-byte code unit (16 rows x 2 k) zero-extended to words (vpmovzxbw) holds in each
 * 32-bit lane one row's 2 codes, the first operand of vpdpwssd (or vpmaddwd + vpaddd without VNNI); the second is
 * the pair of int16 activation codes broadcast to all lanes. Codes are unsigned (Q4 nibbles 0..15, Q8_0 code + 128),
 * so the integer sum starts at -8 * s (Q4_0) or -128 * s (Q8_0) to give the signed isum exactly. */

static inline __m512i avx512_bcast2(const int16_t* q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
}

/* acc + per lane w.lo16 * a.lo16 + w.hi16 * a.hi16 (exact: no pair reaches -32768 * -32768) */
static inline __m512i avx512_dot2(__m512i acc, __m512i w, __m512i a) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, w, a);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, a));
#endif
}

/* Q6_K's signed code words of one unit: the nibbles nib (0..15 in each word) merged under the 2-bit field F of the
 * plane words p, moved to the top and back arithmetically: (signed high part) * 16 | nibble = q - 32. */
#define AVX512_Q6K_WORD(p, F, nib) \
    _mm512_ternarylogic_epi32(low4, nib, _mm512_srai_epi16(_mm512_slli_epi16(p, 14 - 2 * (F)), 10), 0xCA)

/* Q6_K's block b (codes cb, the group's scales sg) for activation rows a[0..MC-1] into acc (the layout and order at
 * the top of qmatmul.c): two exact integer sums per activation row, one per sub-block (the block's low nibbles are
 * k < 16, its high nibbles k >= 16), no bias: the code words are signed. */
static inline __attribute__((always_inline)) void avx512_block_q6k(const int MC, const uint8_t* cb, const uint8_t* sg,
                                                                   int64_t b, const act_row* a, __m512* acc) {
    const __m512i low4 = _mm512_set1_epi16(0x0f);
    const __m512i p0 = _mm512_loadu_si512(cb + 256), p1 = _mm512_loadu_si512(cb + 320);
    __m512i isum0[8], isum1[8];
    for (int i = 0; i < MC; i++) isum0[i] = isum1[i] = _mm512_setzero_si512();
    for (int u = 0; u < 8; u++) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(cb + 32 * u)));
        const __m512i lo = AVX512_Q6K_WORD(p0, u, v);
        const __m512i hi = AVX512_Q6K_WORD(p1, u, _mm512_srli_epi16(v, 4));
        for (int i = 0; i < MC; i++) {
            isum0[i] = avx512_dot2(isum0[i], lo, avx512_bcast2(a[i].q + 32 * b + 2 * u));
            isum1[i] = avx512_dot2(isum1[i], hi, avx512_bcast2(a[i].q + 32 * b + 16 + 2 * u));
        }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)q6k_d(sg, b)));
    const uint8_t* sc = q6k_sc(sg, b);
    const __m512 s0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)sc))));
    const __m512 s1 =
        _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(sc + 16)))));
    for (int i = 0; i < MC; i++) {
        const __m512 t = _mm512_add_ps(_mm512_mul_ps(s0, _mm512_cvtepi32_ps(isum0[i])),
                                       _mm512_mul_ps(s1, _mm512_cvtepi32_ps(isum1[i])));
        acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_set1_ps(a[i].d[b]), t));
    }
}

/* Rows m0 .. m0+MC-1 of one row group: each loaded code unit feeds all MC activation rows. */
static inline __attribute__((always_inline)) void avx512_chunk(const int fmt, const int MC, const uint8_t* cg,
                                                               const uint8_t* sg, int64_t nb, const void* qa,
                                                               int64_t K, int64_t m0, float* y, int64_t N,
                                                               int64_t n0, int h, int64_t rows) {
    (void)h; /* 16 lanes: one pass */
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : fmt == EXO_Q8_0 ? -128 : 0;
    const __m512i low4 = _mm512_set1_epi16(0x0f);
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
        if (fmt == EXO_Q6_K) {
            avx512_block_q6k(MC, cb, sg, b, a, acc);
            continue;
        }
        /* For one or two activation rows, two exact partial sums per row (halves the vpdpwssd dependency chain:
         * M = 1 runs 3-4 % faster); more rows have enough independent chains, and 2 * MC sums would spill. */
        const int split = MC <= 2;
        __m512i isum[8], isum2[8];
        for (int i = 0; i < MC; i++) {
            isum[i] = _mm512_set1_epi32(bias * a[i].s[b]);
            isum2[i] = _mm512_setzero_si512();
        }
        if (fmt == EXO_Q8_0) {
            for (int u = 0; u < 16; u += 2) {
                const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(cb + 32 * u)));
                const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(cb + 32 * u + 32)));
                for (int i = 0; i < MC; i++) {
                    isum[i] = avx512_dot2(isum[i], w0, avx512_bcast2(a[i].q + 32 * b + 2 * u));
                    if (split)
                        isum2[i] = avx512_dot2(isum2[i], w1, avx512_bcast2(a[i].q + 32 * b + 2 * u + 2));
                    else
                        isum[i] = avx512_dot2(isum[i], w1, avx512_bcast2(a[i].q + 32 * b + 2 * u + 2));
                }
            }
        } else {
            for (int u = 0; u < 8; u++) {
                const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(cb + 32 * u)));
                const __m512i lo = _mm512_and_si512(v, low4);
                const __m512i hi = _mm512_srli_epi16(v, 4);
                for (int i = 0; i < MC; i++) {
                    isum[i] = avx512_dot2(isum[i], lo, avx512_bcast2(a[i].q + 32 * b + 2 * u));
                    if (split)
                        isum2[i] = avx512_dot2(isum2[i], hi, avx512_bcast2(a[i].q + 32 * b + 16 + 2 * u));
                    else
                        isum[i] = avx512_dot2(isum[i], hi, avx512_bcast2(a[i].q + 32 * b + 16 + 2 * u));
                }
            }
        }
        if (split)
            for (int i = 0; i < MC; i++) isum[i] = _mm512_add_epi32(isum[i], isum2[i]);
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
