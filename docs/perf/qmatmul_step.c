/* One decode step's quantized matmuls of the 1B model (Llama 3.2 1B shapes) through exo_qmatmul_rows, in C: 16 layers
 * x {QKV 2048 -> 3072, O 2048 -> 2048, gate_up 2048 -> 16384, down 8192 -> 2048} (the runtime's stacked linears),
 * distinct random weights (~547 MB in Q4_0, more than the caches: each step streams them from memory as decode does),
 * activations quantized per call, each call's row groups taken in chunks of 2 (as ort_op.c at these shapes) by T
 * threads (the caller and T - 1 spinning workers). Prints ms per step for each M: thread CPU time by default, which
 * a busy shared machine disturbs far less than wall time (WALL=1 for wall time; then use T = 1 or an idle machine).
 *
 *   gcc -O3 -ffp-contract=off -fno-math-errno -std=c11 -march=native [-DEXO_NO_AMX] -Iexo_rknpu/native \
 *       docs/perf/qmatmul_step.c exo_rknpu/native/qmatmul.c -o /tmp/qmatmul_step -lm -lpthread
 *   /tmp/qmatmul_step [T=1] [steps=4] [M list=1,8] [layers=16] [kind=-1] [fmt=0]
 *
 * layers=1 keeps one layer's 34 MB in the caches (ms per layer: x 16 for a step from cache); kind 0..3 times one
 * matrix of the four alone, kind 4 the head (2048 -> 128256; fmt 3 for its Q6_K). Weights are random bytes with small
 * normal fp16 scales: the work per byte is the kernel's whatever the values. docs/native.md ("AMX") quotes it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "qmatmul.h"

typedef struct {
    int64_t K, N;
    uint8_t* w;
} Mat;

static int fmt_, threads;
static Mat mats[5 * 64];
static int nmats;
/* the current call, shared with the workers */
static const Mat* cur;
static const void* cur_qa;
static int64_t cur_M, nchunks, per_chunk;
static float* cur_y;
static atomic_long next_chunk;
static atomic_int generation, finished;

static void work(void) {
    for (long c; (c = atomic_fetch_add(&next_chunk, 1)) < nchunks;) {
        int64_t begin = c * per_chunk * EXO_ROW_GROUP, end = begin + per_chunk * EXO_ROW_GROUP;
        exo_qmatmul_rows(fmt_, cur->w, cur->N, cur->K, cur_qa, cur_M, cur_y, begin, end < cur->N ? end : cur->N);
    }
}

static void* worker(void* arg) {
    (void)arg;
    for (int seen = 0;;) {
        int g;
        while ((g = atomic_load(&generation)) == seen) __builtin_ia32_pause();
        if (g < 0) return NULL;
        seen = g;
        work();
        atomic_fetch_add(&finished, 1);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(getenv("WALL") ? CLOCK_MONOTONIC : CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void add_matrix(int64_t K, int64_t N) {
    Mat* m = &mats[nmats++];
    m->K = K, m->N = N;
    const int64_t bytes = exo_packed_bytes(fmt_, N, K), ng = (N + EXO_ROW_GROUP - 1) / EXO_ROW_GROUP;
    const int64_t code_bytes = bytes - ng * (K / EXO_BLOCK) * (fmt_ == EXO_Q4_1 ? 64 : fmt_ == EXO_Q6_K ? 36 : 32);
    m->w = aligned_alloc(64, (size_t)(bytes + 63) / 64 * 64);
    for (int64_t i = 0; i < code_bytes; i++) m->w[i] = (uint8_t)rand();
    uint16_t* scales = (uint16_t*)(m->w + code_bytes);
    for (int64_t i = 0; i < (bytes - code_bytes) / 2; i++)  /* small normal fp16 (Q6_K: its d and sc bytes alike) */
        scales[i] = (uint16_t)(fmt_ == EXO_Q6_K ? rand() & 0x3fff : 0x2000 + (rand() & 0x3ff));
}

int main(int argc, char** argv) {
    threads = argc > 1 ? atoi(argv[1]) : 1;
    const int steps = argc > 2 ? atoi(argv[2]) : 4, layers = argc > 4 ? atoi(argv[4]) : 16;
    const char* ms = argc > 3 ? argv[3] : "1,8";
    const int kind = argc > 5 ? atoi(argv[5]) : -1;
    fmt_ = argc > 6 ? atoi(argv[6]) : EXO_Q4_0;
    const int64_t shapes[5][2] = {{2048, 3072}, {2048, 2048}, {2048, 16384}, {8192, 2048}, {2048, 128256}};
    srand(1);
    for (int l = 0; l < layers; l++)
        for (int s = 0; s < 5; s++)
            if (kind == s || (kind < 0 && s < 4)) add_matrix(shapes[s][0], shapes[s][1]);
    pthread_t th[16];
    for (int t = 1; t < threads && t < 16; t++) pthread_create(&th[t], NULL, worker, NULL);
    float* x = malloc(sizeof(float) * 64 * 8192);
    float* y = malloc(sizeof(float) * 64 * 128256);
    void* qa = aligned_alloc(64, (size_t)(exo_act_bytes(64, 8192) + 63) / 64 * 64);
    for (int i = 0; i < 64 * 8192; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    for (const char* p = ms; *p;) {
        const int64_t M = atoi(p);
        while (*p && *p != ',') p++;
        if (*p) p++;
        if (M < 1 || M > 64) continue;
        double best = 1e30, sum = 0;
        for (int s = 0; s <= steps; s++) { /* step 0 warms up */
            const double t0 = now();
            for (int i = 0; i < nmats; i++) {
                cur = &mats[i];
                exo_quantize_act(x, M, cur->K, qa);
                cur_qa = qa, cur_M = M, cur_y = y;
                per_chunk = 65536 / (EXO_ROW_GROUP * cur->K * M);
                if (per_chunk < 2) per_chunk = 2;
                nchunks = ((cur->N + EXO_ROW_GROUP - 1) / EXO_ROW_GROUP + per_chunk - 1) / per_chunk;
                atomic_store(&next_chunk, 0);
                atomic_store(&finished, 0);
                atomic_fetch_add(&generation, 1);
                work();
                while (atomic_load(&finished) < threads - 1) __builtin_ia32_pause();
            }
            const double dt = now() - t0;
            if (s > 0) sum += dt, best = dt < best ? dt : best;
        }
        printf("%s M=%ld: min %.2f ms, mean %.2f ms per step\n", exo_isa(), (long)M, best * 1e3, sum / steps * 1e3);
    }
    atomic_store(&generation, -1);
    for (int t = 1; t < threads && t < 16; t++) pthread_join(th[t], NULL);
    return 0;
}
