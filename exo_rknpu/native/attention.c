/* onnxruntime custom op Attention (domain exo_rknpu): com.microsoft.GroupQueryAttention's contract for the case the
 * exporter writes (packed q|k|v, rotate-half rope from cos/sin tables, caches extended in place), computed per
 * query row of each request in one fixed order: a request's result does not depend on the other rows of the batch,
 * on the number of threads, or on the instruction set the library was built for (docs/native.md, "Attention").
 *
 *   attributes  num_heads, kv_num_heads (int), scale (float)
 *   inputs      qkv float32 [B, S, (nh + 2 kv) * hd]  (q heads, then k heads, then v heads; rope not yet applied)
 *               past_k, past_v float32 [B, kv, C, hd]
 *               seqlens_k int32 [B]: per request, its last position after this call (cached + S - 1)
 *               total_sequence_length int32 []: (max seqlens_k) + 1
 *               cos_cache, sin_cache float32 [P, hd / 2]: the rope tables by position
 *   outputs     out float32 [B, S, nh * hd]
 *               present_k, present_v float32 [B, kv, T, hd], T = max(C, total_sequence_length): the caches with
 *               each request's S new rows at positions seqlens_k - S + 1 ..; bound to past_k/past_v's memory (the
 *               runner's IO binding, backends/ort.py) that write is the only cache traffic
 *
 * Why not GroupQueryAttention: onnxruntime's CPU kernel runs two MLAS GEMM calls of one row per (request, query
 * head) and re-reads each kv head once per query head; on the 1B shape a decode step of 8 requests spent ~0.35 ms
 * per layer in it (docs/performance.md). Here the query heads of one kv head share every key and value read.
 *
 * The arithmetic, per request b, kv head g and query row s at position p = seqlens_k[b] - S + 1 + s (L = p + 1
 * positions visible): q and the new k rotated as x1*c - x2*s, x2*c + x1*s (halves of the head); per visible
 * position t, score = dot(q, k_t) * scale with dot summed in 16 lanes (lane l takes elements l, l+16, ..) then the
 * lanes pairwise (l + 8, l + 4, l + 2, l + 1); softmax: e_t = exp(score_t - max) (expf.h), their sum in 16
 * lanes the same way, w_t = e_t * (1 / sum); out[d] = sum over t in order of w_t * v_t[d]. No FMA contraction
 * (-ffp-contract=off): every build rounds the same operations the same way. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "expf.h"
#include "ort_abi.h"

#define EXO_LANES 16
#define EXO_MAX_DIMS 8
/* multiply-adds of a call below which it runs on the calling thread. In the 1B model (session 7; 2 threads, the
 * host's other load ~2, docs/native.md "Attention") a decode step of 8 requests at ~28 positions (~0.9M) took
 * 151-154 us per call split over both threads against 226-235 on the calling thread; 4 requests (~0.46M) 92-116
 * against 112-113 (even); 2 requests 63-70 against 56-61 (a loss). On a host whose second core is busy the split
 * loses at every size (8 requests: 258-316 against 223-247 us): waking the second thread waits for a core. */
#define EXO_PARALLEL_MACS (1 << 19)
/* query rows per task of a long chunk (prefill): enough tasks for the threads, few enough to amortize a task */
#define EXO_ROWS_PER_TASK 16

_Static_assert(offsetof(OrtApi, KernelInfoGetAttribute_float) == 85 * sizeof(void*), "OrtApi index 85");

typedef struct {
  const OrtApi* api;
  int64_t nh, kv;
  float scale;
} AttentionKernel;

typedef struct { /* one call's work, shared by its tasks */
  int64_t S, nh, kv, hd, T, chunks, rows, tasks;
  float scale;
  const float *qkv, *cos, *sin;
  const int32_t* seqlens;
  float *pk, *pv, *out;
  int failed; /* a task could not allocate its scratch (set, never cleared: read after every task ended) */
} AttentionCall;

static float lanes_sum(float* acc) {
  for (int w = EXO_LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) acc[l] += acc[l + w];
  return acc[0];
}

