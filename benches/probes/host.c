/* What this host's cores and memory give, as ceilings for alora's CPU kernels (BENCHMARKS.md,
 * "Twentieth session"): 512-bit FMA and VNNI throughput per core, read bandwidth with 1 and 2
 * threads, and a few-row projection against Q4_1 blocks written plainly in C (the layout
 * alora's `qmatmul` holds: 16 bytes of nibbles, f32 scale and minimum per 32 weights; each
 * block decoded once, then 2 fma per activation row), streaming 40 matrices of SmolLM2's
 * 1536 x 576 gate shape (27 MB) as a model step does, on 1 and 2 threads.
 *
 *   cc -O3 -march=native -fopenmp benches/probes/host.c -o /tmp/host && /tmp/host
 *
 * x86-64 with AVX-512F and AVX512-VNNI only. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define TWELVE(OP) OP(a0) OP(a1) OP(a2) OP(a3) OP(a4) OP(a5) OP(a6) OP(a7) OP(a8) OP(a9) OP(a10) OP(a11)
#define KEEP __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), \
                              "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11))

/* 12 independent chains, so throughput, not latency, bounds them. */
static double fma_per_s(void) {
    const long n = 100000000;
    __m512 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
#define SET(x) x = _mm512_set1_ps(0.001f);
    TWELVE(SET)
    __m512 b = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(0.0001f);
    double t0 = now();
    for (long i = 0; i < n; i++) {
#define FMA(x) x = _mm512_fmadd_ps(x, b, c);
        TWELVE(FMA)
        KEEP;
    }
    double dt = now() - t0;
    float s = 0;
#define SUM(x) s += _mm512_reduce_add_ps(x);
    TWELVE(SUM)
    if (s == 12345.f) puts("");
    return n * 12 / dt;
}

static double vnni_per_s(void) {
    const long n = 100000000;
    __m512i a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
#define ISET(x) x = _mm512_set1_epi32(1);
    TWELVE(ISET)
    __m512i b = _mm512_set1_epi8(3), c = _mm512_set1_epi8(5);
    double t0 = now();
    for (long i = 0; i < n; i++) {
#define DP(x) x = _mm512_dpbusd_epi32(x, b, c);
        TWELVE(DP)
        KEEP;
    }
    double dt = now() - t0;
    int s = 0;
#define ISUM(x) s += _mm512_reduce_add_epi32(x);
    TWELVE(ISUM)
    if (s == 12345) puts("");
    return n * 12 / dt;
}

static double read_gb_s(const char *buf, long bytes, int threads) {
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        __m512i total = _mm512_setzero_si512();
#pragma omp parallel num_threads(threads)
        {
            __m512i s = _mm512_setzero_si512();
#pragma omp for schedule(static)
            for (long i = 0; i < bytes; i += 64) s = _mm512_xor_si512(s, _mm512_load_si512(buf + i));
#pragma omp critical
            total = _mm512_xor_si512(total, s);
        }
        double dt = now() - t0;
        if (_mm512_reduce_add_epi32(total) == 12345) puts("");
        if (bytes / dt / 1e9 > best) best = bytes / dt / 1e9;
    }
    return best;
}

#define ROWS 1536
#define COLS 576
#define NB (COLS / 32)
#define MATS 40

/* y[r][j] = W_j . x_r for R rows of x, W's rows j0 .. j1 of one matrix. */
#define TILE(R)                                                                              \
    static void tile##R(const uint8_t *qs, const float *d, const float *m, const float *x,   \
                        float *y, int j0, int j1) {                                          \
        const __m128i nib = _mm_set1_epi8(15);                                               \
        for (int j = j0; j < j1; j++) {                                                      \
            __m512 acc[R][2];                                                                \
            for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();        \
            for (int b = 0; b < NB; b++) {                                                   \
                long blk = (long)j * NB + b;                                                 \
                __m128i q = _mm_loadu_si128((const void *)(qs + blk * 16));                  \
                __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, nib))); \
                __m512 w1 = _mm512_cvtepi32_ps(                                              \
                    _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), nib)));         \
                __m512 dd = _mm512_set1_ps(d[blk]), mm = _mm512_set1_ps(m[blk]);             \
                w0 = _mm512_add_ps(_mm512_mul_ps(w0, dd), mm);                               \
                w1 = _mm512_add_ps(_mm512_mul_ps(w1, dd), mm);                               \
                for (int r = 0; r < R; r++) {                                                \
                    const float *xp = x + r * COLS + b * 32;                                 \
                    acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[r][0]);         \
                    acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), acc[r][1]);    \
                }                                                                            \
            }                                                                                \
            for (int r = 0; r < R; r++)                                                      \
                y[r * ROWS + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])); \
        }                                                                                    \
    }
TILE(1)
TILE(6)

typedef void (*tile_fn)(const uint8_t *, const float *, const float *, const float *, float *, int, int);

static uint8_t *qs[MATS];
static float *ds[MATS], *ms[MATS];

/* ns per block (summed over threads' wall time) for one pass over the 40 matrices. */
static double stream(tile_fn f, int threads, const float *x, float *y) {
    double best = 1e9;
    for (int rep = 0; rep < 7; rep++) {
        double t0 = now();
        for (int k = 0; k < MATS; k++) {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int c = 0; c < 8 * threads; c++) {
                int per = ROWS / (8 * threads);
                f(qs[k], ds[k], ms[k], x, y, c * per, (c + 1) * per);
            }
        }
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    return best * 1e9 / ((double)MATS * ROWS * NB);
}

int main(void) {
    printf("zmm fma per core: %.2f G/s\n", fma_per_s() / 1e9);
    printf("zmm vpdpbusd per core: %.2f G/s\n", vnni_per_s() / 1e9);
    long bytes = 256L << 20;
    char *buf = aligned_alloc(64, bytes);
    memset(buf, 1, bytes);
    printf("read: %.1f GB/s (1 thread), %.1f GB/s (2 threads)\n", read_gb_s(buf, bytes, 1),
           read_gb_s(buf, bytes, 2));
    free(buf);
    srand(1);
    for (int k = 0; k < MATS; k++) {
        qs[k] = malloc((long)ROWS * NB * 16);
        ds[k] = malloc(4L * ROWS * NB);
        ms[k] = malloc(4L * ROWS * NB);
        for (long i = 0; i < (long)ROWS * NB * 16; i++) qs[k][i] = rand();
        for (long i = 0; i < (long)ROWS * NB; i++) {
            ds[k][i] = 0.01f;
            ms[k][i] = -0.05f;
        }
    }
    float *x = malloc(4L * 8 * COLS), *y = malloc(4L * 8 * ROWS);
    for (int i = 0; i < 8 * COLS; i++) x[i] = (rand() % 100) / 100.f;
    for (int t = 1; t <= 2; t++) {
        double n1 = stream(tile1, t, x, y), n6 = stream(tile6, t, x, y);
        printf("Q4_1 blocks streamed, %d thread%s: 1 row %.2f ms (%.1f GB/s), 6 rows %.2f ms per 40 matrices\n",
               t, t > 1 ? "s" : "", n1 * MATS * ROWS * NB / 1e6, 24.0 / n1, n6 * MATS * ROWS * NB / 1e6);
    }
    return 0;
}
