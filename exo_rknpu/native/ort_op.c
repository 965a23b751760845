/* onnxruntime custom op QMatMul (domain exo_rknpu): y = x @ W.T with the native kernel (qmatmul.h).
 *
 *   attributes  fmt (0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q6_K), K, N
 *   inputs      x float32 [..., K]; packed uint8 [exo_packed_bytes(fmt, N, K)] (an initializer: exo_rknpu.native.pack)
 *   output      y float32 [..., N]
 *
 * The activations are quantized once per call (exo_quantize_act), then N is split in chunks of whole EXO_ROW_GROUP
 * groups over onnxruntime's intra-op threads (KernelContext_ParallelFor). Every output element is computed by
 * exactly one chunk in the kernel's fixed order, so the result does not depend on the number of threads.
 * Sessions load it with SessionOptions.register_custom_ops_library (backends/ort.py).
 *
 * QMatMulSwiGLU (same domain, attributes and inputs): the MLP's gate|up product and its activation in one op.
 *   packed      the rows of gate (0 .. N/2 - 1) then of up (N/2 .. N - 1), stacked as QMatMul's (N/2 a multiple of
 *               EXO_ROW_GROUP, so both halves start on a row group)
 *   output      a float32 [..., N / 2] = silu(g) * u, g = x @ gate.T, u = x @ up.T
 * g and u are QMatMul's bits (the same kernel call, into a scratch [M, N]); a chunk owns columns j0..j1 of the
 * output: it computes gate rows j0..j1 and up rows N/2 + j0 .. N/2 + j1, then their activation while they are in
 * cache (swiglu below, one fixed order per element): no Split, Sigmoid or Mul op between kernels. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "expf.h"
#include "ort_abi.h"
#include "qmatmul.h"

extern const OrtCustomOp exo_attention_op;                         /* attention.c */
extern const OrtCustomOp exo_rms_norm_op, exo_add_rms_norm_op; /* norm.c */

#define EXO_MAX_DIMS 8
/* weights per chunk handed to one thread: large enough that the per-chunk overhead (a task of onnxruntime's
 * pool, the kernel's setup) is small, small enough that a 576-row matrix still splits over a few threads */
#define EXO_CHUNK_WEIGHTS 65536

_Static_assert(offsetof(OrtApi, CreateCustomOpDomain) == 26 * sizeof(void*), "OrtApi index 26");
_Static_assert(offsetof(OrtApi, AddCustomOpDomain) == 28 * sizeof(void*), "OrtApi index 28");
_Static_assert(offsetof(OrtApi, GetTensorMutableData) == 51 * sizeof(void*), "OrtApi index 51");
_Static_assert(offsetof(OrtApi, GetDimensionsCount) == 61 * sizeof(void*), "OrtApi index 61");
_Static_assert(offsetof(OrtApi, GetTensorTypeAndShape) == 65 * sizeof(void*), "OrtApi index 65");
_Static_assert(offsetof(OrtApi, KernelInfoGetAttribute_int64) == 86 * sizeof(void*), "OrtApi index 86");
_Static_assert(offsetof(OrtApi, KernelContext_GetInput) == 90 * sizeof(void*), "OrtApi index 90");
_Static_assert(offsetof(OrtApi, ReleaseTensorTypeAndShapeInfo) == 99 * sizeof(void*), "OrtApi index 99");
_Static_assert(offsetof(OrtApi, KernelContext_ParallelFor) == 274 * sizeof(void*), "OrtApi index 274");
_Static_assert(offsetof(OrtCustomOp, KernelComputeV2) == 18 * sizeof(void*), "OrtCustomOp v16 layout");

static const OrtCustomOp qmatmul_swiglu_op; /* below: QMatMul's kernel with the SwiGLU stage */

typedef struct {
  const OrtApi* api;
  int fmt;
  int64_t K, N;
  int swiglu; /* QMatMulSwiGLU */
} QMatMulKernel;

typedef struct {  /* one call's work, shared by the chunks */
  const QMatMulKernel* k;
  const uint8_t* packed;
  const void* qa;
  int64_t M;
  float* y;               /* [M, N]: QMatMul's output; QMatMulSwiGLU's scratch of g | u */
  float* act;             /* QMatMulSwiGLU's output [M, N / 2]; NULL for QMatMul */
  int64_t rows_per_chunk; /* a multiple of EXO_ROW_GROUP (of the output's columns) */
} QMatMulCall;

static OrtStatus* fail(const OrtApi* api, const char* what) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT, what);
}

static OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  int swiglu = op == &qmatmul_swiglu_op;
  int64_t fmt = -1, K = 0, N = 0;
  OrtStatus* st;
  if ((st = api->KernelInfoGetAttribute_int64(info, "fmt", &fmt)) ||
      (st = api->KernelInfoGetAttribute_int64(info, "K", &K)) ||
      (st = api->KernelInfoGetAttribute_int64(info, "N", &N)))
    return st;
  if (fmt < 0 || fmt > 3)
    return fail(api, "exo_rknpu.QMatMul: attribute fmt must be 0 (Q4_0), 1 (Q4_1), 2 (Q8_0) or 3 (Q6_K)");
  if (N <= 0 || exo_packed_bytes((int)fmt, N, K) < 0)
    return fail(api, "exo_rknpu.QMatMul: K must be a positive multiple of 32 (of 256 for Q6_K) and N positive");
  if (swiglu && N % (2 * EXO_ROW_GROUP) != 0)
    return fail(api, "exo_rknpu.QMatMulSwiGLU: N must be gate and up rows of a multiple of 16 each");
  QMatMulKernel* k = malloc(sizeof *k);
  if (!k) return api->CreateStatus(ORT_FAIL, "exo_rknpu.QMatMul: out of memory");
  k->api = api;
  k->fmt = (int)fmt;
  k->K = K;
  k->N = N;
  k->swiglu = swiglu;
  *out = k;
  return NULL;
}

static void destroy_kernel(void* kernel) { free(kernel); }

/* act[j] = silu(g[j]) * u[j] for j < n: silu(g) = g * sigmoid(g), sigmoid from e = e^-|g| (never overflows) as
 * 1 / (1 + e) where g's sign bit is clear and e / (1 + e) where it is set; rounded in this order in every build (a
 * loop compilers vectorize: the selects are integer ones, expf.h). */
static void swiglu(const float* g, const float* u, int64_t n, float* act) {
  for (int64_t j = 0; j < n; j++) {
    union { float f; uint32_t i; } x = {.f = g[j]}, minus_abs = {.i = x.i | 0x80000000u};
    float e = exo_exp_nonpos(minus_abs.f);
    float s = exo_select(-(x.i >> 31), e, 1.0f) / (1.0f + e);
    act[j] = g[j] * s * u[j];
  }
}

static void run_chunk(void* data, size_t i) {
  const QMatMulCall* c = data;
  const int64_t N = c->k->N, out = c->act ? N / 2 : N;  /* the output's columns */
  int64_t begin = (int64_t)i * c->rows_per_chunk, end = begin + c->rows_per_chunk;
  if (end > out) end = out;
  exo_qmatmul_rows(c->k->fmt, c->packed, N, c->k->K, c->qa, c->M, c->y, begin, end);
  if (!c->act) return;
  exo_qmatmul_rows(c->k->fmt, c->packed, N, c->k->K, c->qa, c->M, c->y, out + begin, out + end);
  for (int64_t m = 0; m < c->M; m++)
    swiglu(c->y + m * N + begin, c->y + m * N + out + begin, end - begin, c->act + m * out + begin);
}

