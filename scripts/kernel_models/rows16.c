// A model, in C, of a 16-row product (the decode step at concurrency 16)
// over a float32 weight in torchwire's 16-channel panels
// (`panel[p][k][c] = w[16 p + c][k]`), to find a loop order in which memory
// streams the weight while the FMA units work (BENCHMARKS.md, "Sixteen rows,
// chunked"). Ways, two threads each taking half the panels:
//   row1         one row: the time to stream the weight (memory bound);
//   whole        tiles of 6, 6 and 4 rows, each over a whole panel, the
//                first asking for the next panel as it goes (the server's
//                loop before the change);
//   chunkN       every tile over N input indices of the panel before the
//                next N, the tiles sharing the asking for the next chunk in
//                proportion to their rows (what the server runs now, N=128);
//   chunk128 np  the same without asking (the hardware prefetcher alone);
//   narrow6      the weight in 6-channel panels and `x` transposed, one
//                tile of 16 rows x 6 channels a single pass over the weight
//                (a layout change, not taken: no faster than chunk128).
// Output: best and median of the alternating runs, and GFLOP/s of the
// median at 16 rows.
//
//   gcc -O3 -mavx2 -mfma -pthread rows16.c -o rows16
//   ./rows16 2048 8192 25      # in out runs
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define P 16
#define M 16
static long K, N;
static float *W, *X, *XT, *OUT;
static int CHUNK, ASK;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// The server's tile: MR rows of x against a panel's 16 channels over input
// indices [k0, k1), accumulators in and out through `acc`; asks for one
// cache line from `ahead` every `every` input indices (none where null).
#define ROW(r)                                                         \
  {                                                                    \
    __m256 xb = _mm256_broadcast_ss(x + (r) * K + i);                  \
    a##r##0 = _mm256_fmadd_ps(xb, w0, a##r##0);                        \
    a##r##1 = _mm256_fmadd_ps(xb, w1, a##r##1);                        \
  }
#define LOAD(r) __m256 a##r##0 = acc[2 * (r)], a##r##1 = acc[2 * (r) + 1];
#define STORE(r) acc[2 * (r)] = a##r##0, acc[2 * (r) + 1] = a##r##1;
#define LOOP(ROWS)                                                     \
  int wait = 0;                                                        \
  for (long i = k0; i < k1; i++) {                                     \
    if (ahead && wait-- == 0) {                                        \
      _mm_prefetch(ahead, _MM_HINT_T0);                                \
      ahead += 64;                                                     \
      wait = every - 1;                                                \
    }                                                                  \
    __m256 w0 = _mm256_loadu_ps(panel + i * P);                        \
    __m256 w1 = _mm256_loadu_ps(panel + i * P + 8);                    \
    ROWS                                                               \
  }
static void tile6(const float *panel, const float *x, long k0, long k1,
                  __m256 *acc, const char *ahead, int every) {
  LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5)
  LOOP(ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5))
  STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
}
static void tile4(const float *panel, const float *x, long k0, long k1,
                  __m256 *acc, const char *ahead, int every) {
  LOAD(0) LOAD(1) LOAD(2) LOAD(3)
  LOOP(ROW(0) ROW(1) ROW(2) ROW(3))
  STORE(0) STORE(1) STORE(2) STORE(3)
}

static float sum(const __m256 *acc, int n) {
  float s = 0, t[8];
  for (int r = 0; r < n; r++) {
    _mm256_storeu_ps(t, acc[r]);
    for (int j = 0; j < 8; j++) s += t[j];
  }
  return s;
}

static void whole(long p) {
  const float *panel = W + p * K * P;
  __m256 acc[32];
  for (int r = 0; r < 32; r++) acc[r] = _mm256_setzero_ps();
  tile6(panel, X, 0, K, acc, (const char *)(panel + K * P), 1);
  tile6(panel, X + 6 * K, 0, K, acc + 12, 0, 1);
  tile4(panel, X + 12 * K, 0, K, acc + 24, 0, 1);
  OUT[p] = sum(acc, 32);
}

static void chunked(long p) {
  const float *panel = W + p * K * P;
  __m256 acc[32];
  for (int r = 0; r < 32; r++) acc[r] = _mm256_setzero_ps();
  for (long k0 = 0; k0 < K; k0 += CHUNK) {
    long k1 = k0 + CHUNK < K ? k0 + CHUNK : K, n = k1 - k0;
    const char *next = (const char *)(panel + k1 * P);
    // Lines of the next chunk per tile, by rows: 6/16, 6/16, 4/16.
    long a = n * 6 / 16, b = n * 12 / 16 - a, c = n - a - b;
    if (ASK) {
      tile6(panel, X, k0, k1, acc, next, (n + a - 1) / a);
      tile6(panel, X + 6 * K, k0, k1, acc + 12, next + a * 64, (n + b - 1) / b);
      tile4(panel, X + 12 * K, k0, k1, acc + 24, next + (a + b) * 64, (n + c - 1) / c);
    } else {
      tile6(panel, X, k0, k1, acc, 0, 1);
      tile6(panel, X + 6 * K, k0, k1, acc + 12, 0, 1);
      tile4(panel, X + 12 * K, k0, k1, acc + 24, 0, 1);
    }
  }
  OUT[p] = sum(acc, 32);
}

