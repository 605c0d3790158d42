// CPU kernels of mmfast.late_interaction_loss (the document chunk loop is
// mmfast/backends/late_interaction_loss.py).
//
// late_interaction_scores computes MaxSim for every query against one chunk of documents without
// ever writing a token score to memory: the (query block, document block) pairs are handed to the
// threads from a shared counter; a thread computes its pair's token scores with one single-threaded
// GEMM (MKL) into its own scratch of about kScratchFloats floats (in L2), and reduces them at once:
// for each (query, document), for each query token, the max over the document's L tokens (plus the
// bias: 0 at a real token, -inf at padding) and its arg-max, summed over the query's real tokens.
// late_interaction_maxsim does the same reduction over a tile the caller computed (the torch
// backend's loop; kept for tests of the reduction alone).
//
// The max: a first pass takes the max of 16 lanes × 4 accumulators (float32, one copy per ISA); a
// second pass finds the first token holding it, usually within the first few vectors. The winner
// is thus the first maximal token: ties go to the lower document token, as on the other backends.
//
// late_interaction_grads is the backward through the stored arg-max: a query token's gradient is the
// sum over documents of G[i, j] times the winning document row, and a document row's gradient the sum
// of G[i, j] times the query tokens it won. OpenMP over query tokens for the first and over documents
// for the second, so no two threads write one row.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "fast_math.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "late_interaction_loss";

// A fused pair's scratch: about this many float scores (512 KiB), rows of at least kBlockTokens query
// tokens and columns of at least kBlockColumns document tokens, whole queries and documents.
constexpr int64_t kBlockTokens = 128;
constexpr int64_t kBlockColumns = 1024;

// (max over s < n of row[s] + bias[s], its first index); a row without a finite max (every token
// padding, or NaN) points at token 0, as a strict > scan from -inf would leave it.
template <typename T>
std::pair<T, int32_t> first_max(const T* row, const T* bias, int64_t n) {
  T best = -std::numeric_limits<T>::infinity();
  int32_t index = 0;
  for (int64_t s = 0; s < n; ++s) {
    const T v = row[s] + bias[s];
    if (v > best) {
      best = v;
      index = static_cast<int32_t>(s);
    }
  }
  return {best, index};
}

// float32: the same result in two vector passes (see the top of the file).
__attribute__((always_inline)) inline std::pair<float, int32_t> first_max_f32(const float* row, const float* bias,
                                                                               int64_t n) {
  const f32x16 lowest = splat16(-std::numeric_limits<float>::infinity());
  f32x16 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t s = 0;
  for (; s + 4 * kLanes <= n; s += 4 * kLanes) {
    m0 = max16(load16(row + s) + load16(bias + s), m0);
    m1 = max16(load16(row + s + kLanes) + load16(bias + s + kLanes), m1);
    m2 = max16(load16(row + s + 2 * kLanes) + load16(bias + s + 2 * kLanes), m2);
    m3 = max16(load16(row + s + 3 * kLanes) + load16(bias + s + 3 * kLanes), m3);
  }
  for (; s + kLanes <= n; s += kLanes) m0 = max16(load16(row + s) + load16(bias + s), m0);
  float best = max_lane(max16(max16(m0, m1), max16(m2, m3)));
  for (; s < n; ++s) {
    const float v = row[s] + bias[s];
    best = v > best ? v : best;
  }
  if (!(best > -std::numeric_limits<float>::infinity())) return {best, 0};
  const f32x16 best16 = splat16(best);
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const i32x16 hit = (load16(row + t) + load16(bias + t)) == best16;
    typedef int64_t i64x8 __attribute__((vector_size(64)));
    const i64x8 wide = std::bit_cast<i64x8>(hit);
    int64_t any = 0;
    for (int i = 0; i < 8; ++i) any |= wide[i];
    if (any) break;
  }
  for (; t < n; ++t) {
    if (row[t] + bias[t] == best) return {best, static_cast<int32_t>(t)};
  }
  return {best, 0};  // unreachable for finite inputs: best is one of the row's values
}

