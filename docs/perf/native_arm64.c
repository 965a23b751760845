/* Standalone driver of the native kernel for emulated aarch64 (docs/perf/native_arm64.py builds and runs it).
 * argv[1]: input = int64 fmt, N, K, M, n_begin, n_end; packed weights (exo_packed_bytes); x float32 [M, K].
 * argv[2]: output = y[:, n_begin:n_end] float32. Prints exo_isa() (the code path compiled). */
#include <stdio.h>
#include <stdlib.h>

#include "../../exo_rknpu/native/qmatmul.c"

static void* take(FILE* f, size_t n) {
    void* p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, f) != n) { fprintf(stderr, "short input\n"); exit(2); }
    return p;
}

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s input output\n", argv[0]); return 2; }
    FILE* in = fopen(argv[1], "rb");
    if (!in) { perror(argv[1]); return 2; }
    int64_t* h = take(in, 6 * sizeof(int64_t));
    const int64_t fmt = h[0], N = h[1], K = h[2], M = h[3], nb = h[4], ne = h[5];
    uint8_t* packed = take(in, (size_t)exo_packed_bytes((int)fmt, N, K));
    float* x = take(in, (size_t)(M * K) * sizeof(float));
    fclose(in);
    void* qa = malloc((size_t)exo_act_bytes(M, K));
    float* y = calloc((size_t)(M * N), sizeof(float));
    exo_quantize_act(x, M, K, qa);
    exo_qmatmul_rows((int)fmt, packed, N, K, qa, M, y, nb, ne);
    FILE* out = fopen(argv[2], "wb");
    if (!out) { perror(argv[2]); return 2; }
    for (int64_t m = 0; m < M; m++) fwrite(y + m * N + nb, sizeof(float), (size_t)(ne - nb), out);
    fclose(out);
    printf("%s\n", exo_isa());
    return 0;
}
