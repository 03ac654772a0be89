// CPU kernels of the fused LM-head primitive. The [N, V] logits are visited in tiles of
// [rows, cols] (a block of token rows x a slice of the vocabulary, rows * cols <= chunk_elements):
// one GEMM per tile through ATen (MKL/OpenBLAS) into a reused float32 buffer, then a fused
// epilogue per row segment, rows in parallel with at::parallel_for. Only one tile is ever alive.
//
// Forward (per row, online over the vocabulary tiles):
//   segment: z = cap(raw) / T in place, m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m)
//   merged across tiles by rescaling to the common max; at the end
//   lse = m + log s,  logp = z[y] - lse,  ent = log s - t / s   (= lse - sum p z, no cancellation)
// Backward (per row segment, one pass, in place): with d = dz/draw = (1 - tanh^2) / T (or 1 / T)
//   coef = d * (p (k - g) - e p (z - (lse - ent))),  coef[y] += d[y] g,   p = exp(z - lse)
// then grad_hidden[block] += coef @ W[tile] and grad_weight[tile] += coef^T @ h[block] on the same
// recomputed tile, and grad_bias[tile] += sum_rows coef.
//
// See docs/building.md for the build and the design notes.

#include "token_stats_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

// Row epilogues are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time
// (GCC function multi-versioning), so one build runs everywhere and uses wide vectors.
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

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

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

struct Transform {
  bool has_cap;
  float cap;      // c
  float inv_cap;  // 1 / c
  float inv_t;    // 1 / T
};

// ---------------------------------------------------------------------------------------------
// Row epilogues
// ---------------------------------------------------------------------------------------------

// Online softmax state of one row over the vocabulary tiles seen so far:
// m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m).
struct Online {
  float m = -INFINITY, s = 0.0f, t = 0.0f;
};

inline void merge_into(Online& acc, const Online& o) {
  if (o.s == 0.0f) return;
  if (acc.s == 0.0f) {
    acc = o;
    return;
  }
  const float m = acc.m > o.m ? acc.m : o.m;
  const float ea = std::exp(acc.m - m), eo = std::exp(o.m - m);
  acc.t = ea * (acc.t + (acc.m - m) * acc.s) + eo * (o.t + (o.m - m) * o.s);
  acc.s = ea * acc.s + eo * o.s;
  acc.m = m;
}

// Transforms one row segment of raw logits in place (z = cap(raw) / T) and returns its state.
FDIV_CLONES Online forward_segment(float* __restrict z, int64_t n, const Transform& tf) {
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
    const float ev = d0 < -87.0f ? 0.0f : exp_f(d);
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
FDIV_CLONES void backward_segment(float* __restrict c, int64_t V, int64_t y, const Transform& tf, float lse,
                                  float g, float a, float e, float mean_z) {
  // derivative of the transform at the label, before the row is overwritten
  float d_y = tf.inv_t;
  if (y >= 0 && tf.has_cap) {
    const float th = tanh_f(c[y] * tf.inv_cap);
    d_y = (1.0f - th * th) * tf.inv_t;
  }
  if (tf.has_cap) {
    const float scale = tf.cap * tf.inv_t;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float th = tanh_f(c[v] * tf.inv_cap);
      const float d0 = scale * th - lse;
      const float d = d0 < -87.0f ? -87.0f : d0;
      const float p = d0 < -87.0f ? 0.0f : exp_f(d);
      c[v] = (1.0f - th * th) * tf.inv_t * p * (a - e * (d + lse - mean_z));
    }
  } else {
    const float inv_t = tf.inv_t;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float d0 = c[v] * inv_t - lse;
      const float d = d0 < -87.0f ? -87.0f : d0;  // p = 0 there; d stays finite for z = -inf
      const float p = d0 < -87.0f ? 0.0f : exp_f(d);
      c[v] = inv_t * p * (a - e * (d + lse - mean_z));
    }
  }
  if (y >= 0) c[y] += d_y * g;
}

// ---------------------------------------------------------------------------------------------
// Input checks and helpers
// ---------------------------------------------------------------------------------------------

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& labels, double softcap, double temperature, int64_t chunk_elements) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
              "fdiv cpu backend: tensors must be on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fdiv cpu backend: expected hidden [N, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "fdiv cpu backend: hidden must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "fdiv cpu backend: hidden and weight must share a dtype, got ", dt,
              " and ", weight.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong,
              "fdiv cpu backend: labels must be int64 [N] with N = hidden.size(0), got ", labels.scalar_type(), " ",
              labels.sizes());
  TORCH_CHECK(weight.size(0) > 0, "fdiv cpu backend: the vocabulary is empty");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fdiv cpu backend: bias must be [V], got ",
                bias->sizes());
  }
  TORCH_CHECK(temperature > 0, "fdiv cpu backend: temperature must be > 0, got ", temperature);
  TORCH_CHECK(chunk_elements >= 1, "fdiv cpu backend: chunk_elements must be >= 1, got ", chunk_elements);
  (void)softcap;
}

