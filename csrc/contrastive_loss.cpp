// CPU kernels of mmfast.contrastive_loss.
//
// The Python chunk loop (mmfast/backends/contrastive_loss.py) computes one row chunk of the score
// matrix S = X·Yᵀ at a time with MKL GEMMs. These kernels do everything between the GEMMs, in one
// pass over each row while it sits in L1/L2:
//   softmax_rows: masks (positive, false-negative margin), hardness, exact row logsumexp, the loss,
//                 and, when asked, overwrites the row with dLoss/dS so the caller can finish with two
//                 GEMMs (dX = G·Y, dY += Gᵀ·X): three GEMMs in all, no second pass over S.
//   topk_rows:    the UniME top-k path: selects the k hardest surviving negatives per row (ties go to
//                 the lower candidate index), and returns the loss plus the k+1 sparse gradient
//                 coefficients per row.
//   sparse_grads: applies those sparse coefficients to dX and dY without any dense B×N tensor
//                 (csrc/contrastive_loss_sparse.cpp).
// With duplicate ids (mmfast/duplicate_ids.py) both row kernels read one int32 class index per
// candidate and leave out every candidate whose index equals the positive's, before the margin
// filter and the top-k selection.
// With a learnable temperature both row kernels also write w_r = Σ_j G_rj·s_rj per row (one more
// reduction over the row; the caller turns it into dLoss/dτ = -(1/τ)·Σ_r w_r). It needs the raw
// scores next to the softmax weights, so that variant keeps S intact until G overwrites it.
// A symmetric loss on one process also hands softmax_rows its column half (contrastive_columns.h):
// each row's G then gets the column gradient on the block, computed from the raw row first.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "contrastive_columns.h"
#include "fast_math.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "contrastive_loss";

// Everything a row kernel needs; `scores` rows are `row_stride` apart, each `n` long.
template <typename T>
struct RowProblem {
  T* scores;
  int64_t row_stride;
  int64_t n;
  int64_t row_offset;  // global index of row 0: the positive of row r sits in column row_offset + r
  T inv_temperature;
  T negative_scale;  // 1/τ + hardness: a negative's logit is s·(1/τ) + hardness·sg(s)
  bool has_margin;
  T margin;
  const T* grad_scale;  // null: loss only; else dLoss_total/dLoss_row, and S is overwritten by G
  T* loss;
  T* temperature_grad;  // null, or per row Σ_j G_rj·s_rj (needs grad_scale)
  const int32_t* ids;   // null: no duplicate masking; else [n] class indices, equal = same content
  const ColumnTerms<T>* columns = nullptr;  // null, or the column half (needs grad_scale)
};

// Row r's column gradient (none without columns) into `out`, from its raw scores.
template <typename T>
__attribute__((always_inline)) inline void row_column_grads(const RowProblem<T>& p, int64_t r, const T* s, T* out) {
  const ColumnTerms<T>& c = *p.columns;
  if constexpr (std::is_same_v<T, float>) {
    column_grads_f32(c, p.row_offset + r, s, p.negative_scale, p.has_margin, p.margin, out);
  } else {
    column_grads_generic(c, p.row_offset + r, s, p.negative_scale, p.has_margin, p.margin, out);
  }
}

