// CPU kernel of mmfast.similarity_topk (the chunk loop and its MKL GEMMs are
// mmfast/backends/similarity_topk.py).
//
// similarity_topk_rows merges one tile of scores, S[r, j] for gallery item col_offset + j, into each
// row's running top-k and counts the scores strictly above the row's target score. Tiles arrive in
// gallery order, so col_offset is also the number of items each row has seen: a row's first
// min(k, col_offset) slots hold its k best so far as a heap, weakest at slot 0. Because every new
// item has a higher index than all kept ones, it enters only when strictly above the weakest kept
// score, which makes "ties go to the lower gallery index" free. The scan compares 16 scores at a time
// against that threshold and leaves the vector loop only when one of them beats it (rare after the
// first few thousand items). With `last`, each heap is sorted: best first, ties to the lower index.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <limits>
#include <numeric>
#include <vector>

#include "checks.h"
#include "fast_math.h"

namespace mmfast {
namespace {

template <typename T>
struct TileProblem {
  const T* scores;
  int64_t row_stride, n, col_offset, k;
  T* values;
  int64_t* indices;
  const int64_t* targets;  // null: no rank
  int64_t target_slots;
  const T* target_score;
  int64_t* count;
  bool last;
};

// One row's running top-k, kept in place in its slots of values/indices as a binary heap whose root
// (slot 0) is the weakest entry. Hand-written over the two arrays: std::push_heap over a struct with a
// function-pointer comparator was ~15x slower here (an out-of-line call and a store-forwarding stall
// per comparison).
template <typename T>
class RowHeap {
 public:
  RowHeap(const TileProblem<T>& p, int64_t r)
      : values_(p.values + r * p.k), indices_(p.indices + r * p.k), k_(p.k), size_(std::min(p.k, p.col_offset)) {}
  bool full() const { return size_ == k_; }
  T weakest() const { return values_[0]; }
  void push(T value, int64_t index) {  // while not full: sift up from a new leaf
    int64_t hole = size_++;
    while (hole > 0) {
      const int64_t parent = (hole - 1) / 2;
      if (!weaker(value, index, values_[parent], indices_[parent])) break;
      move(parent, hole);
      hole = parent;
    }
    place(hole, value, index);
  }
  void replace_weakest(T value, int64_t index) {  // full, and value > weakest(): sift down from the root
    int64_t hole = 0;
    for (int64_t child = 1; child < size_; child = 2 * hole + 1) {
      if (child + 1 < size_ && weaker(values_[child + 1], indices_[child + 1], values_[child], indices_[child])) {
        ++child;
      }
      if (!weaker(values_[child], indices_[child], value, index)) break;
      move(child, hole);
      hole = child;
    }
    place(hole, value, index);
  }
  void offer(T value, int64_t index) {
    if (!full()) {
      push(value, index);
    } else if (value > weakest()) {
      replace_weakest(value, index);
    }
  }
  void sort_best_first() {
    std::vector<int64_t> order(size_);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [this](int64_t a, int64_t b) {
      return weaker(values_[b], indices_[b], values_[a], indices_[a]);  // a first when b is weaker
    });
    std::vector<T> values(size_);
    std::vector<int64_t> indices(size_);
    for (int64_t t = 0; t < size_; ++t) {
      values[t] = values_[order[t]];
      indices[t] = indices_[order[t]];
    }
    for (int64_t t = 0; t < size_; ++t) place(t, values[t], indices[t]);
  }

 private:
  // The order of the results: a higher score first, an equal one at the lower gallery index first.
  static bool weaker(T value, int64_t index, T other_value, int64_t other_index) {
    return value < other_value || (value == other_value && index > other_index);
  }
  void move(int64_t from, int64_t to) {
    values_[to] = values_[from];
    indices_[to] = indices_[from];
  }
  void place(int64_t slot, T value, int64_t index) {
    values_[slot] = value;
    indices_[slot] = index;
  }
  T* values_;
  int64_t* indices_;
  int64_t k_, size_;
};

// The row's own targets never count against it: their scores here come from another summation
// order than the target score, and the best of them is the target score.
template <typename T>
int64_t targets_above(const TileProblem<T>& p, int64_t r, const T* s, T threshold) {
  int64_t above = 0;
  for (int64_t t = 0; t < p.target_slots; ++t) {
    const int64_t j = p.targets[r * p.target_slots + t] - p.col_offset;  // -1 padding lands below 0
    if (p.targets[r * p.target_slots + t] >= 0 && j >= 0 && j < p.n && s[j] > threshold) ++above;
  }
  return above;
}

// float64 (and the reference for the float32 path's logic): plain scalar loop.
template <typename T>
void merge_rows_generic(const TileProblem<T>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* s = p.scores + r * p.row_stride;
    RowHeap<T> heap(p, r);
    for (int64_t j = 0; j < p.n; ++j) heap.offer(s[j], p.col_offset + j);
    if (p.last) heap.sort_best_first();
    if (p.targets) {
      const T threshold = p.target_score[r];
      int64_t above = 0;
      for (int64_t j = 0; j < p.n; ++j) above += s[j] > threshold;
      p.count[r] += above - targets_above(p, r, s, threshold);
    }
  }
}

