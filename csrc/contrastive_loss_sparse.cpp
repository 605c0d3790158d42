// CPU kernel of mmfast.contrastive_loss's top-k gradient (the selection is csrc/contrastive_loss.cpp's
// topk_rows): applies the k + 1 sparse coefficients per row to dX and to the candidates' gradient,
// without any dense B×N tensor. The symmetric loss's column half uses it too, with x = the targets
// and the queries as candidates.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "checks.h"

namespace mmfast {

constexpr const char* kSparseOp = "contrastive_loss";

namespace {

template <typename T>
void sparse_grads_impl(const at::Tensor& x, const at::Tensor& targets, const c10::optional<at::Tensor>& negatives,
                       const at::Tensor& index, const at::Tensor& coef, const c10::optional<at::Tensor>& grad_x,
                       const c10::optional<at::Tensor>& grad_targets,
                       const c10::optional<at::Tensor>& grad_negatives) {
  const int64_t dim = x.size(1), rows = x.size(0), slots = index.size(1), n_targets = targets.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  const T* c = coef.data_ptr<T>();
  auto row_of = [](const at::Tensor& t, int64_t j) { return t.data_ptr<T>() + j * t.stride(0); };
  if (grad_x.has_value()) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* g = row_of(*grad_x, r);
        for (int64_t t = 0; t < slots; ++t) {
          const int64_t j = idx[r * slots + t];
          if (j < 0) continue;
          const T* y = j < n_targets ? row_of(targets, j) : row_of(*negatives, j - n_targets);
          const T w = c[r * slots + t];
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) g[d] += w * y[d];
        }
      }
    });
  }
  if (!grad_targets.has_value() && !grad_negatives.has_value()) return;
  // Split the embedding dimension across threads: every thread sees every (row, slot) pair, so
  // there are no write conflicts and the summation order is fixed (deterministic).
  at::parallel_for(0, dim, 64, [&](int64_t d0, int64_t d1) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = row_of(x, r);
      for (int64_t t = 0; t < slots; ++t) {
        const int64_t j = idx[r * slots + t];
        T* g = nullptr;
        if (j >= 0 && j < n_targets && grad_targets.has_value()) g = row_of(*grad_targets, j);
        if (j >= n_targets && grad_negatives.has_value()) g = row_of(*grad_negatives, j - n_targets);
        if (!g) continue;
        const T w = c[r * slots + t];
#pragma omp simd
        for (int64_t d = d0; d < d1; ++d) g[d] += w * xr[d];
      }
    }
  });
}

}  // namespace

// grad_x[r] += Σ_t coef[r,t]·y[index[r,t]], and y's gradient += coef[r,t]·x[r], where y is the
// concatenation [targets; negatives] (never built). Slots with index -1 are unused.
void contrastive_sparse_grads(at::Tensor x, at::Tensor targets, c10::optional<at::Tensor> negatives, at::Tensor index,
                              at::Tensor coef, c10::optional<at::Tensor> grad_x, c10::optional<at::Tensor> grad_targets,
                              c10::optional<at::Tensor> grad_negatives) {
  const int64_t dim = x.size(-1);
  const auto dtype = x.scalar_type();
  check_float_or_double(kSparseOp, x, "x");
  check_rows(kSparseOp, x, "x", kAnyRows, dim, dtype);
  check_rows(kSparseOp, targets, "targets", kAnyRows, dim, dtype);
  if (negatives.has_value()) check_rows(kSparseOp, *negatives, "negatives", kAnyRows, dim, dtype);
  const int64_t rows = x.size(0), slots = index.size(1);
  const int64_t n_targets = targets.size(0);
  const int64_t n_total = n_targets + (negatives.has_value() ? negatives->size(0) : 0);
  TORCH_CHECK(index.dim() == 2 && index.size(0) == rows && index.scalar_type() == at::kLong && index.is_contiguous(),
              "mmfast cpu ", kSparseOp, ": index must be a contiguous int64 tensor [", rows, ", slots]");
  TORCH_CHECK(coef.sizes() == index.sizes() && coef.scalar_type() == dtype && coef.is_contiguous(),
              "mmfast cpu ", kSparseOp, ": coef must match index's shape and x's dtype");
  TORCH_CHECK(index.numel() == 0 || (index.max().item<int64_t>() < n_total && index.min().item<int64_t>() >= -1),
              "mmfast cpu ", kSparseOp, ": index entries must lie in [-1, ", n_total, ")");
  if (grad_x.has_value()) check_rows(kSparseOp, *grad_x, "grad_x", kAnyRows, dim, dtype);
  if (grad_targets.has_value()) check_rows(kSparseOp, *grad_targets, "grad_targets", kAnyRows, dim, dtype);
  if (grad_negatives.has_value()) check_rows(kSparseOp, *grad_negatives, "grad_negatives", kAnyRows, dim, dtype);

  AT_DISPATCH_FLOATING_TYPES(dtype, "mmfast_sparse_grads", [&] {
    sparse_grads_impl<scalar_t>(x, targets, negatives, index, coef, grad_x, grad_targets, grad_negatives);
  });
}


}  // namespace mmfast
