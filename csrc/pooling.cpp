// CPU kernels of mmfast.last_token_pool / mean_pool (mmfast/pooling.py).
//
// Forward reads each needed hidden row once (the last real token's row, or every real token's row
// for the mean), accumulates in float32 (float64 for float64 input), takes the norm and writes the
// output; it works on any strides, so a slice of a model's output needs no copy. Backward writes the
// whole dense gradient of hidden_states in one pass, zeros included, and allocates only [B, D]
// buffers (dLoss/dpooled, and the gradient row in the output dtype).
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "checks.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "pooling";

constexpr double kEps = 1e-12;  // F.normalize's
constexpr int64_t kBlockD = 512;  // columns per task: the accumulator stays in L1

template <typename scalar_t, typename acc_t>
void pool_forward_impl(const at::Tensor& hidden, const int32_t* mask, int64_t mode, bool normalize, scalar_t* out,
                       acc_t* unit, acc_t* norm, int64_t* index, acc_t* count) {
  const int64_t batch = hidden.size(0), tokens = hidden.size(1), dim = hidden.size(2);
  const int64_t sb = hidden.stride(0), st = hidden.stride(1), sd = hidden.stride(2);
  const scalar_t* h = hidden.data_ptr<scalar_t>();

  // Phase 1: which rows (last mode) or how many (mean mode).
  at::parallel_for(0, batch, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t* m = mask + b * tokens;
      if (mode == 0) {
        int64_t last = tokens - 1;
        while (last > 0 && m[last] == 0) --last;
        index[b] = last;
      } else {
        int64_t n = 0;
        for (int64_t t = 0; t < tokens; ++t) n += m[t] != 0;
        count[b] = static_cast<acc_t>(n);
      }
    }
  });

  // Phase 2: the pooled vector, one (row, column block) per task so B = 1 still uses every core.
  const int64_t blocks = (dim + kBlockD - 1) / kBlockD;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t task0, int64_t task1) {
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / blocks, d0 = (task % blocks) * kBlockD, d1 = std::min(dim, d0 + kBlockD);
      acc_t* p = unit + b * dim;
      if (mode == 0) {
        const scalar_t* row = h + b * sb + index[b] * st;
        for (int64_t d = d0; d < d1; ++d) p[d] = static_cast<acc_t>(row[d * sd]);
        continue;
      }
      std::fill(p + d0, p + d1, acc_t(0));
      const int32_t* m = mask + b * tokens;
      for (int64_t t = 0; t < tokens; ++t) {
        if (m[t] == 0) continue;  // padding rows are never read
        const scalar_t* row = h + b * sb + t * st;
        if (sd == 1) {
#pragma omp simd
          for (int64_t d = d0; d < d1; ++d) p[d] += static_cast<acc_t>(row[d]);
        } else {
          for (int64_t d = d0; d < d1; ++d) p[d] += static_cast<acc_t>(row[d * sd]);
        }
      }
      for (int64_t d = d0; d < d1; ++d) p[d] /= count[b];
    }
  });

  // Phase 3: norm, normalisation, and the output in the input dtype.
  at::parallel_for(0, batch, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* p = unit + b * dim;
      double squares = 0.0;
      for (int64_t d = 0; d < dim; ++d) squares += static_cast<double>(p[d]) * p[d];
      norm[b] = static_cast<acc_t>(std::sqrt(squares));
      if (normalize) {
        const acc_t scale = static_cast<acc_t>(1.0 / std::max(std::sqrt(squares), kEps));
        for (int64_t d = 0; d < dim; ++d) p[d] *= scale;
      }
      for (int64_t d = 0; d < dim; ++d) out[b * dim + d] = static_cast<scalar_t>(p[d]);
    }
  });
}

