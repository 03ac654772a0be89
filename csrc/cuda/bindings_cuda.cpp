// CUDA backend driver and Python bindings (module fdiv_kernels._C_cuda ahead of time,
// fdiv_kernels_cuda just in time). No CUDA headers: the GEMMs go through ATen (cuBLAS) and the
// epilogues through the extern "C" launchers of token_stats_epilogue.cu, on the stream that
// Python passes as an integer (torch.cuda.current_stream().cuda_stream).
//
// Per chunk of `chunk_rows` token rows:
//   forward : raw = h W^T (float32 output, or the input dtype when mixed_gemm is false)
//             -> forward epilogue (bias, soft-cap, temperature, online lse, label pick, entropy)
//   backward: raw recomputed -> backward epilogue writes coef = dL/draw in the weight's dtype
//             -> grad_hidden[chunk] = coef W and grad_weight += coef^T h (float32 accumulators),
//                grad_bias += sum_rows coef, all on the same chunk.
#include <torch/extension.h>

#include <atomic>
#include <string>

#include "launchers.h"

namespace fdivk_cuda {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return FDIV_F32;
    case at::kBFloat16:
      return FDIV_BF16;
    case at::kHalf:
      return FDIV_F16;
    default:
      TORCH_CHECK(false, "fdiv cuda backend: unsupported dtype ", t, " (float32, bfloat16, float16)");
  }
  return -1;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "fdiv cuda backend: ", what, " failed: ", fdiv_cuda_error_string(err));
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& labels, double temperature, int64_t chunk_rows) {
  TORCH_CHECK(hidden.is_cuda() && weight.is_cuda() && labels.is_cuda(),
              "fdiv cuda backend: hidden, weight and labels must be CUDA tensors");
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == labels.device(),
              "fdiv cuda backend: tensors must be on one device");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fdiv cuda backend: expected hidden [N, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "fdiv cuda backend: hidden and weight must share a dtype");
  dtype_code(hidden.scalar_type());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "fdiv cuda backend: hidden and weight must be contiguous");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == hidden.size(0) &&
                  labels.is_contiguous(),
              "fdiv cuda backend: labels must be contiguous int64 [N]");
  TORCH_CHECK(weight.size(0) > 0, "fdiv cuda backend: the vocabulary is empty");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fdiv cuda backend: bias must be a CUDA tensor [V]");
  }
  TORCH_CHECK(temperature > 0, "fdiv cuda backend: temperature must be > 0");
  TORCH_CHECK(chunk_rows >= 1, "fdiv cuda backend: chunk_rows must be >= 1");
}

