/* leapdecode's skinny matrix product for CPU decode and verify steps (see skinny.py).
 *
 * y[r, j] = sum_k x[r, k] * w[j, k] for x [R, K], w [N, K] (the weight as stored), y [R, N], float32, R small.
 * The weight is streamed once, in blocks of 3 rows: a block is read from memory by the first tile of x rows and
 * from the cache by the others, and every tile prefetches its share of the block PREFETCH blocks on, so memory and
 * arithmetic overlap. A tile is up to 4 rows of x against the block's 3 weight rows, 12 accumulators in registers:
 * each weight load serves 4 rows; the rows are spread evenly over the tiles.
 * Every y[r, j] is summed in one fixed order (8 lanes over k, a fixed horizontal sum, then the tail
 * k >= K & ~7), whatever R, the tile, the block or the thread: a row's result does not depend on the rows beside it. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define COLS 3      /* weight rows per block */
#define PREFETCH 2  /* blocks ahead */

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float tail(const float* x, const float* w, int64_t k0, int64_t K, float s) {
  for (int64_t k = k0; k < K; ++k) s = fmaf(x[k], w[k], s);
  return s;
}

/* RB rows of x against CB weight rows (both with stride K) into y (stride N). Iteration i also prefetches
 * pf + i * stride (and 16 floats on where the stride is longer than a cache line) into L2, not L1: the rows of x
 * (9 rows are 20 KB) and the block being multiplied must stay in L1, and blocks prefetched into L1 evicted them, so
 * every row beyond the first paid its arithmetic on top of the weight stream (a verify step of 4 draft nodes cost
 * 1.30x-1.31x a plain step with L1 prefetches, 1.09x-1.16x with L2 ones; BENCHMARKS.md 0h). */
static inline __attribute__((always_inline)) void tile(const float* x, const float* w, float* y, int64_t K,
                                                       int64_t N, int RB, int CB, const float* pf, int64_t stride) {
  const int64_t K8 = K & ~(int64_t)7;
  __m256 a[4][COLS];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CB; ++j) a[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0, i = 0; k < K8; k += 8, ++i) {
    _mm_prefetch((const char*)(pf + i * stride), _MM_HINT_T1);
    if (stride > 16) _mm_prefetch((const char*)(pf + i * stride + 16), _MM_HINT_T1);
    __m256 xv[4];
    for (int r = 0; r < RB; ++r) xv[r] = _mm256_loadu_ps(x + r * K + k);
    for (int j = 0; j < CB; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * K + k);
      for (int r = 0; r < RB; ++r) a[r][j] = _mm256_fmadd_ps(xv[r], wv, a[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CB; ++j) y[r * N + j] = tail(x + r * K, w + j * K, K8, K, hsum(a[r][j]));
}

/* every row of x against the CB weight rows at w, while the tiles share out the prefetch of the CB * K floats at
 * `next`: the memory streams a later block all the time this one is computed, not only during its first tile */
static inline __attribute__((always_inline)) void block(const float* x, const float* w, float* y, int64_t R,
                                                        int64_t K, int64_t N, int CB, const float* next) {
  const int64_t tiles = (R + 3) / 4, iters = K / 8 > 0 ? K / 8 : 1;
  const int64_t share = (CB * K + tiles - 1) / tiles;  /* floats each tile prefetches */
  const int64_t stride = (share + iters - 1) / iters;  /* floats per iteration */
  /* the rows are spread evenly over the tiles (5 = 3 + 2, 9 = 3 + 3 + 3, 17 = 4 + 4 + 3 + 3 + 3): a tile of one
   * row has only CB independent sums, too few to hide the multiply-add latency, and made a fifth row cost as much
   * as three more (BENCHMARKS.md 0g) */
  const int64_t big = R % tiles, height = R / tiles;  /* the first `big` tiles hold height + 1 rows */
  for (int64_t t = 0, r = 0; t < tiles; ++t, next += share) {
    const int64_t h = height + (t < big);
    switch (h) {
      case 4: tile(x + r * K, w, y + r * N, K, N, 4, CB, next, stride); break;
      case 3: tile(x + r * K, w, y + r * N, K, N, 3, CB, next, stride); break;
      case 2: tile(x + r * K, w, y + r * N, K, N, 2, CB, next, stride); break;
      case 1: tile(x + r * K, w, y + r * N, K, N, 1, CB, next, stride); break;
    }
    r += h;
  }
}

void leap_skinny(const float* x, const float* w, float* y, int64_t R, int64_t K, int64_t N, int threads) {
  const int64_t blocks = N / COLS, rest = N % COLS;
  if (R < 1) return;
  (void)threads; /* unused in a build without OpenMP */
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const float* here = w + b * COLS * K;  /* the last blocks prefetch themselves, not what lies past the weight */
    block(x, here, y + b * COLS, R, K, N, COLS, b + PREFETCH < blocks ? here + PREFETCH * COLS * K : here);
  }
  const float* last = w + blocks * COLS * K;
  if (rest == 2) block(x, last, y + blocks * COLS, R, K, N, 2, last);
  if (rest == 1) block(x, last, y + blocks * COLS, R, K, N, 1, last);
}
