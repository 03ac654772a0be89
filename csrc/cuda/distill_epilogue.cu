// CUDA distillation epilogue (fdiv_kernels.distill_loss): one block per row of a chunk's float32
// logits, three passes over the row (the math: fdiv_kernels/formulas/distill.py, chunk_epilogue;
// the same passes as csrc/cpu/distill_rows_cpu.cpp and the Triton kernel):
//   1. online log-sum-exps of zt / T, zs / T (and zs, for the hard label at T != 1), block-merged;
//   2. per entry lt, ls, term = p_s f(r), pa = p_s a(r) (log space; the limits where a logit is
//      -inf), the row sums div and A; pa stored over zt;
//   3. (wt) coef = s_d (pa - p_s A) + s_h (softmax(zs) - onehot(y)) over zs; at the student's
//      argmax pa_m S' - p_m A' with the sums S', A' without it (no cancellation).
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "distill_launchers.h"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

__device__ __forceinline__ void online(float& m, float& s, float z) {
  if (z == -INFINITY) return;  // a masked column adds exact zeros
  if (z > m) {
    s = s * expf(m - z) + 1.0f;
    m = z;
  } else {
    s += expf(z - m);
  }
}

// logsumexp of the block's per-thread (m, s) (every thread gets it; -inf for an all -inf row)
__device__ float block_lse(float m, float s, float* sm, float* ss) {
  sm[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      float a = sm[threadIdx.x], b = ss[threadIdx.x];
      merge(a, b, sm[threadIdx.x + w], ss[threadIdx.x + w]);
      sm[threadIdx.x] = a;
      ss[threadIdx.x] = b;
    }
    __syncthreads();
  }
  const float out = sm[0] == -INFINITY ? -INFINITY : sm[0] + logf(ss[0]);
  __syncthreads();
  return out;
}

__device__ float block_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  const float out = sh[0];
  __syncthreads();
  return out;
}

// p_s f(r) and p_s a(r) at finite lt, ls (pt = e^lt, ps = e^ls)
template <int F>
__device__ __forceinline__ void core(float lt, float ls, float pt, float ps, const FdivDistillArgs& a, float& term,
                                     float& pa) {
  const float lr = lt - ls;
  if (F == 0) {  // kl
    term = pt * lr;
    pa = -pt;
  } else if (F == 1) {  // reverse_kl
    term = -ps * lr;
    pa = term;
  } else if (F == 2) {  // js
    const float u = lt + a.log_c, w = ls + a.log_1mc;
    const float lm = fmaxf(u, w) + log1pf(expf(-fabsf(u - w)));
    term = a.c * pt * (lt - lm) + (1.0f - a.c) * ps * (ls - lm);
    pa = -(1.0f - a.c) * ps * (lm - ls);
  } else if (F == 3) {  // tv
    term = 0.5f * fabsf(pt - ps);
    pa = 0.5f * ps * (lr < 0.0f ? 1.0f : (lr > 0.0f ? -1.0f : 0.0f));
  } else if (F == 4) {  // squared_hellinger
    const float e = expm1f(-0.5f * fabsf(lr));
    term = (lr > 0.0f ? pt : ps) * e * e;
    pa = -expf(0.5f * (lt + ls));
  } else if (F == 5) {  // pearson
    const float e = expm1f(-fabsf(lr));
    term = expf(ls + 2.0f * fmaxf(lr, 0.0f)) * e * e;
    pa = -expf(2.0f * lt - ls);
  } else if (F == 6) {  // neyman
    const float e = expm1f(-fabsf(lr));
    term = expf(lt + 2.0f * fmaxf(-lr, 0.0f)) * e * e;
    pa = 2.0f * expf(2.0f * ls - lt);
  } else {  // alpha: the term in the dual variables when swapped (ac = 1 - a), pa with a itself
    const float wl = 1.0f - a.swap, ws = a.swap;
    const float a1 = wl * lt + ws * ls, p1 = wl * pt + ws * ps, q1 = wl * ps + ws * pt;
    const float l1 = (wl - ws) * lr, d = a.ac - 1.0f;
    const float k = p1 * l1 - p1 + q1;
    const float x = d * l1;
    const float g = x <= 1.0f ? p1 * (expm1f(x) - x) : expf(a1 + x) - p1 * (1.0f + x);
    term = d == 0.0f ? k : (g / d + k) / a.ac;
    const float y = a.c * lr;
    const float em = y <= 1.0f ? ps * expm1f(y) : expf(ls + y) - ps;
    pa = a.c == 0.0f ? -ps * lr : -em / a.c;
  }
}

__device__ __forceinline__ float limit(float p, float k, int k_inf) { return k_inf ? INFINITY : p * k; }

