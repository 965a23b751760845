/* The part of onnxruntime's C ABI (include/onnxruntime/core/session/onnxruntime_c_api.h) that ort_op.c and
 * attention.c use.
 *
 * The onnxruntime pip wheel ships libonnxruntime.so without headers, so this declares only what we call. The C API
 * is append-only: an entry keeps its index in the OrtApi table in every later release, so the table below lists the
 * entries we call at their indices and fills the rest with placeholders. Each index was checked against the
 * official header: 0..99 against onnxruntime_c_api.h of API version 13 (microsoft/onnxruntime, counted entry by
 * entry; KernelInfoGetAttribute_float is the entry before KernelInfoGetAttribute_int64 there);
 * KernelContext_ParallelFor (274; "since Version 1.17" in its documentation, which also says fn is called `total` times and num_batch 0 sets no limit on the batches) against generated bindings of a current header (their
 * OrtApi offsets, 8 bytes per entry: 2192 / 8) and its declaration order in a current official header (after
 * SetDeterministicCompute, before SessionOptionsAppendExecutionProvider_OpenVINO_V2). The tests run the op with one
 * and two intra-op threads and with bad input, which calls every entry listed here (the attention op's tests read
 * its float attribute `scale`: a wrong entry would fail them).
 *
 * OrtCustomOp is declared up to the fields of version 16 (CreateKernelV2 / KernelComputeV2, which return a status):
 * onnxruntime reads only the fields its `version` promises (custom_ops.cc: optional-io fields from 8, input memory
 * type from 13, variadic arity from 14, compute v2 from 16, shape inference and op versions from 17). */
#ifndef EXO_ORT_ABI_H
#define EXO_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#define EXO_ORT_API_VERSION 17 /* the API version we ask GetApi for: the first with KernelContext_ParallelFor */
#define EXO_CUSTOM_OP_VERSION 16

typedef struct OrtStatus OrtStatus;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOp OrtCustomOp;

typedef enum { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 } OrtErrorCode;  /* first entries only */
typedef enum {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6
} ONNXTensorElementDataType; /* the ones we use; values as in TensorProto.DataType */
typedef enum { INPUT_OUTPUT_REQUIRED = 0 } OrtCustomOpInputOutputCharacteristic;
typedef enum { OrtMemTypeDefault = 0 } OrtMemType;

typedef struct OrtApi OrtApi;

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

#define EXO_ORT_GAP(from, to) void* unused_##from[(to) - (from)]

struct OrtApi {
  OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg);                                      /* 0 */
  EXO_ORT_GAP(1, 26);
  OrtStatus* (*CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);                      /* 26 */
  OrtStatus* (*CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op);            /* 27 */
  OrtStatus* (*AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain);               /* 28 */
  EXO_ORT_GAP(29, 51);
  OrtStatus* (*GetTensorMutableData)(OrtValue* value, void** out);                                      /* 51 */
  EXO_ORT_GAP(52, 61);
  OrtStatus* (*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);                 /* 61 */
  OrtStatus* (*GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count);      /* 62 */
  EXO_ORT_GAP(63, 65);
  OrtStatus* (*GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);          /* 65 */
  EXO_ORT_GAP(66, 85);
  OrtStatus* (*KernelInfoGetAttribute_float)(const OrtKernelInfo* info, const char* name, float* out);       /* 85 */
  OrtStatus* (*KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name, int64_t* out); /* 86 */
  EXO_ORT_GAP(87, 90);
  OrtStatus* (*KernelContext_GetInput)(const OrtKernelContext* ctx, size_t index, const OrtValue** out); /* 90 */
  OrtStatus* (*KernelContext_GetOutput)(OrtKernelContext* ctx, size_t index, const int64_t* dims,
                                        size_t count, OrtValue** out);                                  /* 91 */
  EXO_ORT_GAP(92, 99);
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);                               /* 99 */
  EXO_ORT_GAP(100, 274);
  OrtStatus* (*KernelContext_ParallelFor)(const OrtKernelContext* ctx, void (*fn)(void*, size_t), size_t total,
                                          size_t num_batch, void* usr_data);                            /* 274 */
};

struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const struct OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* ctx);
  void (*KernelDestroy)(void* kernel);
  /* version 8 */
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  /* version 13 */
  OrtMemType (*GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);
  /* version 14 */
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp* op);
  /* version 16 */
  OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* ctx);
};

/* What every op of this library answers alike: it runs on the CPU, every input and output is required and in CPU
 * memory, none is variadic. */
static inline const char* exo_op_cpu(const OrtCustomOp* op) { (void)op; return NULL; }
static inline OrtCustomOpInputOutputCharacteristic exo_op_required(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static inline OrtMemType exo_op_memory(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return OrtMemTypeDefault; }
static inline int exo_op_one(const OrtCustomOp* op) { (void)op; return 1; }

/* Input i of a call: its dims (at most `most`; more is refused with the message `too_many`) into dims[], their
 * count into *n, its data into *data. */
static inline OrtStatus* exo_input(const OrtApi* api, OrtKernelContext* ctx, size_t i, int64_t* dims, size_t* n,
                                   size_t most, void** data, const char* too_many) {
  const OrtValue* v;
  OrtTensorTypeAndShapeInfo* info;
  OrtStatus* st;
  if ((st = api->KernelContext_GetInput(ctx, i, &v)) || (st = api->GetTensorTypeAndShape(v, &info))) return st;
  if (!(st = api->GetDimensionsCount(info, n)))
    st = *n > most ? api->CreateStatus(ORT_INVALID_ARGUMENT, too_many) : api->GetDimensions(info, dims, *n);
  api->ReleaseTensorTypeAndShapeInfo(info);
  return st ? st : api->GetTensorMutableData((OrtValue*)v, data);
}

/* An op of this library from its own parts: name, input / output types and counts, kernel create, run, destroy. */
#define EXO_CPU_OP(name, in_type, in_count, out_type, out_count, create, run, destroy)                       \
  {                                                                                                       \
    .version = EXO_CUSTOM_OP_VERSION, .CreateKernel = NULL, /* onnxruntime calls CreateKernelV2 from 16 */ \
        .GetName = name, .GetExecutionProviderType = exo_op_cpu, .GetInputType = in_type,                 \
        .GetInputTypeCount = in_count, .GetOutputType = out_type, .GetOutputTypeCount = out_count,        \
        .KernelCompute = NULL, .KernelDestroy = destroy, .GetInputCharacteristic = exo_op_required,        \
        .GetOutputCharacteristic = exo_op_required, .GetInputMemoryType = exo_op_memory,                  \
        .GetVariadicInputMinArity = exo_op_one, .GetVariadicInputHomogeneity = exo_op_one,                \
        .GetVariadicOutputMinArity = exo_op_one, .GetVariadicOutputHomogeneity = exo_op_one,              \
        .CreateKernelV2 = create, .KernelComputeV2 = run,                                                  \
  }

#endif
