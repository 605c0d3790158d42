// CPU kernel of mmfast.late_interaction_topk (the chunk loop, its MKL GEMMs and the top-k merge,
// csrc/similarity_topk.cpp's, are in mmfast/backends/late_interaction_topk.py).
//
// late_interaction_topk_maxsim reduces one GEMM output tile of token scores, T[r·L_q, c·L] (query
// tokens × document tokens), to the [r, c] tile of MaxSim scores: for each (query, document) pair,
// the max over the document's L tokens of T + bias (0 at a real token, -inf at padding) for every
// real query token, summed over the query's tokens in order, optionally divided by the query's
// number of real tokens. Unlike the loss's kernel it keeps no arg-max: a search needs no gradient,
// so the max is 16 independent lanes with nothing to merge but their values.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <limits>

#include "checks.h"
#include "fast_math.h"

namespace mmfast {
namespace {

constexpr const char* kOp = "late_interaction_topk";

template <typename T>
T masked_max(const T* row, const T* bias, int64_t n) {
  T lane_max[kLanes];
  for (int k = 0; k < kLanes; ++k) lane_max[k] = -std::numeric_limits<T>::infinity();
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const T v = row[s + k] + bias[s + k];
      lane_max[k] = v > lane_max[k] ? v : lane_max[k];
    }
  }
  for (int k = 0; s + k < n; ++k) {
    const T v = row[s + k] + bias[s + k];
    lane_max[k] = v > lane_max[k] ? v : lane_max[k];
  }
  T best = lane_max[0];
  for (int k = 1; k < kLanes; ++k) best = lane_max[k] > best ? lane_max[k] : best;
  return best;
}

template <typename T>
void maxsim(const at::Tensor& tile, const at::Tensor& bias, const at::Tensor& query_mask,
            const c10::optional<at::Tensor>& divisor, at::Tensor& scores) {
  const int64_t n_queries = scores.size(0), n_docs = scores.size(1);
  const int64_t query_tokens = tile.size(0) / n_queries, doc_tokens = tile.size(1) / n_docs;
  const T* t = tile.data_ptr<T>();
  const T* b = bias.data_ptr<T>();
  const T* mask = query_mask.data_ptr<T>();
  const T* div = divisor ? divisor->data_ptr<T>() : nullptr;
  T* out = scores.data_ptr<T>();
  const int64_t tile_stride = tile.stride(0), score_stride = scores.stride(0);
  // One (query, document) pair per task: it owns its score.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, query_tokens * doc_tokens));
  at::parallel_for(0, n_queries * n_docs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t i = pair / n_docs, j = pair % n_docs;
      T sum = 0;
      for (int64_t q = 0; q < query_tokens; ++q) {
        const int64_t token = i * query_tokens + q;
        if (mask[token] != 0) sum += masked_max(t + token * tile_stride + j * doc_tokens, b + j * doc_tokens, doc_tokens);
      }
      out[i * score_stride + j] = div ? sum / div[i] : sum;
    }
  });
}

}  // namespace

void late_interaction_topk_maxsim(at::Tensor tile, at::Tensor bias, at::Tensor query_mask,
                                  c10::optional<at::Tensor> divisor, at::Tensor scores) {
  check_float_or_double(kOp, tile, "tile");
  const auto dtype = tile.scalar_type();
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) >= 1 && scores.size(1) >= 1, "mmfast cpu ", kOp,
              ": scores must be a non-empty [queries, documents] matrix, got ", scores.sizes());
  const int64_t rows = tile.size(0), cols = tile.dim() == 2 ? tile.size(1) : -1;
  TORCH_CHECK(rows % scores.size(0) == 0 && cols % scores.size(1) == 0 && rows > 0 && cols > 0, "mmfast cpu ", kOp,
              ": tile ", tile.sizes(), " must hold whole queries and documents of scores ", scores.sizes());
  check_rows(kOp, tile, "tile", rows, cols, dtype);
  check_vector(kOp, bias, "bias", cols, dtype);
  check_vector(kOp, query_mask, "query_mask", rows, dtype);
  if (divisor) check_vector(kOp, *divisor, "divisor", scores.size(0), dtype);
  check_rows(kOp, scores, "scores", scores.size(0), scores.size(1), dtype);
  if (dtype == at::kFloat) {
    maxsim<float>(tile, bias, query_mask, divisor, scores);
  } else {
    maxsim<double>(tile, bias, query_mask, divisor, scores);
  }
}

}  // namespace mmfast
