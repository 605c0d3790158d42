// CPU kernels of mmfast.similarity_topk (the gallery chunk loop is mmfast/backends/similarity_topk.py).
//
// similarity_topk_search scores a whole gallery chunk against every query and merges the scores as it
// goes, never leaving a thread's caches: the queries are cut into blocks of up to kMaxBlockRows rows,
// handed to the threads one at a time from a shared counter (a thread slowed by other jobs takes fewer),
// and a thread walks its block across the chunk kBlockCols items at a time: one single-threaded GEMM
// (MKL) into its own [block rows, kBlockCols] scratch, at most 1 MiB, kept in cache, then
// similarity_topk_rows's merge of that scratch. One parallel region per chunk, so the threads meet
// once per chunk instead of twice per tile; no score is written to or read back from memory.
//
// similarity_topk_rows merges one tile of scores, S[r, j] for gallery item col_offset + j, into each
// row's running top-k and counts the scores strictly above the row's target score. Tiles arrive in
// gallery order, so col_offset is also the number of items each row has seen: a row's first
// min(k, col_offset) slots hold its k best so far as a heap, weakest at slot 0. Because every new
// item has a higher index than all kept ones, it enters only when strictly above the weakest kept
// score, which makes "ties go to the lower gallery index" free. The scan compares 16 scores at a time
// against that threshold and leaves the vector loop only when one of them beats it (rare after the
// first few thousand items; the scan tests 64 scores at a time through their max, then the 16-lane
// quarters of a group that holds a winner). With `last`, each
// heap is sorted: best first, ties to the lower index.
//
// similarity_topk_search_screened is the same walk for float32 searches with the GEMMs on bf16 copies
// (twice MKL's float32 rate on CPUs with bf16 dot products); every kept score is still an exact float32
// one, and an item is scored in float32 only when its bf16 score, within a proven bound, could enter the
// row's top-k: see the note above its kernel.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
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
      : RowHeap(p.values + r * p.k, p.indices + r * p.k, p.k, std::min(p.k, p.col_offset)) {}
  RowHeap(T* values, int64_t* indices, int64_t k, int64_t size)
      : values_(values), indices_(indices), k_(k), size_(size) {}
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
    constexpr int kStep = 4 * kLanes;
    for (; j + kStep <= p.n; j += kStep) {  // j < n here means the heap is full
      const f32x16 v0 = load16(s + j), v1 = load16(s + j + kLanes);
      const f32x16 v2 = load16(s + j + 2 * kLanes), v3 = load16(s + j + 3 * kLanes);
      if (counting) {  // comparison lanes are -1 when true
        above16 -= (v0 > threshold16) + (v1 > threshold16) + (v2 > threshold16) + (v3 > threshold16);
      }
      if (any_lane(max16(max16(v0, v1), max16(v2, v3)) > weakest16)) {
        // Early in the gallery most groups hold a winner, but few of their 16-lane quarters do: only
        // those are walked lane by lane, each against the threshold as it rises.
        const f32x16 quarters[4] = {v0, v1, v2, v3};
        for (int quarter = 0; quarter < 4; ++quarter) {
          if (!any_lane(quarters[quarter] > weakest16)) continue;
          const int64_t first = j + quarter * kLanes;
          for (int lane = 0; lane < kLanes; ++lane) {
            if (s[first + lane] > heap.weakest()) heap.replace_weakest(s[first + lane], p.col_offset + first + lane);
          }
          weakest16 = splat16(heap.weakest());
        }
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

// The fused search's blocks: up to kMaxBlockRows queries × kBlockCols items, a thread's scratch of at
// most 1 MiB of float32 scores (L2 here is 1 MiB per core). Measured on 2 cores (phases timed apart, same
// process): the merge costs ~12% of the GEMMs at G = 20,000 and falls with G (a row's heap takes about
// k·ln(G/k) items); the GEMMs of 512-row blocks ran ~10% faster than of 128-row ones, which MKL re-packs
// the chunk's items for 4× as often. Smaller queries get smaller blocks, so every thread has some.
constexpr int64_t kMaxBlockRows = 512;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kBlockCols = 512;

int64_t block_rows_for(int64_t n_queries, int64_t threads) {
  const int64_t share = (n_queries + 2 * threads - 1) / (2 * threads);  // at least two blocks per thread
  const int64_t rounded = (share + kMinBlockRows - 1) / kMinBlockRows * kMinBlockRows;
  return std::clamp(rounded, kMinBlockRows, kMaxBlockRows);
}

// out[rows, cols] (row stride cols) = a[rows, dim] · b[cols, dim]ᵀ, on the calling thread (inside a
// parallel region ATen's GEMM runs single-threaded).
template <typename T>
void block_scores(const T* a, int64_t a_stride, int64_t rows, const T* b, int64_t b_stride, int64_t cols,
                  int64_t dim, T* out) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor lhs = at::from_blob(const_cast<T*>(a), {rows, dim}, {a_stride, 1}, options);
  const at::Tensor rhs = at::from_blob(const_cast<T*>(b), {cols, dim}, {b_stride, 1}, options);
  at::Tensor result = at::from_blob(out, {rows, cols}, {cols, 1}, options);
  at::mm_out(result, lhs, rhs.t());
}

// Every block of query rows against the whole chunk, blocks handed out dynamically.
template <typename T>
void search_chunk(const TileProblem<T>& chunk, const T* query, int64_t query_stride, int64_t n_queries,
                  const T* gallery, int64_t gallery_stride, int64_t dim) {
  const int64_t block_rows = block_rows_for(n_queries, at::get_num_threads());
  const int64_t n_blocks = (n_queries + block_rows - 1) / block_rows;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_blocks);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(block_rows * std::min(kBlockCols, chunk.n));
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t block = next++; block < n_blocks; block = next++) {
        const int64_t row = block * block_rows, rows = std::min(block_rows, n_queries - row);
        for (int64_t col = 0; col < chunk.n; col += kBlockCols) {
          const int64_t cols = std::min(kBlockCols, chunk.n - col);
          block_scores(query + row * query_stride, query_stride, rows, gallery + col * gallery_stride, gallery_stride,
                       cols, dim, scratch.data());
          TileProblem<T> tile = chunk;
          tile.scores = scratch.data();
          tile.row_stride = cols;
          tile.n = cols;
          tile.col_offset = chunk.col_offset + col;
          tile.last = chunk.last && col + cols == chunk.n;
          // The rows of the block: the kernels index the outputs from the tile's row 0.
          tile.values = chunk.values + row * chunk.k;
          tile.indices = chunk.indices + row * chunk.k;
          if (chunk.targets) {
            tile.targets = chunk.targets + row * chunk.target_slots;
            tile.target_score = chunk.target_score + row;
            tile.count = chunk.count + row;
          }
          merge_dispatch(tile, 0, rows);
        }
      }
    }
  });
}

