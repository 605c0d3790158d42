// Checks of the tensors the Python chunk loops hand to the C++ kernels, shared by every csrc/<op>.cpp.
//
// Each raises (TORCH_CHECK: a RuntimeError in Python) before any data is touched, with a message
// "mmfast cpu <op>: <argument> must be ..., got ...", so a bad call never crashes the process.
#pragma once

#include <torch/extension.h>

#include <string>

namespace mmfast {

// A row count that is not checked (check_rows).
constexpr int64_t kAnyRows = -1;

inline void check_float_or_double(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "mmfast cpu ", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// An output the caller allocated: a contiguous CPU tensor of exactly `shape` and `dtype`.
inline void check_output(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                         at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(),
              "mmfast cpu ", op, ": ", name, " must be a contiguous CPU ", dtype, " tensor of shape ", shape,
              ", got ", t.scalar_type(), " ", t.sizes());
}

// A matrix read or written a row at a time: a 2-D CPU tensor of `dtype` with `cols` columns (and
// `rows` rows unless kAnyRows) whose rows are contiguous; the row stride is free (a chunk of a
// larger buffer, a slice of the embeddings).
inline void check_rows(const char* op, const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && (rows == kAnyRows || t.size(0) == rows) && t.size(1) == cols && t.stride(1) == 1 &&
                  t.scalar_type() == dtype && t.device().is_cpu(),
              "mmfast cpu ", op, ": ", name, " must be a CPU ", dtype, " tensor [",
              rows == kAnyRows ? std::string("rows") : std::to_string(rows), ", ", cols,
              "] with contiguous rows, got ", t.scalar_type(), " ", t.sizes());
}

// The per-row coefficient dLoss_total/dLoss_row of a chunk's gradient: [rows], contiguous, `dtype`.
inline void check_row_scale(const char* op, const at::Tensor& row_scale, int64_t rows, at::ScalarType dtype) {
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == rows && row_scale.scalar_type() == dtype &&
                  row_scale.is_contiguous() && row_scale.device().is_cpu(),
              "mmfast cpu ", op, ": row_scale must have shape [", rows, "] and be a contiguous CPU ", dtype,
              " tensor, got ", row_scale.scalar_type(), " ", row_scale.sizes());
}

// A per-candidate vector the kernel reads (duplicate ids): 1-D, `length` entries, contiguous, `dtype`.
inline void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t length,
                         at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.device().is_cpu(),
              "mmfast cpu ", op, ": ", name, " must be a contiguous CPU ", dtype, " tensor of shape [", length,
              "], got ", t.scalar_type(), " ", t.sizes());
}

}  // namespace mmfast