// MaxSim of `queries` whole queries (rows of `tile`, query_tokens each) against `docs` whole documents
// (columns, doc_tokens each): scores[i, j] and argmax[token, j].
template <typename T>
struct MaxsimBlock {
  const T* tile;
  int64_t tile_stride;
  const T* bias;       // [docs · doc_tokens]
  const T* mask;       // [queries · query_tokens]
  int64_t queries, query_tokens, docs, doc_tokens;
  T* scores;           // [queries, docs] at score_stride
  int64_t score_stride;
  int32_t* argmax;     // [queries · query_tokens, docs] at index_stride
  int64_t index_stride;
};

template <typename T>
__attribute__((always_inline)) inline void maxsim_pair(const MaxsimBlock<T>& b, int64_t i, int64_t j) {
  T sum = 0;
  for (int64_t q = 0; q < b.query_tokens; ++q) {
    const int64_t token = i * b.query_tokens + q;
    int32_t winner = 0;
    if (b.mask[token] != 0) {
      const T* row = b.tile + token * b.tile_stride + j * b.doc_tokens;
      std::pair<T, int32_t> found;
      if constexpr (std::is_same_v<T, float>) {
        found = first_max_f32(row, b.bias + j * b.doc_tokens, b.doc_tokens);
      } else {
        found = first_max(row, b.bias + j * b.doc_tokens, b.doc_tokens);
      }
      const auto [best, at] = found;
      sum += best;
      winner = at;
    }
    b.argmax[token * b.index_stride + j] = winner;
  }
  b.scores[i * b.score_stride + j] = sum;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void maxsim_pairs_f32(const MaxsimBlock<float>& b,
                                                                                  int64_t begin, int64_t end) {
  for (int64_t pair = begin; pair < end; ++pair) maxsim_pair(b, pair / b.docs, pair % b.docs);
}

void maxsim_pairs(const MaxsimBlock<float>& b, int64_t begin, int64_t end) { maxsim_pairs_f32(b, begin, end); }
void maxsim_pairs(const MaxsimBlock<double>& b, int64_t begin, int64_t end) {
  for (int64_t pair = begin; pair < end; ++pair) maxsim_pair(b, pair / b.docs, pair % b.docs);
}

template <typename T>
void maxsim(const at::Tensor& tile, const at::Tensor& bias, const at::Tensor& query_mask, at::Tensor& scores,
            at::Tensor& argmax) {
  const int64_t n_queries = scores.size(0), n_docs = scores.size(1);
  const MaxsimBlock<T> block{tile.data_ptr<T>(),   tile.stride(0),   bias.data_ptr<T>(),
                             query_mask.data_ptr<T>(), n_queries,     tile.size(0) / n_queries,
                             n_docs,               tile.size(1) / n_docs, scores.data_ptr<T>(),
                             scores.stride(0),     argmax.data_ptr<int32_t>(), argmax.stride(0)};
  // One (query, document) pair per task: it owns its score and its L_q arg-max entries.
  at::parallel_for(0, n_queries * n_docs, 1, [&](int64_t begin, int64_t end) { maxsim_pairs(block, begin, end); });
}

// out[rows, cols] (row stride cols) = a[rows, dim] · b[cols, dim]ᵀ, on the calling thread (inside a
// parallel region ATen's GEMM runs single-threaded).
template <typename T>
void block_scores(const T* a, int64_t rows, const T* b, int64_t cols, int64_t dim, T* out) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor lhs = at::from_blob(const_cast<T*>(a), {rows, dim}, options);
  const at::Tensor rhs = at::from_blob(const_cast<T*>(b), {cols, dim}, options);
  at::Tensor result = at::from_blob(out, {rows, cols}, options);
  at::mm_out(result, lhs, rhs.t());
}