/* Shape of tensor v: its dims into dims[], their count into *n, its element count into *count. */
static OrtStatus* input_shape(const OrtApi* api, const OrtValue* v, int64_t* dims, size_t* n, int64_t* count) {
  OrtTensorTypeAndShapeInfo* info;
  OrtStatus* st = api->GetTensorTypeAndShape(v, &info);
  if (st) return st;
  if (!(st = api->GetDimensionsCount(info, n))) {
    if (*n > EXO_MAX_DIMS)
      st = fail(api, "exo_rknpu.QMatMul: input has more than 8 dimensions");
    else
      st = api->GetDimensions(info, dims, *n);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  *count = 1;
  for (size_t d = 0; !st && d < *n; d++) *count *= dims[d];
  return st;
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const QMatMulKernel* k = kernel;
  const OrtApi* api = k->api;
  const OrtValue *x, *w;
  int64_t xdims[EXO_MAX_DIMS], wdims[EXO_MAX_DIMS], xcount, wcount;
  size_t xn, wn;
  OrtStatus* st;
  if ((st = api->KernelContext_GetInput(ctx, 0, &x)) || (st = api->KernelContext_GetInput(ctx, 1, &w)) ||
      (st = input_shape(api, x, xdims, &xn, &xcount)) || (st = input_shape(api, w, wdims, &wn, &wcount)))
    return st;
  if (xn < 1 || xdims[xn - 1] != k->K) return fail(api, "exo_rknpu.QMatMul: x's last dimension is not K");
  if (wn != 1 || wcount != exo_packed_bytes(k->fmt, k->N, k->K))
    return fail(api, "exo_rknpu.QMatMul: packed weights are not exo_packed_bytes(fmt, N, K) bytes (1-D)");
  int64_t M = xcount / k->K, cols = k->swiglu ? k->N / 2 : k->N; /* the output's columns */
  xdims[xn - 1] = cols;
  OrtValue* yv;
  void *xp, *wp, *yp;
  if ((st = api->KernelContext_GetOutput(ctx, 0, xdims, xn, &yv)) ||
      (st = api->GetTensorMutableData((OrtValue*)x, &xp)) || (st = api->GetTensorMutableData((OrtValue*)w, &wp)) ||
      (st = api->GetTensorMutableData(yv, &yp)))
    return st;
  if (M == 0) return NULL;
  /* buffers per call (malloc, not kernel-owned ones): a session may run on several threads at once */
  void* qa = malloc((size_t)exo_act_bytes(M, k->K));
  float* gu = k->swiglu ? malloc(sizeof(float) * (size_t)(M * k->N)) : NULL;
  if (!qa || (k->swiglu && !gu)) {
    free(gu);
    free(qa);
    return api->CreateStatus(ORT_FAIL, "exo_rknpu.QMatMul: out of memory for the activations");
  }
  exo_quantize_act(xp, M, k->K, qa);
  int64_t groups = (cols + EXO_ROW_GROUP - 1) / EXO_ROW_GROUP;
  /* (QMatMulSwiGLU's chunk reads the rows of both gate and up: twice the weights per output group) */
  int64_t per_chunk = EXO_CHUNK_WEIGHTS / (EXO_ROW_GROUP * k->K * M * (k->swiglu ? 2 : 1));
  if (per_chunk < 2) per_chunk = 2;  /* the AMX path runs two groups per pass: one-group chunks cost it ~17 % */
  QMatMulCall call = {k, wp, qa, M, gu ? gu : yp, gu ? yp : NULL, per_chunk * EXO_ROW_GROUP};
  size_t chunks = (size_t)((groups + per_chunk - 1) / per_chunk);
  st = chunks == 1 ? (run_chunk(&call, 0), NULL) : api->KernelContext_ParallelFor(ctx, run_chunk, chunks, 0, &call);
  free(gu);
  free(qa);
  return st;
}

static const char* op_name(const OrtCustomOp* op) { return op == &qmatmul_swiglu_op ? "QMatMulSwiGLU" : "QMatMul"; }
static ONNXTensorElementDataType input_type(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
static size_t input_count(const OrtCustomOp* op) { (void)op; return 2; }
static ONNXTensorElementDataType output_type(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t output_count(const OrtCustomOp* op) { (void)op; return 1; }

static const OrtCustomOp qmatmul_op =
    EXO_CPU_OP(op_name, input_type, input_count, output_type, output_count, create_kernel, compute,
               destroy_kernel);
static const OrtCustomOp qmatmul_swiglu_op =
    EXO_CPU_OP(op_name, input_type, input_count, output_type, output_count, create_kernel, compute,
               destroy_kernel);

/* The entry point onnxruntime looks up in a custom op library. The domain object is not released: onnxruntime
 * needs it for as long as any session made with these options lives, which the library cannot know. */
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(EXO_ORT_API_VERSION);
  if (!api)  /* an onnxruntime older than 1.17: CreateStatus is entry 0 of every version's table */
    return base->GetApi(1)->CreateStatus(ORT_FAIL, "exo_rknpu.QMatMul needs onnxruntime 1.17 or later");
  OrtCustomOpDomain* domain;
  OrtStatus* st;
  if ((st = api->CreateCustomOpDomain("exo_rknpu", &domain)) || (st = api->CustomOpDomain_Add(domain, &qmatmul_op)) ||
      (st = api->CustomOpDomain_Add(domain, &qmatmul_swiglu_op)) ||
      (st = api->CustomOpDomain_Add(domain, &exo_attention_op)) || (st = api->CustomOpDomain_Add(domain, &exo_rms_norm_op)) ||
      (st = api->CustomOpDomain_Add(domain, &exo_add_rms_norm_op)))
    return st;
  return api->AddCustomOpDomain(options, domain);
}