static void row1(long p) {
  const float *panel = W + p * K * P;
  __m256 a[8];
  for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
  for (long i = 0; i + 4 <= K; i += 4)
    for (int j = 0; j < 4; j++) {
      __m256 xb = _mm256_broadcast_ss(X + i + j);
      a[2 * j] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(panel + (i + j) * P), a[2 * j]);
      a[2 * j + 1] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(panel + (i + j) * P + 8), a[2 * j + 1]);
    }
  OUT[p] = sum(a, 8);
}

// 6-channel panels (the same bytes read as [N/6][K][6]), x as [K][16].
#define CH(c)                                                          \
  {                                                                    \
    __m256 wb = _mm256_broadcast_ss(w + c);                            \
    b##c##0 = _mm256_fmadd_ps(wb, xa, b##c##0);                        \
    b##c##1 = _mm256_fmadd_ps(wb, xb, b##c##1);                        \
  }
#define ZERO(c) __m256 b##c##0 = _mm256_setzero_ps(), b##c##1 = b##c##0;
#define PUT(c) acc[2 * c] = b##c##0, acc[2 * c + 1] = b##c##1;
static void narrow6(long p) {
  const float *w = W + p * K * 6;
  ZERO(0) ZERO(1) ZERO(2) ZERO(3) ZERO(4) ZERO(5)
  for (long i = 0; i < K; i++, w += 6) {
    __m256 xa = _mm256_loadu_ps(XT + 16 * i), xb = _mm256_loadu_ps(XT + 16 * i + 8);
    CH(0) CH(1) CH(2) CH(3) CH(4) CH(5)
  }
  __m256 acc[12];
  PUT(0) PUT(1) PUT(2) PUT(3) PUT(4) PUT(5)
  OUT[p] = sum(acc, 12);
}

typedef struct { void (*panel)(long); long p0, p1; } Part;
static void *part(void *v) {
  Part *a = v;
  for (long p = a->p0; p < a->p1; p++) a->panel(p);
  return 0;
}
static double run(void (*panel)(long), long panels) {
  pthread_t t[2];
  Part a[2] = {{panel, 0, panels / 2}, {panel, panels / 2, panels}};
  double t0 = now();
  for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, part, &a[i]);
  for (int i = 0; i < 2; i++) pthread_join(t[i], 0);
  return now() - t0;
}
static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s IN OUT [RUNS]\n", argv[0]);
    return 2;
  }
  K = atol(argv[1]), N = atol(argv[2]);
  int runs = argc > 3 ? atoi(argv[3]) : 15;
  if (K < 64 || N < 96 || runs < 1 || runs > 100) {
    fprintf(stderr, "IN >= 64, OUT >= 96, 1 <= RUNS <= 100\n");
    return 2;
  }
  W = aligned_alloc(64, (K * N * 4 + 4096) / 64 * 64);
  X = aligned_alloc(64, M * K * 4);
  XT = aligned_alloc(64, M * K * 4);
  OUT = calloc(N, 4);
  for (long i = 0; i < K * N; i++) W[i] = (float)((i * 2654435761u) % 1000) / 1000.f - .5f;
  for (long i = 0; i < M * K; i++) X[i] = (float)(i % 17) / 17.f;
  for (long r = 0; r < M; r++)
    for (long i = 0; i < K; i++) XT[i * M + r] = X[r * K + i];
  struct { const char *name; void (*panel)(long); long panels; int chunk, ask; } ways[] = {
    {"row1", row1, N / P, 0, 0},          {"whole", whole, N / P, 0, 0},
    {"chunk64", chunked, N / P, 64, 1},   {"chunk128", chunked, N / P, 128, 1},
    {"chunk256", chunked, N / P, 256, 1}, {"chunk128 np", chunked, N / P, 128, 0},
    {"narrow6", narrow6, N / 6, 0, 0},
  };
  enum { WAYS = sizeof ways / sizeof ways[0] };
  static double t[WAYS][100];
  for (int r = 0; r < runs; r++)
    for (int w = 0; w < WAYS; w++) {
      CHUNK = ways[w].chunk, ASK = ways[w].ask;
      t[w][r] = run(ways[w].panel, ways[w].panels);
    }
  printf("%ld x %ld, 16 rows, %d runs, 2 threads\n", K, N, runs);
  for (int w = 0; w < WAYS; w++) {
    qsort(t[w], runs, sizeof(double), cmp);
    double med = t[w][runs / 2];
    printf("%-12s best %7.2f ms  median %7.2f ms  %6.1f GFLOP/s\n", ways[w].name,
           t[w][0] * 1e3, med * 1e3, 2.0 * M * K * (ways[w].panels * (ways[w].panel == narrow6 ? 6 : P)) / med / 1e9);
  }
  return 0;
}
