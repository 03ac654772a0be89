// Row epilogues of the CPU kernels (see epilogue_cpu.h). No torch headers here.
#include "epilogue_cpu.h"

#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FDIV_X86_GATHER 1
#endif

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

// float32 -> bfloat16 bits, round to nearest even; a NaN stays a (quiet) NaN, as c10::BFloat16.
inline uint16_t to_bf16_bits(float f) {
  const uint32_t u = static_cast<uint32_t>(float_to_bits(f));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

template <typename S, typename D, typename F>
inline void transpose_blocks(const S* __restrict src, int64_t rows, int64_t cols, int64_t lds, D* __restrict dst,
                             int64_t ldd, F conv) {
  constexpr int64_t B = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += B) {
    const int64_t r1 = r0 + B < rows ? r0 + B : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t c1 = c0 + B < cols ? c0 + B : cols;
      for (int64_t c = c0; c < c1; ++c) {
        D* out = dst + c * ldd;
        for (int64_t r = r0; r < r1; ++r) out[r] = conv(src[r * lds + c]);
      }
    }
  }
}

#ifdef FDIV_X86_GATHER
bool has_avx512f() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

// 16 rows of a 32-bit matrix, transposed: dst[c * ldd + i] = src[i * lds + c] (i < 16, c < cols),
// one 16-lane gather per column (the 16 source rows stay in L1 across consecutive columns).
__attribute__((target("avx512f"))) void gather_rows16_u32(const uint32_t* src, int64_t cols, int64_t lds,
                                                         uint32_t* dst, int64_t ldd) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(lds)));
  for (int64_t c = 0; c < cols; ++c) {
    _mm512_storeu_si512(dst + c * ldd, _mm512_i32gather_epi32(idx, src + c, 4));
  }
}

// the same for float32 -> bf16 (round to nearest even, NaN -> 0x7FC0, as to_bf16_bits)
__attribute__((target("avx512f"))) void gather_rows16_to_bf16(const float* src, int64_t cols, int64_t lds,
                                                             uint16_t* dst, int64_t ldd) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(lds)));
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), qnan = _mm512_set1_epi32(0x7FC0);
  for (int64_t c = 0; c < cols; ++c) {
    const __m512 x = _mm512_i32gather_ps(idx, src + c, 4);
    const __m512i u = _mm512_castps_si512(x);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias),
                                                   _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * ldd), _mm512_cvtepi32_epi16(r));
  }
}
#define FDIV_GATHER(f) (has_avx512f() ? &f : nullptr)
#else
#define FDIV_GATHER(f) nullptr
#endif

// transpose_blocks, the full 16-row blocks by gather16 (an AVX-512 kernel) when it is not null
template <typename S, typename D, typename F>
inline void transpose_gathered(const S* src, int64_t rows, int64_t cols, int64_t lds, D* dst, int64_t ldd, F conv,
                               void (*gather16)(const S*, int64_t, int64_t, D*, int64_t)) {
  int64_t r0 = 0;
  if (gather16 != nullptr) {
    for (; r0 + 16 <= rows; r0 += 16) gather16(src + r0 * lds, cols, lds, dst + r0, ldd);
  }
  transpose_blocks(src + r0 * lds, rows - r0, cols, lds, dst + r0, ldd, conv);
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

FDIV_CLONES void add_row(float* __restrict z, const float* __restrict b, int64_t n) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) z[v] += b[v];
}

FDIV_CLONES void coef_to_bf16(const float* __restrict c, int64_t cols, int64_t r0, int64_t r1, int64_t n_rows,
                              uint16_t* __restrict rm, int64_t ld_rm, uint16_t* __restrict vnni, float vnni_scale) {
  for (int64_t r = r0; r < r1; r += 2) {
    const float* a = c + r * cols;
    const bool pair = r + 1 < n_rows;
    const float* b = pair ? a + cols : a;  // no partner: b is read but its slots are set to 0
    uint16_t* ra = rm + r * ld_rm;
    uint16_t* rb = ra + ld_rm;
    uint16_t* vp = vnni + (r / 2) * cols * 2;
    const uint16_t keep_b = pair ? 0xFFFFu : 0u;
#pragma omp simd
    for (int64_t v = 0; v < cols; ++v) {
      ra[v] = to_bf16_bits(a[v]);
      vp[2 * v] = to_bf16_bits(a[v] * vnni_scale);
      vp[2 * v + 1] = static_cast<uint16_t>(to_bf16_bits(b[v] * vnni_scale) & keep_b);
    }
    for (int64_t v = cols; v < ld_rm; ++v) ra[v] = 0;
    if (pair) {
#pragma omp simd
      for (int64_t v = 0; v < cols; ++v) rb[v] = to_bf16_bits(b[v]);
      for (int64_t v = cols; v < ld_rm; ++v) rb[v] = 0;
    }
  }
}

FDIV_CLONES void transpose_u16(const uint16_t* src, int64_t rows, int64_t cols, int64_t lds, uint16_t* dst,
                               int64_t ldd) {
  transpose_blocks(src, rows, cols, lds, dst, ldd, [](uint16_t x) { return x; });
}

FDIV_CLONES void transpose_u32(const uint32_t* src, int64_t rows, int64_t cols, int64_t lds, uint32_t* dst,
                               int64_t ldd) {
  transpose_gathered(src, rows, cols, lds, dst, ldd, [](uint32_t x) { return x; }, FDIV_GATHER(gather_rows16_u32));
}

FDIV_CLONES void transpose_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t lds, uint16_t* dst,
                                   int64_t ldd) {
  transpose_gathered(src, rows, cols, lds, dst, ldd, [](float x) { return to_bf16_bits(x); },
                     FDIV_GATHER(gather_rows16_to_bf16));
}

FDIV_CLONES void interleave_u16(const uint16_t* __restrict a, const uint16_t* __restrict b, int64_t n,
                                uint16_t* __restrict out) {
  if (b == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      out[2 * i] = a[i];
      out[2 * i + 1] = 0;
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[2 * i] = a[i];
    out[2 * i + 1] = b[i];
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
