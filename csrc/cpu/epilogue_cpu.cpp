// Row epilogues of the CPU kernels (see epilogue_cpu.h). No torch headers here.
#include "epilogue_cpu.h"

#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FDIV_NO_CLONES)
#define FDIV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FDIV_CLONES
#endif

namespace fdivk {
namespace {

// ---------------------------------------------------------------------------------------------
// Branch-free exp / tanh that GCC auto-vectorises (omp simd); ~2 ulp for exp on [-87, 88].
// ---------------------------------------------------------------------------------------------

// __builtin_bit_cast (std::bit_cast without C++20; not memcpy into a local, which stops GCC from
// vectorising the loops that use it). torch < 2.13 builds extensions as C++17.
inline float bits_to_float(int32_t i) { return __builtin_bit_cast(float, i); }

inline int32_t float_to_bits(float f) { return __builtin_bit_cast(int32_t, f); }

// Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n by the
// exponent bits. Inputs are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for 0).
inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float kn = x * 1.44269504088896341f + magic;
  const float n = kn - magic;
  const int32_t ni = float_to_bits(kn) - float_to_bits(magic);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((ni + 127) << 23);
}

// Cephes tanhf: odd polynomial for |x| < 0.625, (1 - e) / (1 + e) with e = exp(-2|x|) above.
inline float tanh_f(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float s = x * x;
  float small = -5.70498872745e-3f;
  small = small * s + 2.06390887954e-2f;
  small = small * s - 5.37397155531e-2f;
  small = small * s + 1.33314422036e-1f;
  small = small * s - 3.33332819422e-1f;
  small = small * s * x + x;
  const float e = exp_f(-2.0f * ax);
  float big = (1.0f - e) / (1.0f + e);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

}  // namespace

// z = cap(raw) / T in place over one row segment; returns max z. The one definition of the
// transform: the forward and the two-pass backward both call it, so the backward's z has the
// forward's bits exactly (p = exp(z - lse) <= 1). Not inlined: a caller's expression must not be
// contracted with it (GCC fuses `raw * inv_t - lse` into one FMA, whose rounding differs).
FDIV_CLONES __attribute__((noinline)) float transform_segment(float* __restrict z, int64_t n, const Transform& tf) {
  float m = -INFINITY;
  if (tf.has_cap) {
    const float scale = tf.cap * tf.inv_t;
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < n; ++v) {
      const float zv = scale * tanh_f(z[v] * tf.inv_cap);
      z[v] = zv;
      m = zv > m ? zv : m;
    }
  } else if (tf.inv_t != 1.0f) {
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < n; ++v) {
      const float zv = z[v] * tf.inv_t;
      z[v] = zv;
      m = zv > m ? zv : m;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < n; ++v) m = z[v] > m ? z[v] : m;
  }
  return m;
}

// Transforms one row segment of raw logits in place (z = cap(raw) / T) and returns its state.
FDIV_CLONES Online forward_segment(float* __restrict z, int64_t n, const Transform& tf) {
  const float m = transform_segment(z, n, tf);
  if (m == -INFINITY) {  // a segment of only -inf (masked tokens) adds nothing; NaN still propagates
    for (int64_t v = 0; v < n; ++v) {
      if (z[v] != z[v]) return Online{z[v], z[v], z[v]};
    }
    return Online();
  }
  float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
  for (int64_t v = 0; v < n; ++v) {
    const float d0 = z[v] - m;
    // exp underflows below -87: 0 exactly, and the clamped d keeps -inf logits (masked tokens)
    // from giving 0 * -inf
    const float d = d0 < -87.0f ? -87.0f : d0;
    const float e_ev = exp_f(d);  // unconditional: vectorises (no trap)
      const float ev = d0 < -87.0f ? 0.0f : e_ev;
    s += ev;
    t += ev * d;
  }
  Online o;
  o.m = m;
  o.s = s;
  o.t = t;
  return o;
}

// Overwrites one row segment of raw logits with dL/draw. a = k - g, e = dL/dent,
// mean_z = lse - ent; y = the label's column within the segment, or -1 when it lies elsewhere.
// z is recomputed by the forward's own transform (same bits), then treated as the one-pass
// coefficient does.
FDIV_CLONES void backward_segment(float* __restrict c, int64_t V, int64_t y, const Transform& tf, float lse,
                                  float g, float a, float e, float mean_z) {
  transform_segment(c, V, tf);
  coef_segment(c, V, y, tf, lse, g, a, e, mean_z);
}

// One-pass variant: the row segment holds z = cap(raw) / T as stored by forward_segment (the
// very values the forward reduced, so p = exp(z - lse) <= 1 exactly); overwrites it with dL/draw.
// inv_scale = T / c recovers tanh(raw / c) = z T / c for the soft-cap derivative.
FDIV_CLONES void coef_segment(float* __restrict c, int64_t V, int64_t y, const Transform& tf, float lse, float g,
                              float a, float e, float mean_z) {
  const float inv_scale = tf.has_cap ? 1.0f / (tf.cap * tf.inv_t) : 0.0f;
  float d_y = tf.inv_t;
  const float z_y = y >= 0 ? c[y] : 0.0f;  // the label's z, before the row is overwritten
  if (y >= 0 && tf.has_cap) {
    const float th = z_y * inv_scale;
    d_y = (1.0f - th * th) * tf.inv_t;
  }
  if (tf.has_cap) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float z = c[v];
      const float d1 = z - lse;
      const float d0 = d1 > 0.0f ? 0.0f : d1;  // p <= 1 (a select, not fminf: fminf does not vectorise; NaN kept)
      const float e_p = exp_f(d0);  // unconditional: vectorises (no trap)
      const float p = d0 < -87.0f ? 0.0f : e_p;
      const float th = z * inv_scale;
      c[v] = (1.0f - th * th) * tf.inv_t * p * (a - e * (z - mean_z));
    }
  } else {
    const float inv_t = tf.inv_t;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float d1 = c[v] - lse;
      const float d0 = d1 > 0.0f ? 0.0f : d1;  // p <= 1 (a select, not fminf: fminf does not vectorise; NaN kept)
      const float d = d0 < -87.0f ? -87.0f : d0;  // p = 0 there; d stays finite for z = -inf
      const float e_p = exp_f(d);  // unconditional: vectorises (no trap)
      const float p = d0 < -87.0f ? 0.0f : e_p;
      c[v] = inv_t * p * (a - e * (d + lse - mean_z));
    }
  }
  if (y >= 0) {
    // the label's dL/dz = p (a - e (z - mean_z)) + g first, then its transform derivative, as the
    // other backends order it: with p = 1 and k = 0 the two terms cancel to 0 exactly (adding
    // d_y g to the scaled term left an FMA's rounding residual, eps |g| / T, where it should be 0)
    const float d1 = z_y - lse;
    const float d0 = d1 > 0.0f ? 0.0f : d1;
    const float d = d0 < -87.0f ? -87.0f : d0;
    const float p = d0 < -87.0f ? 0.0f : exp_f(d);
    const float zc = tf.has_cap ? z_y : d + lse;
    c[y] = d_y * (p * (a - e * (zc - mean_z)) + g);
  }
}

FDIV_CLONES void exp_array(const float* __restrict x, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_f(x[i]);
}

FDIV_CLONES void tanh_array(const float* __restrict x, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = tanh_f(x[i]);
}

}  // namespace fdivk