// Generic (scalar) row kernel; used for float64, where accuracy matters more than speed. The scores
// stay as they are until G overwrites them, so the temperature reduction can read them.
template <typename T>
void softmax_rows_range(const RowProblem<T>& p, int64_t begin, int64_t end) {
  const T minus_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> column_grads(p.columns ? p.columns->n : 0);
  for (int64_t r = begin; r < end; ++r) {
    T* s = p.scores + r * p.row_stride;
    if (p.columns) row_column_grads(p, r, s, column_grads.data());
    const int64_t pos_col = p.row_offset + r;
    const T pos = s[pos_col];
    const T pos_logit = pos * p.inv_temperature;
    const T limit = p.has_margin ? pos + p.margin : std::numeric_limits<T>::infinity();
    const int32_t pos_id = p.ids ? p.ids[pos_col] : 0;
    auto logit = [&](int64_t j) {
      if (j == pos_col) return pos_logit;
      return (s[j] > limit || (p.ids && p.ids[j] == pos_id)) ? minus_inf : s[j] * p.negative_scale;
    };
    T m = pos_logit;
    for (int64_t j = 0; j < p.n; ++j) m = std::max(m, logit(j));  // NaN scores do not raise the max
    double sum = 0.0, weighted = 0.0;  // Σ e_j and Σ e_j·s_j
    for (int64_t j = 0; j < p.n; ++j) {
      const T e = std::exp(logit(j) - m);
      if (p.temperature_grad) weighted += static_cast<double>(e) * s[j];
      if (p.grad_scale) s[j] = e;
      sum += e;
    }
    p.loss[r] = static_cast<T>(static_cast<double>(m) + std::log(sum) - static_cast<double>(pos_logit));
    if (p.grad_scale) {
      // G = c·(softmax - onehot)/τ with c the row's share of the total loss.
      const T row_coef = p.grad_scale[r] * p.inv_temperature;
      const T c = static_cast<T>(static_cast<double>(row_coef) / sum);
      for (int64_t j = 0; j < p.n; ++j) s[j] *= c;
      s[pos_col] -= row_coef;
      if (p.temperature_grad) p.temperature_grad[r] = static_cast<T>(row_coef * (weighted / sum - pos));
      for (int64_t j = 0; j < static_cast<int64_t>(column_grads.size()); ++j) s[j] += column_grads[j];
    }
  }
}

