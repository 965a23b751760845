/* The library's one e^x (attention.c's softmax, ort_op.c's SwiGLU): the same bits in every build (scalar, AVX2,
 * AVX-512, NEON), since it is plain IEEE float operations in a fixed order (-ffp-contract=off, build.py) that
 * compilers vectorize as they are. */
#ifndef EXO_EXPF_H
#define EXO_EXPF_H

#include <stdint.h>

/* a where mask is all ones, b where it is zero: a select in integer operations, because a float ?: in these loops
 * became a branch (gcc 12 specializes the branches, and then may not if-convert their trapping float operations),
 * which kept the loops scalar in every build but AVX-512's */
static inline float exo_select(uint32_t mask, float a, float b) {
  union { float f; uint32_t i; } x = {.f = a}, y = {.f = b};
  x.i = (x.i & mask) | (y.i & ~mask);
  return x.f;
}

/* e^v for v <= 0: Cephes' expf polynomial after v = n ln2 + r, |r| <= ln2 / 2, n rounded to nearest by the
 * 1.5 * 2^23 trick (exact, and vectorizes without SSE4.1's round); results below e^-87 are e^-87 (~1.6e-38, still a
 * normal float). Relative error ~2e-7. NaN stays NaN. */
static inline float exo_exp_nonpos(float v) {
  v = exo_select(-(uint32_t)(v < -87.0f), -87.0f, v);
  float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = v - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  union { uint32_t i; float f; } p2 = {.i = ((uint32_t)(int32_t)k + 127u) << 23};
  return y * p2.f;
}

#endif
