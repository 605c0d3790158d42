// CPU row kernel of mmfast.sigmoid_loss (the chunk loop is mmfast/backends/sigmoid_loss.py).
//
// The chunk loop computes one row chunk of the scores S = X·Yᵀ at a time with MKL GEMMs. This kernel
// does everything between them in one pass over each row while it sits in L1/L2: the logits
// t·s + b, the labels (z = +1 for the row's positive, or every candidate sharing its id, else -1),
// the loss Σ_j softplus(-z·logit) = Σ_j -log σ(z·logit), and, when asked, G = t·g over the row with
// g = dLoss/dlogit = c·(-z)·σ(-z·logit) (c: the row's share of the total loss), so the caller
// finishes with two GEMMs. With a learnable scale or bias it also writes Σ_j g_j·s_j and Σ_j g_j
// per row (the caller sums them over rows into dLoss/dt and dLoss/db).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "checks.h"
#include "fast_math.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "sigmoid_loss";

template <typename T>
struct SigmoidProblem {
  T* scores;
  int64_t row_stride;
  int64_t n;
  int64_t row_offset;  // global index of row 0: the positive of row r sits in column row_offset + r
  T scale;
  T bias;
  const T* grad_scale;  // null: loss only; else dLoss_total/dLoss_row, and S is overwritten by G
  T* loss;
  T* scale_grad;       // null, or per row Σ_j g_j·s_j (needs grad_scale)
  T* bias_grad;        // null, or per row Σ_j g_j (needs grad_scale)
  const int32_t* ids;  // null: one positive per row; else [n] class indices, equal = same content
};

// The generic (scalar) kernel, used for float64, where accuracy matters more than speed.
template <typename T>
void pair_rows_generic(const SigmoidProblem<T>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T* s = p.scores + r * p.row_stride;
    const int64_t pos_col = p.row_offset + r;
    const int32_t pos_id = p.ids ? p.ids[pos_col] : 0;
    const double c = p.grad_scale ? static_cast<double>(p.grad_scale[r]) : 0.0;
    double loss = 0.0, sum_g = 0.0, sum_gs = 0.0;
    for (int64_t j = 0; j < p.n; ++j) {
      const bool positive = p.ids ? p.ids[j] == pos_id : j == pos_col;
      const double logit = static_cast<double>(s[j]) * p.scale + p.bias;
      const double u = positive ? logit : -logit;  // z·logit
      const double e = std::exp(-std::abs(u));
      loss += std::max(-u, 0.0) + std::log1p(e);  // softplus(-u), no overflow either way
      if (p.grad_scale) {
        const double sigmoid = (u >= 0 ? e : 1.0) / (1.0 + e);  // σ(-u)
        const double g = (positive ? -sigmoid : sigmoid) * c;
        sum_g += g;
        sum_gs += g * s[j];
        s[j] = static_cast<T>(g * p.scale);
      }
    }
    p.loss[r] = static_cast<T>(loss);
    if (p.scale_grad) p.scale_grad[r] = static_cast<T>(sum_gs);
    if (p.bias_grad) p.bias_grad[r] = static_cast<T>(sum_g);
  }
}

struct PairTerms {
  f32x16 loss;  // softplus(-z·logit)
  f32x16 g;     // dLoss/dlogit
};

// One block of 16 candidates: the same formulas as the generic kernel, float32.
__attribute__((always_inline)) inline PairTerms pair_block(f32x16 v, i32x16 positive, f32x16 scale, f32x16 bias,
                                                           f32x16 c) {
  const f32x16 zero{}, one = splat16(1.0f);
  const f32x16 logit = v * scale + bias;
  const f32x16 u = select16(positive, logit, -logit);
  const f32x16 e = exp_flush(select16(u < zero, u, -u));  // exp(-|u|)
  const f32x16 w = one + e;
  const f32x16 inv_w = one / w;
  const f32x16 loss = max16(-u, zero) + log1p_unit(e, w, inv_w);
  const f32x16 sigmoid = select16(u >= zero, e, one) * inv_w;
  return {loss, select16(positive, -sigmoid, sigmoid) * c};
}