static float dot(const float* a, const float* b, int64_t n) { /* n: a multiple of EXO_LANES */
  float acc[EXO_LANES];
  for (int l = 0; l < EXO_LANES; l++) acc[l] = a[l] * b[l];
  for (int64_t d = EXO_LANES; d < n; d += EXO_LANES)
    for (int l = 0; l < EXO_LANES; l++) acc[l] += a[d + l] * b[d + l];
  return lanes_sum(acc);
}

/* e^(x - max) of a row's scores, in place (expf.h) */
static void exp_row(float* x, int64_t n, float max) {
  for (int64_t t = 0; t < n; t++) x[t] = exo_exp_nonpos(x[t] - max);
}

static void softmax(float* x, int64_t n) {
  /* the maximum in 16 lanes (exact in any order), the sum of the exponentials in 16 lanes then pairwise */
  float acc[EXO_LANES];
  int64_t t0 = 0, full = n - n % EXO_LANES;
  for (int l = 0; l < EXO_LANES; l++) acc[l] = x[0];
  for (; t0 < full; t0 += EXO_LANES)
    for (int l = 0; l < EXO_LANES; l++) acc[l] = x[t0 + l] > acc[l] ? x[t0 + l] : acc[l];
  for (int64_t t = full; t < n; t++) acc[0] = x[t] > acc[0] ? x[t] : acc[0];
  float max = acc[0];
  for (int l = 1; l < EXO_LANES; l++) max = acc[l] > max ? acc[l] : max;
  exp_row(x, n, max);
  for (int l = 0; l < EXO_LANES; l++) acc[l] = 0.0f;
  for (t0 = 0; t0 < full; t0 += EXO_LANES)
    for (int l = 0; l < EXO_LANES; l++) acc[l] += x[t0 + l];
  for (int64_t t = full; t < n; t++) acc[t - full] += x[t];
  float inv = 1.0f / lanes_sum(acc);
  for (int64_t t = 0; t < n; t++) x[t] *= inv;
}

static void rope(float* y, const float* x, const float* c, const float* s, int64_t hd) {
  int64_t h = hd / 2;
  for (int64_t i = 0; i < h; i++) {
    float a = x[i], b = x[i + h];
    y[i] = a * c[i] - b * s[i];
    y[i + h] = b * c[i] + a * s[i];
  }
}

#if defined(__AVX512F__) && !defined(EXO_NO_SIMD)
#include <immintrin.h>

/* sc[k] = dot(q, K row t0 + k) * scale for k < 16: `dot`'s sums, 16 keys at a time. Each key's 16 lane sums are
 * one vector; the pairwise steps (l + 8, + 4, + 2, + 1) then run on pairs of those vectors at once (a lane sum
 * a + b is b + a bit for bit, so which operand a shuffle puts first does not matter). */
static void scores16(const float* q, const float* K, int64_t hd, float scale, float* sc) {
  __m512 acc[16];
  __m512 q0 = _mm512_loadu_ps(q);
  for (int k = 0; k < 16; k++) acc[k] = _mm512_mul_ps(q0, _mm512_loadu_ps(K + k * hd));
  for (int64_t d = 16; d < hd; d += 16) {
    __m512 qd = _mm512_loadu_ps(q + d);
    for (int k = 0; k < 16; k++) acc[k] = _mm512_add_ps(acc[k], _mm512_mul_ps(qd, _mm512_loadu_ps(K + k * hd + d)));
  }
  __m512 u[8], w[4], z[2];
  for (int i = 0; i < 8; i++) /* l + 8: key 2i in lanes 0-7, key 2i+1 in lanes 8-15 */
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++) /* l + 4: 128-bit block m of w[i] holds key 4i + m */
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++) /* l + 2: block m of z[i] holds keys 8i + m (lanes 0, 1) and 8i + 4 + m (2, 3) */
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  /* l + 1: lane 4m + n holds key 4n + m; then each key to its lane and the scale */
  __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
  const __m512i to_key = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(sc, _mm512_mul_ps(_mm512_permutexvar_ps(to_key, r), _mm512_set1_ps(scale)));
}

