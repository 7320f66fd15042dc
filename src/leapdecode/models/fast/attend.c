/* leapdecode's attention for CPU decode and verify steps (see attend.py): every sequence of a batched step, one
 * layer, one call.
 *
 * Per segment (one sequence's rows [first, first + rows) of the step): store each row's key and value at slot
 * start + r of that sequence's cache, then for every row r and query head h attend over the slots s < start + rows
 * that mask[r, s] marks visible. Cache layout per layer: [capacity, 2, kv_heads, d] (k then v), layers one after
 * the other. qkv rows: [heads + 2 * kv_heads, d] (q heads, k heads, v heads), already rotated.
 *
 * Work items are (sequence, key/value head): its keys and values are read once for all the query heads of all the
 * sequence's rows, 8 slots at a time, prefetched ahead. Every output is computed in one fixed order from its own
 * row, its own sequence's cache and its own mask row: each score by the same sum over d whatever block of slots
 * holds it, the maximum over the visible ones, exp(score - max) by the same polynomial for every slot, then the
 * weights and the weighted values summed in slot order over the visible slots, divided at the end. No result
 * depends on the other rows or sequences of the step, on the scan length, or on where the visible slots are: a tree
 * node that sees the prefix and its ancestors gets the same bits as the same token decoded alone after that path
 * was committed. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#ifndef PREFETCH
#define PREFETCH 16 /* slots ahead: the keys and values of a slot are 2 x 256 bytes of a 1.5 KB slot (SmolLM2) */
#endif

/* exp(x) for 8 lanes, x <= 0 (scores minus their maximum): exp(x) = 2^n * exp(r), r = x - n ln 2, |r| <= ln 2 / 2,
 * exp(r) by a degree-6 polynomial (relative error about 2e-7). The same instructions for every lane, so a slot's
 * weight does not depend on which lane or call computes it. Inputs below -87 give 2^-126 * exp(r) > 0. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* lane t = the sum of the 8 lanes of a[t], for t = 0..7, by the same tree for every t:
 * ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) */
static inline __m256 hsum8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h03 = _mm256_hadd_ps(h01, h23), h47 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h03, h47, 0x20), _mm256_permute2f128_ps(h03, h47, 0x31));
}

/* scores of one query against 8 keys (key t at k[t], d a multiple of 8): lane t = q . key t, summed over d in
 * order, 8 lanes at a time, then by hsum8 */
static inline __m256 dot8(const float* q, const float* const* k, int64_t d) {
  __m256 a[8];
  for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int t = 0; t < 8; ++t) a[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[t] + i), a[t]);
  }
  return hsum8(a);
}

/* one sequence's rows and one key/value head: the `group` query heads of each row (nq = rows * group queries)
 * against slots [0, end). scores: [nq, padded] scratch, padded = end rounded up to 8; pad: [8, d] scratch for the
 * keys of a last, partial block of 8 slots. Query j is (row j / group, head kvh * group + j % group).
 * A score is computed by dot8 whichever block holds its slot (a partial block's missing keys are zeros), so it does
 * not depend on `end`. whole: prefetch every head's keys and values of the slots ahead (the first of a sequence's
 * heads, when one thread does them all), else only this head's keys. */
