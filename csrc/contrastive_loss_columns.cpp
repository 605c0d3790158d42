// CPU kernels of the column half of a symmetric mmfast.contrastive_loss on one process (the math:
// mmfast/backends/contrastive_columns.py). Both read one chunk's B × B block of scores [rows, B] (row j =
// query row_offset + r, column i = target i) while it is still raw, before the row kernel runs:
//   column_stats: merges the chunk into each column's running max and float64 sum of exp(logit - max)
//                 (and, for a learnable temperature, Σ exp(logit - max)·(s - d_i)); vectorised across
//                 16 columns, two passes over the chunk's rows per 16 columns (the second from L1).
//   column_topk:  merges the chunk into each column's running top-k selection (descending, ties to the
//                 lower query index, as later chunks hold higher rows and an equal score never displaces).
// Column i leaves out query j = i (its positive, d_i/τ, seeds the statistics), queries with
// s_ji > d_i + margin and, with ids, queries of its own class.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "contrastive_columns.h"
#include "fast_math.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "contrastive_loss";

template <typename T>
struct ColumnStatsProblem {
  const T* block;
  int64_t row_stride, rows, row_offset;
  T negative_scale;
  bool has_margin;
  T margin;
  const T* diag;
  const int32_t* ids;
  T* running_max;
  double* running_sum;
  double* weighted;  // null, or the temperature reduction
};

// Generic (scalar) version over columns [begin, end): float64, and the float32 tails.
template <typename T>
void column_stats_range(const ColumnStatsProblem<T>& p, int64_t begin, int64_t end) {
  const T minus_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = begin; i < end; ++i) {
    const T limit = p.has_margin ? p.diag[i] + p.margin : std::numeric_limits<T>::infinity();
    const int32_t own_id = p.ids ? p.ids[i] : 0;
    auto logit = [&](int64_t r) {
      const int64_t j = p.row_offset + r;
      const T v = p.block[r * p.row_stride + i];
      return (j == i || v > limit || (p.ids && p.ids[j] == own_id)) ? minus_inf : v * p.negative_scale;
    };
    const T old_max = p.running_max[i];
    T m = old_max;
    for (int64_t r = 0; r < p.rows; ++r) m = std::max(m, logit(r));  // NaN does not raise the max
    const double rescale = std::exp(static_cast<double>(old_max) - static_cast<double>(m));
    double sum = 0.0, weighted = 0.0;
    for (int64_t r = 0; r < p.rows; ++r) {
      const T e = kernel_exp(logit(r) - m);
      sum += e;
      if (p.weighted) weighted += static_cast<double>(e) * (p.block[r * p.row_stride + i] - p.diag[i]);
    }
    p.running_sum[i] = p.running_sum[i] * rescale + sum;
    if (p.weighted) p.weighted[i] = p.weighted[i] * rescale + weighted;
    p.running_max[i] = m;
  }
}

