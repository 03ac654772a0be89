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
#include "epilogue_cpu.h"

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

namespace fdivk {
namespace {

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

// -------------------------------------------------------------------------------------------------
// One-pass chunk kernels (fdiv_kernels/ops/fused.py): the chunk's z stays in `buf` between the calls.

namespace {

void check_chunk(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& buf,
                 double temperature, int64_t tile_cols) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu() && buf.device().is_cpu(),
              "fdiv cpu backend: tensors must be on the CPU");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && buf.scalar_type() == at::kFloat,
              "fdiv cpu chunk kernels: hidden, weight and buf must be float32");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && hidden.is_contiguous() &&
                  weight.is_contiguous(),
              "fdiv cpu chunk kernels: expected contiguous hidden [n, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "fdiv cpu chunk kernels: labels must be contiguous int64 [n]");
  TORCH_CHECK(buf.is_contiguous() && buf.numel() >= hidden.size(0) * weight.size(0),
              "fdiv cpu chunk kernels: buf must be contiguous with at least n * V elements");
  TORCH_CHECK(weight.size(0) > 0, "fdiv cpu backend: the vocabulary is empty");
  TORCH_CHECK(temperature > 0, "fdiv cpu backend: temperature must be > 0, got ", temperature);
  TORCH_CHECK(tile_cols >= 1, "fdiv cpu chunk kernels: tile_cols must be >= 1");
}

// The chunk's z is stored tile-major: tile t (vocabulary columns [t * tile_cols, ...)) is a
// contiguous [n, cols] block at offset t * n * tile_cols, so every GEMM reads and writes
// contiguous matrices and a tile is still in cache when the next step uses it.
at::Tensor chunk_tile(at::Tensor& buf, int64_t n, int64_t v0, int64_t cols, int64_t tile_cols) {
  return buf.narrow(0, (v0 / tile_cols) * n * tile_cols, n * cols).view({n, cols});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               const at::Tensor& labels, at::Tensor& buf,
                                                               double softcap, double temperature,
                                                               bool return_entropy, int64_t tile_cols) {
  check_chunk(hidden, weight, labels, buf, temperature, tile_cols);
  const int64_t n = hidden.size(0), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor ent = return_entropy ? at::empty({n}, f32) : at::Tensor();
  if (n == 0) return {logp, lse, ent};
  const auto b = f32_bias(bias);
  const Transform tf = make_transform(softcap, temperature);
  std::vector<Online> state(n);
  std::vector<float> z_label(n);
  const int64_t* yp = labels.data_ptr<int64_t>();
  for (int64_t v0 = 0; v0 < V; v0 += tile_cols) {
    const int64_t cols = std::min(tile_cols, V - v0);
    at::Tensor tile = chunk_tile(buf, n, v0, cols, tile_cols);
    if (b.has_value()) {
      at::addmm_out(tile, b->narrow(0, v0, cols), hidden, weight.narrow(0, v0, cols).t());
    } else {
      at::mm_out(tile, hidden, weight.narrow(0, v0, cols).t());
    }
    float* zp = tile.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* row = zp + r * cols;
        merge_into(state[r], forward_segment(row, cols, tf));  // stores z = cap(raw) / T in place
        const int64_t yl = yp[r] - v0;
        if (yl >= 0 && yl < cols) z_label[r] = row[yl];
      }
    });
  }
  float* logp_p = logp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = return_entropy ? ent.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < n; ++r) {
    const Online& st = state[r];
    const float log_s = std::log(st.s);
    const float l = st.m + log_s;
    lse_p[r] = l;
    logp_p[r] = z_label[r] - l;
    if (ent_p != nullptr) ent_p[r] = log_s - st.t / st.s;
  }
  return {logp, lse, ent};
}