// The arguments both entry points share, checked: the outputs and the optional rank inputs.
void check_outputs(int64_t rows, at::ScalarType dtype, int64_t col_offset, int64_t n, const at::Tensor& values,
                   const at::Tensor& indices, const c10::optional<at::Tensor>& targets,
                   const c10::optional<at::Tensor>& target_score, const c10::optional<at::Tensor>& count, bool last) {
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
}

template <typename T>
TileProblem<T> make_problem(const T* scores, int64_t row_stride, int64_t n, int64_t col_offset, at::Tensor& values,
                            at::Tensor& indices, const c10::optional<at::Tensor>& targets,
                            const c10::optional<at::Tensor>& target_score, const c10::optional<at::Tensor>& count,
                            bool last) {
  return TileProblem<T>{scores,
                        row_stride,
                        n,
                        col_offset,
                        values.size(1),
                        values.data_ptr<T>(),
                        indices.data_ptr<int64_t>(),
                        targets.has_value() ? targets->data_ptr<int64_t>() : nullptr,
                        targets.has_value() ? targets->size(1) : 0,
                        target_score.has_value() ? target_score->data_ptr<T>() : nullptr,
                        count.has_value() ? count->data_ptr<int64_t>() : nullptr,
                        last};
}

// ---- The bf16-screened search (float32 inputs on CPUs with bf16 dot products) ----------------------------
//
// The GEMM of each block runs on bf16 copies of the queries and items (twice the fp32 rate where the CPU
// has bf16 dot products), giving screening scores s~ into a bf16 scratch. Every result is still an exact
// float32 score s^: the row's heap holds s^ = <q, g> of the float32 inputs, computed by screened_dot in one
// fixed order (the same value on every thread count and block size). An item is scored exactly only when
// its screening score could put it in the heap: |s~ - s^| <= B + u'|s~| (screen_threshold's bound), so an
// item with s~ + B + u'|s~| <= the heap's weakest s^ cannot beat it, and skipping it changes nothing.
// B for a row and a block of items (the caller's norms; q = q_hi + q_lo, q_hi its bf16 copy):
//   |<q,g> - <q_hi,g_hi>|              <= ||q_lo|| ||g|| + ||q_hi|| ||g_lo||        (inputs rounded to bf16)
//   |fp32 sum of q_hi*g_hi - <q_hi,g_hi>| <= g_D ||q_hi|| ||g_hi||,  g_D = D u32 / (1 - D u32)   (GEMM sums)
//   |s^ - <q,g>|                      <= g_D ||q|| ||g||                              (screened_dot)
//   bf16 flushes of denormal inputs/products: < 2 D 2^-126 (1 + ||q|| + ||g||)
// and u' = u16 / (1 - u16), u16 = 2^-8, covers the rounding of the GEMM's float32 sum to the bf16 scratch.
// Norms are taken as the block's maxima over its items; the caller keeps ||q|| ||g|| far from overflow.

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load_bf16x16(const uint16_t* p) {
  u16x16 half;
  std::memcpy(&half, p, sizeof(half));
  return std::bit_cast<f32x16>(__builtin_convertvector(half, u32x16) << 16);
}
inline float bf16_to_float(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

// <a, b> in float32 in one fixed order: two 16-lane accumulators, a fixed tree over the lanes, then the tail.
__attribute__((always_inline)) inline float screened_dot(const float* a, const float* b, int64_t dim) {
  f32x16 acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 2 * kLanes <= dim; j += 2 * kLanes) {
    acc0 += load16(a + j) * load16(b + j);
    acc1 += load16(a + j + kLanes) * load16(b + j + kLanes);
  }
  if (j + kLanes <= dim) {
    acc0 += load16(a + j) * load16(b + j);
    j += kLanes;
  }
  acc0 += acc1;
  float lanes[kLanes];
  store16(lanes, acc0);
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  float sum = lanes[0];
  for (; j < dim; ++j) sum += a[j] * b[j];
  return sum;
}

