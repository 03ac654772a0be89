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
#include <ATen/record_function.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <atomic>
#include <thread>
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

void check_chunk_buf(const at::Tensor& labels, const at::Tensor& buf, int64_t n, int64_t V, double temperature,
                     int64_t tile_cols) {
  TORCH_CHECK(labels.device().is_cpu() && buf.device().is_cpu(), "fdiv cpu backend: tensors must be on the CPU");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "fdiv cpu chunk kernels: labels must be contiguous int64 [n]");
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() >= n * V,
              "fdiv cpu chunk kernels: buf must be contiguous float32 with at least n * V elements");
  TORCH_CHECK(V > 0, "fdiv cpu backend: the vocabulary is empty");
  TORCH_CHECK(temperature > 0, "fdiv cpu backend: temperature must be > 0, got ", temperature);
  TORCH_CHECK(tile_cols >= 1, "fdiv cpu chunk kernels: tile_cols must be >= 1");
}

void check_chunk(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& buf,
                 double temperature, int64_t tile_cols) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "fdiv cpu backend: tensors must be on the CPU");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "fdiv cpu chunk kernels: hidden and weight must be float32");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && hidden.is_contiguous() &&
                  weight.is_contiguous(),
              "fdiv cpu chunk kernels: expected contiguous hidden [n, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  check_chunk_buf(labels, buf, hidden.size(0), weight.size(0), temperature, tile_cols);
}

// The chunk's z is stored tile-major: tile t (vocabulary columns [t * tile_cols, ...)) is a
// contiguous [n, cols] block at offset t * n * tile_cols, so every GEMM reads and writes
// contiguous matrices and a tile is still in cache when the next step uses it.
at::Tensor chunk_tile(at::Tensor& buf, int64_t n, int64_t v0, int64_t cols, int64_t tile_cols) {
  return buf.narrow(0, (v0 / tile_cols) * n * tile_cols, n * cols).view({n, cols});
}

// The forward epilogue of rows [r0, r1) of a raw-logits tile zp ([n, cols], vocabulary [v0, v0 + cols)):
// z = cap(raw) / T in place, each row's online state merged into state[r], the label's z kept.
void stats_rows(float* zp, int64_t r0, int64_t r1, int64_t cols, int64_t v0, const int64_t* yp, const Transform& tf,
                Online* state, float* z_label) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = zp + r * cols;
    merge_into(state[r], forward_segment(row, cols, tf));  // stores z = cap(raw) / T in place
    const int64_t yl = yp[r] - v0;
    if (yl >= 0 && yl < cols) z_label[r] = row[yl];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_stats(const std::vector<Online>& state,
                                                            const std::vector<float>& z_label, int64_t n,
                                                            bool return_entropy, const at::TensorOptions& f32) {
  at::Tensor logp = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor ent = return_entropy ? at::empty({n}, f32) : at::Tensor();
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

// What the coefficient epilogue reads per row: the label, lse, g, k - g and (with an entropy
// gradient) e and mean z = lse - ent; float32 contiguous [n] tensors, checked here.
struct RowGrads {
  const int64_t* y;
  const float *lse, *g, *k, *e, *ent;
  at::Tensor e_c, ent_c;  // owners of e / ent

  RowGrads(const at::Tensor& labels, const at::Tensor& lse_t, const std::optional<at::Tensor>& entropy,
           const at::Tensor& grad_logp, const at::Tensor& grad_lse, const std::optional<at::Tensor>& grad_entropy,
           int64_t n) {
    const bool has_e = grad_entropy.has_value() && grad_entropy->defined();
    TORCH_CHECK(!has_e || (entropy.has_value() && entropy->defined()),
                "fdiv cpu backend: grad_entropy needs the forward's entropy");
    for (const at::Tensor* t : {&lse_t, &grad_logp, &grad_lse}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kFloat && t->is_contiguous(),
                  "fdiv cpu chunk kernels: per-row tensors must be contiguous float32 [n], got ", t->sizes());
    }
    if (has_e) {
      e_c = grad_entropy->to(at::kFloat).contiguous();
      ent_c = entropy->to(at::kFloat).contiguous();
    }
    y = labels.data_ptr<int64_t>();
    lse = lse_t.data_ptr<float>();
    g = grad_logp.data_ptr<float>();
    k = grad_lse.data_ptr<float>();
    e = has_e ? e_c.data_ptr<float>() : nullptr;
    ent = has_e ? ent_c.data_ptr<float>() : nullptr;
  }

  // rows [r0, r1) of the tile zp ([n, cols], vocabulary [v0, v0 + cols)): z -> dL/draw in place
  void coef_rows(float* zp, int64_t r0, int64_t r1, int64_t cols, int64_t v0, const Transform& tf) const {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t yl = (y[r] >= v0 && y[r] < v0 + cols) ? y[r] - v0 : -1;
      const float er = e != nullptr ? e[r] : 0.0f;
      const float mean_z = e != nullptr ? lse[r] - ent[r] : 0.0f;
      coef_segment(zp + r * cols, cols, yl, tf, lse[r], g[r], k[r] - g[r], er, mean_z);
    }
  }
};

