// CPU row kernel of mmfast.distillation_loss (the chunk loop is mmfast/backends/distillation_loss.py).
//
// For each row of a chunk of student scores s and teacher scores t (same rows, same candidates):
// both logsumexps, KL(p_t ‖ p_s) = Σ_j p_t,j (log p_t,j - log p_s,j), and, when asked,
// G = c·(p_s - p_t)/τ_s written over s. Three passes over the row while it is in L1/L2. With a
// learnable student temperature the third pass also sums w = Σ_j G_j·z_j over the student logits
// z = s/τ_s (the caller's dLoss/dτ_s = -Σ_rows w).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "fast_math.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "distillation_loss";

template <typename T>
struct DistillProblem {
  T* student;
  T* teacher;
  int64_t row_stride_s, row_stride_t, n;
  T inv_ts, inv_tt;
  const T* grad_scale;  // null: loss only
  T* loss;
  T* temperature_grad;  // null, or per row Σ_j G_j·z_j (needs grad_scale)
};

template <typename T>
void distill_rows_generic(const DistillProblem<T>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T* s = p.student + r * p.row_stride_s;
    T* t = p.teacher + r * p.row_stride_t;
    T ms = -std::numeric_limits<T>::infinity(), mt = ms;
    for (int64_t j = 0; j < p.n; ++j) {
      s[j] *= p.inv_ts;
      t[j] *= p.inv_tt;
      ms = std::max(ms, s[j]);
      mt = std::max(mt, t[j]);
    }
    double sum_s = 0, sum_t = 0;
    for (int64_t j = 0; j < p.n; ++j) {
      sum_s += std::exp(static_cast<double>(s[j] - ms));
      sum_t += std::exp(static_cast<double>(t[j] - mt));
    }
    const double log_sum_s = std::log(sum_s), log_sum_t = std::log(sum_t);
    const double c = p.grad_scale ? static_cast<double>(p.grad_scale[r]) * p.inv_ts : 0.0;
    double kl = 0, weighted = 0;
    for (int64_t j = 0; j < p.n; ++j) {
      const double log_pt = t[j] - mt - log_sum_t, log_ps = s[j] - ms - log_sum_s;
      const double pt = std::exp(log_pt);
      kl += pt * (log_pt - log_ps);
      if (p.grad_scale) {
        const double g = c * (std::exp(log_ps) - pt);
        weighted += g * (s[j] - ms);  // Σ_j G_j = 0: the shifted logits give the same sum, more exactly
        s[j] = static_cast<T>(g);
      }
    }
    p.loss[r] = static_cast<T>(kl);
    if (p.temperature_grad) p.temperature_grad[r] = static_cast<T>(weighted);
  }
}