/* o[j][d] = sum over t in order of w[j][t] * V[t][d] for J <= 4 query heads j (their outputs `stride` apart), 64
 * elements of d at a time: 4 J independent sums per key. J is a constant in each inlined copy (weighted_simd). */
static inline __attribute__((always_inline)) void weighted_heads(float* o, int64_t stride, const float* w, int64_t L,
                                                                 const float* V, int64_t hd, const int J) {
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) {
    __m512 a[4][4];
    for (int c = 0; c < 4; c++) {
      __m512 v = _mm512_loadu_ps(V + d + 16 * c);
      for (int j = 0; j < J; j++) a[j][c] = _mm512_mul_ps(_mm512_set1_ps(w[j * L]), v);
    }
    for (int64_t t = 1; t < L; t++) {
      __m512 v0 = _mm512_loadu_ps(V + t * hd + d), v1 = _mm512_loadu_ps(V + t * hd + d + 16);
      __m512 v2 = _mm512_loadu_ps(V + t * hd + d + 32), v3 = _mm512_loadu_ps(V + t * hd + d + 48);
      for (int j = 0; j < J; j++) {
        __m512 wj = _mm512_set1_ps(w[j * L + t]);
        a[j][0] = _mm512_add_ps(a[j][0], _mm512_mul_ps(wj, v0));
        a[j][1] = _mm512_add_ps(a[j][1], _mm512_mul_ps(wj, v1));
        a[j][2] = _mm512_add_ps(a[j][2], _mm512_mul_ps(wj, v2));
        a[j][3] = _mm512_add_ps(a[j][3], _mm512_mul_ps(wj, v3));
      }
    }
    for (int j = 0; j < J; j++)
      for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + j * stride + d + 16 * c, a[j][c]);
  }
  for (; d < hd; d += 16) {
    __m512 v = _mm512_loadu_ps(V + d), a[4];
    for (int j = 0; j < J; j++) a[j] = _mm512_mul_ps(_mm512_set1_ps(w[j * L]), v);
    for (int64_t t = 1; t < L; t++) {
      v = _mm512_loadu_ps(V + t * hd + d);
      for (int j = 0; j < J; j++) a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(_mm512_set1_ps(w[j * L + t]), v));
    }
    for (int j = 0; j < J; j++) _mm512_storeu_ps(o + j * stride + d, a[j]);
  }
}

static void weighted_simd(float* o, int64_t stride, const float* w, int64_t L, const float* V, int64_t hd, int64_t J) {
  switch (J) {
    case 4: weighted_heads(o, stride, w, L, V, hd, 4); break;
    case 3: weighted_heads(o, stride, w, L, V, hd, 3); break;
    case 2: weighted_heads(o, stride, w, L, V, hd, 2); break;
    default: weighted_heads(o, stride, w, L, V, hd, 1);
  }
}
#define EXO_KEYS_AT_ONCE 16
#define EXO_HEADS_AT_ONCE 4
#else
#define EXO_KEYS_AT_ONCE 0
#define EXO_HEADS_AT_ONCE 0
#endif

/* sc[t] for t < L; a block of 16 keys reaching past L (not past the cache's T rows) is computed whole and its
 * extra scores dropped: each key's score is its own, whichever block computes it. */
static void scores(const float* q, const float* K, int64_t L, int64_t T, int64_t hd, float scale, float* sc) {
  int64_t t = 0;
#if EXO_KEYS_AT_ONCE
  float block[EXO_KEYS_AT_ONCE];
  for (; t + EXO_KEYS_AT_ONCE <= L; t += EXO_KEYS_AT_ONCE) scores16(q, K + t * hd, hd, scale, sc + t);
  if (t < L && t + EXO_KEYS_AT_ONCE <= T) {
    scores16(q, K + t * hd, hd, scale, block);
    for (int64_t i = t; i < L; i++) sc[i] = block[i - t];
    return;
  }
#else
  (void)T;
#endif
  for (; t < L; t++) sc[t] = dot(q, K + t * hd, hd) * scale;
}

