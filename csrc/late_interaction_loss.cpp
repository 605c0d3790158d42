// CPU kernels of mmfast.late_interaction_loss (the chunk loop and its MKL GEMMs are
// mmfast/backends/late_interaction_loss.py).
//
// late_interaction_maxsim reduces one GEMM output tile of token scores, T[r·L_q, c·L] (query tokens
// × document tokens), to MaxSim: for each (query, document) pair, for each query token, the max over
// the document's L tokens (plus the bias: 0 at a real token, -inf at padding) and its arg-max, summed
// over the query's real tokens. The max runs over 16 lanes, each keeping its own first maximal index
// (a strict > never moves it on a tie), and the lanes are merged to the lowest index among those
// holding the max: ties go to the lower document token, as on the other backends.
//
// late_interaction_grads is the backward through the stored arg-max: a query token's gradient is the
// sum over documents of G[i, j] times the winning document row, and a document row's gradient the sum
// of G[i, j] times the query tokens it won. OpenMP over query tokens for the first and over documents
// for the second, so no two threads write one row.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <limits>

#include "checks.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "late_interaction_loss";
constexpr int64_t kLanes = 16;

// (max over s < n of row[s] + bias[s], its first index)
template <typename T>
std::pair<T, int32_t> first_max(const T* row, const T* bias, int64_t n) {
  T lane_max[kLanes];
  int32_t lane_index[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) {
    lane_max[k] = -std::numeric_limits<T>::infinity();
    lane_index[k] = std::numeric_limits<int32_t>::max();
  }
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const T v = row[s + k] + bias[s + k];
      const bool better = v > lane_max[k];
      lane_max[k] = better ? v : lane_max[k];
      lane_index[k] = better ? static_cast<int32_t>(s + k) : lane_index[k];
    }
  }
  for (int64_t k = 0; s + k < n; ++k) {
    const T v = row[s + k] + bias[s + k];
    if (v > lane_max[k]) {
      lane_max[k] = v;
      lane_index[k] = static_cast<int32_t>(s + k);
    }
  }
  T best = lane_max[0];
  int32_t index = lane_index[0];
  for (int64_t k = 1; k < kLanes; ++k) {
    if (lane_max[k] > best || (lane_max[k] == best && lane_index[k] < index)) {
      best = lane_max[k];
      index = lane_index[k];
    }
  }
  // Only a row without a real token (refused in Python) or of NaNs keeps no index: point at token 0.
  return {best, index == std::numeric_limits<int32_t>::max() ? 0 : index};
}

template <typename T>
void maxsim(const at::Tensor& tile, const at::Tensor& bias, const at::Tensor& query_mask, at::Tensor& scores,
            at::Tensor& argmax) {
  const int64_t n_queries = scores.size(0), n_docs = scores.size(1);
  const int64_t query_tokens = tile.size(0) / n_queries, doc_tokens = tile.size(1) / n_docs;
  const T* t = tile.data_ptr<T>();
  const T* b = bias.data_ptr<T>();
  const T* mask = query_mask.data_ptr<T>();
  T* out = scores.data_ptr<T>();
  int32_t* index = argmax.data_ptr<int32_t>();
  const int64_t tile_stride = tile.stride(0), score_stride = scores.stride(0), index_stride = argmax.stride(0);
  // One (query, document) pair per task: it owns its score and its L_q arg-max entries.
  at::parallel_for(0, n_queries * n_docs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t i = pair / n_docs, j = pair % n_docs;
      T sum = 0;
      for (int64_t q = 0; q < query_tokens; ++q) {
        const int64_t token = i * query_tokens + q;
        int32_t winner = 0;
        if (mask[token] != 0) {
          const auto [best, at] = first_max(t + token * tile_stride + j * doc_tokens, b + j * doc_tokens, doc_tokens);
          sum += best;
          winner = at;
        }
        index[token * index_stride + j] = winner;
      }
      out[i * score_stride + j] = sum;
    }
  });
}