void check_grad_buffers(const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                        at::IntArrayRef weight_sizes, int64_t V) {
  if (grad_weight.has_value() && grad_weight->defined()) {
    TORCH_CHECK(grad_weight->sizes() == weight_sizes && grad_weight->scalar_type() == at::kFloat &&
                    grad_weight->is_contiguous(),
                "fdiv cpu chunk kernels: grad_weight must be contiguous float32 ", weight_sizes);
  }
  if (grad_bias.has_value() && grad_bias->defined()) {
    TORCH_CHECK(grad_bias->dim() == 1 && grad_bias->size(0) == V && grad_bias->scalar_type() == at::kFloat,
                "fdiv cpu chunk kernels: grad_bias must be float32 [V]");
  }
}

// grad_bias[v0 : v0 + cols] = beta grad_bias + alpha sum_rows coef (beta = 0: not read)
void update_grad_bias(const std::optional<at::Tensor>& grad_bias, const at::Tensor& coef, int64_t v0, double alpha,
                      double beta) {
  if (!grad_bias.has_value() || !grad_bias->defined()) return;
  at::Tensor gb = grad_bias->narrow(0, v0, coef.size(1));
  if (beta == 0.0) {
    gb.copy_(at::sum(coef, 0)).mul_(alpha);
  } else {
    gb.mul_(beta).add_(at::sum(coef, 0), alpha);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               const at::Tensor& labels, at::Tensor& buf,
                                                               double softcap, double temperature,
                                                               bool return_entropy, int64_t tile_cols) {
  check_chunk(hidden, weight, labels, buf, temperature, tile_cols);
  const int64_t n = hidden.size(0), V = weight.size(0);
  std::vector<Online> state(n);
  std::vector<float> z_label(n);
  const auto f32 = hidden.options().dtype(at::kFloat);
  if (n == 0) return finish_stats(state, z_label, n, return_entropy, f32);
  const auto b = f32_bias(bias);
  const Transform tf = make_transform(softcap, temperature);
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
      stats_rows(zp, r0, r1, cols, v0, yp, tf, state.data(), z_label.data());
    });
  }
  return finish_stats(state, z_label, n, return_entropy, f32);
}

at::Tensor chunk_grads_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                           at::Tensor& buf, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                           const at::Tensor& grad_logp, const at::Tensor& grad_lse,
                           const std::optional<at::Tensor>& grad_entropy, double softcap, double temperature,
                           const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                           double alpha, double beta, bool need_grad_hidden, int64_t tile_cols) {
  check_chunk(hidden, weight, labels, buf, temperature, tile_cols);
  const int64_t n = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const RowGrads rg(labels, lse, entropy, grad_logp, grad_lse, grad_entropy, n);
  check_grad_buffers(grad_weight, grad_bias, weight.sizes(), V);
  const bool has_w = grad_weight.has_value() && grad_weight->defined();
  at::Tensor grad_h = need_grad_hidden ? at::empty({n, H}, hidden.options()) : at::Tensor();
  if (n == 0) {
    if (need_grad_hidden) grad_h.zero_();
    return grad_h;
  }
  const Transform tf = make_transform(softcap, temperature);
  for (int64_t v0 = 0; v0 < V; v0 += tile_cols) {
    const int64_t cols = std::min(tile_cols, V - v0);
    const at::Tensor coef = chunk_tile(buf, n, v0, cols, tile_cols);  // z, overwritten in place
    float* zp = coef.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) { rg.coef_rows(zp, r0, r1, cols, v0, tf); });
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
    update_grad_bias(grad_bias, coef, v0, alpha, beta);
  }
  return grad_h;
}