at::Tensor f32_vec(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

const float* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// raw logits h W^T of one chunk into buf[:rows]
at::Tensor chunk_logits(at::Tensor& buf, const at::Tensor& h, const at::Tensor& w) {
  at::Tensor out = buf.narrow(0, 0, h.size(0));
  if (buf.scalar_type() == h.scalar_type()) {
    at::mm_out(out, h, w.t());
  } else {
    at::mm_out(out, h, w.t(), buf.scalar_type());  // bf16/fp16 operands, float32 output
  }
  return out;
}

// grad_w (float32 [V, H]) += c^T h with bf16/fp16 c and h. One addmm with a float32 output when
// this torch accepts a float32 accumulator with reduced-precision operands; otherwise float32
// GEMMs over vocabulary blocks of 8192 rows added in (bounded temporary).
void accumulate_grad_w(at::Tensor& grad_w, const at::Tensor& c, const at::Tensor& h) {
  static std::atomic<bool> fused_ok{true};
  if (fused_ok.load()) {
    try {
      at::addmm_out(grad_w, grad_w, c.t(), h, at::kFloat);
      return;
    } catch (const c10::Error& err) {
      // only the rejection of a float32 output for 16-bit operands (argument checks throw before
      // any work): out of memory or anything else is not ours to hide
      const std::string msg = err.what_without_backtrace();
      if (msg.find("dtype") == std::string::npos) throw;
      fused_ok.store(false);
    }
  }
  const int64_t V = c.size(1), block = 8192;
  for (int64_t v0 = 0; v0 < V; v0 += block) {
    const int64_t n = std::min(block, V - v0);
    grad_w.narrow(0, v0, n).add_(at::mm(c.narrow(1, v0, n).t(), h, at::kFloat));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& labels, double softcap,
                                                            double temperature, bool return_entropy,
                                                            int64_t chunk_rows, bool mixed_gemm, int64_t stream) {
  check_inputs(hidden, weight, bias, labels, temperature, chunk_rows);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  at::Tensor ent = return_entropy ? at::empty({N}, f32) : at::Tensor();
  if (N == 0) return {logp, lse, ent};
  const at::Tensor b = (bias.has_value() && bias->defined()) ? f32_vec(*bias) : at::Tensor();
  const int64_t step = std::min(N, chunk_rows);
  const auto buf_dtype = mixed_gemm ? at::kFloat : hidden.scalar_type();
  at::Tensor buf = at::empty({step, V}, hidden.options().dtype(buf_dtype));
  void* s_ptr = reinterpret_cast<void*>(stream);
  for (int64_t s = 0; s < N; s += step) {
    const int64_t rows = std::min(step, N - s);
    at::Tensor z = chunk_logits(buf, hidden.narrow(0, s, rows), weight);
    check_launch(fdiv_cuda_forward_epilogue(z.data_ptr(), dtype_code(buf_dtype), rows, V, V, opt_ptr(b),
                                            labels.data_ptr<int64_t>() + s, static_cast<float>(softcap),
                                            static_cast<float>(temperature), lse.data_ptr<float>() + s,
                                            logp.data_ptr<float>() + s,
                                            return_entropy ? ent.data_ptr<float>() + s : nullptr, s_ptr),
                 "forward epilogue");
  }
  return {logp, lse, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const at::Tensor& grad_logp, const at::Tensor& grad_lse, const std::optional<at::Tensor>& grad_entropy,
    double softcap, double temperature, int64_t chunk_rows, bool mixed_gemm, int64_t stream) {
  check_inputs(hidden, weight, bias, labels, temperature, chunk_rows);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const bool has_e = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_e || (entropy.has_value() && entropy->defined()),
              "fdiv cuda backend: grad_entropy needs the forward's entropy");
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor grad_h = at::empty({N, H}, f32);
  at::Tensor grad_w = at::zeros({V, H}, f32);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor grad_b = has_bias ? at::zeros({V}, f32) : at::Tensor();
  if (N == 0) return {grad_h, grad_w, grad_b};

  const at::Tensor b = has_bias ? f32_vec(*bias) : at::Tensor();
  const at::Tensor lse_c = f32_vec(lse), g_c = f32_vec(grad_logp), k_c = f32_vec(grad_lse);
  const at::Tensor e_c = has_e ? f32_vec(*grad_entropy) : at::Tensor();
  const at::Tensor ent_c = has_e ? f32_vec(*entropy) : at::Tensor();
  for (const at::Tensor* t : {&lse_c, &g_c, &k_c}) {
    TORCH_CHECK(t->numel() == N && t->device() == hidden.device(), "fdiv cuda backend: per-row tensors must be [N] on hidden's device");
  }

  const auto in_dtype = hidden.scalar_type();
  const int64_t step = std::min(N, chunk_rows);
  const auto buf_dtype = mixed_gemm ? at::kFloat : in_dtype;
  at::Tensor buf = at::empty({step, V}, hidden.options().dtype(buf_dtype));
  // the coefficient feeds GEMMs with the weight, so it takes the weight's dtype (in place when equal)
  at::Tensor coef_buf = buf_dtype == in_dtype ? buf : at::empty({step, V}, hidden.options().dtype(in_dtype));
  void* s_ptr = reinterpret_cast<void*>(stream);

  for (int64_t s = 0; s < N; s += step) {
    const int64_t rows = std::min(step, N - s);
    const at::Tensor h = hidden.narrow(0, s, rows);
    at::Tensor z = chunk_logits(buf, h, weight);
    at::Tensor c = coef_buf.narrow(0, 0, rows);
    check_launch(fdiv_cuda_backward_epilogue(z.data_ptr(), dtype_code(buf_dtype), c.data_ptr(), dtype_code(in_dtype),
                                             rows, V, V, opt_ptr(b), labels.data_ptr<int64_t>() + s,
                                             static_cast<float>(softcap), static_cast<float>(temperature),
                                             lse_c.data_ptr<float>() + s, has_e ? ent_c.data_ptr<float>() + s : nullptr,
                                             g_c.data_ptr<float>() + s, k_c.data_ptr<float>() + s,
                                             has_e ? e_c.data_ptr<float>() + s : nullptr, s_ptr),
                 "backward epilogue");
    at::Tensor gh = grad_h.narrow(0, s, rows);
    if (in_dtype == at::kFloat) {
      at::mm_out(gh, c, weight);
      grad_w.addmm_(c.t(), h);
    } else if (mixed_gemm) {
      at::mm_out(gh, c, weight, at::kFloat);
      accumulate_grad_w(grad_w, c, h);
    } else {  // GEMMs in the input dtype, accumulated in float32
      gh.copy_(at::mm(c, weight));
      grad_w.add_(at::mm(c.t(), h));
    }
    if (has_bias) grad_b.add_(at::sum(c, {0}, false, at::kFloat));
  }
  return {grad_h, grad_w, grad_b};
}

// ---------------------------------------------------------------------------------------------
// One-pass chunk epilogues (the GEMMs run in torch, see fdiv_kernels/ops/cuda_backend.py)

// (logp, lse, entropy|undefined) of a chunk whose raw logits h W^T are the float32 view `z`
// [n, V] (row stride z.stride(0)); bias is added and the soft-cap/temperature applied here.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_forward_epilogue(const at::Tensor& z,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      const at::Tensor& labels, double softcap,
                                                                      double temperature, bool return_entropy,
                                                                      int64_t stream) {
  TORCH_CHECK(z.is_cuda() && z.scalar_type() == at::kFloat && z.dim() == 2 && z.stride(1) == 1,
              "fdiv cuda chunk: z must be a float32 CUDA matrix with unit column stride");
  TORCH_CHECK(labels.is_cuda() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == z.size(0) && labels.is_contiguous(),
              "fdiv cuda chunk: labels must be contiguous int64 [n]");
  const int64_t n = z.size(0), V = z.size(1);
  const auto f32 = z.options();
  at::Tensor logp = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor ent = return_entropy ? at::empty({n}, f32) : at::Tensor();
  const at::Tensor b = (bias.has_value() && bias->defined()) ? f32_vec(*bias) : at::Tensor();
  check_launch(fdiv_cuda_forward_epilogue(z.data_ptr(), FDIV_F32, n, V, z.stride(0), opt_ptr(b),
                                          labels.data_ptr<int64_t>(), static_cast<float>(softcap),
                                          static_cast<float>(temperature), lse.data_ptr<float>(),
                                          logp.data_ptr<float>(), return_entropy ? ent.data_ptr<float>() : nullptr,
                                          reinterpret_cast<void*>(stream)),
               "chunk forward epilogue");
  return {logp, lse, ent};
}

// Writes coef = dL/draw of the chunk into `coef` [n, V] (float32/bf16/fp16, unit column stride),
// which may share z's storage row by row (see launchers.h).
void chunk_coef_epilogue(const at::Tensor& z, at::Tensor& coef, const std::optional<at::Tensor>& bias,
                         const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                         const at::Tensor& grad_logp, const at::Tensor& grad_lse,
                         const std::optional<at::Tensor>& grad_entropy, double softcap, double temperature,
                         int64_t stream) {
  TORCH_CHECK(z.is_cuda() && z.scalar_type() == at::kFloat && z.dim() == 2 && z.stride(1) == 1,
              "fdiv cuda chunk: z must be a float32 CUDA matrix with unit column stride");
  TORCH_CHECK(coef.is_cuda() && coef.dim() == 2 && coef.sizes() == z.sizes() && coef.stride(1) == 1,
              "fdiv cuda chunk: coef must match z's shape with unit column stride");
  const int64_t n = z.size(0), V = z.size(1);
  const bool has_e = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_e || (entropy.has_value() && entropy->defined()), "fdiv cuda chunk: grad_entropy needs entropy");
  const at::Tensor b = (bias.has_value() && bias->defined()) ? f32_vec(*bias) : at::Tensor();
  const at::Tensor lse_c = f32_vec(lse), g_c = f32_vec(grad_logp), k_c = f32_vec(grad_lse);
  const at::Tensor e_c = has_e ? f32_vec(*grad_entropy) : at::Tensor();
  const at::Tensor ent_c = has_e ? f32_vec(*entropy) : at::Tensor();
  for (const at::Tensor* t : {&lse_c, &g_c, &k_c}) {
    TORCH_CHECK(t->numel() == n && t->device() == z.device(), "fdiv cuda chunk: per-row tensors must be [n] on z's device");
  }
  check_launch(fdiv_cuda_coef_epilogue(z.data_ptr<float>(), z.stride(0), coef.data_ptr(), dtype_code(coef.scalar_type()),
                                       coef.stride(0), n, V, opt_ptr(b), labels.data_ptr<int64_t>(),
                                       static_cast<float>(softcap), static_cast<float>(temperature),
                                       lse_c.data_ptr<float>(), has_e ? ent_c.data_ptr<float>() : nullptr,
                                       g_c.data_ptr<float>(), k_c.data_ptr<float>(),
                                       has_e ? e_c.data_ptr<float>() : nullptr, reinterpret_cast<void*>(stream)),
               "chunk coefficient epilogue");
}

}  // namespace fdivk_cuda