constexpr double kBf16Rounding = 1.0 / 256;  // u16: bf16 keeps 8 significant bits, round to nearest
constexpr double kOutputSlack = kBf16Rounding / (1 - kBf16Rounding);

// The largest float t such that s~ <= t guarantees s~ + bound + u'|s~| <= weakest (the inverse of the
// increasing s -> s + u'|s|, lowered by a relative 2^-40 for the double arithmetic, then rounded down).
inline float screen_threshold(float weakest, double bound) {
  const double c = static_cast<double>(weakest) - bound;
  double t = c >= 0 ? c / (1 + kOutputSlack) : c / (1 - kOutputSlack);
  t -= std::abs(t) * 0x1p-40 + 0x1p-140;
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

struct ScreenedTile {
  const uint16_t* scores;  // [rows, n] bf16 bits, row stride n
  int64_t n, col_offset, k;
  float* values;  // the tile's row 0
  int64_t* indices;
  const float* query;  // float32 rows of the tile
  int64_t query_stride;
  const float* items;  // float32 items of the tile
  int64_t item_stride, dim;
  const double* bound;  // [rows] B of each row against this tile's items
  bool last;
};

__attribute__((target_clones("avx512f", "avx2", "default"))) void merge_rows_screened(const ScreenedTile& t,
                                                                                     int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* s = t.scores + r * t.n;
    const float* q = t.query + r * t.query_stride;
    RowHeap<float> heap(t.values + r * t.k, t.indices + r * t.k, t.k, std::min(t.k, t.col_offset));
    int64_t j = 0;
    for (; j < t.n && !heap.full(); ++j) heap.push(screened_dot(q, t.items + j * t.item_stride, t.dim), t.col_offset + j);
    float threshold = heap.full() ? screen_threshold(heap.weakest(), t.bound[r]) : 0.0f;
    const auto offer = [&](int64_t col) {
      if (bf16_to_float(s[col]) <= threshold) return;
      const float exact = screened_dot(q, t.items + col * t.item_stride, t.dim);
      if (exact > heap.weakest()) {
        heap.replace_weakest(exact, t.col_offset + col);
        threshold = screen_threshold(heap.weakest(), t.bound[r]);
      }
    };
    for (; j + kLanes <= t.n; j += kLanes) {  // j < n here means the heap is full
      if (!any_lane(load_bf16x16(s + j) > splat16(threshold))) continue;
      for (int lane = 0; lane < kLanes; ++lane) offer(j + lane);
    }
    for (; j < t.n; ++j) offer(j);
    if (t.last) heap.sort_best_first();
  }
}