// -------------------------------------------------------------------------------------------------
// One-pass chunk kernels of bf16 inputs: bf16 x bf16 -> float32 GEMMs by oneDNN's brgemm micro-kernel
// (at::native::cpublas::brgemm: the hardware's bf16 dot products, float32 accumulation and output;
// the kernel is JIT-generated by oneDNN per shape and cached per thread). B operands are in the
// "vnni" layout brgemm reads: pairs of K rows interleaved, [K / 2][ldb][2]. Layouts (fdiv_kernels/ops/cpu_backend.py
// packs the weight once per call and the hidden rows once per chunk):
//   logits    z [n, cols]   = h [n, K]           x  W^T (vnni [K / 2][V][2])
//   grad_h    [n, K]       += coef [n, cols]      x  W   (vnni [V2 / 2][K][2])
//   grad_W^T  [K, cols]   (+)= h^T [K, n2]        x  coef (vnni [n2 / 2][cols][2])
// K = H rounded up to even, n2 = n rounded up to even, V2 = V rounded up to even (zero padding).
// The epilogues are the float32 ones above (same math); the coefficient is rounded to bf16 for
// the two gradient GEMMs (as Liger and Cut Cross-Entropy do), after its float32 column sums
// (grad_bias).

namespace {

using bf16_t = at::BFloat16;

constexpr int64_t kRowBlock = 32;     // token rows per task (even: the vnni pairs of a task are its own)
constexpr int64_t kStatsCols = 2048;  // vocabulary columns per logits task (a [32, 2048] float32 block: 256 KiB)
constexpr int64_t kColBlock = 512;    // vocabulary columns per brgemm call in the logits GEMM
constexpr int64_t kGwRows = 64;       // grad_W^T rows (hidden units) per task
constexpr int64_t kGwCols = 512;      // grad_W^T columns (vocabulary) per task

// fn(task) for task in [0, n) on torch's intra-op threads, handed out one at a time (an atomic
// counter): a thread the OS deschedules (a shared machine) delays its current task only, not a
// static share of the region. Each thread releases its brgemm context (AMX tiles) at the end.
template <typename F>
void parallel_tasks(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < n; t = next++) fn(t);
    at::native::cpublas::brgemm_release(true);
  });
}

// C[M, N] (row stride ldc) (+)= A[M, K] (row-major, lda) x B (vnni [K / 2][ldb][2], its column 0 at b)
inline void brgemm_bf16(int64_t M, int64_t N, int64_t K, const bf16_t* a, int64_t lda, const bf16_t* b, int64_t ldb,
                        float* c, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/true);
}

int64_t blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

void check_bf16(const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == dim && t.is_contiguous(),
              "fdiv cpu bf16 chunk kernels: ", what, " must be a contiguous bfloat16 CPU tensor of ", dim,
              " dimensions, got ", t.scalar_type(), " ", t.sizes());
}

}  // namespace

// a bf16 tensor of `sizes` in the memory of `storage` (contiguous bf16, large enough), or a new one
static at::Tensor storage_or_empty(const std::optional<at::Tensor>& storage, at::IntArrayRef sizes,
                                   const at::TensorOptions& options) {
  if (!storage.has_value() || !storage->defined()) return at::empty(sizes, options);
  check_bf16(*storage, storage->dim(), "the output storage");
  const int64_t numel = c10::multiply_integers(sizes);
  TORCH_CHECK(storage->numel() >= numel, "fdiv cpu bf16: the output storage holds fewer than ", numel, " elements");
  return storage->view({-1}).narrow(0, 0, numel).view(sizes);
}

at::Tensor pack_weight_t_bf16(const at::Tensor& weight) {
  check_bf16(weight, 2, "weight [V, H]");
  const int64_t V = weight.size(0), H = weight.size(1), K2 = (H + 1) / 2;
  const at::Tensor w = H % 2 == 0 ? weight : at::constant_pad_nd(weight, {0, 1});
  at::Tensor out = at::empty({K2, V, 2}, weight.options());
  // as 32-bit words (a pair of hidden units): [V, K / 2] -> [K / 2, V]
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr<bf16_t>());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<bf16_t>());
  constexpr int64_t rb = 256;
  at::parallel_for(0, blocks(V, rb), 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * rb, r1 = std::min(V, b1 * rb);
    transpose_u32(src + r0 * K2, r1 - r0, K2, K2, dst + r0, V);
  });
  return out;
}

