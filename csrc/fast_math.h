// Vector helpers shared by the CPU kernels.
//
// The hot loops use GCC/Clang vector extensions (16 float lanes) rather than relying on the
// auto-vectoriser, which gave scalar code for the exp loop. Each function compiled with
// target_clones then lowers the same source to AVX-512, AVX2 or SSE2.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

namespace mmfast {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));

constexpr int kLanes = 16;

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }
inline f32x16 splat16(float x) { return f32x16{} + x; }
// Lane-wise mask ? a : b for comparison masks (all ones or all zeros per lane). Written with bit
// operations because GCC lowers the vector ?: operator lane by lane, with branches.
inline f32x16 select16(i32x16 mask, f32x16 a, f32x16 b) {
  return std::bit_cast<f32x16>((mask & std::bit_cast<i32x16>(a)) | (~mask & std::bit_cast<i32x16>(b)));
}
inline f32x16 max16(f32x16 a, f32x16 b) { return select16(a > b, a, b); }
inline f32x16 min16(f32x16 a, f32x16 b) { return select16(a < b, a, b); }
inline float max_lane(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline f32x16 splat16(float x);
inline i32x16 splat16i(int32_t x) { return i32x16{} + x; }
inline i32x16 load16i(const int32_t* p) {
  i32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// Lane-wise a == b as a comparison mask, for non-negative a and b. GCC 12 lowers the vector == of
// integers lane by lane (a scalar compare and insert per lane, 3-4x slower kernels); a signed
// comparison compiles to one vector compare: a ^ b is 0 exactly when neither it nor its negation
// has the sign bit set.
inline i32x16 equal16i(i32x16 a, i32x16 b) {
  const i32x16 diff = a ^ b;
  return (diff | -diff) >= 0;
}

// Accumulates float lanes in double: two 8-lane halves, so both stay in registers.
struct DoubleSum16 {
  f64x8 lo{}, hi{};
  inline void add(f32x16 v) {
    lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), f64x8);
    hi += __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), f64x8);
  }
  inline double total() const {
    double s = 0.0;
    for (int i = 0; i < 8; ++i) s += lo[i] + hi[i];
    return s;
  }
};

// exp(x) for float or f32x16 with about 1 ulp error (Cody-Waite reduction, Cephes polynomial).
// Inputs below -87.33, including -inf (our "masked" logit), give exactly 0; NaN stays NaN.
// Rounding uses the 1.5·2^23 trick, which needs no floor instruction and yields the integer in the
// low mantissa bits.
// always_inline: called from target_clones copies, a 64-byte vector argument must never cross a call
// into the default-target copy of this function (its ABI passes vectors differently).
template <typename V, typename I>
__attribute__((always_inline)) inline V exp_flush(V x) {
  const V hi = V{} + 88.37626f, lo = V{} + -87.33654f;
  // NaN compares false both ways, so it passes through the clamps and stays NaN.
  const V c = select16(x > hi, hi, select16(x < lo, lo, x));
  const V magic = V{} + 12582912.0f;
  const V t = c * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = c - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  const I exponent = (std::bit_cast<I>(t) - 0x4B400000 + 127) << 23;
  const V scaled = y * std::bit_cast<V>(exponent);
  return select16(x < lo, V{}, scaled);
}

__attribute__((always_inline)) inline f32x16 exp_flush(f32x16 x) { return exp_flush<f32x16, i32x16>(x); }
inline float exp_flush(float x) {
  // The scalar tail goes through lane 0 of the vector code, so tails and bodies round alike.
  return exp_flush<f32x16, i32x16>(splat16(x))[0];
}

// log(1 + e) for e in [0, 1], 16 lanes (the softplus of the sigmoid loss, csrc/sigmoid_loss.cpp), about
// 1 ulp: w = 1 + e rounds, so log(w) (Cephes logf's polynomial on w or w/2, whichever is nearer 1)
// is corrected by (e - (w - 1))/w, the first-order term of the rounding. `inv_w` is 1/w, which the
// caller also needs. A tiny e gives w = 1 and exactly e.
__attribute__((always_inline)) inline f32x16 log1p_unit(f32x16 e, f32x16 w, f32x16 inv_w) {
  const i32x16 big = w > 1.41421356f;
  const f32x16 k = select16(big, splat16(1.0f), f32x16{});
  const f32x16 x = select16(big, w * 0.5f, w) - 1.0f;
  const f32x16 z = x * x;
  f32x16 p = splat16(7.0376836292e-2f);
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  const f32x16 y = p * x * z + k * -2.12194440e-4f - 0.5f * z;
  return x + y + k * 0.693359375f + (e - (w - 1.0f)) * inv_w;
}

}  // namespace mmfast
