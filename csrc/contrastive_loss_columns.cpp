// CPU kernels of the column half of a symmetric mmfast.contrastive_loss on one process (the math:
// mmfast/backends/contrastive_columns.py). Both read one chunk's B × B block of scores [rows, B] (row j =
// query row_offset + r, column i = target i) while it is still raw, before the row kernel runs:
//   column_stats: merges the chunk into each column's running max and float64 sum of exp(logit - max)
//                 (and, for a learnable temperature, Σ exp(logit - max)·(s - d_i)); vectorised across
//                 16 columns, row-major, a tile of rows at a time (its max, then its sum of exp).
//   column_topk:  merges the chunk into each column's running top-k selection (descending, ties to the
//                 lower query index, as later chunks hold higher rows and an equal score never displaces).
// Column i leaves out query j = i (its positive, d_i/τ, seeds the statistics), queries with
// s_ji > d_i + margin and, with ids, queries of its own class.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

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

// Generic (scalar) version over columns [begin, end): float64, and the float32 tails. Row-major (the
// block's rows are contiguous; a walk down one column would touch one page per row), with the online
// update per score: a new max rescales the column's sum (and weighted sum) by exp(old - new).
template <typename T>
void column_stats_range(const ColumnStatsProblem<T>& p, int64_t begin, int64_t end) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* s = p.block + r * p.row_stride;
    const int64_t j = p.row_offset + r;
    const int32_t row_id = p.ids ? p.ids[j] : 0;
    for (int64_t i = begin; i < end; ++i) {
      const T v = s[i];
      if (j == i || (p.has_margin && v > p.diag[i] + p.margin) || (p.ids && p.ids[i] == row_id)) continue;
      const T logit = v * p.negative_scale;
      if (logit > p.running_max[i]) {  // NaN does not raise the max (and poisons the sum below)
        const double rescale = std::exp(static_cast<double>(p.running_max[i]) - static_cast<double>(logit));
        p.running_sum[i] *= rescale;
        if (p.weighted) p.weighted[i] *= rescale;
        p.running_max[i] = logit;
      }
      const T e = kernel_exp(logit - p.running_max[i]);
      p.running_sum[i] += e;
      if (p.weighted) p.weighted[i] += static_cast<double>(e) * (v - p.diag[i]);
    }
  }
}

// Sixteen float32 columns at a time, row-major, a tile of kRowTile rows at a time: first the tile
// raises each column's max, then the float64 sums of the columns whose max rose are rescaled, then a
// second pass over the tile (now in L2) sums exp(logit - max) in float over the tile's rows and adds
// that to the float64 sums. One exp per score; kWeighted: the temperature variant.
constexpr int64_t kRowTile = 64;

template <bool kWeighted>
__attribute__((always_inline)) inline void column_stats_f32_body(const ColumnStatsProblem<float>& p, int64_t begin,
                                                                 int64_t end) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const float inf = std::numeric_limits<float>::infinity();
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t vec_end = begin + (end - begin) / kLanes * kLanes;
  const int64_t width = end - begin;
  std::vector<float> old_max(width), tile_sum(width), tile_weighted(kWeighted ? width : 0), limit(width);
  for (int64_t i = begin; i < end; ++i) limit[i - begin] = p.has_margin ? p.diag[i] + p.margin : inf;
  // The column's own query j = i is masked only in the one block of 16 that holds it (a branch that
  // is false for all but one block per row).
  auto logit16 = [&](const float* s, int32_t j, int64_t i) {
    const f32x16 v = load16(s + i);
    i32x16 drop = v > load16(limit.data() + (i - begin));
    if (p.ids) drop |= equal16i(load16i(p.ids + i), splat16i(p.ids[j]));
    if (j >= i && j < i + kLanes) drop |= equal16i(lane, splat16i(static_cast<int32_t>(j - i)));
    return select16(drop, splat16(minus_inf), v * p.negative_scale);
  };
  auto logit = [&](const float* s, int64_t j, int64_t i) {
    const float v = s[i];
    const bool drop = j == i || (p.has_margin && v > p.diag[i] + p.margin) || (p.ids && p.ids[i] == p.ids[j]);
    return drop ? minus_inf : v * p.negative_scale;
  };
  for (int64_t r0 = 0; r0 < p.rows; r0 += kRowTile) {
    const int64_t r1 = std::min(p.rows, r0 + kRowTile);
    std::copy(p.running_max + begin, p.running_max + end, old_max.begin());
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = p.block + r * p.row_stride;
      const int32_t j = static_cast<int32_t>(p.row_offset + r);
      for (int64_t i = begin; i < vec_end; i += kLanes) {
        store16(p.running_max + i, max16(logit16(s, j, i), load16(p.running_max + i)));
      }
      for (int64_t i = vec_end; i < end; ++i) p.running_max[i] = std::max(p.running_max[i], logit(s, j, i));
    }
    for (int64_t i = begin; i < end; ++i) {
      if (p.running_max[i] != old_max[i - begin]) {
        const double rescale = std::exp(static_cast<double>(old_max[i - begin]) - p.running_max[i]);
        p.running_sum[i] *= rescale;
        if (kWeighted) p.weighted[i] *= rescale;
      }
    }
    std::fill(tile_sum.begin(), tile_sum.end(), 0.0f);
    std::fill(tile_weighted.begin(), tile_weighted.end(), 0.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = p.block + r * p.row_stride;
      const int32_t j = static_cast<int32_t>(p.row_offset + r);
      for (int64_t i = begin; i < vec_end; i += kLanes) {
        const f32x16 e = exp_flush(logit16(s, j, i) - load16(p.running_max + i));
        store16(tile_sum.data() + (i - begin), load16(tile_sum.data() + (i - begin)) + e);
        if (kWeighted) {
          float* w = tile_weighted.data() + (i - begin);
          store16(w, load16(w) + e * (load16(s + i) - load16(p.diag + i)));
        }
      }
      for (int64_t i = vec_end; i < end; ++i) {
        const float e = exp_flush(logit(s, j, i) - p.running_max[i]);
        tile_sum[i - begin] += e;
        if (kWeighted) tile_weighted[i - begin] += e * (s[i] - p.diag[i]);
      }
    }
    for (int64_t i = begin; i < end; ++i) {
      p.running_sum[i] += tile_sum[i - begin];
      if (kWeighted) p.weighted[i] += tile_weighted[i - begin];
    }
  }
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