at::Tensor pack_weight_bf16(const at::Tensor& weight, const std::optional<at::Tensor>& out_storage) {
  check_bf16(weight, 2, "weight [V, H]");
  const int64_t V = weight.size(0), H = weight.size(1), K = H + H % 2, pairs = (V + 1) / 2;
  const at::Tensor w = H % 2 == 0 ? weight : at::constant_pad_nd(weight, {0, 1});
  const at::Tensor out = storage_or_empty(out_storage, {pairs, K, 2}, weight.options());
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr<bf16_t>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<bf16_t>());
  at::parallel_for(0, pairs, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* a = src + 2 * p * K;
      interleave_u16(a, 2 * p + 1 < V ? a + K : nullptr, K, dst + p * K * 2);
    }
  });
  return out;
}

at::Tensor unpack_grad_weight_bf16(const at::Tensor& grad_weight_t, int64_t hidden_size,
                                   const std::optional<at::Tensor>& out_storage) {
  TORCH_CHECK(grad_weight_t.scalar_type() == at::kFloat && grad_weight_t.dim() == 2 && grad_weight_t.is_contiguous() &&
                  grad_weight_t.size(0) >= hidden_size,
              "fdiv cpu bf16 chunk kernels: grad_weight^T must be contiguous float32 [K >= H, V]");
  const int64_t V = grad_weight_t.size(1), H = hidden_size;
  // out_storage: memory no longer read (the packed weight)
  const at::Tensor out = storage_or_empty(out_storage, {V, H}, grad_weight_t.options().dtype(at::kBFloat16));
  const float* src = grad_weight_t.data_ptr<float>();
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<bf16_t>());
  constexpr int64_t cb = 256;
  at::parallel_for(0, blocks(V, cb), 1, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * cb, c1 = std::min(V, b1 * cb);
    transpose_to_bf16(src + c0, H, c1 - c0, V, dst + c0 * H, H);
  });
  return out;
}