Transform make_transform(double softcap, double temperature) {
  Transform tf;
  tf.has_cap = softcap > 0;
  tf.cap = tf.has_cap ? static_cast<float>(softcap) : 1.0f;
  tf.inv_cap = tf.has_cap ? static_cast<float>(1.0 / softcap) : 1.0f;
  tf.inv_t = static_cast<float>(1.0 / temperature);
  return tf;
}

std::optional<at::Tensor> f32_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  return bias->to(at::kFloat).contiguous();
}

// Tile sizes: a [rows, cols] float32 logits tile with rows * cols <= chunk_elements. Square-ish
// tiles minimise memory traffic: every token block streams the weight (and read-modify-writes
// grad_weight) once, every vocabulary tile streams the hidden block (and grad_hidden) once, so
// traffic ~ N V H (1/rows + 1/cols); rows = cols = sqrt(chunk) when the problem allows.
struct Tiling {
  int64_t rows, cols;
};

Tiling pick_tiling(int64_t N, int64_t V, int64_t chunk_elements) {
  int64_t side = 1;
  while ((side * 2) * (side * 2) <= chunk_elements) side *= 2;
  Tiling t;
  t.rows = std::max<int64_t>(1, std::min(N, side));
  t.cols = std::max<int64_t>(1, std::min(V, chunk_elements / t.rows));
  // spare budget (narrow vocabulary) goes to more rows
  t.rows = std::max<int64_t>(1, std::min(N, std::max(t.rows, chunk_elements / t.cols)));
  return t;
}

// raw logits of one tile: h_blk [rows, H] x W[v0 : v0 + cols]^T (+ bias) into buf, as [rows, cols]
at::Tensor tile_logits(at::Tensor& buf, const at::Tensor& h_blk, const at::Tensor& w_tile,
                       const std::optional<at::Tensor>& b, int64_t v0) {
  const int64_t rows = h_blk.size(0), cols = w_tile.size(0);
  at::Tensor out = buf.narrow(0, 0, rows * cols).view({rows, cols});
  if (b.has_value()) {
    at::addmm_out(out, b->narrow(0, v0, cols), h_blk, w_tile.t());
  } else {
    at::mm_out(out, h_blk, w_tile.t());
  }
  return out;
}

}  // namespace

