/* onnxruntime custom ops RMSNorm and AddRMSNorm (domain exo_rknpu): a layer's RMSNorm, and the residual Add before
 * it fused with it, computed per row in one fixed order on the calling thread (docs/native.md, "Norms").
 *
 *   attribute   epsilon (float)
 *   RMSNorm     inputs x float32 [..., H], gamma float32 [H]             outputs y [..., H]
 *   AddRMSNorm  inputs x, skip float32 [..., H] (same dims), gamma [H]   outputs y [..., H], sum = x + skip [..., H]
 *
 * Per row: s = x (+ skip); ss = sum of s_i * s_i in 16 lanes (lane l takes i = l, l + 16, ..) then the lanes
 * pairwise (l + 8, l + 4, l + 2, l + 1); rms = sqrtf(ss / H + epsilon); y_i = s_i / rms * gamma_i. Every step is a
 * correctly rounded IEEE operation in a fixed order (no FMA contraction: build.py's -ffp-contract=off), so a row's
 * result has the same bits in every build, at any batch size and thread count; RMSNorm and AddRMSNorm give the same
 * y for the same s, so a layer after a slice boundary (RMSNorm) equals the same layer inside a slice (AddRMSNorm).
 *
 * Why not onnxruntime's SimplifiedLayerNormalization and Add: at several rows (a batched decode step) onnxruntime
 * splits each over its pool, and waking the parked worker costs more than the op (~40 us against ~5 us of work
 * for 8 rows of 2048); these ops run on the calling thread below EXO_PARALLEL_ROWS rows. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

#define EXO_LANES 16
#define EXO_MAX_DIMS 8
/* rows of a call from which it is split over onnxruntime's pool (a prefill chunk), in tasks of EXO_TASK_ROWS */
#define EXO_PARALLEL_ROWS 64
#define EXO_TASK_ROWS 16

typedef struct {
  const OrtApi* api;
  float eps;
  int add; /* AddRMSNorm */
} NormKernel;

typedef struct { /* one call's work */
  const float *x, *skip, *gamma;
  float *y, *sum;
  int64_t H, rows;
  float eps;
} NormCall;

static void norm_row(const NormCall* c, int64_t r) {
  const int64_t H = c->H;
  const float* x = c->x + r * H;
  const float* s = x;
  if (c->skip) {
    const float* k = c->skip + r * H;
    float* sum = c->sum + r * H;
    for (int64_t i = 0; i < H; i++) sum[i] = x[i] + k[i];
    s = sum;
  }
  float acc[EXO_LANES];
  for (int l = 0; l < EXO_LANES; l++) acc[l] = s[l] * s[l];
  for (int64_t i = EXO_LANES; i < H; i += EXO_LANES)
    for (int l = 0; l < EXO_LANES; l++) acc[l] += s[i + l] * s[i + l];
  for (int w = EXO_LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) acc[l] += acc[l + w];
  const float rms = sqrtf(acc[0] / (float)H + c->eps);
  float* y = c->y + r * H;
  for (int64_t i = 0; i < H; i++) y[i] = s[i] / rms * c->gamma[i];
}

static void run_task(void* data, size_t task) {
  const NormCall* c = data;
  const int64_t r0 = (int64_t)task * EXO_TASK_ROWS, r1 = r0 + EXO_TASK_ROWS < c->rows ? r0 + EXO_TASK_ROWS : c->rows;
  for (int64_t r = r0; r < r1; r++) norm_row(c, r);
}

static OrtStatus* fail(const OrtApi* api, const char* what) { return api->CreateStatus(ORT_INVALID_ARGUMENT, what); }

static OrtStatus* create_kernel(const OrtApi* api, const OrtKernelInfo* info, void** out, int add) {
  float eps = 0.0f;
  OrtStatus* st = api->KernelInfoGetAttribute_float(info, "epsilon", &eps);
  if (st) return st;
  if (!(eps >= 0.0f)) return fail(api, "exo_rknpu.RMSNorm: epsilon must be a number >= 0");
  NormKernel* k = malloc(sizeof *k);
  if (!k) return api->CreateStatus(ORT_FAIL, "exo_rknpu.RMSNorm: out of memory");
  *k = (NormKernel){api, eps, add};
  *out = k;
  return NULL;
}