#if !EXO_HEADS_AT_ONCE
static void weighted(float* o, const float* w, int64_t L, const float* V, int64_t hd) {
  for (int64_t d = 0; d < hd; d++) o[d] = w[0] * V[d];
  for (int64_t t = 1; t < L; t++)
    for (int64_t d = 0; d < hd; d++) o[d] += w[t] * V[t * hd + d];
}
#endif

/* Query rows [s0, s1) of request b against kv head g: its nh / kv query heads share each key and value read.
 * scratch: G * hd (rotated queries) + G * (p + 1) (scores) floats for the last row's position p. */
static void attend(const AttentionCall* c, int64_t b, int64_t g, int64_t s0, int64_t s1, float* scratch) {
  const int64_t G = c->nh / c->kv, hd = c->hd, width = (c->nh + 2 * c->kv) * hd;
  const float* K = c->pk + (b * c->kv + g) * c->T * hd;
  const float* V = c->pv + (b * c->kv + g) * c->T * hd;
  float* q = scratch;
  float* sc = scratch + G * hd;
  for (int64_t s = s0; s < s1; s++) {
    const int64_t p = c->seqlens[b] - c->S + 1 + s, L = p + 1;
    const float* row = c->qkv + (b * c->S + s) * width;
    float* o = c->out + ((b * c->S + s) * c->nh + g * G) * hd;
    for (int64_t j = 0; j < G; j++) {
      rope(q + j * hd, row + (g * G + j) * hd, c->cos + p * (hd / 2), c->sin + p * (hd / 2), hd);
      scores(q + j * hd, K, L, c->T, hd, c->scale, sc + j * L);
      softmax(sc + j * L, L);
    }
#if EXO_HEADS_AT_ONCE
    for (int64_t j = 0; j < G; j += EXO_HEADS_AT_ONCE)
      weighted_simd(o + j * hd, hd, sc + j * L, L, V, hd, G - j < EXO_HEADS_AT_ONCE ? G - j : EXO_HEADS_AT_ONCE);
#else
    for (int64_t j = 0; j < G; j++) weighted(o + j * hd, sc + j * L, L, V, hd);
#endif
  }
}

/* Request b's S new rows of kv head g into the caches at their positions (k rotated). */
static void write_rows(const AttentionCall* c, int64_t b, int64_t g) {
  const int64_t hd = c->hd, width = (c->nh + 2 * c->kv) * hd;
  for (int64_t s = 0; s < c->S; s++) {
    const int64_t p = c->seqlens[b] - c->S + 1 + s;
    const float* row = c->qkv + (b * c->S + s) * width;
    rope(c->pk + ((b * c->kv + g) * c->T + p) * hd, row + (c->nh + g) * hd, c->cos + p * (hd / 2),
         c->sin + p * (hd / 2), hd);
    memcpy(c->pv + ((b * c->kv + g) * c->T + p) * hd, row + (c->nh + c->kv + g) * hd, sizeof(float) * (size_t)hd);
  }
}

static void run_task(void* data, size_t i) {
  AttentionCall* c = data;
  const int64_t chunk = (int64_t)i % c->chunks, bg = (int64_t)i / c->chunks;
  const int64_t b = bg / c->kv, g = bg % c->kv;
  /* one task per (request, kv head): its own new rows, written by the thread that reads them next, so a decode call
   * split over threads extends the caches in parallel too (the rows of a call cut into several chunks are written
   * before any task starts: a later chunk reads an earlier one's) */
  if (c->chunks == 1) write_rows(c, b, g);
  const int64_t s0 = chunk * c->rows, s1 = s0 + c->rows < c->S ? s0 + c->rows : c->S;
  const int64_t L = c->seqlens[b] - c->S + s1 + 1; /* the last row's visible positions */
  float* scratch = malloc(sizeof(float) * (size_t)((c->nh / c->kv) * (c->hd + L)));
  if (!scratch) {
    c->failed = 1;
    return;
  }
  attend(c, b, g, s0, s1, scratch);
  free(scratch);
}