// Sixteen float32 columns [i, i + 16) at a time; kWeighted: the temperature variant.
template <bool kWeighted>
__attribute__((always_inline)) inline void column_stats_f32_body(const ColumnStatsProblem<float>& p, int64_t begin,
                                                                 int64_t end) {
  const f32x16 minus_inf16 = splat16(-std::numeric_limits<float>::infinity());
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const f32x16 diag16 = load16(p.diag + i);
    const f32x16 limit16 = p.has_margin ? diag16 + p.margin : splat16(std::numeric_limits<float>::infinity());
    const i32x16 column16 = lane + static_cast<int32_t>(i);
    const i32x16 own_id16 = p.ids ? load16i(p.ids + i) : i32x16{};
    auto logit = [&](int64_t r, f32x16 v) {
      const int32_t j = static_cast<int32_t>(p.row_offset + r);
      i32x16 drop = (v > limit16) | equal16i(column16, splat16i(j));
      if (p.ids) drop |= equal16i(own_id16, splat16i(p.ids[j]));
      return select16(drop, minus_inf16, v * p.negative_scale);
    };
    const f32x16 old_max = load16(p.running_max + i);
    f32x16 m16 = old_max;
    for (int64_t r = 0; r < p.rows; ++r) m16 = max16(logit(r, load16(p.block + r * p.row_stride + i)), m16);
    f64x8 sum_lo{}, sum_hi{}, weighted_lo{}, weighted_hi{};
    for (int64_t r = 0; r < p.rows; ++r) {
      const f32x16 v = load16(p.block + r * p.row_stride + i);
      const f32x16 e = exp_flush(logit(r, v) - m16);
      sum_lo += __builtin_convertvector(__builtin_shufflevector(e, e, 0, 1, 2, 3, 4, 5, 6, 7), f64x8);
      sum_hi += __builtin_convertvector(__builtin_shufflevector(e, e, 8, 9, 10, 11, 12, 13, 14, 15), f64x8);
      if (kWeighted) {
        const f32x16 w = e * (v - diag16);
        weighted_lo += __builtin_convertvector(__builtin_shufflevector(w, w, 0, 1, 2, 3, 4, 5, 6, 7), f64x8);
        weighted_hi += __builtin_convertvector(__builtin_shufflevector(w, w, 8, 9, 10, 11, 12, 13, 14, 15), f64x8);
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      const double rescale = std::exp(static_cast<double>(old_max[l]) - static_cast<double>(m16[l]));
      p.running_sum[i + l] = p.running_sum[i + l] * rescale + (l < 8 ? sum_lo[l] : sum_hi[l - 8]);
      if (kWeighted) p.weighted[i + l] = p.weighted[i + l] * rescale + (l < 8 ? weighted_lo[l] : weighted_hi[l - 8]);
    }
    store16(p.running_max + i, m16);
  }
  column_stats_range<float>(p, i, end);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void column_stats_range_f32(
    const ColumnStatsProblem<float>& p, int64_t begin, int64_t end) {
  column_stats_f32_body<false>(p, begin, end);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) void column_stats_range_f32_weighted(
    const ColumnStatsProblem<float>& p, int64_t begin, int64_t end) {
  column_stats_f32_body<true>(p, begin, end);
}

void column_stats_dispatch(const ColumnStatsProblem<float>& p, int64_t begin, int64_t end) {
  if (p.weighted) {
    column_stats_range_f32_weighted(p, begin, end);
  } else {
    column_stats_range_f32(p, begin, end);
  }
}
void column_stats_dispatch(const ColumnStatsProblem<double>& p, int64_t begin, int64_t end) {
  column_stats_range<double>(p, begin, end);
}

// Columns per parallel task: a multiple of 16, with enough work to amortise the hand-off.
int64_t column_grain(int64_t rows) {
  return std::max<int64_t>(kLanes, (32768 / std::max<int64_t>(rows, 1)) / kLanes * kLanes);
}

void check_block(const at::Tensor& block, int64_t row_offset, const at::Tensor& diag,
                 const c10::optional<at::Tensor>& ids) {
  TORCH_CHECK(block.device().is_cpu() && block.dim() == 2 && block.stride(1) == 1, "mmfast cpu ", kOp,
              ": block must be a 2-D CPU tensor [rows, B] with contiguous rows, got ", block.sizes());
  check_float_or_double(kOp, block, "block");
  const int64_t b = block.size(1);
  TORCH_CHECK(b < (int64_t{1} << 31), "mmfast cpu ", kOp, ": at most 2^31-1 columns");
  TORCH_CHECK(row_offset >= 0 && row_offset + block.size(0) <= b, "mmfast cpu ", kOp, ": row_offset ", row_offset,
              " + rows ", block.size(0), " exceeds the block's ", b, " columns");
  check_vector(kOp, diag, "diag", b, block.scalar_type());
  if (ids.has_value()) check_vector(kOp, *ids, "ids", b, at::kInt);
}

template <typename T>
void column_topk_range(const at::Tensor& block, int64_t row_offset, const c10::optional<double>& margin,
                       const T* diag, const int32_t* ids, T* values, int64_t* index, int64_t k, int64_t begin,
                       int64_t end) {
  const T* s = block.data_ptr<T>();
  const int64_t stride = block.stride(0);
  const T margin_value = static_cast<T>(margin.value_or(0.0));
  for (int64_t r = 0; r < block.size(0); ++r) {
    const int64_t j = row_offset + r;
    const int32_t row_id = ids ? ids[j] : 0;
    for (int64_t i = begin; i < end; ++i) {
      const T v = s[r * stride + i];
      T* vals = values + i * k;
      int64_t* idx = index + i * k;
      if (idx[k - 1] >= 0 && !(v > vals[k - 1])) continue;  // full, and no better than the weakest
      if (j == i || (margin.has_value() && !(v <= diag[i] + margin_value)) || !(v == v)) continue;
      if (ids && ids[i] == row_id) continue;
      int64_t slot = k - 1;  // insert behind every kept score >= v: equal scores keep the lower index
      while (slot > 0 && (idx[slot - 1] < 0 || v > vals[slot - 1])) {
        vals[slot] = vals[slot - 1];
        idx[slot] = idx[slot - 1];
        --slot;
      }
      vals[slot] = v;
      idx[slot] = j;
    }
  }
}

}  // namespace