static OrtStatus* create_norm(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  (void)op;
  return create_kernel(api, info, out, 0);
}

static OrtStatus* create_add_norm(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  (void)op;
  return create_kernel(api, info, out, 1);
}

static void destroy_kernel(void* kernel) { free(kernel); }

static OrtStatus* input(const OrtApi* api, OrtKernelContext* ctx, size_t i, int64_t* dims, size_t* n, void** data) {
  return exo_input(api, ctx, i, dims, n, EXO_MAX_DIMS, data, "exo_rknpu.RMSNorm: an input has too many dimensions");
}

static OrtStatus* output(const OrtApi* api, OrtKernelContext* ctx, size_t i, const int64_t* dims, size_t n,
                         float** data) {
  OrtValue* v;
  OrtStatus* st = api->KernelContext_GetOutput(ctx, i, dims, n, &v);
  return st ? st : api->GetTensorMutableData(v, (void**)data);
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const NormKernel* k = kernel;
  const OrtApi* api = k->api;
  int64_t xd[EXO_MAX_DIMS], kd[EXO_MAX_DIMS], gd[EXO_MAX_DIMS];
  size_t xn, kn = 0, gn;
  void *x, *skip = NULL, *gamma;
  OrtStatus* st;
  if ((st = input(api, ctx, 0, xd, &xn, &x)) || (k->add && (st = input(api, ctx, 1, kd, &kn, &skip))) ||
      (st = input(api, ctx, k->add ? 2 : 1, gd, &gn, &gamma)))
    return st;
  if (gn != 1 || gd[0] <= 0 || gd[0] % EXO_LANES != 0)
    return fail(api, "exo_rknpu.RMSNorm: gamma is not [H] with H a positive multiple of 16");
  if (xn < 1 || xd[xn - 1] != gd[0]) return fail(api, "exo_rknpu.RMSNorm: x's last dimension is not gamma's");
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < xn; d++) rows *= xd[d];
  if (k->add && (kn != xn || memcmp(kd, xd, sizeof(int64_t) * xn) != 0))
    return fail(api, "exo_rknpu.AddRMSNorm: x and skip differ in shape");
  NormCall c = {x, skip, gamma, NULL, NULL, gd[0], rows, k->eps};
  if ((st = output(api, ctx, 0, xd, xn, &c.y)) || (k->add && (st = output(api, ctx, 1, xd, xn, &c.sum)))) return st;
  const size_t tasks = (size_t)((rows + EXO_TASK_ROWS - 1) / EXO_TASK_ROWS);
  if (rows < EXO_PARALLEL_ROWS) {
    for (int64_t r = 0; r < rows; r++) norm_row(&c, r);
    return NULL;
  }
  return api->KernelContext_ParallelFor(ctx, run_task, tasks, 0, &c);
}

static const char* norm_name(const OrtCustomOp* op) { (void)op; return "RMSNorm"; }
static const char* add_norm_name(const OrtCustomOp* op) { (void)op; return "AddRMSNorm"; }
static ONNXTensorElementDataType float_type(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t norm_inputs(const OrtCustomOp* op) { (void)op; return 2; }
static size_t add_norm_inputs(const OrtCustomOp* op) { (void)op; return 3; }
static size_t norm_outputs(const OrtCustomOp* op) { (void)op; return 1; }
static size_t add_norm_outputs(const OrtCustomOp* op) { (void)op; return 2; }

const OrtCustomOp exo_rms_norm_op =
    EXO_CPU_OP(norm_name, float_type, norm_inputs, float_type, norm_outputs, create_norm, compute, destroy_kernel);
const OrtCustomOp exo_add_rms_norm_op = EXO_CPU_OP(add_norm_name, float_type, add_norm_inputs, float_type,
                                                   add_norm_outputs, create_add_norm, compute, destroy_kernel);