// float32: the same passes 16 lanes at a time, one compiled copy per ISA (see contrastive_loss.cpp).
__attribute__((target_clones("avx512f", "avx2", "default"))) void distill_rows_f32(const DistillProblem<float>& p,
                                                                                   int64_t begin, int64_t end) {
  const int64_t n = p.n, n_vec = n - n % kLanes;
  for (int64_t r = begin; r < end; ++r) {
    float* s = p.student + r * p.row_stride_s;
    float* t = p.teacher + r * p.row_stride_t;
    const float minus_inf = -std::numeric_limits<float>::infinity();
    f32x16 ms16 = splat16(minus_inf), mt16 = ms16;
    for (int64_t j = 0; j < n_vec; j += kLanes) {
      const f32x16 ls = load16(s + j) * p.inv_ts, lt = load16(t + j) * p.inv_tt;
      store16(s + j, ls);
      store16(t + j, lt);
      ms16 = max16(ms16, ls);
      mt16 = max16(mt16, lt);
    }
    float ms = max_lane(ms16), mt = max_lane(mt16);
    for (int64_t j = n_vec; j < n; ++j) {
      s[j] *= p.inv_ts;
      t[j] *= p.inv_tt;
      ms = std::max(ms, s[j]);
      mt = std::max(mt, t[j]);
    }
    DoubleSum16 sum_s16, sum_t16;
    double sum_s = 0, sum_t = 0;
    for (int64_t j = 0; j < n_vec; j += kLanes) {
      sum_s16.add(exp_flush(load16(s + j) - ms));
      sum_t16.add(exp_flush(load16(t + j) - mt));
    }
    for (int64_t j = n_vec; j < n; ++j) {
      sum_s += exp_flush(s[j] - ms);
      sum_t += exp_flush(t[j] - mt);
    }
    sum_s += sum_s16.total();
    sum_t += sum_t16.total();
    // KL as Σ p_t·(log p_t - log p_s) with both logs taken relative to their own logsumexp, so no
    // large terms cancel (a one-candidate row gives exactly 0).
    // (x - max) - log Σ: the first difference is exact for the terms that matter, and the second
    // subtracts a small number; (x - (max + log Σ)) would round the large shift first.
    const float log_sum_s = static_cast<float>(std::log(sum_s)), log_sum_t = static_cast<float>(std::log(sum_t));
    const bool write = p.grad_scale != nullptr;
    const float c = write ? static_cast<float>(static_cast<double>(p.grad_scale[r]) * p.inv_ts) : 0.0f;
    const bool weigh = p.temperature_grad != nullptr;
    DoubleSum16 kl16, weighted16;
    double kl = 0, weighted = 0;
    for (int64_t j = 0; j < n_vec; j += kLanes) {
      const f32x16 z = load16(s + j);
      const f32x16 log_pt = (load16(t + j) - mt) - log_sum_t, log_ps = (z - ms) - log_sum_s;
      const f32x16 pt = exp_flush(log_pt);
      kl16.add(pt * (log_pt - log_ps));
      if (write) {
        const f32x16 g = (exp_flush(log_ps) - pt) * c;
        if (weigh) weighted16.add(g * (z - ms));  // Σ_j G_j = 0: shifted logits, the same sum
        store16(s + j, g);
      }
    }
    for (int64_t j = n_vec; j < n; ++j) {
      const float log_pt = (t[j] - mt) - log_sum_t, log_ps = (s[j] - ms) - log_sum_s;
      const float pt = exp_flush(log_pt);
      kl += static_cast<double>(pt) * (log_pt - log_ps);
      if (write) {
        const float g = (exp_flush(log_ps) - pt) * c;
        weighted += static_cast<double>(g) * (s[j] - ms);
        s[j] = g;
      }
    }
    p.loss[r] = static_cast<float>(kl + kl16.total());
    if (weigh) p.temperature_grad[r] = static_cast<float>(weighted + weighted16.total());
  }
}

void distill_dispatch(const DistillProblem<float>& p, int64_t begin, int64_t end) { distill_rows_f32(p, begin, end); }
void distill_dispatch(const DistillProblem<double>& p, int64_t begin, int64_t end) {
  distill_rows_generic<double>(p, begin, end);
}

}  // namespace

void distillation_kl_rows(at::Tensor student, at::Tensor teacher, double inv_student_t, double inv_teacher_t,
                          c10::optional<at::Tensor> row_scale, at::Tensor loss,
                          c10::optional<at::Tensor> temperature_grad) {
  TORCH_CHECK(student.dim() == 2, "mmfast cpu ", kOp, ": student scores must be 2-D, got ", student.sizes());
  check_float_or_double(kOp, student, "student scores");
  const auto dtype = student.scalar_type();
  const int64_t rows = student.size(0), n = student.size(1);
  check_rows(kOp, student, "student scores", rows, n, dtype);
  check_rows(kOp, teacher, "teacher scores", rows, n, dtype);
  check_output(kOp, loss, "loss", {rows}, dtype);
  if (row_scale.has_value()) check_row_scale(kOp, *row_scale, rows, dtype);
  if (temperature_grad.has_value()) {
    TORCH_CHECK(row_scale.has_value(), "mmfast cpu ", kOp, ": temperature_grad needs row_scale");
    check_output(kOp, *temperature_grad, "temperature_grad", {rows}, dtype);
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "mmfast_distillation_kl_rows", [&] {
    DistillProblem<scalar_t> p{student.data_ptr<scalar_t>(),
                               teacher.data_ptr<scalar_t>(),
                               student.stride(0),
                               teacher.stride(0),
                               n,
                               static_cast<scalar_t>(inv_student_t),
                               static_cast<scalar_t>(inv_teacher_t),
                               row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr,
                               loss.data_ptr<scalar_t>(),
                               temperature_grad.has_value() ? temperature_grad->data_ptr<scalar_t>() : nullptr};
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { distill_dispatch(p, begin, end); });
  });
}

}  // namespace mmfast