inline bool any_lane(i32x16 mask) {
  typedef int64_t i64x8 __attribute__((vector_size(64)));
  const i64x8 wide = std::bit_cast<i64x8>(mask);
  int64_t bits = 0;
  for (int i = 0; i < 8; ++i) bits |= wide[i];
  return bits != 0;
}

// float32: one pass, 16 lanes at a time, counting and filtering together; one compiled copy per ISA
// (see contrastive_loss.cpp).
__attribute__((target_clones("avx512f", "avx2", "default"))) void merge_rows_f32(const TileProblem<float>& p,
                                                                                int64_t begin, int64_t end) {
  const bool counting = p.targets != nullptr;
  for (int64_t r = begin; r < end; ++r) {
    const float* s = p.scores + r * p.row_stride;
    RowHeap<float> heap(p, r);
    const float threshold = counting ? p.target_score[r] : std::numeric_limits<float>::infinity();
    int64_t above = 0, j = 0;
    for (; j < p.n && !heap.full(); ++j) {  // the first k items of the gallery all enter
      heap.push(s[j], p.col_offset + j);
      above += s[j] > threshold;
    }
    const f32x16 threshold16 = splat16(threshold);
    i32x16 above16{};
    f32x16 weakest16 = splat16(heap.full() ? heap.weakest() : 0.0f);
    for (; j + kLanes <= p.n; j += kLanes) {  // j < n here means the heap is full
      const f32x16 v = load16(s + j);
      above16 -= (v > threshold16);  // comparison lanes are -1 when true
      if (any_lane(v > weakest16)) {
        for (int lane = 0; lane < kLanes; ++lane) {
          if (s[j + lane] > heap.weakest()) heap.replace_weakest(s[j + lane], p.col_offset + j + lane);
        }
        weakest16 = splat16(heap.weakest());
      }
    }
    for (; j < p.n; ++j) {
      heap.offer(s[j], p.col_offset + j);
      above += s[j] > threshold;
    }
    if (p.last) heap.sort_best_first();
    if (counting) {
      for (int lane = 0; lane < kLanes; ++lane) above += above16[lane];
      p.count[r] += above - targets_above(p, r, s, threshold);
    }
  }
}

void merge_dispatch(const TileProblem<float>& p, int64_t begin, int64_t end) { merge_rows_f32(p, begin, end); }
void merge_dispatch(const TileProblem<double>& p, int64_t begin, int64_t end) {
  merge_rows_generic<double>(p, begin, end);
}

constexpr const char* kOp = "similarity_topk";

}  // namespace

void similarity_topk_rows(at::Tensor scores, int64_t col_offset, at::Tensor values, at::Tensor indices,
                          c10::optional<at::Tensor> targets, c10::optional<at::Tensor> target_score,
                          c10::optional<at::Tensor> count, bool last) {
  check_float_or_double(kOp, scores, "scores");
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(scores.dim() == 2, "mmfast cpu similarity_topk: scores must be 2-D, got ", scores.sizes());
  check_rows(kOp, scores, "scores", kAnyRows, scores.size(1), dtype);
  const int64_t rows = scores.size(0), n = scores.size(1);
  TORCH_CHECK(values.dim() == 2 && values.size(1) >= 1, "mmfast cpu similarity_topk: values must be [rows, k]");
  const int64_t k = values.size(1);
  check_output(kOp, values, "values", {rows, k}, dtype);
  check_output(kOp, indices, "indices", {rows, k}, at::kLong);
  TORCH_CHECK(col_offset >= 0 && (!last || col_offset + n >= k), "mmfast cpu similarity_topk: the last tile ends at ",
              col_offset + n, " items, fewer than k = ", k);
  TORCH_CHECK(targets.has_value() == target_score.has_value() && targets.has_value() == count.has_value(),
              "mmfast cpu similarity_topk: targets, target_score and count go together");
  if (targets.has_value()) {
    TORCH_CHECK(targets->dim() == 2, "mmfast cpu similarity_topk: targets must be [rows, P]");
    check_output(kOp, *targets, "targets", {rows, targets->size(1)}, at::kLong);
    check_output(kOp, *target_score, "target_score", {rows}, dtype);
    check_output(kOp, *count, "count", {rows}, at::kLong);
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "mmfast_similarity_topk_rows", [&] {
    TileProblem<scalar_t> p{scores.data_ptr<scalar_t>(),
                            scores.stride(0),
                            n,
                            col_offset,
                            k,
                            values.data_ptr<scalar_t>(),
                            indices.data_ptr<int64_t>(),
                            targets.has_value() ? targets->data_ptr<int64_t>() : nullptr,
                            targets.has_value() ? targets->size(1) : 0,
                            target_score.has_value() ? target_score->data_ptr<scalar_t>() : nullptr,
                            count.has_value() ? count->data_ptr<int64_t>() : nullptr,
                            last};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { merge_dispatch(p, begin, end); });
  });
}

}  // namespace mmfast