// The float32 row kernel: the same three passes, 16 lanes at a time. One compiled copy per ISA is
// picked at load time, so the binary stays portable and AVX-512 machines get 16-wide exp. (A lambda
// would not inherit the target, hence named functions called from parallel_for; the body is one
// template, inlined into each.) kTemperatureGrad: the variant that also writes Σ_j G_rj·s_rj.
template <bool kTemperatureGrad>
__attribute__((always_inline)) inline void softmax_rows_f32_body(const RowProblem<float>& p, int64_t begin,
                                                                 int64_t end) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const int32_t n = static_cast<int32_t>(p.n);
  const int32_t n_vec = n - n % kLanes;
  std::vector<float> column_grads(p.columns ? p.columns->n : 0);
  for (int64_t r = begin; r < end; ++r) {
    float* s = p.scores + r * p.row_stride;
    if (p.columns) row_column_grads(p, r, s, column_grads.data());
    const int32_t pos_col = static_cast<int32_t>(p.row_offset + r);
    const float pos = s[pos_col];
    const float pos_logit = pos * p.inv_temperature;
    const float limit = p.has_margin ? pos + p.margin : std::numeric_limits<float>::infinity();
    const f32x16 limit16 = splat16(limit);
    const f32x16 minus_inf16 = splat16(minus_inf);
    const int32_t* ids = p.ids;  // duplicates of the positive: -inf like false negatives
    const int32_t pos_id = ids ? ids[pos_col] : 0;
    const i32x16 pos_id16 = splat16i(pos_id);
    auto negative_logit = [&](int32_t j) {
      return (s[j] > limit || (ids && ids[j] == pos_id)) ? minus_inf : s[j] * p.negative_scale;
    };

    // Pass 1: logits in place (-inf for false negatives), and their max. The positive's slot holds
    // NaN meanwhile: it fails every comparison, so it neither passes the margin test nor raises the
    // max, whatever the sign of the logit scale; it gets its own logit afterwards. The temperature
    // variant only takes the max here: pass 2 needs the scores themselves.
    s[pos_col] = std::numeric_limits<float>::quiet_NaN();
    f32x16 m16 = splat16(pos_logit);
    for (int32_t j = 0; j < n_vec; j += kLanes) {
      const f32x16 v = load16(s + j);
      i32x16 drop = v > limit16;
      if (ids) drop |= equal16i(load16i(ids + j), pos_id16);  // the same branch for every block of a row
      const f32x16 logit = select16(drop, minus_inf16, v * p.negative_scale);
      if (!kTemperatureGrad) store16(s + j, logit);
      m16 = max16(logit, m16);
    }
    float m = max_lane(m16);
    for (int32_t j = n_vec; j < n; ++j) {
      const float logit = negative_logit(j);
      if (!kTemperatureGrad) s[j] = logit;
      m = logit > m ? logit : m;
    }
    s[pos_col] = kTemperatureGrad ? pos : pos_logit;

    // Pass 2: the sum of exp(logit - max), kept in double so the row error does not grow with N;
    // the temperature variant also sums exp(logit - max)·s, skipping the positive's block of 16 in
    // the vector loop (the scalar loop gives the positive its own logit).
    DoubleSum16 sum16, weighted16;
    double sum = 0.0, weighted = 0.0;
    const bool write = p.grad_scale != nullptr;
    const int32_t pos_block = kTemperatureGrad ? pos_col - pos_col % kLanes : -1;
    for (int32_t j = 0; j < n_vec; j += kLanes) {
      if (kTemperatureGrad && j == pos_block) continue;
      const f32x16 v = load16(s + j);
      f32x16 logit = v;
      if (kTemperatureGrad) {
        i32x16 drop = v > limit16;
        if (ids) drop |= equal16i(load16i(ids + j), pos_id16);
        logit = select16(drop, minus_inf16, v * p.negative_scale);
      }
      const f32x16 e = exp_flush(logit - m);
      if (kTemperatureGrad) weighted16.add(e * v);
      if (write) store16(s + j, e);
      sum16.add(e);
    }
    auto scalar_term = [&](int32_t j) {
      const float logit = !kTemperatureGrad ? s[j] : j == pos_col ? pos_logit : negative_logit(j);
      const float e = exp_flush(logit - m);
      if (kTemperatureGrad) weighted += static_cast<double>(e) * s[j];
      if (write) s[j] = e;
      sum += e;
    };
    if (kTemperatureGrad && pos_block + kLanes <= n_vec) {
      for (int32_t j = pos_block; j < pos_block + kLanes; ++j) scalar_term(j);
    }
    for (int32_t j = n_vec; j < n; ++j) scalar_term(j);
    sum += sum16.total();
    weighted += weighted16.total();
    p.loss[r] = static_cast<float>(static_cast<double>(m) + std::log(sum) - static_cast<double>(pos_logit));

    // Pass 3: G = c·(softmax - onehot)/τ with c the row's share of the total loss.
    if (write) {
      const float row_coef = p.grad_scale[r] * p.inv_temperature;
      const float c = static_cast<float>(static_cast<double>(row_coef) / sum);
      for (int32_t j = 0; j < n_vec; j += kLanes) store16(s + j, load16(s + j) * c);
      for (int32_t j = n_vec; j < n; ++j) s[j] *= c;
      s[pos_col] -= row_coef;
      if (p.columns) {
        const int32_t n_block = static_cast<int32_t>(column_grads.size());
        const int32_t block_vec = n_block - n_block % kLanes;
        for (int32_t j = 0; j < block_vec; j += kLanes) store16(s + j, load16(s + j) + load16(column_grads.data() + j));
        for (int32_t j = block_vec; j < n_block; ++j) s[j] += column_grads[j];
      }
      // Σ_j G_j·s_j = row_coef·(Σ_j p_j·s_j - s_pos), the softmax weights times the raw scores.
      if (kTemperatureGrad) p.temperature_grad[r] = static_cast<float>(row_coef * (weighted / sum - pos));
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_rows_range_f32(
    const RowProblem<float>& p, int64_t begin, int64_t end) {
  softmax_rows_f32_body<false>(p, begin, end);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_rows_range_f32_temperature(
    const RowProblem<float>& p, int64_t begin, int64_t end) {
  softmax_rows_f32_body<true>(p, begin, end);
}

void softmax_rows_dispatch(const RowProblem<float>& p, int64_t begin, int64_t end) {
  if (p.temperature_grad) {
    softmax_rows_range_f32_temperature(p, begin, end);
  } else {
    softmax_rows_range_f32(p, begin, end);
  }
}
void softmax_rows_dispatch(const RowProblem<double>& p, int64_t begin, int64_t end) {
  softmax_rows_range<double>(p, begin, end);
}

void check_scores(const at::Tensor& scores, int64_t row_offset, const c10::optional<at::Tensor>& row_scale,
                  const c10::optional<at::Tensor>& ids) {
  TORCH_CHECK(scores.device().is_cpu(), "mmfast cpu ", kOp, ": scores must be a CPU tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "mmfast cpu ", kOp, ": scores must be 2-D [rows, N], got shape ", scores.sizes());
  check_float_or_double(kOp, scores, "scores");
  TORCH_CHECK(scores.stride(1) == 1, "mmfast cpu ", kOp, ": scores rows must be contiguous");
  TORCH_CHECK(scores.size(1) < (int64_t{1} << 31), "mmfast cpu ", kOp, ": at most 2^31-1 candidates");
  TORCH_CHECK(row_offset >= 0 && row_offset + scores.size(0) <= scores.size(1), "mmfast cpu ", kOp, ": row_offset ",
              row_offset, " + rows ", scores.size(0), " exceeds the number of candidates ", scores.size(1));
  if (row_scale.has_value()) check_row_scale(kOp, *row_scale, scores.size(0), scores.scalar_type());
  if (ids.has_value()) check_vector(kOp, *ids, "ids", scores.size(1), at::kInt);
}

// The optional per-row output of the temperature reduction: only with a gradient (row_scale).
void check_temperature_grad(const c10::optional<at::Tensor>& temperature_grad,
                            const c10::optional<at::Tensor>& row_scale, int64_t rows, at::ScalarType dtype) {
  if (!temperature_grad.has_value()) return;
  TORCH_CHECK(row_scale.has_value(), "mmfast cpu ", kOp, ": temperature_grad needs row_scale");
  check_output(kOp, *temperature_grad, "temperature_grad", {rows}, dtype);
}

// Rows per parallel task: enough work per task to amortise the OpenMP hand-off.
int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
}

}  // namespace

void contrastive_softmax_rows(at::Tensor scores, int64_t row_offset, double inv_temperature, double hardness,
                              c10::optional<double> margin, c10::optional<at::Tensor> row_scale, at::Tensor loss,
                              c10::optional<at::Tensor> temperature_grad, c10::optional<at::Tensor> ids,
                              c10::optional<at::Tensor> column_diag, c10::optional<at::Tensor> column_lse,
                              c10::optional<at::Tensor> column_coef, c10::optional<at::Tensor> column_positive,
                              c10::optional<at::Tensor> column_ids) {
  check_scores(scores, row_offset, row_scale, ids);
  const int64_t rows = scores.size(0);
  check_output(kOp, loss, "loss", {rows}, scores.scalar_type());
  check_temperature_grad(temperature_grad, row_scale, rows, scores.scalar_type());
  const bool has_columns = column_diag.has_value();
  TORCH_CHECK(has_columns == column_lse.has_value() && has_columns == column_coef.has_value() &&
                  has_columns == column_positive.has_value() && (has_columns || !column_ids.has_value()),
              "mmfast cpu ", kOp,
              ": column_diag, column_lse, column_coef and column_positive go together (column_ids with them)");
  if (has_columns) {
    TORCH_CHECK(row_scale.has_value(), "mmfast cpu ", kOp, ": the column terms need row_scale");
    const int64_t n_block = column_diag->numel();
    TORCH_CHECK(n_block <= scores.size(1) && row_offset + rows <= n_block, "mmfast cpu ", kOp, ": the block of ",
                n_block, " columns must hold the rows' positives (row_offset ", row_offset, " + rows ", rows, ")");
    for (const auto& [t, name] : {std::pair{*column_diag, "column_diag"}, std::pair{*column_lse, "column_lse"},
                                  std::pair{*column_coef, "column_coef"}, std::pair{*column_positive, "column_positive"}}) {
      check_vector(kOp, t, name, n_block, scores.scalar_type());
    }
    if (column_ids.has_value()) check_vector(kOp, *column_ids, "column_ids", n_block, at::kInt);
  }
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mmfast_softmax_rows", [&] {
    RowProblem<scalar_t> p{scores.data_ptr<scalar_t>(),
                           scores.stride(0),
                           scores.size(1),
                           row_offset,
                           static_cast<scalar_t>(inv_temperature),
                           static_cast<scalar_t>(inv_temperature + hardness),
                           margin.has_value(),
                           static_cast<scalar_t>(margin.value_or(0.0)),
                           row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr,
                           loss.data_ptr<scalar_t>(),
                           temperature_grad.has_value() ? temperature_grad->data_ptr<scalar_t>() : nullptr,
                           ids.has_value() ? ids->data_ptr<int32_t>() : nullptr};
    ColumnTerms<scalar_t> columns{};
    if (has_columns) {
      columns = {column_diag->numel(), column_diag->data_ptr<scalar_t>(), column_lse->data_ptr<scalar_t>(),
                 column_coef->data_ptr<scalar_t>(), column_positive->data_ptr<scalar_t>(),
                 column_ids.has_value() ? column_ids->data_ptr<int32_t>() : nullptr};
      p.columns = &columns;
    }
    at::parallel_for(0, rows, row_grain(p.n),
                     [&](int64_t begin, int64_t end) { softmax_rows_dispatch(p, begin, end); });
  });
}

