// CPU kernels of the fused LM-head primitive (the ``token_stats`` contract of fdiv_kernels).
//
// Contract (fdiv_kernels/ops/torch_chunked.py): for valid rows only,
//   z      = cap(h W^T + b) / T,  cap(x) = c * tanh(x / c) when softcap c > 0
//   lse    = logsumexp_v z,  logp = z[y] - lse,  ent = lse - sum_v p z,  p = softmax(z)
//   dL/dz  = g * onehot(y) + (k - g) * p - e * p * (z - (lse - ent))
// with g = dL/dlogp, k = dL/dlse, e = dL/dent. Inputs float32/bfloat16/float16 (float64 is
// delegated to the torch reference in Python); all outputs float32; fp32 accumulation.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fdivk {

// hidden [N, H], weight [V, H] (same floating dtype), bias [V] or none, labels [N] int64 in [0, V).
// softcap <= 0 means no soft-cap. chunk_elements: float32 logits per tile (>= 1); tiles are
// [rows, cols] blocks of tokens x vocabulary with rows * cols <= chunk_elements.
// Returns (logp [N], lse [N], entropy [N] or an undefined tensor), float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, double softcap, double temperature, bool return_entropy,
    int64_t chunk_elements);

// lse/entropy: [N] float32 from forward_cpu (entropy may be absent when grad_entropy is).
// grad_logp, grad_lse: [N]; grad_entropy: [N] or none.
// Returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or undefined), float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const at::Tensor& grad_logp, const at::Tensor& grad_lse,
    const std::optional<at::Tensor>& grad_entropy, double softcap, double temperature,
    int64_t chunk_elements);

// One-pass chunk kernels (float32 hidden/weight; reduced dtypes are converted in Python). The
// chunk's logits live in `buf` (contiguous float32, >= n * V elements) between the two calls.
// chunk_stats: z = cap(h W^T + b) / T into buf (tiles of tile_cols vocabulary columns, each reduced
//   while hot), returns (logp [n], lse [n], entropy [n] or undefined).
// chunk_grads: dL/draw from buf in place, then per tile grad_hidden (+)= coef W[tile] and
//   grad_weight[tile] = beta grad_weight[tile] + alpha coef^T h (beta = 0: not read), grad_bias
//   likewise. Returns grad_hidden [n, H] float32 (undefined unless need_grad_hidden).
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, at::Tensor& buf, double softcap, double temperature, bool return_entropy,
    int64_t tile_cols);
at::Tensor chunk_grads_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                           at::Tensor& buf, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                           const at::Tensor& grad_logp, const at::Tensor& grad_lse,
                           const std::optional<at::Tensor>& grad_entropy, double softcap, double temperature,
                           const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                           double alpha, double beta, bool need_grad_hidden, int64_t tile_cols);

// One-pass chunk kernels of bf16 inputs on CPUs with bf16 dot-product units: the three GEMMs are
// bf16 x bf16 -> float32 oneDNN brgemm calls (float32 logits, float32 accumulation), the epilogues
// those of the float32 kernels. K = H rounded up to even, n2 = n and V2 = V rounded up to even
// (zero padding; cpu_backend.py packs the operands):
// chunk_stats_bf16: hidden [n, K] bf16, weight_t_vnni [K / 2, V, 2] bf16 (W^T, pairs of hidden
//   units interleaved), bias [V] float32 or none; like chunk_stats_cpu (tile_cols even).
// chunk_grads_bf16: hidden [n, K] bf16 (as chunk_stats_bf16's), weight_vnni [V2 / 2, K, 2] bf16
//   (W, pairs of vocabulary rows interleaved; needed for grad_hidden only), scratch bf16 >= (n + n2) * min(tile_cols, V2) elements;
//   grad_weight_t [K, V] float32 (W's gradient transposed) = beta grad_weight_t + alpha coef^T h;
//   the coefficient is rounded to bf16 for both GEMMs. Returns grad_hidden [n, K] float32.
// bf16_gemm_probe: whether this CPU has AVX512-BF16 and torch's brgemm runs bf16 there (a
//   2 x 16 x 2 product checked); false elsewhere (the caller converts to float32 instead).
bool bf16_gemm_probe();
// Operand packing of the bf16 path (parallel copies, zero padding to even sizes):
// pack_weight_t_bf16: W [V, H] -> [K / 2, V, 2]; pack_weight_bf16: W [V, H] -> [V2 / 2, K, 2] (into
// out_storage's memory when given, as unpack_grad_weight_bf16);
// unpack_grad_weight_bf16: grad_W^T [K, V] float32 -> grad_W [V, H] bf16 (rows >= H of the input
// are padding, dropped), written into out_storage (contiguous bf16, >= V * H elements) when given.
at::Tensor pack_weight_t_bf16(const at::Tensor& weight);
at::Tensor pack_weight_bf16(const at::Tensor& weight, const std::optional<at::Tensor>& out_storage);
at::Tensor unpack_grad_weight_bf16(const at::Tensor& grad_weight_t, int64_t hidden_size,
                                   const std::optional<at::Tensor>& out_storage);
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats_bf16_cpu(
    const at::Tensor& hidden, const at::Tensor& weight_t_vnni, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, at::Tensor& buf, double softcap, double temperature, bool return_entropy,
    int64_t tile_cols);
at::Tensor chunk_grads_bf16_cpu(
    const at::Tensor& hidden, const std::optional<at::Tensor>& weight_vnni, const at::Tensor& labels, at::Tensor& buf,
    at::Tensor& scratch, const at::Tensor& lse, const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
    const at::Tensor& grad_lse, const std::optional<at::Tensor>& grad_entropy, double softcap, double temperature,
    const std::optional<at::Tensor>& grad_weight_t, const std::optional<at::Tensor>& grad_bias, double alpha,
    double beta, bool need_grad_hidden, int64_t vocab_size, int64_t tile_cols);

// row_argmax: each row's largest logit's index from the logits a chunk's stats keep in `buf`
// ([rows, V] float32 at its start): the first index of the largest value, 0 for a row of only -inf
// or NaN (predicted tokens, token accuracy). Rows in parallel; one read of the rows, no GEMM.
at::Tensor row_argmax(const at::Tensor& buf, int64_t rows, int64_t V);

// Test hooks: the vectorisable exp / tanh approximations used by the epilogues, elementwise on
// a float32 tensor (so tests can compare them with float64 math).
at::Tensor exp_approx(const at::Tensor& x);
at::Tensor tanh_approx(const at::Tensor& x);

}  // namespace fdivk
