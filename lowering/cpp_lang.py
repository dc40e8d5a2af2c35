"""The C++/OpenMP flavour of the C-like renderer: storage types, pragmas and helpers."""

from __future__ import annotations

import torch

from .c_ops import CLanguage

CPP = CLanguage(
    storage={
        torch.float32: "float",
        torch.bfloat16: "uint16_t",
        torch.float16: "uint16_t",
        torch.int32: "int32_t",
        torch.int64: "int64_t",
        torch.int16: "int16_t",
        torch.int8: "int8_t",
        torch.uint8: "uint8_t",
        torch.bool: "bool",
    }
)

CPP_PRELUDE = r"""// yirage generated C++/OpenMP kernels
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
using std::exp; using std::exp2; using std::expm1; using std::log; using std::log1p;
using std::log2; using std::sqrt; using std::sin; using std::cos; using std::tan;
using std::tanh; using std::erf; using std::floor; using std::ceil; using std::trunc;
using std::nearbyint; using std::pow;

static inline float y_bf16_to_f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline uint16_t y_f_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  uint32_t u; std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (uint16_t)(u >> 16);
}
#if defined(__FLT16_MAX__)
static inline float y_f16_to_f(uint16_t v) { _Float16 h; std::memcpy(&h, &v, 2); return (float)h; }
static inline uint16_t y_f_to_f16(float f) { _Float16 h = (_Float16)f; uint16_t v; std::memcpy(&v, &h, 2); return v; }
#else
static inline float y_f16_to_f(uint16_t h) {
  uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
  if (e == 0) {
    if (m == 0) { u = s; } else {
      e = 113; while (!(m & 0x400)) { m <<= 1; --e; } m &= 0x3ff; u = s | (e << 23) | (m << 13);
    }
  } else if (e == 31) { u = s | 0x7f800000u | (m << 13); } else { u = s | ((e + 112) << 23) | (m << 13); }
  float f; std::memcpy(&f, &u, 4); return f;
}
static inline uint16_t y_f_to_f16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  uint32_t s = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00);
  if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00);
  if (a < 0x38800000u) {  // subnormal half
    float v; std::memcpy(&v, &a, 4); return (uint16_t)(s | (uint32_t)nearbyint(v * 16777216.0f));
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);
  return (uint16_t)(s | (r >> 13));
}
#endif
static inline float y_round_bf16(float f) { return y_bf16_to_f(y_f_to_bf16(f)); }
static inline float y_round_f16(float f) { return y_f16_to_f(y_f_to_f16(f)); }
template <class T> static inline T y_max(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a > b ? a : b)); }
template <class T> static inline T y_min(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a < b ? a : b)); }
template <class T> static inline T y_abs(T a) { return a < 0 ? -a : a; }
// exp, erf and tanh that GCC vectorises under `omp simd` (libm's are one call per element:
// an exact GELU over a [336, 1536] BERT activation ran at ~0.19 G elements/s). Plain float
// arithmetic and bit casts, with -fno-trapping-math (cpp_build's base flags) so the clamps'
// compares if-convert. exp: 2^n * e^r, n = nearest(x / ln2), Cephes' polynomial for e^r
// (~1 ulp); 2^n is built from exponent bits in two halves, so overflow gives inf and tiny
// results fall through the denormals to 0. NaN stays NaN (it flows through y).
static inline float y_exp(float x) {
  const float c = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  // nearest(c / ln2) by the 1.5 * 2^23 trick: the low mantissa bits of t hold n
  const float t = c * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  const int32_t ni = __builtin_bit_cast(int32_t, t) - 0x4B400000;
  const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t h = ni >> 1;
  return y * __builtin_bit_cast(float, (h + 127) << 23)
           * __builtin_bit_cast(float, (ni - h + 127) << 23);
}
// erf: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7 + rounding), the formula of ATen's own
// vectorised erf, so eager's CPU GELU rounds alike.
static inline float y_erf(float x) {
  const float a = x < 0 ? -x : x;
  const float t = 1.0f / (0.3275911f * a + 1.0f);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float e = 1.0f - r * t * y_exp(-a * a);
  return x < 0 ? -e : e;
}
// tanh: x + x^3 P(x^2) below |x| = 0.625 (Cephes), 1 - 2 / (exp(2|x|) + 1) above.
static inline float y_tanh(float x) {
  const float a = x < 0 ? -x : x;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float big = 1.0f - 2.0f / (y_exp(2.0f * a) + 1.0f);
  return a < 0.625f ? x + x * z * p : (x < 0 ? -big : big);
}
static inline int64_t y_floordiv(int64_t a, int64_t b) { int64_t q = a / b; return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q; }

// 16 floats as a compiler vector: AVX-512, AVX2 or NEON code from one source, without
// <immintrin.h> (~0.28 s of parse per build). Used by the hand-written kernels.
typedef float y_vf16 __attribute__((vector_size(64)));
typedef float y_vf8 __attribute__((vector_size(32)));
typedef float y_vf4 __attribute__((vector_size(16)));
static inline y_vf16 y_load16(const float* p) { y_vf16 v; std::memcpy(&v, p, 64); return v; }
static inline void y_store16(float* p, y_vf16 v) { std::memcpy(p, &v, 64); }
// Sum of the lanes, halving the width each step (as _mm512_reduce_add_ps); a lane-by-lane
// sum costs as much as a 576-long dot product.
static inline float y_hsum16(y_vf16 v) {
#if !defined(__clang__) && __GNUC__ < 12  // no __builtin_shufflevector
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#else
  const y_vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  y_vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b += __builtin_shufflevector(b, b, 2, 3, 0, 1);
  b += __builtin_shufflevector(b, b, 1, 0, 3, 2);
  return b[0];
#endif
}
"""
