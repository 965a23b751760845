/* AVX2 path of qmatmul.c (included there; needs AVX2 and F16C). One ymm lane per output row: a 64-byte code chunk
 * is two ymm of 8 rows x 4 k (rows 0-7, then 8-15), done as two halves.
 * With AVX-VNNI (EXO_AVXVNNI), vpdpbusd does each chunk as the AVX-512 path does (unsigned codes, biased start).
 * Q4_*: vpmaddubsw(u8 nibble, s8 activation) gives int16 pair sums of at most 2*15*127; the 8 of a block add up to
 * at most 30480 < 32768, so they are summed in int16 and widened once (vpmaddwd by 1). Q4_0's -8 is the -8 * s start.
 * Q8_0: vpmaddubsw would saturate on codes + 128, so it takes |w| (u8, <= 128) and the activation with w's sign:
 * pair sums <= 2*128*127 = 32512, widened per chunk. */

static inline __m256i avx2_bcast4(const int8_t* q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm256_set1_epi32(v);
}

/* Rows m0 .. m0+MC-1, lanes 8h .. 8h+7 of one row group. */
static inline __attribute__((always_inline)) void avx2_chunk(const int fmt, const int MC, const uint8_t* cg,
                                                             const uint8_t* sg, int64_t nb, const void* qa, int64_t K,
                                                             int64_t m0, float* y, int64_t N, int64_t n0, int h,
                                                             int64_t rows) {
    const int64_t cbb = code_block_bytes(fmt), sbb = scale_block_bytes(fmt);
#if defined(EXO_AVXVNNI)
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : fmt == EXO_Q8_0 ? -128 : 0;
#else
    const int32_t bias = fmt == EXO_Q4_0 ? -8 : 0;
#endif
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    act_row a[4];
    __m256 acc[4];
    for (int i = 0; i < MC; i++) {
        a[i] = act_of(qa, K, m0 + i);
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* cb = cg + b * cbb + 32 * h;
        const uint8_t* sb = sg + b * sbb + 16 * h;
        for (int64_t o = 0; o < cbb; o += 64) _mm_prefetch((const char*)(cb + EXO_PREFETCH + o), _MM_HINT_T0);
        _mm_prefetch((const char*)(sb + EXO_PREFETCH * sbb / cbb), _MM_HINT_T0);
        __m256i isum[4];
#if defined(EXO_AVXVNNI)
        for (int i = 0; i < MC; i++) isum[i] = _mm256_set1_epi32(bias * a[i].s[b]);
        if (fmt == EXO_Q8_0) {
            for (int c = 0; c < 8; c++) {
                const __m256i w = _mm256_loadu_si256((const __m256i*)(cb + 64 * c));
                for (int i = 0; i < MC; i++)
                    isum[i] = _mm256_dpbusd_avx_epi32(isum[i], w, avx2_bcast4(a[i].q + 32 * b + 4 * c));
            }
        } else {
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(cb + 64 * c));
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                for (int i = 0; i < MC; i++) {
                    isum[i] = _mm256_dpbusd_avx_epi32(isum[i], lo, avx2_bcast4(a[i].q + 32 * b + 4 * c));
                    isum[i] = _mm256_dpbusd_avx_epi32(isum[i], hi, avx2_bcast4(a[i].q + 32 * b + 16 + 4 * c));
                }
            }
        }
        (void)ones16;
        (void)flip;
#else
        if (fmt == EXO_Q8_0) {
            for (int i = 0; i < MC; i++) isum[i] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(cb + 64 * c)), flip);
                const __m256i aw = _mm256_abs_epi8(w);
                for (int i = 0; i < MC; i++) {
                    const __m256i sx = _mm256_sign_epi8(avx2_bcast4(a[i].q + 32 * b + 4 * c), w);
                    isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones16));
                }
            }
        } else {
            __m256i s16[4];
            for (int i = 0; i < MC; i++) s16[i] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(cb + 64 * c));
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                for (int i = 0; i < MC; i++) {
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, avx2_bcast4(a[i].q + 32 * b + 4 * c)));
                    s16[i] = _mm256_add_epi16(s16[i],
                                              _mm256_maddubs_epi16(hi, avx2_bcast4(a[i].q + 32 * b + 16 + 4 * c)));
                }
            }
            for (int i = 0; i < MC; i++)
                isum[i] = _mm256_add_epi32(_mm256_madd_epi16(s16[i], ones16), _mm256_set1_epi32(bias * a[i].s[b]));
        }
#endif
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
