// Row loops of the cpu distillation epilogue (see distill_rows_cpu.h). No torch headers here, so
// GCC vectorises the `omp simd` loops; every function that loops is compiled for AVX-512, AVX2+FMA
// and baseline x86-64 and picked at load time (function multi-versioning), as epilogue_cpu.cpp is.
//
// Per row (formulas/distill.py's chunk_epilogue, in float32 with double block sums):
//   lse_t = logsumexp(zt / T), lse_s = logsumexp(zs / T), lse_r = logsumexp(zs) (hard label, T != 1)
//   lt = zt / T - lse_t, ls = zs / T - lse_s; term = p_s f(r), pa = p_s a(r) per entry (log space)
//   div = sum term;  nll = lse_r - zs[y];  coef = s_d (pa - p_s sum pa) + s_h (softmax(zs) - onehot(y))
#include "distill_rows_cpu.h"

#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FDIV_NO_CLONES)
#define FDIV_DISTILL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FDIV_DISTILL_CLONES
#endif
// the row loops call these several times per entry: always inlined, or GCC keeps a call (and the
// loop scalar)
#define FDIV_INLINE inline __attribute__((always_inline))

namespace fdivk {
namespace {

constexpr int64_t kBlock = 512;  // entries per float partial sum (block sums are added in double)

FDIV_INLINE float as_float(int32_t i) { return __builtin_bit_cast(float, i); }
FDIV_INLINE int32_t as_bits(float f) { return __builtin_bit_cast(int32_t, f); }

// e^x over the whole float range: Cody-Waite reduction x = n ln2 + r (|r| <= ln2 / 2), Taylor
// polynomial to r^7, 2^n applied in two halves (n reaches 128 near the top); exactly 0 below -87.3
// (subnormals flushed), inf above 88.7, NaN kept.
FDIV_INLINE float vexp(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: rounds to the nearest integer
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f +
                  r * (8.33333377e-3f + r * (1.38888892e-3f + r * 1.98412701e-4f))))));
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  float out = p * as_float((half + 127) << 23) * as_float((ni - half + 127) << 23);
  out = x < -87.3f ? 0.0f : out;
  out = x > 88.7f ? INFINITY : out;
  return x != x ? x : out;
}

// e^x - 1: its Taylor series to x^9 for |x| < 1/2 (relative error < 3e-10), e^x - 1 above.
FDIV_INLINE float vexpm1(float x) {
  const float s = x * (1.0f + x * (0.5f + x * (1.66666672e-1f + x * (4.16666679e-2f + x * (8.33333377e-3f +
                  x * (1.38888892e-3f + x * (1.98412701e-4f + x * (2.48015876e-5f + x * 2.75573188e-6f))))))));
  return (x > -0.5f && x < 0.5f) ? s : vexp(x) - 1.0f;
}

// log x for a normal x > 0 (Cephes logf: x = m 2^e, m in [sqrt(1/2), sqrt(2)), a degree-9 polynomial).
FDIV_INLINE float vlog(float x) {
  const int32_t b = as_bits(x);
  float e = static_cast<float>(((b >> 23) & 0xff) - 126);
  float m = as_float((b & 0x007fffff) | 0x3f000000);  // [1/2, 1)
  const bool lo = m < 0.707106781f;
  e = lo ? e - 1.0f : e;
  m = lo ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  return m + y + 0.693359375f * e;
}

// log(1 + e) for e in [0, 1], with the rounding of 1 + e corrected.
FDIV_INLINE float vlog1p_unit(float e) {
  const float u = 1.0f + e;
  return vlog(u) - ((u - 1.0f) - e) / u;
}

FDIV_INLINE float absf(float x) { return x < 0.0f ? -x : x; }
FDIV_INLINE float maxf(float a, float b) { return a > b ? a : b; }