template <int F>
__global__ void distill_kernel(float* __restrict__ zt, float* __restrict__ zs, const int64_t* __restrict__ labels,
                               const float* __restrict__ wt, float* __restrict__ div, float* __restrict__ nll,
                               int64_t V, FdivDistillArgs a) {
  __shared__ float sm[kThreads], ss[kThreads];
  const int64_t row = blockIdx.x;
  float* rt = zt + row * V;
  float* rs = zs + row * V;
  const float it = a.inv_t;
  __shared__ float smax[kThreads];
  __shared__ int64_t sarg[kThreads];
  float mt = -INFINITY, st = 0.0f, ms = -INFINITY, s_s = 0.0f, mr = -INFINITY, sr = 0.0f;
  float zmax = -INFINITY;
  int64_t arg = V;  // this thread's first column of its max of zs
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    online(mt, st, rt[v] * it);
    online(ms, s_s, rs[v] * it);
    if (a.raw) online(mr, sr, rs[v]);
    if (rs[v] > zmax) {
      zmax = rs[v];
      arg = v;
    }
  }
  // the student's argmax (its first column): where the coefficient is formed without cancellation
  smax[threadIdx.x] = zmax;
  sarg[threadIdx.x] = arg;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      const float o = smax[threadIdx.x + w];
      const int64_t oa = sarg[threadIdx.x + w];
      if (o > smax[threadIdx.x] || (o == smax[threadIdx.x] && oa < sarg[threadIdx.x])) {
        smax[threadIdx.x] = o;
        sarg[threadIdx.x] = oa;
      }
    }
    __syncthreads();
  }
  const int64_t im = sarg[0];
  __syncthreads();
  const float lse_t = block_lse(mt, st, sm, ss);
  const float lse_s = block_lse(ms, s_s, sm, ss);
  const float lse_r = a.raw ? block_lse(mr, sr, sm, ss) : lse_s;
  const bool bad = lse_t == -INFINITY || lse_s == -INFINITY;  // a whole vocabulary masked: undefined
  const int64_t y = labels[row];
  float dsum = 0.0f, asum = 0.0f, rest_s = 0.0f, rest_a = 0.0f;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float lt = rt[v] * it - lse_t, ls = rs[v] * it - lse_s;
    const bool t0 = lt == -INFINITY, s0 = ls == -INFINITY;
    const float ltf = t0 ? 0.0f : lt, lsf = s0 ? 0.0f : ls;
    const float pt = t0 ? 0.0f : expf(ltf), ps = s0 ? 0.0f : expf(lsf);
    float term, pa;
    core<F>(ltf, lsf, pt, ps, a, term, pa);
    term = t0 ? (s0 ? 0.0f : limit(ps, a.f0, a.f0_inf)) : (s0 ? limit(pt, a.f_inf, a.f_inf_inf) : term);
    pa = t0 ? (s0 ? 0.0f : limit(ps, a.a0, a.a0_inf)) : (s0 ? 0.0f : pa);
    dsum += term;
    asum += pa;
    if (v != im) {
      rest_s += ps;
      rest_a += pa;
    }
    rt[v] = pa;  // the teacher's logits are spent: keep pa for the coefficient
  }
  const float d = block_sum(dsum, sm);
  const float big_a = block_sum(asum, ss);
  const float big_rs = block_sum(rest_s, sm);
  const float big_ra = block_sum(rest_a, ss);
  if (threadIdx.x == 0) {
    div[row] = bad ? NAN : d;
    nll[row] = bad ? NAN : (a.hard ? lse_r - rs[y] : 0.0f);
  }
  if (wt == nullptr) return;
  __syncthreads();  // nll read rs[y] before it is overwritten
  const float sd = wt[row] * a.div_scale, sh = wt[row] * a.hard_weight;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float z = rs[v];
    const float ls = z * it - lse_s;
    const float ps = ls == -INFINITY ? 0.0f : expf(ls);
    // at the argmax pa_m S' - p_m A' (the sums without it), not pa_m - p_m A: no cancellation
    // (fdiv_kernels/formulas/distill.py, dominant_safe)
    float c = sd * (v == im ? rt[v] * big_rs - ps * big_ra : rt[v] - ps * big_a);
    if (a.hard) {
      const float zr = z - lse_r;
      c += sh * ((zr == -INFINITY ? 0.0f : expf(zr)) - (v == y ? 1.0f : 0.0f));
    }
    rs[v] = bad ? 0.0f : c;
  }
}

}  // namespace

extern "C" int fdiv_cuda_distill_epilogue(float* zt, float* zs, const int64_t* labels, const float* wt, float* div,
                                          float* nll, int64_t rows, int64_t V, FdivDistillArgs args, void* stream) {
  if (rows == 0) return 0;
  const dim3 grid(static_cast<unsigned>(rows)), block(kThreads);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.form) {
    case 0: distill_kernel<0><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
    case 1: distill_kernel<1><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
    case 2: distill_kernel<2><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
    case 3: distill_kernel<3><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
    case 4: distill_kernel<4><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
    case 5: distill_kernel<5><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
    case 6: distill_kernel<6><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
    default: distill_kernel<7><<<grid, block, 0, s>>>(zt, zs, labels, wt, div, nll, V, args); break;
  }
  return static_cast<int>(cudaGetLastError());
}