namespace fdivk_cuda {
void bind_distill(pybind11::module_& m);  // distillation (distill_bindings_cuda.cpp)
}  // namespace fdivk_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fdiv_kernels CUDA backend: cuBLAS GEMMs per chunk + CUDA epilogues (forward/backward)";
  m.def("forward", &fdivk_cuda::forward_cuda,
        "(hidden[N,H], weight[V,H], bias|None, labels[N] int64, softcap (<=0: none), temperature, return_entropy, "
        "chunk_rows, mixed_gemm, stream) -> (logp[N], lse[N], entropy[N]|None), float32",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("softcap"),
        py::arg("temperature"), py::arg("return_entropy"), py::arg("chunk_rows"), py::arg("mixed_gemm"),
        py::arg("stream"));
  m.def("chunk_forward_epilogue", &fdivk_cuda::chunk_forward_epilogue,
        "one-pass chunk: (z[n,V] float32 raw logits view, bias|None, labels[n] int64, softcap, temperature, "
        "return_entropy, stream) -> (logp[n], lse[n], entropy[n]|None)",
        py::arg("z"), py::arg("bias"), py::arg("labels"), py::arg("softcap"), py::arg("temperature"),
        py::arg("return_entropy"), py::arg("stream"));
  m.def("chunk_coef_epilogue", &fdivk_cuda::chunk_coef_epilogue,
        "one-pass chunk: (z, coef (may share z's rows), bias|None, labels, lse, entropy|None, grad_logp, grad_lse, "
        "grad_entropy|None, softcap, temperature, stream): coef = dL/draw",
        py::arg("z"), py::arg("coef"), py::arg("bias"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_lse"), py::arg("grad_entropy"), py::arg("softcap"), py::arg("temperature"),
        py::arg("stream"));
  m.def("backward", &fdivk_cuda::backward_cuda,
        "(hidden, weight, bias|None, labels, lse, entropy|None, grad_logp, grad_lse, grad_entropy|None, softcap, "
        "temperature, chunk_rows, mixed_gemm, stream) -> (grad_hidden[N,H], grad_weight[V,H], grad_bias[V]|None), "
        "float32",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_lse"), py::arg("grad_entropy"), py::arg("softcap"),
        py::arg("temperature"), py::arg("chunk_rows"), py::arg("mixed_gemm"), py::arg("stream"));
  fdivk_cuda::bind_distill(m);  // distillation (distill_bindings_cuda.cpp)
}