// p_s f(r) and p_s a(r) at finite lt, ls with pt = e^lt, ps = e^ls (formulas/distill.py's core_term
// and core_pa).
template <int F>
FDIV_INLINE void core(float lt, float ls, float pt, float ps, const DistillRowArgs& a, float& term, float& pa) {
  const float lr = lt - ls;
  if constexpr (F == 0) {  // kl
    term = pt * lr;
    pa = -pt;
  } else if constexpr (F == 1) {  // reverse_kl
    term = ps * -lr;
    pa = term;
  } else if constexpr (F == 2) {  // js
    const float u = lt + a.log_c, w = ls + a.log_1mc;
    const float lm = maxf(u, w) + vlog1p_unit(vexp(-absf(u - w)));
    term = a.c * pt * (lt - lm) + (1.0f - a.c) * ps * (ls - lm);
    pa = -(1.0f - a.c) * ps * (lm - ls);
  } else if constexpr (F == 3) {  // tv
    term = 0.5f * absf(pt - ps);
    pa = 0.5f * ps * (lr < 0.0f ? 1.0f : (lr > 0.0f ? -1.0f : 0.0f));
  } else if constexpr (F == 4) {  // squared_hellinger
    const float e = vexpm1(-0.5f * absf(lr));
    term = (lr > 0.0f ? pt : ps) * e * e;
    pa = -vexp(0.5f * (lt + ls));
  } else if constexpr (F == 5) {  // pearson
    const float e = vexpm1(-absf(lr));
    term = vexp(ls + 2.0f * maxf(lr, 0.0f)) * e * e;
    pa = -vexp(2.0f * lt - ls);
  } else if constexpr (F == 6) {  // neyman
    const float e = vexpm1(-absf(lr));
    term = vexp(lt + 2.0f * maxf(-lr, 0.0f)) * e * e;
    pa = 2.0f * vexp(2.0f * ls - lt);
  } else {  // alpha: term in the dual variables when swapped (a.ac = 1 - a), pa with a itself
    // the roles as weights (a select on the invariant a.swap stops GCC from vectorising)
    const float wl = a.swap ? 0.0f : 1.0f, ws = 1.0f - wl;
    const float a1 = wl * lt + ws * ls;
    const float p1 = wl * pt + ws * ps, q1 = wl * ps + ws * pt;
    const float l1 = (wl - ws) * lr, d = a.ac - 1.0f;
    const float k = p1 * l1 - p1 + q1;
    const float x = d * l1;
    const bool small = x <= 1.0f;
    const float xs = small ? x : 0.0f;
    const float g = small ? p1 * (vexpm1(xs) - xs) : vexp(a1 + x) - p1 * (1.0f + x);
    term = d == 0.0f ? k : (g / d + k) / a.ac;
    const float y = a.c * lr;
    const float ys = y <= 1.0f ? y : 0.0f;
    const float em = y <= 1.0f ? ps * vexpm1(ys) : vexp(ls + y) - ps;
    pa = a.c == 0.0f ? -ps * lr : -em / a.c;
  }
}

// p k with the limits' convention: inf (the divergence is infinite) when k is, else p k.
FDIV_INLINE float limit(float p, float k) { return k == INFINITY ? INFINITY : p * k; }