namespace {

template <typename T>
struct Candidate {
  T value;
  int64_t index;
};

// True when a ranks above b: higher score, ties to the lower index.
template <typename T>
inline bool ranks_above(const Candidate<T>& a, const Candidate<T>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

template <typename T>
void topk_rows_range(const RowProblem<T>& p, int64_t k, int64_t* index_out, T* coef_out, int64_t begin,
                     int64_t end) {
  std::vector<Candidate<T>> heap;  // the k best so far; heap front is the weakest of them
  heap.reserve(k);
  std::vector<double> prob(k + 1);
  auto weaker_first = [](const Candidate<T>& a, const Candidate<T>& b) { return ranks_above(a, b); };
  for (int64_t r = begin; r < end; ++r) {
    const T* s = p.scores + r * p.row_stride;
    const int64_t pos_col = p.row_offset + r;
    const T pos = s[pos_col];
    const T limit = p.has_margin ? pos + p.margin : std::numeric_limits<T>::infinity();
    const int32_t pos_id = p.ids ? p.ids[pos_col] : 0;
    heap.clear();
    for (int64_t j = 0; j < p.n; ++j) {
      const T v = s[j];
      if (j == pos_col || !(v <= limit)) continue;  // the positive, a false negative, or NaN
      if (p.ids && p.ids[j] == pos_id) continue;     // a duplicate of the positive
      if (static_cast<int64_t>(heap.size()) < k) {
        heap.push_back({v, j});
        std::push_heap(heap.begin(), heap.end(), weaker_first);
      } else if (v > heap.front().value) {  // an equal score has a higher index: it ranks below
        std::pop_heap(heap.begin(), heap.end(), weaker_first);
        heap.back() = {v, j};
        std::push_heap(heap.begin(), heap.end(), weaker_first);
      }
    }
    std::sort(heap.begin(), heap.end(), ranks_above<T>);
    const int64_t kept = static_cast<int64_t>(heap.size());

    // Softmax over [positive, kept negatives].
    const double pos_logit = static_cast<double>(pos) * p.inv_temperature;
    double m = pos_logit;
    for (int64_t t = 0; t < kept; ++t) m = std::max(m, static_cast<double>(heap[t].value) * p.negative_scale);
    double sum = std::exp(pos_logit - m);
    prob[0] = sum;
    for (int64_t t = 0; t < kept; ++t) {
      prob[t + 1] = std::exp(static_cast<double>(heap[t].value) * p.negative_scale - m);
      sum += prob[t + 1];
    }
    p.loss[r] = static_cast<T>(m + std::log(sum) - pos_logit);

    int64_t* idx = index_out + r * (k + 1);
    idx[0] = pos_col;
    for (int64_t t = 0; t < k; ++t) idx[t + 1] = t < kept ? heap[t].index : -1;
    if (coef_out) {
      T* coef = coef_out + r * (k + 1);
      const double row_coef = static_cast<double>(p.grad_scale[r]) * p.inv_temperature;
      coef[0] = static_cast<T>(row_coef * (prob[0] / sum - 1.0));
      for (int64_t t = 0; t < k; ++t) coef[t + 1] = t < kept ? static_cast<T>(row_coef * prob[t + 1] / sum) : T(0);
      if (p.temperature_grad) {  // Σ_t coef_t·s_t over the k+1 slots
        double weighted = prob[0] * static_cast<double>(pos);
        for (int64_t t = 0; t < kept; ++t) weighted += prob[t + 1] * static_cast<double>(heap[t].value);
        p.temperature_grad[r] = static_cast<T>(row_coef * (weighted / sum - static_cast<double>(pos)));
      }
    }
  }
}

}  // namespace

void contrastive_topk_rows(at::Tensor scores, int64_t row_offset, double inv_temperature, double hardness,
                           c10::optional<double> margin, int64_t topk, c10::optional<at::Tensor> row_scale,
                           at::Tensor loss, at::Tensor index, c10::optional<at::Tensor> coef_out,
                           c10::optional<at::Tensor> temperature_grad, c10::optional<at::Tensor> ids) {
  check_scores(scores, row_offset, row_scale, ids);
  TORCH_CHECK(topk >= 1, "mmfast cpu ", kOp, ": topk must be >= 1, got ", topk);
  const int64_t rows = scores.size(0);
  check_output(kOp, loss, "loss", {rows}, scores.scalar_type());
  check_output(kOp, index, "index", {rows, topk + 1}, at::kLong);
  TORCH_CHECK(coef_out.has_value() == row_scale.has_value(),
              "mmfast cpu ", kOp, ": coef must be given exactly when row_scale is");
  if (coef_out.has_value()) check_output(kOp, *coef_out, "coef", {rows, topk + 1}, scores.scalar_type());
  check_temperature_grad(temperature_grad, row_scale, rows, scores.scalar_type());
  at::Tensor coef = coef_out.has_value() ? *coef_out : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mmfast_topk_rows", [&] {
    RowProblem<scalar_t> p{scores.data_ptr<scalar_t>(),
                           scores.stride(0),
                           scores.size(1),
                           row_offset,
                           static_cast<scalar_t>(inv_temperature),
                           static_cast<scalar_t>(inv_temperature + hardness),
                           margin.has_value(),
                           static_cast<scalar_t>(margin.value_or(0.0)),
                           row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr,
                           loss.data_ptr<scalar_t>(),
                           temperature_grad.has_value() ? temperature_grad->data_ptr<scalar_t>() : nullptr,
                           ids.has_value() ? ids->data_ptr<int32_t>() : nullptr};
    scalar_t* coef_ptr = coef.defined() ? coef.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(p.n), [&](int64_t begin, int64_t end) {
      topk_rows_range<scalar_t>(p, topk, index.data_ptr<int64_t>(), coef_ptr, begin, end);
    });
  });
}