template <typename T>
void grads(const at::Tensor& grad_scores, const at::Tensor& query, const at::Tensor& query_mask,
           const at::Tensor& documents, const at::Tensor& argmax, int64_t doc_tokens,
           const c10::optional<at::Tensor>& grad_query, const c10::optional<at::Tensor>& grad_documents) {
  const int64_t n_queries = grad_scores.size(0), n_docs = grad_scores.size(1), dim = query.size(1);
  const int64_t query_tokens = query.size(0) / n_queries;
  const T* g = grad_scores.data_ptr<T>();
  const T* q = query.data_ptr<T>();
  const T* mask = query_mask.data_ptr<T>();
  const T* d = documents.data_ptr<T>();
  const int32_t* index = argmax.data_ptr<int32_t>();
  if (grad_query) {
    T* gq = grad_query->data_ptr<T>();
    at::parallel_for(0, n_queries * query_tokens, 1, [&](int64_t begin, int64_t end) {
      for (int64_t token = begin; token < end; ++token) {
        if (mask[token] == 0) continue;
        T* out = gq + token * dim;
        const T* weights = g + (token / query_tokens) * n_docs;
        for (int64_t j = 0; j < n_docs; ++j) {
          const T w = weights[j];
          if (w == 0) continue;
          const T* row = d + (j * doc_tokens + index[token * n_docs + j]) * dim;
          for (int64_t k = 0; k < dim; ++k) out[k] += w * row[k];
        }
      }
    });
  }
  if (grad_documents) {
    T* gd = grad_documents->data_ptr<T>();
    at::parallel_for(0, n_docs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        for (int64_t token = 0; token < n_queries * query_tokens; ++token) {
          const T w = g[(token / query_tokens) * n_docs + j];
          if (mask[token] == 0 || w == 0) continue;
          T* out = gd + (j * doc_tokens + index[token * n_docs + j]) * dim;
          const T* row = q + token * dim;
          for (int64_t k = 0; k < dim; ++k) out[k] += w * row[k];
        }
      }
    });
  }
}

}  // namespace

void late_interaction_maxsim(at::Tensor tile, at::Tensor bias, at::Tensor query_mask, at::Tensor scores,
                             at::Tensor argmax) {
  check_float_or_double(kOp, tile, "tile");
  const auto dtype = tile.scalar_type();
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) >= 1 && scores.size(1) >= 1, "mmfast cpu ", kOp,
              ": scores must be a non-empty [queries, documents] matrix, got ", scores.sizes());
  const int64_t rows = tile.size(0), cols = tile.dim() == 2 ? tile.size(1) : -1;
  TORCH_CHECK(rows % scores.size(0) == 0 && cols % scores.size(1) == 0, "mmfast cpu ", kOp, ": tile ", tile.sizes(),
              " must hold whole queries and documents of scores ", scores.sizes());
  check_rows(kOp, tile, "tile", rows, cols, dtype);
  check_vector(kOp, bias, "bias", cols, dtype);
  check_vector(kOp, query_mask, "query_mask", rows, dtype);
  check_rows(kOp, scores, "scores", scores.size(0), scores.size(1), dtype);
  check_rows(kOp, argmax, "argmax", rows, scores.size(1), at::kInt);
  if (dtype == at::kFloat) {
    maxsim<float>(tile, bias, query_mask, scores, argmax);
  } else {
    maxsim<double>(tile, bias, query_mask, scores, argmax);
  }
}

void late_interaction_grads(at::Tensor grad_scores, at::Tensor query, at::Tensor query_mask, at::Tensor documents,
                            at::Tensor argmax, int64_t doc_tokens, c10::optional<at::Tensor> grad_query,
                            c10::optional<at::Tensor> grad_documents) {
  check_float_or_double(kOp, query, "query");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(grad_scores.dim() == 2 && query.dim() == 2 && doc_tokens >= 1 && grad_scores.size(0) >= 1 &&
                  query.size(0) % grad_scores.size(0) == 0,
              "mmfast cpu ", kOp, ": query ", query.sizes(), " must hold whole queries of grad_scores ",
              grad_scores.sizes(), " and doc_tokens (", doc_tokens, ") must be >= 1");
  const int64_t tokens = query.size(0), dim = query.size(1), n_docs = grad_scores.size(1);
  check_output(kOp, grad_scores, "grad_scores", grad_scores.sizes(), dtype);
  check_output(kOp, query, "query", {tokens, dim}, dtype);
  check_vector(kOp, query_mask, "query_mask", tokens, dtype);
  check_output(kOp, documents, "documents", {n_docs * doc_tokens, dim}, dtype);
  check_output(kOp, argmax, "argmax", {tokens, n_docs}, at::kInt);
  if (argmax.numel()) {
    const auto [low, high] = at::aminmax(argmax);
    TORCH_CHECK(low.item<int32_t>() >= 0 && high.item<int32_t>() < doc_tokens, "mmfast cpu ", kOp,
                ": argmax entries must be document token indices in [0, ", doc_tokens, ")");
  }
  if (grad_query) check_output(kOp, *grad_query, "grad_query", {tokens, dim}, dtype);
  if (grad_documents) check_output(kOp, *grad_documents, "grad_documents", {n_docs * doc_tokens, dim}, dtype);
  if (dtype == at::kFloat) {
    grads<float>(grad_scores, query, query_mask, documents, argmax, doc_tokens, grad_query, grad_documents);
  } else {
    grads<double>(grad_scores, query, query_mask, documents, argmax, doc_tokens, grad_query, grad_documents);
  }
}

}  // namespace mmfast
