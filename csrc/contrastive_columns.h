// The column half of a symmetric contrastive loss on one process, as the row kernels see it
// (mmfast/backends/contrastive_columns.py has the math). The B × B block of a chunk's scores, read down
// a column, is target i against the queries: while the row kernel writes row j's G it also adds the
// column gradient on the block columns,
//   G[j, i] += coef_i·exp(logit_ji - lse_i),  logit_ji = s_ji·(1/τ + α), or -inf when s_ji > d_i + β
//   or ids[j] == ids[i] (j ≠ i); G[i, i] += positive_i = coef_i·(p_ii - 1), computed once per column
//   by the caller from the very logit d_i/τ that seeded the statistics (so that a column without
//   negatives gets exactly 0, whatever the compiler contracts into an FMA here).
// The statistics (lse) come from contrastive_column_stats (csrc/contrastive_loss_columns.cpp) over the
// same block. Inline helpers here: they are compiled into each target_clones copy of the row kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "fast_math.h"

namespace mmfast {

template <typename T>
struct ColumnTerms {
  int64_t n;             // B: the block is the first n candidate columns
  const T* diag;         // [n] d_i = q_i·t_i
  const T* lse;          // [n] the column logsumexps
  const T* coef;         // [n] c_i/τ
  const T* positive;     // [n] the positive's gradient
  const int32_t* ids;    // null, or [n] the queries' class indices
};

// The exp the kernels of T use: exp_flush for float (tails and vector bodies round alike), std::exp
// for double.
inline float kernel_exp(float x) { return exp_flush(x); }
inline double kernel_exp(double x) { return std::exp(x); }

// Row j's column gradient over the block, from its raw scores s[0, n), into out[0, n).
template <typename T>
inline void column_grads_generic(const ColumnTerms<T>& c, int64_t j, const T* s, T negative_scale, bool has_margin,
                                 T margin, T* out) {
  const T minus_inf = -std::numeric_limits<T>::infinity();
  const int32_t own_id = c.ids ? c.ids[j] : 0;
  for (int64_t i = 0; i < c.n; ++i) {
    if (i == j) {
      out[i] = c.positive[i];
      continue;
    }
    const bool drop = (has_margin && s[i] > c.diag[i] + margin) || (c.ids && c.ids[i] == own_id);
    out[i] = c.coef[i] * kernel_exp((drop ? minus_inf : s[i] * negative_scale) - c.lse[i]);
  }
}

// The float32 version, 16 columns at a time.
__attribute__((always_inline)) inline void column_grads_f32(const ColumnTerms<float>& c, int64_t j, const float* s,
                                                            float negative_scale, bool has_margin, float margin,
                                                            float* out) {
  const int32_t n = static_cast<int32_t>(c.n);
  const int32_t n_vec = n - n % kLanes;
  const f32x16 minus_inf16 = splat16(-std::numeric_limits<float>::infinity());
  const i32x16 own_id16 = splat16i(c.ids ? c.ids[j] : 0);
  for (int32_t i = 0; i < n_vec; i += kLanes) {
    const f32x16 v = load16(s + i);
    i32x16 drop = has_margin ? v > load16(c.diag + i) + margin : i32x16{};
    if (c.ids) drop |= equal16i(load16i(c.ids + i), own_id16);
    const f32x16 logit = select16(drop, minus_inf16, v * negative_scale);
    store16(out + i, load16(c.coef + i) * exp_flush(logit - load16(c.lse + i)));
  }
  for (int64_t i = n_vec; i < n; ++i) {
    const bool drop = (has_margin && s[i] > c.diag[i] + margin) || (c.ids && c.ids[i] == c.ids[j]);
    out[i] = c.coef[i] * exp_flush((drop ? -std::numeric_limits<float>::infinity() : s[i] * negative_scale) - c.lse[i]);
  }
  if (j < n) out[j] = c.positive[j];
}

}  // namespace mmfast