// The Matryoshka row kernel (mmfast/backends/contrastive_matryoshka.py): `blocks` [m, rows, N] holds
// the m segment products P_k = x[:, seg_k]·y[:, seg_k]ᵀ of one chunk. Per row, while its m rows of
// blocks sit in L2: R_k = Σ_{j≤k} P_j (a running row), S_k = a_k·R_k·b_k into the block's row, the
// softmax row kernel on it (G_k times a_k: `row_scale` is already a_k·dTotal/dLoss), then G̃_k = that
// times b_k, α_k = Σ_c G̃_k·R_k (per row) and β_k += Σ_r G̃_k·R_k (per column, per thread, summed at
// the end), and last the suffix sums H_j = Σ_{k≥j} G̃_k in place: one GEMM per segment finishes.
namespace {

template <typename T>
void matryoshka_rows_range(const RowProblem<T>& base, int64_t m, int64_t rows, const T* a, const T* b, T* alpha,
                           T* beta, int64_t begin, int64_t end) {
  const int64_t n = base.n;
  std::vector<T> raw(n);
  for (int64_t r = begin; r < end; ++r) {
    std::fill(raw.begin(), raw.end(), T(0));
    for (int64_t k = 0; k < m; ++k) {
      T* s = base.scores + (k * rows + r) * n;
      const T* bk = b + k * n;
      const T ak = a[k * rows + r];
      for (int64_t j = 0; j < n; ++j) {
        raw[j] += s[j];
        s[j] = ak * raw[j] * bk[j];
      }
      RowProblem<T> p = base;
      p.scores = base.scores + k * rows * n;  // row r of block k
      p.loss = base.loss + k * rows;
      if (base.grad_scale) p.grad_scale = base.grad_scale + k * rows;
      softmax_rows_dispatch(p, r, r + 1);
      if (!base.grad_scale) continue;
      T* beta_k = beta + k * n;
      double row_sum = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        const T g = s[j] * bk[j];
        s[j] = g;
        const T term = g * raw[j];
        row_sum += term;
        beta_k[j] += term;
      }
      alpha[k * rows + r] = static_cast<T>(row_sum);
    }
    if (!base.grad_scale) continue;
    for (int64_t k = m - 2; k >= 0; --k) {
      T* h = base.scores + (k * rows + r) * n;
      const T* next = h + rows * n;
      for (int64_t j = 0; j < n; ++j) h[j] += next[j];
    }
  }
}