bool bf16_gemm_probe() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (!__builtin_cpu_supports("avx512bf16")) return false;
  try {
    // 2 x 16 x 2: A = [[1, 2], [3, 4]], B = 1 everywhere -> C rows 3 and 7
    std::vector<bf16_t> a = {bf16_t(1.0f), bf16_t(2.0f), bf16_t(3.0f), bf16_t(4.0f)};
    std::vector<bf16_t> b(32, bf16_t(1.0f));
    std::vector<float> c(32, -1.0f);
    brgemm_bf16(2, 16, 2, a.data(), 2, b.data(), 16, c.data(), 16, false);
    at::native::cpublas::brgemm_release(true);
    for (int i = 0; i < 16; ++i) {
      if (c[i] != 3.0f || c[16 + i] != 7.0f) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats_bf16_cpu(
    const at::Tensor& hidden, const at::Tensor& weight_t_vnni, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, at::Tensor& buf, double softcap, double temperature, bool return_entropy,
    int64_t tile_cols) {
  // the profiler's record of this call names its GEMM operands (bf16): tests/test_cpu_backend.py
  RECORD_FUNCTION("fdiv_kernels::chunk_stats_bf16", std::vector<c10::IValue>({hidden, weight_t_vnni}));
  check_bf16(hidden, 2, "hidden [n, K]");
  check_bf16(weight_t_vnni, 3, "the packed weight [K / 2, V, 2]");
  const int64_t n = hidden.size(0), K = hidden.size(1), V = weight_t_vnni.size(1);
  TORCH_CHECK(K % 2 == 0 && weight_t_vnni.size(0) * 2 == K && weight_t_vnni.size(2) == 2,
              "fdiv cpu bf16 chunk kernels: hidden [n, K] (K even) and the packed weight [K / 2, V, 2] disagree: ",
              hidden.sizes(), " and ", weight_t_vnni.sizes());
  TORCH_CHECK(tile_cols % 2 == 0, "fdiv cpu bf16 chunk kernels: tile_cols must be even");
  check_chunk_buf(labels, buf, n, V, temperature, tile_cols);
  // tasks: (row block, column block of <= kStatsCols within a tile); one online state per (column
  // block, row), merged per row in vocabulary order
  const int64_t per_tile = blocks(std::min(tile_cols, V), kStatsCols), row_blocks = blocks(n, kRowBlock);
  const int64_t col_blocks = blocks(V, tile_cols) * per_tile;
  std::vector<Online> part(col_blocks * n);
  std::vector<float> z_label(n);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto b = f32_bias(bias);
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  const Transform tf = make_transform(softcap, temperature);
  const int64_t* yp = labels.data_ptr<int64_t>();
  const bf16_t* hp = hidden.data_ptr<bf16_t>();
  const bf16_t* wp = weight_t_vnni.data_ptr<bf16_t>();
  float* base = buf.data_ptr<float>();
  parallel_tasks(col_blocks * row_blocks, [&](int64_t t) {
    const int64_t cb = t / row_blocks, r0 = (t % row_blocks) * kRowBlock, r1 = std::min(n, r0 + kRowBlock);
    const int64_t tile = cb / per_tile, v0 = tile * tile_cols, cols = std::min(tile_cols, V - v0);
    const int64_t c0 = (cb % per_tile) * kStatsCols;
    if (c0 >= cols) return;  // the last tile is narrower
    const int64_t c1 = std::min(cols, c0 + kStatsCols);
    float* zp = base + tile * n * tile_cols + c0;  // chunk_tile's layout, row stride cols
    for (int64_t c = c0; c < c1; c += kColBlock) {
      brgemm_bf16(r1 - r0, std::min(kColBlock, c1 - c), K, hp + r0 * K, K, wp + (v0 + c) * 2, V,
                  zp + r0 * cols + (c - c0), cols, false);
    }
    for (int64_t r = r0; r < r1; ++r) {
      float* row = zp + r * cols;
      if (bp != nullptr) add_row(row, bp + v0 + c0, c1 - c0);
      part[cb * n + r] = forward_segment(row, c1 - c0, tf);  // stores z = cap(raw) / T in place
      const int64_t yl = yp[r] - (v0 + c0);
      if (yl >= 0 && yl < c1 - c0) z_label[r] = row[yl];
    }
  });
  std::vector<Online> state(n);
  for (int64_t cb = 0; cb < col_blocks; ++cb) {
    for (int64_t r = 0; r < n; ++r) merge_into(state[r], part[cb * n + r]);
  }
  return finish_stats(state, z_label, n, return_entropy, f32);
}

at::Tensor chunk_grads_bf16_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& weight_vnni,
                                const at::Tensor& labels, at::Tensor& buf, at::Tensor& scratch, const at::Tensor& lse,
                                const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                                const at::Tensor& grad_lse, const std::optional<at::Tensor>& grad_entropy,
                                double softcap, double temperature, const std::optional<at::Tensor>& grad_weight_t,
                                const std::optional<at::Tensor>& grad_bias, double alpha, double beta,
                                bool need_grad_hidden, int64_t vocab_size, int64_t tile_cols) {
  RECORD_FUNCTION("fdiv_kernels::chunk_grads_bf16",
                  std::vector<c10::IValue>({hidden, weight_vnni.has_value() ? *weight_vnni : at::Tensor(), scratch}));
  check_bf16(hidden, 2, "hidden [n, K]");
  const bool has_w = grad_weight_t.has_value() && grad_weight_t->defined();
  const int64_t n = hidden.size(0), K = hidden.size(1), n2 = n + n % 2, V = vocab_size;
  TORCH_CHECK(K % 2 == 0, "fdiv cpu bf16 chunk kernels: hidden must be [n, K] with K even, got ", hidden.sizes());
  TORCH_CHECK(!need_grad_hidden || (weight_vnni.has_value() && weight_vnni->defined()),
              "fdiv cpu bf16 chunk kernels: grad_hidden needs the packed weight");
  if (need_grad_hidden) {
    check_bf16(*weight_vnni, 3, "the packed weight [V2 / 2, K, 2]");
    TORCH_CHECK(weight_vnni->size(1) == K && weight_vnni->size(0) == (V + 1) / 2 && weight_vnni->size(2) == 2,
                "fdiv cpu bf16 chunk kernels: the packed weight must be [V2 / 2, K, 2], got ", weight_vnni->sizes());
  }
  check_bf16(scratch, 1, "scratch");
  TORCH_CHECK(tile_cols % 2 == 0, "fdiv cpu bf16 chunk kernels: tile_cols must be even");
  check_chunk_buf(labels, buf, n, V, temperature, tile_cols);
  const int64_t tile_cols2 = std::min(tile_cols, V + (V % 2));
  TORCH_CHECK(scratch.numel() >= 2 * (n + n2) * tile_cols2,
              "fdiv cpu bf16 chunk kernels: scratch holds fewer than 2 (n + n2) c elements (c = min(tile_cols, V2))");
  const RowGrads rg(labels, lse, entropy, grad_logp, grad_lse, grad_entropy, n);
  if (has_w) {
    TORCH_CHECK(grad_weight_t->dim() == 2 && grad_weight_t->size(0) == K && grad_weight_t->size(1) == V &&
                    grad_weight_t->scalar_type() == at::kFloat && grad_weight_t->is_contiguous(),
                "fdiv cpu bf16 chunk kernels: grad_weight^T must be contiguous float32 [K, V], got ",
                grad_weight_t->sizes());
  }
  check_grad_buffers(std::nullopt, grad_bias, {}, V);
  at::Tensor grad_h = need_grad_hidden ? at::empty({n, K}, labels.options().dtype(at::kFloat)) : at::Tensor();
  if (n == 0) {
    if (need_grad_hidden) grad_h.zero_();
    return grad_h;
  }
  if (has_w && beta != 0.0 && beta != 1.0) grad_weight_t->mul_(beta);  // then accumulate
  const bool add_w = beta != 0.0;
  const Transform tf = make_transform(softcap, temperature);
  // h^T [K, n2], the A of the grad_W^T GEMM
  at::Tensor hidden_t = has_w ? at::empty({K, n2}, hidden.options()) : at::Tensor();
  if (has_w && n2 != n) hidden_t.narrow(1, n, 1).zero_();
  const uint16_t* hp16 = reinterpret_cast<const uint16_t*>(hidden.data_ptr<bf16_t>());
  uint16_t* ht16 = has_w ? reinterpret_cast<uint16_t*>(hidden_t.data_ptr<bf16_t>()) : nullptr;
  const bf16_t* htp = reinterpret_cast<const bf16_t*>(ht16);
  const bf16_t* wvp = need_grad_hidden ? weight_vnni->data_ptr<bf16_t>() : nullptr;
  uint16_t* scratch_p = reinterpret_cast<uint16_t*>(scratch.data_ptr<bf16_t>());
  float* ghp = need_grad_hidden ? grad_h.data_ptr<float>() : nullptr;
  float* gwp = has_w ? grad_weight_t->data_ptr<float>() : nullptr;
  // One parallel region of tasks, claimed in this order (each one's dependencies come earlier, so
  // the earliest unfinished task can always run):
  //   T: h^T, one task per row block;
  //   for each tile t: C(t, rb) per row block: the coefficient of the rows, their bf16 operands (in
  //     scratch half t % 2) and their grad_h GEMM; then W(t - 1, *): the grad_W^T GEMM of tile t - 1
  //     by blocks of [kGwRows, kGwCols], which reads all its rows' operands.
  // C(t, rb) waits for C(t - 1, rb) (grad_h rows accumulate tile after tile) and for W(t - 2, *)
  // (the scratch half it overwrites); W(t, *) waits for C(t, *) and T. A waiting thread yields.
  const int64_t tiles = blocks(V, tile_cols), row_blocks = blocks(n, kRowBlock);
  const int64_t half = (n + n2) * tile_cols2, t_tasks = has_w ? row_blocks : 0;
  const int64_t k_blocks = has_w ? blocks(K, kGwRows) : 0;
  auto tile_cols_at = [&](int64_t t) { return std::min(tile_cols, V - t * tile_cols); };
  struct Task {
    int64_t kind, tile, index;  // kind 0: T, 1: C, 2: W
  };
  std::vector<Task> tasks;
  for (int64_t rb = 0; rb < t_tasks; ++rb) tasks.push_back({0, 0, rb});
  auto push_w = [&](int64_t t) {
    const int64_t col_blocks = blocks(tile_cols_at(t), kGwCols);
    for (int64_t i = 0; i < k_blocks * col_blocks; ++i) tasks.push_back({2, t, i});
  };
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t rb = 0; rb < row_blocks; ++rb) tasks.push_back({1, t, rb});
    if (t > 0) push_w(t - 1);
  }
  push_w(tiles - 1);
  std::atomic<int64_t> t_done{0};
  std::vector<std::atomic<int64_t>> c_done(tiles), w_done(tiles), rb_tiles(row_blocks);
  for (auto* v : {&c_done, &w_done}) {
    for (auto& c : *v) c.store(0);
  }
  for (auto& c : rb_tiles) c.store(0);
  auto wait_for = [](const std::atomic<int64_t>& counter, int64_t target) {
    while (counter.load(std::memory_order_acquire) < target) std::this_thread::yield();
  };
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task task = tasks[i];
    const int64_t t = task.tile, v0 = t * tile_cols, cols = tile_cols_at(t);
    const int64_t cols2 = cols + (cols % 2);  // the K of the grad_h GEMM (a zero column pads an odd V)
    uint16_t* rm = scratch_p + (t % 2) * half;
    uint16_t* vn = rm + n * cols2;
    if (task.kind == 0) {
      const int64_t r0 = task.index * kRowBlock, r1 = std::min(n, r0 + kRowBlock);
      transpose_u16(hp16 + r0 * K, r1 - r0, K, K, ht16 + r0, n2);
      t_done.fetch_add(1, std::memory_order_release);
    } else if (task.kind == 1) {
      const int64_t rb = task.index, r0 = rb * kRowBlock, r1 = std::min(n, r0 + kRowBlock);
      wait_for(rb_tiles[rb], t);
      if (t >= 2) {
        wait_for(w_done[t - 2], k_blocks * blocks(tile_cols_at(t - 2), kGwCols));
      }
      float* zp = chunk_tile(buf, n, v0, cols, tile_cols).data_ptr<float>();
      rg.coef_rows(zp, r0, r1, cols, v0, tf);
      coef_to_bf16(zp, cols, r0, r1, n, rm, cols2, vn, static_cast<float>(alpha));
      if (ghp != nullptr) {
        brgemm_bf16(r1 - r0, K, cols2, reinterpret_cast<const bf16_t*>(rm) + r0 * cols2, cols2,
                    wvp + (v0 / 2) * K * 2, K, ghp + r0 * K, K, v0 > 0);
      }
      rb_tiles[rb].fetch_add(1, std::memory_order_release);
      c_done[t].fetch_add(1, std::memory_order_release);
    } else {
      wait_for(t_done, t_tasks);
      wait_for(c_done[t], row_blocks);
      const int64_t col_blocks = blocks(cols, kGwCols);
      const int64_t k0 = (task.index / col_blocks) * kGwRows, c0 = (task.index % col_blocks) * kGwCols;
      brgemm_bf16(std::min(kGwRows, K - k0), std::min(kGwCols, cols - c0), n2, htp + k0 * n2, n2,
                  reinterpret_cast<const bf16_t*>(vn) + c0 * 2, cols, gwp + k0 * V + v0 + c0, V, add_w);
      w_done[t].fetch_add(1, std::memory_order_release);
    }
  });
  for (int64_t t = 0; t < tiles; ++t) {
    update_grad_bias(grad_bias, chunk_tile(buf, n, t * tile_cols, tile_cols_at(t), tile_cols), t * tile_cols, alpha,
                     beta);
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

at::Tensor row_argmax(const at::Tensor& buf, int64_t rows, int64_t V) {
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() >= rows * V,
              "row_argmax: buf must be contiguous float32 with >= rows * V elements");
  at::Tensor out = at::empty({rows}, buf.options().dtype(at::kLong));
  const float* z = buf.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    constexpr int L = 16;  // independent lanes (each keeps its first largest value): vectorisable
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = z + r * V;
      float best[L];
      int64_t at[L];
      for (int l = 0; l < L; ++l) {
        best[l] = -INFINITY;
        at[l] = -1;
      }
      int64_t v = 0;
      for (; v + L <= V; v += L) {
        for (int l = 0; l < L; ++l) {
          const float x = row[v + l];
          const bool gt = x > best[l];
          best[l] = gt ? x : best[l];
          at[l] = gt ? v + l : at[l];
        }
      }
      float m = -INFINITY;
      int64_t idx = -1;
      for (int l = 0; l < L; ++l) {  // the largest value; the smallest index among equal ones
        if (at[l] >= 0 && (best[l] > m || (best[l] == m && at[l] < idx))) {
          m = best[l];
          idx = at[l];
        }
      }
      for (; v < V; ++v) {
        if (row[v] > m) {
          m = row[v];
          idx = v;
        }
      }
      o[r] = idx < 0 ? 0 : idx;
    }
  });
  return out;
}

}  // namespace fdivk