template <typename scalar_t, typename acc_t>
void pool_backward_impl(const scalar_t* grad_out, const acc_t* unit, const acc_t* norm, const int64_t* index,
                        const acc_t* count, const int32_t* mask, int64_t mode, bool normalize, int64_t batch,
                        int64_t tokens, int64_t dim, scalar_t* grad_hidden) {
  // dLoss/dpooled: through the normalisation, (g - y·(y·g)) / ‖p‖ (g / eps where the norm clamps).
  std::vector<acc_t> grad_pooled(batch * dim);
  at::parallel_for(0, batch, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* g = grad_out + b * dim;
      const acc_t* y = unit + b * dim;
      acc_t* dp = grad_pooled.data() + b * dim;
      if (!normalize) {
        for (int64_t d = 0; d < dim; ++d) dp[d] = static_cast<acc_t>(g[d]);
        continue;
      }
      if (norm[b] <= kEps) {
        for (int64_t d = 0; d < dim; ++d) dp[d] = static_cast<acc_t>(static_cast<double>(g[d]) / kEps);
        continue;
      }
      double dot = 0.0;
      for (int64_t d = 0; d < dim; ++d) dot += static_cast<double>(y[d]) * static_cast<acc_t>(g[d]);
      const acc_t projection = static_cast<acc_t>(dot), inv_norm = acc_t(1) / norm[b];
      for (int64_t d = 0; d < dim; ++d) dp[d] = (static_cast<acc_t>(g[d]) - y[d] * projection) * inv_norm;
    }
  });
  // Every token of a row gets the same gradient row (dp, or dp/count for the mean), so it is
  // converted to the output dtype once per row and then copied; unused tokens get zeros. Only
  // memcpy/memset touch the big tensor: as fast as a fill, whatever the dtype.
  std::vector<scalar_t> grad_rows(batch * dim);
  at::parallel_for(0, batch, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t weight = mode == 0 ? acc_t(1) : acc_t(1) / count[b];
      const acc_t* dp = grad_pooled.data() + b * dim;
      for (int64_t d = 0; d < dim; ++d) grad_rows[b * dim + d] = static_cast<scalar_t>(dp[d] * weight);
    }
  });
  const size_t row_bytes = dim * sizeof(scalar_t);
  at::parallel_for(0, batch * tokens, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / tokens, t = r % tokens;
      if (mode == 0 ? t == index[b] : mask[r] != 0) {
        std::memcpy(grad_hidden + r * dim, grad_rows.data() + b * dim, row_bytes);
      } else {
        std::memset(grad_hidden + r * dim, 0, row_bytes);  // all-zero bits are 0 in every float type
      }
    }
  });
}

void check_common(const at::Tensor& mask, int64_t batch, int64_t tokens, int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "mmfast cpu ", kOp, ": mode must be 0 (last) or 1 (mean), got ", mode);
  check_output(kOp, mask, "attention_mask", {batch, tokens}, at::kInt);
}

}  // namespace

void pooling_forward(at::Tensor hidden, at::Tensor mask, int64_t mode, bool normalize, at::Tensor out, at::Tensor unit,
                     at::Tensor norm, at::Tensor index, at::Tensor count) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.device().is_cpu(), "mmfast cpu ", kOp,
              ": hidden_states must be a 3-D CPU tensor");
  const int64_t batch = hidden.size(0), tokens = hidden.size(1), dim = hidden.size(2);
  TORCH_CHECK(batch > 0 && tokens > 0 && dim > 0, "mmfast cpu ", kOp, ": empty hidden_states ", hidden.sizes());
  check_common(mask, batch, tokens, mode);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "mmfast_pooling_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    check_output(kOp, out, "out", {batch, dim}, hidden.scalar_type());
    check_output(kOp, unit, "unit", {batch, dim}, acc);
    check_output(kOp, norm, "norm", {batch}, acc);
    check_output(kOp, index, "index", {mode == 0 ? batch : 0}, at::kLong);
    check_output(kOp, count, "count", {mode == 1 ? batch : 0}, acc);
    pool_forward_impl<scalar_t, acc_t>(hidden, mask.data_ptr<int32_t>(), mode, normalize, out.data_ptr<scalar_t>(),
                                       unit.data_ptr<acc_t>(), norm.data_ptr<acc_t>(), index.data_ptr<int64_t>(),
                                       count.data_ptr<acc_t>());
  });
}

void pooling_backward(at::Tensor grad_out, at::Tensor unit, at::Tensor norm, at::Tensor index, at::Tensor count,
                      at::Tensor mask, int64_t mode, bool normalize, at::Tensor grad_hidden) {
  TORCH_CHECK(grad_hidden.dim() == 3 && grad_hidden.is_contiguous() && grad_hidden.device().is_cpu(),
              "mmfast cpu ", kOp, ": grad_hidden must be a contiguous 3-D CPU tensor");
  const int64_t batch = grad_hidden.size(0), tokens = grad_hidden.size(1), dim = grad_hidden.size(2);
  check_common(mask, batch, tokens, mode);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_hidden.scalar_type(), "mmfast_pooling_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    check_output(kOp, grad_out, "grad_out", {batch, dim}, grad_hidden.scalar_type());
    check_output(kOp, unit, "unit", {batch, dim}, acc);
    check_output(kOp, norm, "norm", {batch}, acc);
    check_output(kOp, index, "index", {mode == 0 ? batch : 0}, at::kLong);
    check_output(kOp, count, "count", {mode == 1 ? batch : 0}, acc);
    pool_backward_impl<scalar_t, acc_t>(grad_out.data_ptr<scalar_t>(), unit.data_ptr<acc_t>(), norm.data_ptr<acc_t>(),
                                        index.data_ptr<int64_t>(), count.data_ptr<acc_t>(), mask.data_ptr<int32_t>(),
                                        mode, normalize, batch, tokens, dim, grad_hidden.data_ptr<scalar_t>());
  });
}

}  // namespace mmfast