// float32: the same passes, 16 lanes at a time, with the softmax body inlined (one compiled copy per
// ISA, as softmax_rows_range_f32). The scalar loops above do not vectorise (the double row sum is a
// reduction the compiler may not reorder) and ran at a third of this speed.
__attribute__((always_inline)) inline void matryoshka_rows_f32_body(const RowProblem<float>& base, int64_t m,
                                                                    int64_t rows, const float* a, const float* b,
                                                                    float* alpha, float* beta, int64_t begin,
                                                                    int64_t end) {
  const int32_t n = static_cast<int32_t>(base.n);
  const int32_t n_vec = n - n % kLanes;
  std::vector<float> raw_row(n);
  float* raw = raw_row.data();
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t k = 0; k < m; ++k) {
      float* s = base.scores + (k * rows + r) * n;
      const float* bk = b + k * n;
      const float ak = a[k * rows + r];
      const f32x16 ak16 = splat16(ak);
      for (int32_t j = 0; j < n_vec; j += kLanes) {  // R_k = R_{k-1} + P_k, S_k = a_k·R_k·b_k
        const f32x16 running = k == 0 ? load16(s + j) : load16(raw + j) + load16(s + j);
        store16(raw + j, running);
        store16(s + j, ak16 * running * load16(bk + j));
      }
      for (int32_t j = n_vec; j < n; ++j) {
        raw[j] = k == 0 ? s[j] : raw[j] + s[j];
        s[j] = ak * raw[j] * bk[j];
      }
      RowProblem<float> p = base;
      p.scores = base.scores + k * rows * n;  // row r of block k
      p.loss = base.loss + k * rows;
      if (base.grad_scale) p.grad_scale = base.grad_scale + k * rows;
      softmax_rows_f32_body<false>(p, r, r + 1);
      if (!base.grad_scale) continue;
      float* beta_k = beta + k * n;
      DoubleSum16 sum16;
      double row_sum = 0.0;
      for (int32_t j = 0; j < n_vec; j += kLanes) {  // G̃_k = G_k·b_k; α_k, β_k from G̃_k ⊙ R_k
        const f32x16 g = load16(s + j) * load16(bk + j);
        store16(s + j, g);
        const f32x16 term = g * load16(raw + j);
        sum16.add(term);
        store16(beta_k + j, load16(beta_k + j) + term);
      }
      for (int32_t j = n_vec; j < n; ++j) {
        const float g = s[j] * bk[j];
        s[j] = g;
        const float term = g * raw[j];
        row_sum += term;
        beta_k[j] += term;
      }
      alpha[k * rows + r] = static_cast<float>(row_sum + sum16.total());
    }
    if (!base.grad_scale) continue;
    for (int64_t k = m - 2; k >= 0; --k) {  // H_j = Σ_{k≥j} G̃_k
      float* h = base.scores + (k * rows + r) * n;
      const float* next = h + rows * n;
      for (int32_t j = 0; j < n_vec; j += kLanes) store16(h + j, load16(h + j) + load16(next + j));
      for (int32_t j = n_vec; j < n; ++j) h[j] += next[j];
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void matryoshka_rows_range_f32(
    const RowProblem<float>& base, int64_t m, int64_t rows, const float* a, const float* b, float* alpha, float* beta,
    int64_t begin, int64_t end) {
  matryoshka_rows_f32_body(base, m, rows, a, b, alpha, beta, begin, end);
}

void matryoshka_rows_dispatch(const RowProblem<float>& base, int64_t m, int64_t rows, const float* a, const float* b,
                              float* alpha, float* beta, int64_t begin, int64_t end) {
  matryoshka_rows_range_f32(base, m, rows, a, b, alpha, beta, begin, end);
}
void matryoshka_rows_dispatch(const RowProblem<double>& base, int64_t m, int64_t rows, const double* a,
                              const double* b, double* alpha, double* beta, int64_t begin, int64_t end) {
  matryoshka_rows_range<double>(base, m, rows, a, b, alpha, beta, begin, end);
}

}  // namespace