static OrtStatus* fail(const OrtApi* api, const char* what) { return api->CreateStatus(ORT_INVALID_ARGUMENT, what); }

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  (void)op;
  int64_t nh = 0, kv = 0;
  float scale = 0.0f;
  OrtStatus* st;
  if ((st = api->KernelInfoGetAttribute_int64(info, "num_heads", &nh)) ||
      (st = api->KernelInfoGetAttribute_int64(info, "kv_num_heads", &kv)) ||
      (st = api->KernelInfoGetAttribute_float(info, "scale", &scale)))
    return st;
  if (nh <= 0 || kv <= 0 || nh % kv != 0)
    return fail(api, "exo_rknpu.Attention: num_heads must be a positive multiple of kv_num_heads");
  AttentionKernel* k = malloc(sizeof *k);
  if (!k) return api->CreateStatus(ORT_FAIL, "exo_rknpu.Attention: out of memory");
  *k = (AttentionKernel){api, nh, kv, scale};
  *out = k;
  return NULL;
}

static void destroy_kernel(void* kernel) { free(kernel); }

static OrtStatus* input(const OrtApi* api, OrtKernelContext* ctx, size_t i, int64_t* dims, size_t* n, size_t most,
                        void** data) {
  return exo_input(api, ctx, i, dims, n, most, data, "exo_rknpu.Attention: an input has too many dimensions");
}

static int same_dims(const int64_t* a, const int64_t* b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) return 0;
  return 1;
}

/* The caches into present_k/v: past rows copied (unless bound to the same memory), the rest zero; then, for a call
 * cut into several chunks per (request, kv head), each request's new rows (k rotated) at their positions (a call of
 * one chunk each has its tasks write them: run_task). Checks every position against the cache and the tables. */
