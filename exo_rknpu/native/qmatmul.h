/* exo-rknpu native quantized matmul: int16 activations x block-quantized weights (Q4_0, Q4_1, Q8_0, Q6_K).
 * The result is bit-for-bit the same on every CPU: see docs at the top of qmatmul.c and docs/native.md. */
#ifndef EXO_QMATMUL_H
#define EXO_QMATMUL_H

#include <stdint.h>

#define EXO_ROW_GROUP 16 /* rows interleaved together in `packed`; threads split N in whole groups */
#define EXO_BLOCK 32     /* weights and activations are quantized in blocks of 32 along K */

enum { EXO_Q4_0 = 0, EXO_Q4_1 = 1, EXO_Q8_0 = 2, EXO_Q6_K = 3 };
#define EXO_SUPER_BLOCK 256 /* Q6_K: K must be a multiple of it (one fp16 d per 256 weights of a row) */

#ifdef __cplusplus
extern "C" {
#endif

/* Size in bytes of the quantized-activation buffer for M rows of K (K % 32 == 0). */
int64_t exo_act_bytes(int64_t M, int64_t K);
/* Quantizes x [M, K] (float32, row-major) into qa (exo_act_bytes(M, K) bytes, 4-byte aligned). */
void exo_quantize_act(const float* x, int64_t M, int64_t K, void* qa);
/* y[m, n] for m < M and n_begin <= n < n_end (y is [M, N] row-major; other entries untouched).
 * n_begin is a multiple of EXO_ROW_GROUP; reentrant, no allocation (the only process state: whether Linux granted
 * AMX tile data, asked once by the AMX build). */
void exo_qmatmul_rows(int fmt, const uint8_t* packed, int64_t N, int64_t K, const void* qa, int64_t M, float* y,
                      int64_t n_begin, int64_t n_end);
/* Size in bytes of the packed weights of an N x K matrix in format fmt (-1 for an unknown fmt, or a K that is not
 * a multiple of 32, of 256 for Q6_K). */
int64_t exo_packed_bytes(int fmt, int64_t N, int64_t K);
/* Which code path this build compiled: "avx512vnni-amx" (AMX-INT8 for batched rows where Linux grants tile
 * data, else AVX-512 VNNI), "avx512vnni", "avx512", "avx2-vnni", "avx2", "neon" or "scalar". */
const char* exo_isa(void);

#ifdef __cplusplus
}
#endif

#endif