void contrastive_matryoshka_rows(at::Tensor blocks, int64_t row_offset, double inv_temperature, double hardness,
                                 c10::optional<double> margin, at::Tensor inv_row_norms, at::Tensor inv_col_norms,
                                 c10::optional<at::Tensor> row_scale, at::Tensor loss, c10::optional<at::Tensor> alpha,
                                 c10::optional<at::Tensor> beta, c10::optional<at::Tensor> ids) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.is_contiguous() && blocks.device().is_cpu(), "mmfast cpu ", kOp,
              ": blocks must be a contiguous CPU tensor [m, rows, N], got ", blocks.sizes());
  check_float_or_double(kOp, blocks, "blocks");
  const int64_t m = blocks.size(0), rows = blocks.size(1), n = blocks.size(2);
  const auto dtype = blocks.scalar_type();
  TORCH_CHECK(n < (int64_t{1} << 31), "mmfast cpu ", kOp, ": at most 2^31-1 candidates");
  TORCH_CHECK(row_offset >= 0 && row_offset + rows <= n, "mmfast cpu ", kOp, ": row_offset ", row_offset, " + rows ",
              rows, " exceeds the number of candidates ", n);
  check_output(kOp, inv_row_norms, "inv_row_norms", {m, rows}, dtype);
  check_output(kOp, inv_col_norms, "inv_col_norms", {m, n}, dtype);
  check_output(kOp, loss, "loss", {m, rows}, dtype);
  TORCH_CHECK(row_scale.has_value() == alpha.has_value() && row_scale.has_value() == beta.has_value(), "mmfast cpu ",
              kOp, ": row_scale, alpha and beta go together (a gradient)");
  if (row_scale.has_value()) {
    check_output(kOp, *row_scale, "row_scale", {m, rows}, dtype);
    check_output(kOp, *alpha, "alpha", {m, rows}, dtype);
    check_output(kOp, *beta, "beta", {m, n}, dtype);
  }
  if (ids.has_value()) check_vector(kOp, *ids, "ids", n, at::kInt);
  AT_DISPATCH_FLOATING_TYPES(dtype, "mmfast_matryoshka_rows", [&] {
    RowProblem<scalar_t> p{blocks.data_ptr<scalar_t>(),
                           n,
                           n,
                           row_offset,
                           static_cast<scalar_t>(inv_temperature),
                           static_cast<scalar_t>(inv_temperature + hardness),
                           margin.has_value(),
                           static_cast<scalar_t>(margin.value_or(0.0)),
                           row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr,
                           loss.data_ptr<scalar_t>(),
                           nullptr,
                           ids.has_value() ? ids->data_ptr<int32_t>() : nullptr};
    const scalar_t* a = inv_row_norms.data_ptr<scalar_t>();
    const scalar_t* b = inv_col_norms.data_ptr<scalar_t>();
    scalar_t* alpha_out = row_scale.has_value() ? alpha->data_ptr<scalar_t>() : nullptr;
    // β per thread (rows run in parallel), summed into `beta` at the end.
    const int64_t threads = row_scale.has_value() ? at::get_num_threads() : 0;
    std::vector<scalar_t> partial(static_cast<size_t>(threads * m * n), scalar_t(0));
    at::parallel_for(0, rows, std::max<int64_t>(1, row_grain(m * n)), [&](int64_t begin, int64_t end) {
      scalar_t* beta_thread = threads ? partial.data() + at::get_thread_num() * m * n : nullptr;
      matryoshka_rows_dispatch(p, m, rows, a, b, alpha_out, beta_thread, begin, end);
    });
    if (threads) {
      scalar_t* beta_out = beta->data_ptr<scalar_t>();
      for (int64_t t = 0; t < threads; ++t) {
        const scalar_t* part = partial.data() + t * m * n;
        for (int64_t i = 0; i < m * n; ++i) beta_out[i] += part[i];
      }
    }
  });
}

}  // namespace mmfast