at::Tensor chunk_grads_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                           at::Tensor& buf, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                           const at::Tensor& grad_logp, const at::Tensor& grad_lse,
                           const std::optional<at::Tensor>& grad_entropy, double softcap, double temperature,
                           const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                           double alpha, double beta, bool need_grad_hidden, int64_t tile_cols) {
  check_chunk(hidden, weight, labels, buf, temperature, tile_cols);
  const int64_t n = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const bool has_e = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_e || (entropy.has_value() && entropy->defined()),
              "fdiv cpu backend: grad_entropy needs the forward's entropy");
  for (const at::Tensor* t : {&lse, &grad_logp, &grad_lse}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "fdiv cpu chunk kernels: per-row tensors must be contiguous float32 [n], got ", t->sizes());
  }
  const bool has_w = grad_weight.has_value() && grad_weight->defined();
  const bool has_b = grad_bias.has_value() && grad_bias->defined();
  if (has_w) {
    TORCH_CHECK(grad_weight->sizes() == weight.sizes() && grad_weight->scalar_type() == at::kFloat &&
                    grad_weight->is_contiguous(),
                "fdiv cpu chunk kernels: grad_weight must be contiguous float32 [V, H]");
  }
  if (has_b) {
    TORCH_CHECK(grad_bias->dim() == 1 && grad_bias->size(0) == V && grad_bias->scalar_type() == at::kFloat,
                "fdiv cpu chunk kernels: grad_bias must be float32 [V]");
  }
  at::Tensor grad_h = need_grad_hidden ? at::empty({n, H}, hidden.options()) : at::Tensor();
  if (n == 0) {
    if (need_grad_hidden) grad_h.zero_();
    return grad_h;
  }
  const at::Tensor e_c = has_e ? grad_entropy->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor ent_c = has_e ? entropy->to(at::kFloat).contiguous() : at::Tensor();
  const Transform tf = make_transform(softcap, temperature);
  const int64_t* yp = labels.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* g_p = grad_logp.data_ptr<float>();
  const float* k_p = grad_lse.data_ptr<float>();
  const float* e_p = has_e ? e_c.data_ptr<float>() : nullptr;
  const float* ent_p = has_e ? ent_c.data_ptr<float>() : nullptr;
  for (int64_t v0 = 0; v0 < V; v0 += tile_cols) {
    const int64_t cols = std::min(tile_cols, V - v0);
    const at::Tensor coef = chunk_tile(buf, n, v0, cols, tile_cols);  // z, overwritten in place
    float* zp = coef.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t yl = (yp[r] >= v0 && yp[r] < v0 + cols) ? yp[r] - v0 : -1;
        const float e = has_e ? e_p[r] : 0.0f;
        const float mean_z = has_e ? lse_p[r] - ent_p[r] : 0.0f;
        coef_segment(zp + r * cols, cols, yl, tf, lse_p[r], g_p[r], k_p[r] - g_p[r], e, mean_z);
      }
    });
    const at::Tensor w_tile = weight.narrow(0, v0, cols);
    if (need_grad_hidden) {
      if (v0 == 0) {
        at::mm_out(grad_h, coef, w_tile);
      } else {
        grad_h.addmm_(coef, w_tile);
      }
    }
    if (has_w) {
      at::Tensor gw = grad_weight->narrow(0, v0, cols);
      at::addmm_out(gw, gw, coef.t(), hidden, beta, alpha);  // beta = 0: gw is not read
    }
    if (has_b) {
      at::Tensor gb = grad_bias->narrow(0, v0, cols);
      if (beta == 0.0) {
        gb.copy_(at::sum(coef, 0)).mul_(alpha);
      } else {
        gb.mul_(beta).add_(at::sum(coef, 0), alpha);
      }
    }
  }
  return grad_h;
}

at::Tensor exp_approx(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "exp_approx: expected a float32 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* ip = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = in.numel();
  exp_array(ip, op, n);
  return out;
}

at::Tensor tanh_approx(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "tanh_approx: expected a float32 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* ip = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = in.numel();
  tanh_array(ip, op, n);
  return out;
}

}  // namespace fdivk