// no loop unswitching: GCC would split the loops on the invariant limits (f0, f_inf, a0 infinite or
// not) into versions it then leaves scalar
template <int F>
FDIV_DISTILL_CLONES __attribute__((optimize("no-unswitch-loops"))) void row_impl(float* __restrict zt, float* __restrict zs, int64_t V, int64_t y,
                                  const DistillRowArgs& args, bool coef, float coef_scale, float hard_scale, float* div,
                                  float* nll) {
  const DistillRowArgs a = args;  // a local copy: no store to zt/zs can alias it (the loops stay vector)
  const float it = a.inv_t;
  float mt = -INFINITY, ms = -INFINITY;
#pragma omp simd reduction(max : mt, ms)
  for (int64_t v = 0; v < V; ++v) {
    mt = zt[v] > mt ? zt[v] : mt;
    ms = zs[v] > ms ? zs[v] : ms;
  }
  if (mt == -INFINITY || ms == -INFINITY) {  // a whole vocabulary masked: undefined (the data check says so)
    *div = NAN;
    *nll = NAN;
    if (coef) {
      for (int64_t v = 0; v < V; ++v) zs[v] = 0.0f;
    }
    return;
  }
  int64_t im = 0;  // the student's argmax (its first), where the coefficient is formed without cancellation
  while (zs[im] != ms) ++im;
  const float mtz = mt * it, msz = ms * it;
  const bool raw = a.hard && it != 1.0f;
  double st = 0.0, ss = 0.0, sr = 0.0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float bt = 0.0f, bs = 0.0f;
#pragma omp simd reduction(+ : bt, bs)
    for (int64_t v = b0; v < b1; ++v) {
      bt += vexp(zt[v] * it - mtz);
      bs += vexp(zs[v] * it - msz);
    }
    st += bt;
    ss += bs;
    if (raw) {
      float br = 0.0f;
#pragma omp simd reduction(+ : br)
      for (int64_t v = b0; v < b1; ++v) br += vexp(zs[v] - ms);
      sr += br;
    }
  }
  const float lse_t = mtz + static_cast<float>(std::log(st));
  const float lse_s = msz + static_cast<float>(std::log(ss));
  const float lse_r = raw ? ms + static_cast<float>(std::log(sr)) : lse_s;
  *nll = a.hard ? lse_r - zs[y] : 0.0f;
  double dsum = 0.0, asum = 0.0, rest_s = 0.0, rest_a = 0.0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < V ? b0 + kBlock : V;
    float bd = 0.0f, ba = 0.0f, brs = 0.0f, bra = 0.0f;
#pragma omp simd reduction(+ : bd, ba, brs, bra)
    for (int64_t v = b0; v < b1; ++v) {
      const float lt = zt[v] * it - lse_t, ls = zs[v] * it - lse_s;
      const bool t0 = lt == -INFINITY, s0 = ls == -INFINITY;
      const float pt = vexp(lt), ps = vexp(ls);  // 0 at -inf
      float term, pa;
      core<F>(t0 ? 0.0f : lt, s0 ? 0.0f : ls, pt, ps, a, term, pa);
      term = t0 ? (s0 ? 0.0f : limit(ps, a.f0)) : (s0 ? limit(pt, a.f_inf) : term);
      pa = t0 ? (s0 ? 0.0f : limit(ps, a.a0)) : (s0 ? 0.0f : pa);
      bd += term;
      ba += pa;
      const bool rest = v != im;
      brs += rest ? ps : 0.0f;
      bra += rest ? pa : 0.0f;
      zt[v] = pa;  // the teacher's logits are spent: keep pa for the coefficient
    }
    dsum += bd;
    asum += ba;
    rest_s += brs;
    rest_a += bra;
  }
  *div = static_cast<float>(dsum);
  if (!coef) return;
  const float big_a = static_cast<float>(asum);
  const float z_m = zs[im];
  if (a.hard) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      zs[v] = coef_scale * (zt[v] - vexp(zs[v] * it - lse_s) * big_a) + hard_scale * vexp(zs[v] - lse_r);
    }
    zs[y] -= hard_scale;
  } else {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) zs[v] = coef_scale * (zt[v] - vexp(zs[v] * it - lse_s) * big_a);
  }
  // the argmax: pa_m S' - p_m A' (S', A' the sums without it), not pa_m - p_m A (formulas/distill.py,
  // dominant_safe)
  float c_m = coef_scale * (zt[im] * static_cast<float>(rest_s) -
                            vexp(z_m * it - lse_s) * static_cast<float>(rest_a));
  if (a.hard) c_m += hard_scale * (vexp(z_m - lse_r) - (im == y ? 1.0f : 0.0f));
  zs[im] = c_m;
}

}  // namespace

void distill_row(float* zt, float* zs, int64_t V, int64_t y, const DistillRowArgs& a, bool coef, float coef_scale,
                 float hard_scale, float* div, float* nll) {
  switch (a.form) {
    case 0: row_impl<0>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
    case 1: row_impl<1>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
    case 2: row_impl<2>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
    case 3: row_impl<3>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
    case 4: row_impl<4>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
    case 5: row_impl<5>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
    case 6: row_impl<6>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
    default: row_impl<7>(zt, zs, V, y, a, coef, coef_scale, hard_scale, div, nll); break;
  }
}

}  // namespace fdivk