template <typename T>
void fused_scores(const at::Tensor& query, const at::Tensor& query_mask, int64_t query_tokens,
                  const at::Tensor& documents, const at::Tensor& bias, int64_t doc_tokens, at::Tensor& scores,
                  at::Tensor& argmax) {
  const int64_t n_queries = scores.size(0), n_docs = scores.size(1), dim = query.size(1);
  const int64_t block_queries = std::min(n_queries, std::max<int64_t>(1, kBlockTokens / query_tokens));
  const int64_t block_docs = std::min(n_docs, std::max<int64_t>(1, kBlockColumns / doc_tokens));
  const int64_t query_blocks = (n_queries + block_queries - 1) / block_queries;
  const int64_t doc_blocks = (n_docs + block_docs - 1) / block_docs;
  const int64_t n_items = query_blocks * doc_blocks;
  const T* q = query.data_ptr<T>();
  const T* d = documents.data_ptr<T>();
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(block_queries * query_tokens * block_docs * doc_tokens);
    for (int64_t worker = begin; worker < end; ++worker) {
      // Consecutive items share a document block: its tokens stay in cache while the queries pass.
      for (int64_t item = next++; item < n_items; item = next++) {
        const int64_t first_query = (item % query_blocks) * block_queries;
        const int64_t first_doc = (item / query_blocks) * block_docs;
        const int64_t queries = std::min(block_queries, n_queries - first_query);
        const int64_t docs = std::min(block_docs, n_docs - first_doc);
        const int64_t rows = queries * query_tokens, cols = docs * doc_tokens;
        block_scores(q + first_query * query_tokens * dim, rows, d + first_doc * doc_tokens * dim, cols, dim,
                     scratch.data());
        const MaxsimBlock<T> block{scratch.data(),
                                   cols,
                                   bias.data_ptr<T>() + first_doc * doc_tokens,
                                   query_mask.data_ptr<T>() + first_query * query_tokens,
                                   queries,
                                   query_tokens,
                                   docs,
                                   doc_tokens,
                                   scores.data_ptr<T>() + first_query * scores.stride(0) + first_doc,
                                   scores.stride(0),
                                   argmax.data_ptr<int32_t>() + first_query * query_tokens * argmax.stride(0) + first_doc,
                                   argmax.stride(0)};
        maxsim_pairs(block, 0, queries * docs);
      }
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

void late_interaction_scores(at::Tensor query, at::Tensor query_mask, at::Tensor documents, at::Tensor bias,
                             int64_t doc_tokens, at::Tensor scores, at::Tensor argmax) {
  check_float_or_double(kOp, query, "query");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) >= 1 && scores.size(1) >= 1 && query.dim() == 2 &&
                  query.size(0) % scores.size(0) == 0 && doc_tokens >= 1,
              "mmfast cpu ", kOp, ": query ", query.sizes(), " must hold whole queries of scores ", scores.sizes(),
              " and doc_tokens (", doc_tokens, ") must be >= 1");
  const int64_t tokens = query.size(0), dim = query.size(1), n_docs = scores.size(1);
  check_output(kOp, query, "query", {tokens, dim}, dtype);
  check_vector(kOp, query_mask, "query_mask", tokens, dtype);
  check_output(kOp, documents, "documents", {n_docs * doc_tokens, dim}, dtype);
  check_vector(kOp, bias, "bias", n_docs * doc_tokens, dtype);
  check_rows(kOp, scores, "scores", scores.size(0), n_docs, dtype);
  check_rows(kOp, argmax, "argmax", tokens, n_docs, at::kInt);
  if (dtype == at::kFloat) {
    fused_scores<float>(query, query_mask, tokens / scores.size(0), documents, bias, doc_tokens, scores, argmax);
  } else {
    fused_scores<double>(query, query_mask, tokens / scores.size(0), documents, bias, doc_tokens, scores, argmax);
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
