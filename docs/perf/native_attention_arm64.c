/* attention.c's arithmetic outside onnxruntime, for builds onnxruntime cannot load here (emulated aarch64): fixed
 * pseudo-random inputs (5 requests at positions 0..44, 3 new rows each, 8 heads over 2 kv heads, head_dim 64), the
 * caches extended, every task run; prints a hash of the output and the new caches. Every build must print the same:
 *
 *   F="-O3 -ffp-contract=off -fno-math-errno -std=c11"
 *   gcc $F -march=native -o a docs/perf/native_attention_arm64.c -lm && ./a
 *   gcc $F -march=x86-64 -DEXO_NO_SIMD -o a docs/perf/native_attention_arm64.c -lm && ./a
 *   aarch64-linux-gnu-gcc $F -mcpu=cortex-a76 -static -o a docs/perf/native_attention_arm64.c -lm \
 *     && qemu-aarch64-static -cpu cortex-a76 ./a
 */
#include <stdio.h>

#include "../../exo_rknpu/native/attention.c"

static uint32_t state = 12345;
static float next(void) { /* uniform in [-1, 1): an LCG's top 24 bits, exact in float32 */
  state = state * 1664525u + 1013904223u;
  return (float)((int32_t)(state >> 8) - (1 << 23)) / (float)(1 << 23);
}

static float* filled(int64_t n) {
  float* p = malloc(sizeof(float) * (size_t)n);
  for (int64_t i = 0; p && i < n; i++) p[i] = next();
  return p;
}

int main(void) {
  const int64_t B = 5, S = 3, nh = 8, kv = 2, hd = 64, C = 48, P = 64, width = (nh + 2 * kv) * hd;
  int32_t seqlens[5] = {2, 9, 20, 33, 44};
  float *qkv = filled(B * S * width), *pk = filled(B * kv * C * hd), *pv = filled(B * kv * C * hd);
  float *cos = filled(P * hd / 2), *sin = filled(P * hd / 2), *out = malloc(sizeof(float) * (size_t)(B * S * nh * hd));
  if (!qkv || !pk || !pv || !cos || !sin || !out) return 2;
  AttentionCall c = {S, nh, kv, hd, C, 1, S, B * kv, 0.125f, qkv, cos, sin, seqlens, pk, pv, out, 0};
  if (extend_caches(NULL, &c, pk, pv, B, C, P)) return 1; /* valid positions: no status is made */
  for (int64_t i = 0; i < c.tasks; i++) run_task(&c, (size_t)i);
  uint32_t h = 2166136261u; /* FNV-1a over the bits */
  for (int64_t i = 0; i < B * S * nh * hd; i++) h = (h ^ ((uint32_t*)out)[i]) * 16777619u;
  for (int64_t i = 0; i < B * kv * C * hd; i++) h = (h ^ ((uint32_t*)pk)[i] ^ ((uint32_t*)pv)[i]) * 16777619u;
  printf("%08x (out[0] = %.9g)\n", h, out[0]);
  return c.failed;
}