static OrtStatus* extend_caches(const OrtApi* api, AttentionCall* c, const float* past_k, const float* past_v,
                                int64_t B, int64_t C, int64_t P) {
  const int64_t hd = c->hd;
  for (int64_t b = 0; b < B; b++) {
    int64_t first = (int64_t)c->seqlens[b] - c->S + 1;
    if (first < 0 || c->seqlens[b] >= c->T || c->seqlens[b] >= P)
      return fail(api, "exo_rknpu.Attention: seqlens_k out of range (below S - 1, or past the cache or the tables)");
  }
  for (int x = 0; x < 2; x++) {
    const float* past = x ? past_v : past_k;
    float* present = x ? c->pv : c->pk;
    if (past == present) continue;
    for (int64_t r = 0; r < B * c->kv; r++) {
      memcpy(present + r * c->T * hd, past + r * C * hd, sizeof(float) * (size_t)(C * hd));
      memset(present + (r * c->T + C) * hd, 0, sizeof(float) * (size_t)((c->T - C) * hd));
    }
  }
  if (c->chunks > 1)
    for (int64_t bg = 0; bg < B * c->kv; bg++) write_rows(c, bg / c->kv, bg % c->kv);
  return NULL;
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const AttentionKernel* k = kernel;
  const OrtApi* api = k->api;
  int64_t qd[EXO_MAX_DIMS], kd[EXO_MAX_DIMS], vd[EXO_MAX_DIMS], sd[EXO_MAX_DIMS], td[EXO_MAX_DIMS], cd[EXO_MAX_DIMS],
      nd[EXO_MAX_DIMS];
  size_t qn, kn, vn, sn, tn, cn, nn;
  void *qkv, *past_k, *past_v, *seqlens, *total, *cos, *sin;
  OrtStatus* st;
  if ((st = input(api, ctx, 0, qd, &qn, 3, &qkv)) || (st = input(api, ctx, 1, kd, &kn, 4, &past_k)) ||
      (st = input(api, ctx, 2, vd, &vn, 4, &past_v)) || (st = input(api, ctx, 3, sd, &sn, 1, &seqlens)) ||
      (st = input(api, ctx, 4, td, &tn, 1, &total)) || (st = input(api, ctx, 5, cd, &cn, 2, &cos)) ||
      (st = input(api, ctx, 6, nd, &nn, 2, &sin)))
    return st;
  const int64_t nh = k->nh, kv = k->kv, width = (nh + 2 * kv);
  if (qn != 3 || qd[2] % width != 0)
    return fail(api, "exo_rknpu.Attention: qkv is not [B, S, (num_heads + 2 kv_num_heads) * head_dim]");
  const int64_t B = qd[0], S = qd[1], hd = qd[2] / width;
  if (hd % EXO_LANES != 0) return fail(api, "exo_rknpu.Attention: head_dim must be a multiple of 16");
  if (kn != 4 || vn != 4 || !same_dims(kd, vd, 4) || kd[0] != B || kd[1] != kv || kd[3] != hd)
    return fail(api, "exo_rknpu.Attention: past_k/past_v are not both [B, kv_num_heads, C, head_dim]");
  if (sn != 1 || sd[0] != B || tn != 0)
    return fail(api, "exo_rknpu.Attention: seqlens_k is not [B] or total_sequence_length not a scalar");
  if (cn != 2 || nn != 2 || !same_dims(cd, nd, 2) || cd[1] != hd / 2)
    return fail(api, "exo_rknpu.Attention: cos_cache/sin_cache are not both [P, head_dim / 2]");
  const int64_t C = kd[2], T = *(const int32_t*)total > C ? *(const int32_t*)total : C;
  int64_t out_dims[3] = {B, S, nh * hd}, cache_dims[4] = {B, kv, T, hd};
  OrtValue *ov, *pkv, *pvv;
  void *out, *pk, *pv;
  if ((st = api->KernelContext_GetOutput(ctx, 0, out_dims, 3, &ov)) ||
      (st = api->KernelContext_GetOutput(ctx, 1, cache_dims, 4, &pkv)) ||
      (st = api->KernelContext_GetOutput(ctx, 2, cache_dims, 4, &pvv)) || (st = api->GetTensorMutableData(ov, &out)) ||
      (st = api->GetTensorMutableData(pkv, &pk)) || (st = api->GetTensorMutableData(pvv, &pv)))
    return st;
  if (B == 0 || S == 0) return NULL;
  const int64_t rows = S < EXO_ROWS_PER_TASK ? S : EXO_ROWS_PER_TASK;
  const int64_t chunks = (S + rows - 1) / rows;
  AttentionCall c = {S, nh, kv, hd, T, chunks, rows, B * kv * chunks, k->scale, qkv, cos, sin, seqlens, pk, pv, out, 0};
  if ((st = extend_caches(api, &c, past_k, past_v, B, C, cd[0]))) return st;
  double macs = 0; /* the call's multiply-adds, to decide whether to wake the pool */
  for (int64_t b = 0; b < B; b++) macs += (double)S * (c.seqlens[b] + 1) * nh * hd * 2;
  size_t tasks = (size_t)c.tasks;
  if (macs < EXO_PARALLEL_MACS || tasks == 1) {
    for (size_t i = 0; i < tasks; i++) run_task(&c, i);
  } else if ((st = api->KernelContext_ParallelFor(ctx, run_task, tasks, 0, &c))) {
    return st;
  }
  return c.failed ? api->CreateStatus(ORT_FAIL, "exo_rknpu.Attention: out of memory for the scores") : NULL;
}

static const char* op_name(const OrtCustomOp* op) { (void)op; return "Attention"; }
static ONNXTensorElementDataType input_type(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 3 || i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t input_count(const OrtCustomOp* op) { (void)op; return 7; }
static ONNXTensorElementDataType output_type(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t output_count(const OrtCustomOp* op) { (void)op; return 3; }

const OrtCustomOp exo_attention_op =
    EXO_CPU_OP(op_name, input_type, input_count, output_type, output_count, create_kernel, compute,
               destroy_kernel);
