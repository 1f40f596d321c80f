// A model, in C, of the one-row (batch-1 decode) product over a weight in
// torchwire's 16-channel panels, for three weight formats, each widened to
// float32 in registers:
//   f32   the float32 panels the server runs by default;
//   int8  a scale per channel (what `--quantize int8` runs);
//   int4  a scale per channel and group of 32 input indices (not in the
//         server): 8 bytes an input index, byte c holding channel c in its
//         low nibble and channel c + 8 in its high one, q - 8 in -8..7.
// It answers whether a 4-bit format read that way would beat int8 on this
// CPU (BENCHMARKS.md, "4-bit weights: does it pay?"). Two threads, each half
// the panels; the best of 7 alternating runs.
//
//   gcc -O3 -funroll-loops -mavx2 -mfma -pthread quant_b1.c -o quant_b1
//   ./quant_b1 1024 32000      # in out
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { F32, INT8, INT4, WAYS };
static const char *NAMES[WAYS] = {"f32", "int8", "int4 g32"};

static long K, P;
static float *WF, *X, *SC8, *SC4;
static int8_t *W8;
static uint8_t *W4;
static int WAY;
static float OUT[1 << 20];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void f32_panel(long p, __m256 a[4][2]) {
    const float *w = WF + p * K * 16;
    for (long i = 0; i < K; i += 4)
        for (int j = 0; j < 4; j++) {
            __m256 b = _mm256_broadcast_ss(X + i + j);
            a[j][0] = _mm256_fmadd_ps(b, _mm256_loadu_ps(w + (i + j) * 16), a[j][0]);
            a[j][1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(w + (i + j) * 16 + 8), a[j][1]);
        }
}

static void int8_panel(long p, __m256 a[4][2]) {
    const int8_t *w = W8 + p * K * 16;
    for (long i = 0; i < K; i += 4) {
        _mm_prefetch((const char *)(w + (i + 64) * 16), _MM_HINT_NTA);
        for (int j = 0; j < 4; j++) {
            __m256 b = _mm256_broadcast_ss(X + i + j);
            __m128i v = _mm_loadu_si128((const __m128i *)(w + (i + j) * 16));
            __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
            a[j][0] = _mm256_fmadd_ps(b, lo, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(b, hi, a[j][1]);
        }
    }
    a[0][0] = _mm256_mul_ps(a[0][0], _mm256_loadu_ps(SC8 + p * 16));
    a[0][1] = _mm256_mul_ps(a[0][1], _mm256_loadu_ps(SC8 + p * 16 + 8));
}

static void int4_panel(long p, __m256 a[4][2]) {
    const uint8_t *w = W4 + p * K * 8;
    const float *sc = SC4 + p * (K / 32) * 16;
    const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    for (long g = 0; g < K / 32; g++) {
        __m256 ga[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()},
                           {_mm256_setzero_ps(), _mm256_setzero_ps()}};
        _mm_prefetch((const char *)(w + (g * 32 + 128) * 8), _MM_HINT_NTA);
        for (long i = g * 32; i < g * 32 + 32; i += 2)
            for (int j = 0; j < 2; j++) {
                __m256 b = _mm256_broadcast_ss(X + i + j);
                __m128i v = _mm_loadl_epi64((const __m128i *)(w + (i + j) * 8));
                __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), eight);
                __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);
                ga[j][0] = _mm256_fmadd_ps(b, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), ga[j][0]);
                ga[j][1] = _mm256_fmadd_ps(b, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), ga[j][1]);
            }
        // The group's scales, once per 32 input indices.
        a[0][0] = _mm256_fmadd_ps(_mm256_add_ps(ga[0][0], ga[1][0]), _mm256_loadu_ps(sc + g * 16), a[0][0]);
        a[0][1] = _mm256_fmadd_ps(_mm256_add_ps(ga[0][1], ga[1][1]), _mm256_loadu_ps(sc + g * 16 + 8), a[0][1]);
    }
}

static void *run(void *arg) {
    long t = (long)arg, p0 = t * P / 2, p1 = (t + 1) * P / 2;
    for (long p = p0; p < p1; p++) {
        __m256 a[4][2];
        for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_ps();
        if (WAY == F32) f32_panel(p, a);
        else if (WAY == INT8) int8_panel(p, a);
        else int4_panel(p, a);
        __m256 lo = _mm256_add_ps(_mm256_add_ps(a[0][0], a[1][0]), _mm256_add_ps(a[2][0], a[3][0]));
        __m256 hi = _mm256_add_ps(_mm256_add_ps(a[0][1], a[1][1]), _mm256_add_ps(a[2][1], a[3][1]));
        // Every result is read at the end, so no work can be dropped.
        _mm256_storeu_ps(OUT + (p * 16) % (1 << 20), lo);
        _mm256_storeu_ps(OUT + (p * 16 + 8) % (1 << 20), hi);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || atol(argv[1]) % 32 || atol(argv[2]) % 32) {
        fprintf(stderr, "usage: %s IN OUT (multiples of 32)\n", argv[0]);
        return 2;
    }
    K = atol(argv[1]);
    P = atol(argv[2]) / 16;
    WF = aligned_alloc(64, P * K * 16 * 4);
    W8 = aligned_alloc(64, P * K * 16);
    W4 = aligned_alloc(64, P * K * 8);
    SC8 = aligned_alloc(64, P * 16 * 4);
    SC4 = aligned_alloc(64, P * (K / 32) * 16 * 4);
    X = aligned_alloc(64, K * 4);
    for (long i = 0; i < P * K * 16; i++) WF[i] = 1e-3f * (i % 7), W8[i] = i % 13 - 6;
    for (long i = 0; i < P * K * 8; i++) W4[i] = (uint8_t)(i * 37);
    for (long i = 0; i < P * 16; i++) SC8[i] = 0.01f;
    for (long i = 0; i < P * (K / 32) * 16; i++) SC4[i] = 0.02f;
    for (long i = 0; i < K; i++) X[i] = 1e-2f * (i % 5);
    double bytes[WAYS] = {P * K * 16 * 4.0, P * K * 16.0 + P * 16 * 4.0, P * K * 8.0 + P * (K / 32) * 16 * 4.0};
    double best[WAYS] = {1e9, 1e9, 1e9};
    for (int rep = 0; rep < 7; rep++)
        for (WAY = 0; WAY < WAYS; WAY++) {
            pthread_t th[2];
            double t0 = now();
            for (long t = 0; t < 2; t++) pthread_create(&th[t], 0, run, (void *)t);
            for (int t = 0; t < 2; t++) pthread_join(th[t], 0);
            double dt = now() - t0;
            if (dt < best[WAY]) best[WAY] = dt;
        }
    float sum = 0;
    for (int i = 0; i < 1 << 20; i++) sum += OUT[i];
    for (int w = 0; w < WAYS; w++)
        printf("%-9s %.3f ms  %.1f GB/s of its bytes  (%.2fx the f32 time)\n", NAMES[w], best[w] * 1e3,
               bytes[w] / best[w] / 1e9, best[w] / best[F32]);
    printf("(checksum %g)\n", sum);
    return 0;
}