// Each row's B against the items [col, col + cols): see the note above.
void screen_bounds(const double* query_norms, int64_t rows, const double* item_norms, int64_t cols, int64_t dim,
                   double* bound) {
  double g = 0, g_lo = 0, g_hi = 0;  // the block's maxima of ||g||, ||g_lo||, ||g_hi||
  for (int64_t j = 0; j < cols; ++j) {
    g = std::max(g, item_norms[3 * j]);
    g_lo = std::max(g_lo, item_norms[3 * j + 1]);
    g_hi = std::max(g_hi, item_norms[3 * j + 2]);
  }
  const double unit = 0x1p-24 * static_cast<double>(dim), gamma = unit / (1 - unit);
  for (int64_t r = 0; r < rows; ++r) {
    const double q = query_norms[3 * r], q_lo = query_norms[3 * r + 1], q_hi = query_norms[3 * r + 2];
    const double flushes = 2 * static_cast<double>(dim) * 0x1p-126 * (1 + q + g);
    bound[r] = (q_lo * g + q_hi * g_lo + gamma * (q_hi * g_hi + q * g)) * (1 + 0x1p-20) + flushes;
  }
}

// Rows of x as bf16 (rounded to nearest even) and their norms (||x||, ||x - bf16(x)||, ||bf16(x)||) in float64:
// one pass over x, the rows split over the threads.
void screen_rows(const float* x, int64_t stride, int64_t rows, int64_t dim, uint16_t* copy, double* norms) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double full = 0, low = 0, high = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const float value = x[r * stride + d];
        const c10::BFloat16 rounded(value);  // round to nearest even
        const float kept = static_cast<float>(rounded);
        const double rest = static_cast<double>(value) - kept;
        full += static_cast<double>(value) * value;
        low += rest * rest;
        high += static_cast<double>(kept) * kept;
        copy[r * dim + d] = rounded.x;
      }
      norms[3 * r] = std::sqrt(full);
      norms[3 * r + 1] = std::sqrt(low);
      norms[3 * r + 2] = std::sqrt(high);
    }
  });
}

// 256 items, not 512: the rescored items' float32 rows of a block (768 KiB at D = 768) then stay in L2 beside the
// bf16 scratch; measured at Q = 2,048, G = 100,000, D = 768, k = 100 (CPU s, one thread): 512 → 2.19,
// 256 → 2.12, 128 → 2.33, with the GEMMs alone 1.6.
constexpr int64_t kScreenBlockCols = 256;

void search_chunk_screened(const float* query, int64_t query_stride, const uint16_t* query_bf16,
                           const double* query_norms, int64_t n_queries, const float* gallery, int64_t gallery_stride,
                           const uint16_t* gallery_bf16,
                           const double* item_norms, int64_t n_items, int64_t dim, int64_t col_offset, float* values,
                           int64_t* indices, int64_t k, bool last) {
  const int64_t block_rows = block_rows_for(n_queries, at::get_num_threads());
  const int64_t n_blocks = (n_queries + block_rows - 1) / block_rows;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_blocks);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> scratch(block_rows * std::min(kScreenBlockCols, n_items));
    std::vector<double> bound(block_rows);
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t block = next++; block < n_blocks; block = next++) {
        const int64_t row = block * block_rows, rows = std::min(block_rows, n_queries - row);
        for (int64_t col = 0; col < n_items; col += kScreenBlockCols) {
          const int64_t cols = std::min(kScreenBlockCols, n_items - col);
          block_scores(reinterpret_cast<const at::BFloat16*>(query_bf16) + row * dim, dim, rows,
                       reinterpret_cast<const at::BFloat16*>(gallery_bf16) + col * dim, dim, cols, dim,
                       scratch.data());
          screen_bounds(query_norms + 3 * row, rows, item_norms + 3 * col, cols, dim, bound.data());
          const ScreenedTile tile{reinterpret_cast<const uint16_t*>(scratch.data()), cols, col_offset + col, k,
                                  values + row * k, indices + row * k, query + row * query_stride, query_stride,
                                  gallery + col * gallery_stride, gallery_stride, dim, bound.data(),
                                  last && col + cols == n_items};
          merge_rows_screened(tile, 0, rows);
        }
      }
    }
  });
}

}  // namespace

void similarity_topk_rows(at::Tensor scores, int64_t col_offset, at::Tensor values, at::Tensor indices,
                          c10::optional<at::Tensor> targets, c10::optional<at::Tensor> target_score,
                          c10::optional<at::Tensor> count, bool last) {
  check_float_or_double(kOp, scores, "scores");
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(scores.dim() == 2, "mmfast cpu similarity_topk: scores must be 2-D, got ", scores.sizes());
  check_rows(kOp, scores, "scores", kAnyRows, scores.size(1), dtype);
  const int64_t rows = scores.size(0), n = scores.size(1);
  check_outputs(rows, dtype, col_offset, n, values, indices, targets, target_score, count, last);
  AT_DISPATCH_FLOATING_TYPES(dtype, "mmfast_similarity_topk_rows", [&] {
    const auto p = make_problem<scalar_t>(scores.data_ptr<scalar_t>(), scores.stride(0), n, col_offset, values,
                                          indices, targets, target_score, count, last);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { merge_dispatch(p, begin, end); });
  });
}

