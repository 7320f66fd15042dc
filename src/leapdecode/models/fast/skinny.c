/* leapdecode's skinny matrix product for CPU decode and verify steps (see skinny.py).
 *
 * y[r, j] = sum_k x[r, k] * w[j, k] for x [R, K], w [N, K] (the weight as stored), y [R, N], float32, R small.
 * The weight is streamed once: each block of 8 weight rows is read from memory for the first row of x and from the
 * cache for the others. Every y[r, j] is summed in one fixed order (8 lanes over k, a fixed horizontal sum, then the
 * tail k >= K & ~7), whatever R, the block or the thread: a row's result does not depend on the rows beside it. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

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

/* one row of x against 8 weight rows starting at w */
static inline void block8(const float* x, const float* w, float* y, int64_t K) {
  const int64_t K8 = K & ~(int64_t)7;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 0 * K + k), a0);
    a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 1 * K + k), a1);
    a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 2 * K + k), a2);
    a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 3 * K + k), a3);
    a4 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 4 * K + k), a4);
    a5 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 5 * K + k), a5);
    a6 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 6 * K + k), a6);
    a7 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 7 * K + k), a7);
  }
  y[0] = tail(x, w + 0 * K, K8, K, hsum(a0));
  y[1] = tail(x, w + 1 * K, K8, K, hsum(a1));
  y[2] = tail(x, w + 2 * K, K8, K, hsum(a2));
  y[3] = tail(x, w + 3 * K, K8, K, hsum(a3));
  y[4] = tail(x, w + 4 * K, K8, K, hsum(a4));
  y[5] = tail(x, w + 5 * K, K8, K, hsum(a5));
  y[6] = tail(x, w + 6 * K, K8, K, hsum(a6));
  y[7] = tail(x, w + 7 * K, K8, K, hsum(a7));
}

/* one row of x against one weight row: the same order of sums as one lane set of block8 */
static inline float dot1(const float* x, const float* w, int64_t K) {
  const int64_t K8 = K & ~(int64_t)7;
  __m256 a = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a);
  return tail(x, w, K8, K, hsum(a));
}

void leap_skinny(const float* x, const float* w, float* y, int64_t R, int64_t K, int64_t N, int threads) {
  const int64_t blocks = (N + 7) / 8;
  (void)threads; /* unused in a build without OpenMP */
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * 8;
    if (j0 + 8 <= N) {
      for (int64_t r = 0; r < R; ++r) block8(x + r * K, w + j0 * K, y + r * N + j0, K);
    } else {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = j0; j < N; ++j) y[r * N + j] = dot1(x + r * K, w + j * K, K);
    }
  }
}