// The float32 kernel, 16 lanes at a time, one compiled copy per ISA (see contrastive_loss.cpp). The
// row's last n % 16 candidates go through the same block code, padded and masked.
// kParameterGrads: the variant that also sums g and g·s.
template <bool kParameterGrads>
__attribute__((always_inline)) inline void pair_rows_f32_body(const SigmoidProblem<float>& p, int64_t begin,
                                                              int64_t end) {
  const int32_t n = static_cast<int32_t>(p.n);
  const int32_t n_vec = n - n % kLanes;
  const i32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const f32x16 scale = splat16(p.scale), bias = splat16(p.bias), zero{};
  const bool write = p.grad_scale != nullptr;
  for (int64_t r = begin; r < end; ++r) {
    float* s = p.scores + r * p.row_stride;
    const int32_t pos_col = static_cast<int32_t>(p.row_offset + r);
    const i32x16 pos16 = splat16i(pos_col);
    const int32_t* ids = p.ids;
    const i32x16 pos_id16 = splat16i(ids ? ids[pos_col] : 0);
    const f32x16 c = splat16(write ? p.grad_scale[r] : 0.0f);
    DoubleSum16 loss16, g16, gs16;  // in double, so the row error does not grow with N
    for (int32_t j = 0; j < n_vec; j += kLanes) {
      const f32x16 v = load16(s + j);
      const i32x16 positive = ids ? equal16i(load16i(ids + j), pos_id16) : equal16i(iota + j, pos16);
      const PairTerms t = pair_block(v, positive, scale, bias, c);
      loss16.add(t.loss);
      if (write) {
        if (kParameterGrads) {
          g16.add(t.g);
          gs16.add(t.g * v);
        }
        store16(s + j, t.g * scale);
      }
    }
    if (n_vec < n) {
      const int32_t rest = n - n_vec;
      float tail[kLanes] = {};
      int32_t tail_ids[kLanes] = {};
      std::memcpy(tail, s + n_vec, sizeof(float) * rest);
      if (ids) std::memcpy(tail_ids, ids + n_vec, sizeof(int32_t) * rest);
      const i32x16 valid = iota < splat16i(rest);
      const f32x16 v = load16(tail);
      const i32x16 positive = valid & (ids ? equal16i(load16i(tail_ids), pos_id16) : equal16i(iota + n_vec, pos16));
      const PairTerms t = pair_block(v, positive, scale, bias, c);
      const f32x16 g = select16(valid, t.g, zero);
      loss16.add(select16(valid, t.loss, zero));
      if (write) {
        if (kParameterGrads) {
          g16.add(g);
          gs16.add(g * v);
        }
        store16(tail, g * scale);
        std::memcpy(s + n_vec, tail, sizeof(float) * rest);
      }
    }
    p.loss[r] = static_cast<float>(loss16.total());
    if (kParameterGrads) {
      if (p.scale_grad) p.scale_grad[r] = static_cast<float>(gs16.total());
      if (p.bias_grad) p.bias_grad[r] = static_cast<float>(g16.total());
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void pair_rows_f32(const SigmoidProblem<float>& p,
                                                                                int64_t begin, int64_t end) {
  pair_rows_f32_body<false>(p, begin, end);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) void pair_rows_f32_parameter_grads(
    const SigmoidProblem<float>& p, int64_t begin, int64_t end) {
  pair_rows_f32_body<true>(p, begin, end);
}

void pair_rows_dispatch(const SigmoidProblem<float>& p, int64_t begin, int64_t end) {
  if (p.scale_grad || p.bias_grad) {
    pair_rows_f32_parameter_grads(p, begin, end);
  } else {
    pair_rows_f32(p, begin, end);
  }
}
void pair_rows_dispatch(const SigmoidProblem<double>& p, int64_t begin, int64_t end) {
  pair_rows_generic<double>(p, begin, end);
}

// A per-row sum of the parameter gradients: only with a gradient (row_scale).
void check_parameter_grad(const c10::optional<at::Tensor>& out, const char* name,
                          const c10::optional<at::Tensor>& row_scale, int64_t rows, at::ScalarType dtype) {
  if (!out.has_value()) return;
  TORCH_CHECK(row_scale.has_value(), "mmfast cpu ", kOp, ": ", name, " needs row_scale");
  check_output(kOp, *out, name, {rows}, dtype);
}

}  // namespace

void sigmoid_pair_rows(at::Tensor scores, int64_t row_offset, double scale, double bias,
                       c10::optional<at::Tensor> row_scale, at::Tensor loss, c10::optional<at::Tensor> scale_grad,
                       c10::optional<at::Tensor> bias_grad, c10::optional<at::Tensor> ids) {
  TORCH_CHECK(scores.device().is_cpu(), "mmfast cpu ", kOp, ": scores must be a CPU tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "mmfast cpu ", kOp, ": scores must be 2-D [rows, N], got shape ", scores.sizes());
  check_float_or_double(kOp, scores, "scores");
  const auto dtype = scores.scalar_type();
  const int64_t rows = scores.size(0), n = scores.size(1);
  check_rows(kOp, scores, "scores", rows, n, dtype);
  TORCH_CHECK(n < (int64_t{1} << 31) - kLanes, "mmfast cpu ", kOp, ": at most 2^31-17 candidates");
  TORCH_CHECK(row_offset >= 0 && row_offset + rows <= n, "mmfast cpu ", kOp, ": row_offset ", row_offset, " + rows ",
              rows, " exceeds the number of candidates ", n);
  TORCH_CHECK(std::isfinite(scale) && std::isfinite(bias), "mmfast cpu ", kOp,
              ": logit_scale and logit_bias must be finite, got ", scale, " and ", bias);
  if (row_scale.has_value()) check_row_scale(kOp, *row_scale, rows, dtype);
  if (ids.has_value()) check_vector(kOp, *ids, "ids", n, at::kInt);
  check_output(kOp, loss, "loss", {rows}, dtype);
  check_parameter_grad(scale_grad, "scale_grad", row_scale, rows, dtype);
  check_parameter_grad(bias_grad, "bias_grad", row_scale, rows, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "mmfast_sigmoid_pair_rows", [&] {
    SigmoidProblem<scalar_t> p{scores.data_ptr<scalar_t>(),
                               scores.stride(0),
                               n,
                               row_offset,
                               static_cast<scalar_t>(scale),
                               static_cast<scalar_t>(bias),
                               row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr,
                               loss.data_ptr<scalar_t>(),
                               scale_grad.has_value() ? scale_grad->data_ptr<scalar_t>() : nullptr,
                               bias_grad.has_value() ? bias_grad->data_ptr<scalar_t>() : nullptr,
                               ids.has_value() ? ids->data_ptr<int32_t>() : nullptr};
    // Rows per parallel task: enough work per task to amortise the OpenMP hand-off.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { pair_rows_dispatch(p, begin, end); });
  });
}

}  // namespace mmfast