void contrastive_column_stats(at::Tensor block, int64_t row_offset, double inv_temperature, double hardness,
                              c10::optional<double> margin, at::Tensor diag, c10::optional<at::Tensor> ids,
                              at::Tensor running_max, at::Tensor running_sum, c10::optional<at::Tensor> weighted) {
  check_block(block, row_offset, diag, ids);
  const int64_t b = block.size(1);
  check_vector(kOp, running_max, "running_max", b, block.scalar_type());
  check_vector(kOp, running_sum, "running_sum", b, at::kDouble);
  if (weighted.has_value()) check_vector(kOp, *weighted, "weighted", b, at::kDouble);
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "mmfast_column_stats", [&] {
    ColumnStatsProblem<scalar_t> p{block.data_ptr<scalar_t>(),
                                   block.stride(0),
                                   block.size(0),
                                   row_offset,
                                   static_cast<scalar_t>(inv_temperature + hardness),
                                   margin.has_value(),
                                   static_cast<scalar_t>(margin.value_or(0.0)),
                                   diag.data_ptr<scalar_t>(),
                                   ids.has_value() ? ids->data_ptr<int32_t>() : nullptr,
                                   running_max.data_ptr<scalar_t>(),
                                   running_sum.data_ptr<double>(),
                                   weighted.has_value() ? weighted->data_ptr<double>() : nullptr};
    at::parallel_for(0, b, column_grain(p.rows),
                     [&](int64_t begin, int64_t end) { column_stats_dispatch(p, begin, end); });
  });
}

void contrastive_column_topk(at::Tensor block, int64_t row_offset, c10::optional<double> margin, at::Tensor diag,
                             c10::optional<at::Tensor> ids, at::Tensor values, at::Tensor index) {
  check_block(block, row_offset, diag, ids);
  const int64_t b = block.size(1);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == b && values.size(1) >= 1, "mmfast cpu ", kOp,
              ": values must be [B, k] with k >= 1, got ", values.sizes());
  const int64_t k = values.size(1);
  check_output(kOp, values, "values", {b, k}, block.scalar_type());
  check_output(kOp, index, "index", {b, k}, at::kLong);
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "mmfast_column_topk", [&] {
    const int32_t* id_ptr = ids.has_value() ? ids->data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, b, column_grain(block.size(0)), [&](int64_t begin, int64_t end) {
      column_topk_range<scalar_t>(block, row_offset, margin, diag.data_ptr<scalar_t>(), id_ptr,
                                  values.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), k, begin, end);
    });
  });
}

}  // namespace mmfast