void similarity_topk_search(at::Tensor query, at::Tensor gallery, int64_t col_offset, at::Tensor values,
                            at::Tensor indices, c10::optional<at::Tensor> targets,
                            c10::optional<at::Tensor> target_score, c10::optional<at::Tensor> count, bool last) {
  check_float_or_double(kOp, query, "query");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(query.dim() == 2 && gallery.dim() == 2 && query.size(0) >= 1 && gallery.size(0) >= 1,
              "mmfast cpu similarity_topk: query and gallery must be non-empty 2-D tensors, got ", query.sizes(),
              " and ", gallery.sizes());
  const int64_t rows = query.size(0), n = gallery.size(0), dim = query.size(1);
  check_rows(kOp, query, "query", rows, dim, dtype);
  check_rows(kOp, gallery, "gallery", n, dim, dtype);
  check_outputs(rows, dtype, col_offset, n, values, indices, targets, target_score, count, last);
  AT_DISPATCH_FLOATING_TYPES(dtype, "mmfast_similarity_topk_search", [&] {
    const auto p = make_problem<scalar_t>(nullptr, 0, n, col_offset, values, indices, targets, target_score, count,
                                          last);
    search_chunk<scalar_t>(p, query.data_ptr<scalar_t>(), query.stride(0), rows, gallery.data_ptr<scalar_t>(),
                           gallery.stride(0), dim);
  });
}

void similarity_topk_search_screened(at::Tensor query, at::Tensor query_bf16, at::Tensor query_norms,
                                     at::Tensor gallery, at::Tensor gallery_bf16, at::Tensor gallery_norms,
                                     int64_t col_offset, at::Tensor values, at::Tensor indices, bool last) {
  TORCH_CHECK(query.dim() == 2 && gallery.dim() == 2 && query.size(0) >= 1 && gallery.size(0) >= 1,
              "mmfast cpu similarity_topk: query and gallery must be non-empty 2-D tensors, got ", query.sizes(),
              " and ", gallery.sizes());
  const int64_t rows = query.size(0), n = gallery.size(0), dim = query.size(1);
  TORCH_CHECK(dim < (int64_t{1} << 20), "mmfast cpu similarity_topk: the bf16 screen needs D < 2^20, got ", dim);
  check_rows(kOp, query, "query", rows, dim, at::kFloat);
  check_rows(kOp, gallery, "gallery", n, dim, at::kFloat);
  check_output(kOp, query_bf16, "query_bf16", {rows, dim}, at::kBFloat16);
  check_output(kOp, gallery_bf16, "gallery_bf16", {n, dim}, at::kBFloat16);
  check_output(kOp, query_norms, "query_norms", {rows, 3}, at::kDouble);
  check_output(kOp, gallery_norms, "gallery_norms", {n, 3}, at::kDouble);
  check_outputs(rows, at::kFloat, col_offset, n, values, indices, c10::nullopt, c10::nullopt, c10::nullopt, last);
  search_chunk_screened(query.data_ptr<float>(), query.stride(0), reinterpret_cast<const uint16_t*>(query_bf16.data_ptr()),
                        query_norms.data_ptr<double>(), rows, gallery.data_ptr<float>(), gallery.stride(0),
                        reinterpret_cast<const uint16_t*>(gallery_bf16.data_ptr()), gallery_norms.data_ptr<double>(),
                        n, dim, col_offset, values.data_ptr<float>(), indices.data_ptr<int64_t>(), values.size(1),
                        last);
}

void similarity_topk_screen_rows(at::Tensor x, at::Tensor copy, at::Tensor norms) {
  TORCH_CHECK(x.dim() == 2, "mmfast cpu similarity_topk: rows must be 2-D, got ", x.sizes());
  check_rows(kOp, x, "rows", x.size(0), x.size(1), at::kFloat);
  check_output(kOp, copy, "copy", {x.size(0), x.size(1)}, at::kBFloat16);
  check_output(kOp, norms, "norms", {x.size(0), 3}, at::kDouble);
  screen_rows(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), reinterpret_cast<uint16_t*>(copy.data_ptr()),
              norms.data_ptr<double>());
}

}  // namespace mmfast