static void attend_head(const float* qkv, int64_t row_floats, int64_t rows, int64_t group, const float* cache,
                        const uint8_t* mask, int64_t mask_stride, int64_t end, int64_t kv_heads, int64_t kvh,
                        int64_t d, float scale, float* scores, int64_t padded, float* pad, float* out,
                        int64_t out_floats, int whole) {
  const int64_t slot_stride = 2 * kv_heads * d, nq = rows * group;
  const float* keys = cache + kvh * d;
  const float* values = cache + (kv_heads + kvh) * d;
  const __m256 scale8 = _mm256_set1_ps(scale), hidden = _mm256_set1_ps(-INFINITY);
  __m256 best[nq];
  for (int64_t j = 0; j < nq; ++j) best[j] = hidden;
  for (int64_t s = 0; s < end; s += 8) { /* scores, 8 slots at a time */
    const float* k[8];
    for (int t = 0; t < 8; ++t) {
      if (s + t < end) {
        k[t] = keys + (s + t) * slot_stride;
        if (s + t + PREFETCH < end) { /* this head's key, or the whole slot (every head's key and value) */
          const float* next = whole ? cache + (s + t + PREFETCH) * slot_stride : k[t] + PREFETCH * slot_stride;
          const char* ahead = (const char*)next;
          for (int64_t i = 0; i < (whole ? slot_stride : d); i += 16) _mm_prefetch(ahead + 4 * i, _MM_HINT_T1);
        }
      } else {
        k[t] = pad + t * d;
        for (int64_t i = 0; i < d; ++i) pad[t * d + i] = 0.0f;
      }
    }
    for (int64_t r = 0, j = 0; r < rows; ++r) {
      const uint8_t* m = mask + r * mask_stride + s;
      float seen[8];
      for (int t = 0; t < 8; ++t) seen[t] = (s + t < end && m[t]) ? 0.0f : -INFINITY;
      const __m256 bias = _mm256_loadu_ps(seen);
      for (int64_t g = 0; g < group; ++g, ++j) {
        const __m256 score = _mm256_add_ps(_mm256_mul_ps(dot8(qkv + r * row_floats + (kvh * group + g) * d, k, d),
                                                         scale8), bias);
        _mm256_storeu_ps(scores + j * padded + s, score);
        best[j] = _mm256_max_ps(best[j], score);
      }
    }
  }
  for (int64_t j = 0; j < nq; ++j) { /* weights exp(score - max) (hidden slots: about 0, never used); the sum of
                                        the visible ones in slot order; the weighted values, 64 entries of d at a
                                        time, in slot order */
    const int64_t r = j / group, h = kvh * group + j % group;
    const uint8_t* m = mask + r * mask_stride;
    float* w = scores + j * padded;
    float most[8];
    _mm256_storeu_ps(most, best[j]);
    float top = most[0];
    for (int t = 1; t < 8; ++t) top = most[t] > top ? most[t] : top;
    const __m256 top8 = _mm256_set1_ps(top);
    for (int64_t s = 0; s < padded; s += 8) _mm256_storeu_ps(w + s, exp8(_mm256_sub_ps(_mm256_loadu_ps(w + s), top8)));
    float total = 0.0f;
    for (int64_t s = 0; s < end; ++s)
      if (m[s]) total += w[s];
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    float* o = out + r * out_floats + h * d;
    for (int64_t c = 0; c < d; c += 64) {
      const int64_t lanes = (d - c < 64 ? d - c : 64) / 8;
      __m256 acc[8];
      for (int64_t u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
      for (int64_t s = 0; s < end; ++s) {
        if (!m[s]) continue;
        const __m256 e = _mm256_set1_ps(w[s]);
        const float* v = values + s * slot_stride + c;
        for (int64_t u = 0; u < lanes; ++u) acc[u] = _mm256_fmadd_ps(e, _mm256_loadu_ps(v + 8 * u), acc[u]);
      }
      for (int64_t u = 0; u < lanes; ++u) _mm256_storeu_ps(o + c + 8 * u, _mm256_mul_ps(acc[u], inv));
    }
  }
}

/* seg: [segments, 5] = first row, rows, start slot, mask row stride (slots), cache capacity (slots);
 * caches: [segments] addresses of layer 0 of each sequence's cache; masks: [segments] addresses of uint8 [rows,
 * stride]. out: [R, heads * d]. */
void leap_attend(const float* qkv, float* out, int64_t heads, int64_t kv_heads, int64_t d, float scale,
                 int64_t segments, const int64_t* seg, const int64_t* caches, const int64_t* masks, int64_t layer,
                 int threads) {
  const int64_t row_floats = (heads + 2 * kv_heads) * d, slot_floats = 2 * kv_heads * d, group = heads / kv_heads;
  int64_t longest = 0, most = 0; /* longest end slot, most queries per (sequence, key/value head) */
  for (int64_t g = 0; g < segments; ++g) {
    const int64_t* p = seg + 5 * g;
    float* cache = (float*)(intptr_t)caches[g] + layer * p[4] * slot_floats;
    for (int64_t r = 0; r < p[1]; ++r) /* this row's keys and values: one copy, k heads then v heads */
      memcpy(cache + (p[2] + r) * slot_floats, qkv + (p[0] + r) * row_floats + heads * d,
             sizeof(float) * slot_floats);
    if (p[1] * group > most) most = p[1] * group;
    if (p[2] + p[1] > longest) longest = p[2] + p[1];
  }
  (void)threads; /* unused in a build without OpenMP */
  #pragma omp parallel num_threads(threads)
  {
    float* scores = (float*)malloc(sizeof(float) * (size_t)(most * ((longest + 7) & ~(int64_t)7) + 8 * d));
    float* pad = scores + most * ((longest + 7) & ~(int64_t)7);
    /* one item per sequence (all its heads: its slots are read in order) when there are enough sequences to go
     * round the threads, else one per (sequence, key/value head) */
    const int64_t per = segments >= 2 * threads ? kv_heads : 1;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < segments * kv_heads / per; ++item) {
      for (int64_t kvh = item * per % kv_heads, last = kvh + per; kvh < last; ++kvh) {
        const int64_t g = item * per / kv_heads, *p = seg + 5 * g, end = p[2] + p[1];
        const float* cache = (const float*)(intptr_t)caches[g] + layer * p[4] * slot_floats;
        attend_head(qkv + p[0] * row_floats, row_floats, p[1], group, cache, (const uint8_t*)(intptr_t)masks[g],
                    p[3], end, kv_heads, kvh, d, scale, scores, (end + 7) & ~(int64_t)7, pad,
                    out + p[0] * heads * d, heads * d, per > 1 && kvh == 0);
      }
    }
    free(scores);
  }
}