// -------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& labels, double softcap,
                                                           double temperature, bool return_entropy,
                                                           int64_t chunk_elements) {
  check_inputs(hidden, weight, bias, labels, softcap, temperature, chunk_elements);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  at::Tensor ent = return_entropy ? at::empty({N}, f32) : at::Tensor();
  if (N == 0) return {logp, lse, ent};

  const bool f32_in = weight.scalar_type() == at::kFloat;
  const auto b = f32_bias(bias);
  const at::Tensor y = labels.contiguous();
  const Transform tf = make_transform(softcap, temperature);
  const Tiling tl = pick_tiling(N, V, chunk_elements);
  at::Tensor buf = at::empty({tl.rows * tl.cols}, f32);
  std::vector<Online> state(tl.rows);
  std::vector<float> z_label(tl.rows);

  const int64_t* yp = y.data_ptr<int64_t>();
  float* logp_p = logp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = return_entropy ? ent.data_ptr<float>() : nullptr;

  for (int64_t s = 0; s < N; s += tl.rows) {
    const int64_t rows = std::min(tl.rows, N - s);
    const at::Tensor h = hidden.narrow(0, s, rows).to(at::kFloat).contiguous();
    std::fill(state.begin(), state.end(), Online());
    for (int64_t v0 = 0; v0 < V; v0 += tl.cols) {
      const int64_t cols = std::min(tl.cols, V - v0);
      const at::Tensor w_tile = f32_in ? weight.narrow(0, v0, cols) : weight.narrow(0, v0, cols).to(at::kFloat);
      at::Tensor z = tile_logits(buf, h, w_tile, b, v0);
      float* zp = z.data_ptr<float>();
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float* row = zp + r * cols;
          merge_into(state[r], forward_segment(row, cols, tf));
          const int64_t yl = yp[s + r] - v0;
          if (yl >= 0 && yl < cols) z_label[r] = row[yl];
        }
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      const Online& st = state[r];
      const float log_s = std::log(st.s);
      const float l = st.m + log_s;
      lse_p[s + r] = l;
      logp_p[s + r] = z_label[r] - l;
      if (ent_p != nullptr) ent_p[s + r] = log_s - st.t / st.s;
    }
  }
  return {logp, lse, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const at::Tensor& grad_logp, const at::Tensor& grad_lse, const std::optional<at::Tensor>& grad_entropy,
    double softcap, double temperature, int64_t chunk_elements) {
  check_inputs(hidden, weight, bias, labels, softcap, temperature, chunk_elements);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const bool has_e = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_e || (entropy.has_value() && entropy->defined()),
              "fdiv cpu backend: grad_entropy needs the forward's entropy");
  for (const at::Tensor* t : {&lse, &grad_logp, &grad_lse}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N, "fdiv cpu backend: per-row tensors must be [N], got ", t->sizes());
  }
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool has_bias = bias.has_value() && bias->defined();
  if (N == 0) {
    return {at::zeros({N, H}, f32), at::zeros({V, H}, f32), has_bias ? at::zeros({V}, f32) : at::Tensor()};
  }
  // every element is written by the first tile that reaches it (mm_out), later tiles accumulate
  at::Tensor grad_h = at::empty({N, H}, f32);
  at::Tensor grad_w = at::empty({V, H}, f32);
  at::Tensor grad_b = has_bias ? at::zeros({V}, f32) : at::Tensor();

  const bool f32_in = weight.scalar_type() == at::kFloat;
  const auto b = f32_bias(bias);
  const at::Tensor y = labels.contiguous();
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  const at::Tensor g_c = grad_logp.to(at::kFloat).contiguous();
  const at::Tensor k_c = grad_lse.to(at::kFloat).contiguous();
  at::Tensor e_c, ent_c;
  if (has_e) {
    e_c = grad_entropy->to(at::kFloat).contiguous();
    ent_c = entropy->to(at::kFloat).contiguous();
    TORCH_CHECK(e_c.numel() == N && ent_c.numel() == N, "fdiv cpu backend: entropy tensors must be [N]");
  }
  const Transform tf = make_transform(softcap, temperature);
  const Tiling tl = pick_tiling(N, V, chunk_elements);
  at::Tensor buf = at::empty({tl.rows * tl.cols}, f32);

  const int64_t* yp = y.data_ptr<int64_t>();
  const float* lse_p = lse_c.data_ptr<float>();
  const float* g_p = g_c.data_ptr<float>();
  const float* k_p = k_c.data_ptr<float>();
  const float* e_p = has_e ? e_c.data_ptr<float>() : nullptr;
  const float* ent_p = has_e ? ent_c.data_ptr<float>() : nullptr;

  for (int64_t s = 0; s < N; s += tl.rows) {
    const int64_t rows = std::min(tl.rows, N - s);
    const at::Tensor h = hidden.narrow(0, s, rows).to(at::kFloat).contiguous();
    at::Tensor gh = grad_h.narrow(0, s, rows);
    for (int64_t v0 = 0; v0 < V; v0 += tl.cols) {
      const int64_t cols = std::min(tl.cols, V - v0);
      const at::Tensor w_tile = f32_in ? weight.narrow(0, v0, cols) : weight.narrow(0, v0, cols).to(at::kFloat);
      at::Tensor coef = tile_logits(buf, h, w_tile, b, v0);
      float* cp = coef.data_ptr<float>();
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = s + r;
          const int64_t yl = (yp[n] >= v0 && yp[n] < v0 + cols) ? yp[n] - v0 : -1;
          const float e = has_e ? e_p[n] : 0.0f;
          const float mean_z = has_e ? lse_p[n] - ent_p[n] : 0.0f;
          backward_segment(cp + r * cols, cols, yl, tf, lse_p[n], g_p[n], k_p[n] - g_p[n], e, mean_z);
        }
      });
      // both GEMMs on this recomputed tile
      at::Tensor gw = grad_w.narrow(0, v0, cols);
      if (v0 == 0) {
        at::mm_out(gh, coef, w_tile);
      } else {
        gh.addmm_(coef, w_tile);
      }
      if (s == 0) {
        at::mm_out(gw, coef.t(), h);
      } else {
        gw.addmm_(coef.t(), h);
      }
      if (has_bias) grad_b.narrow(0, v0, cols).add_(at::sum(coef, 0));
    }
  }
  return {grad_h, grad_w, grad_b};
}

at::Tensor exp_approx(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "exp_approx: expected a float32 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* ip = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = in.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) op[i] = exp_f(ip[i]);
  return out;
}

at::Tensor tanh_approx(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "tanh_approx: expected a float32 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* ip = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = in.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) op[i] = tanh_f(ip[i]);
  return out;
}

}  // namespace fdivk
