// Python bindings of the CPU kernels (module fdiv_kernels._C_cpu when built ahead of time,
// fdiv_kernels_cpu when built just in time). See token_stats_cpu.h for shapes and math.
#include <torch/extension.h>

#include "token_stats_cpu.h"
#include "distill_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fdiv_kernels CPU backend: fused LM head + log-softmax statistics (forward/backward)";
  m.def("forward", &fdivk::forward_cpu,
        "(hidden[N,H], weight[V,H], bias[V]|None, labels[N] int64, softcap (<=0: none), temperature, "
        "return_entropy, chunk_elements) -> (logp[N], lse[N], entropy[N]|None), float32",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("softcap"),
        py::arg("temperature"), py::arg("return_entropy"), py::arg("chunk_elements"));
  m.def("backward", &fdivk::backward_cpu,
        "(hidden, weight, bias|None, labels, lse, entropy|None, grad_logp, grad_lse, grad_entropy|None, "
        "softcap, temperature, chunk_elements) -> (grad_hidden[N,H], grad_weight[V,H], grad_bias[V]|None), float32",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("lse"),
        py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_lse"), py::arg("grad_entropy"),
        py::arg("softcap"), py::arg("temperature"), py::arg("chunk_elements"));
  m.def("chunk_stats", &fdivk::chunk_stats_cpu,
        "one-pass chunk: (hidden[n,H] f32, weight[V,H] f32, bias|None, labels[n] int64, buf f32 >= n*V, softcap, "
        "temperature, return_entropy, tile_cols) -> (logp[n], lse[n], entropy[n]|None); z kept in buf",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("buf"), py::arg("softcap"),
        py::arg("temperature"), py::arg("return_entropy"), py::arg("tile_cols"));
  m.def("chunk_grads", &fdivk::chunk_grads_cpu,
        "one-pass chunk: (hidden, weight, labels, buf, lse, entropy|None, grad_logp, grad_lse, grad_entropy|None, "
        "softcap, temperature, grad_weight|None, grad_bias|None, alpha, beta, need_grad_hidden, tile_cols) -> "
        "grad_hidden[n,H]|None; grad_weight/grad_bias updated in place",
        py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("buf"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_lse"), py::arg("grad_entropy"), py::arg("softcap"),
        py::arg("temperature"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("alpha"), py::arg("beta"),
        py::arg("need_grad_hidden"), py::arg("tile_cols"));
  m.def("bf16_gemm_probe", &fdivk::bf16_gemm_probe,
        "whether bf16 x bf16 -> float32 GEMMs run on this CPU's bf16 units (AVX512-BF16, oneDNN brgemm)");
  m.def("pack_weight_t_bf16", &fdivk::pack_weight_t_bf16, "W [V,H] bf16 -> [K/2, V, 2] (W^T, vnni)");
  m.def("pack_weight_bf16", &fdivk::pack_weight_bf16, "W [V,H] bf16 -> [V2/2, K, 2] (W, vnni; in out_storage when given)",
        py::arg("weight"), py::arg("out_storage") = py::none());
  m.def("unpack_grad_weight_bf16", &fdivk::unpack_grad_weight_bf16,
        "grad_W^T [K, V] float32 -> grad_W [V, H] bf16 (in out_storage's memory when given)",
        py::arg("grad_weight_t"), py::arg("hidden_size"), py::arg("out_storage") = py::none());
  m.def("chunk_stats_bf16", &fdivk::chunk_stats_bf16_cpu,
        "one-pass chunk, bf16 GEMMs: (hidden[n,K] bf16, weight_t_vnni[K/2,V,2] bf16, bias f32|None, labels, buf, "
        "softcap, temperature, return_entropy, tile_cols) -> (logp[n], lse[n], entropy[n]|None); z kept in buf",
        py::arg("hidden"), py::arg("weight_t_vnni"), py::arg("bias"), py::arg("labels"), py::arg("buf"),
        py::arg("softcap"), py::arg("temperature"), py::arg("return_entropy"), py::arg("tile_cols"));
  m.def("chunk_grads_bf16", &fdivk::chunk_grads_bf16_cpu,
        "one-pass chunk, bf16 GEMMs: (hidden[n,K] bf16, weight_vnni[V2/2,K,2] bf16, labels, buf, scratch bf16, "
        "lse, entropy|None, grad_logp, grad_lse, grad_entropy|None, softcap, temperature, grad_weight_t[K,V] f32|None, "
        "grad_bias|None, alpha, beta, need_grad_hidden, vocab_size, tile_cols) -> grad_hidden[n,K] f32|None",
        py::arg("hidden"), py::arg("weight_vnni"), py::arg("labels"), py::arg("buf"), py::arg("scratch"),
        py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_lse"), py::arg("grad_entropy"),
        py::arg("softcap"), py::arg("temperature"), py::arg("grad_weight_t"), py::arg("grad_bias"), py::arg("alpha"),
        py::arg("beta"), py::arg("need_grad_hidden"), py::arg("vocab_size"), py::arg("tile_cols"));
  m.def("row_argmax", &fdivk::row_argmax,
        "(buf f32 >= rows*V, rows, V) -> [rows] int64: each row's first largest logit's index (the kept logits)",
        py::arg("buf"), py::arg("rows"), py::arg("V"));
  m.def("exp_approx", &fdivk::exp_approx, "elementwise exp approximation used by the epilogues (float32)");
  m.def("tanh_approx", &fdivk::tanh_approx, "elementwise tanh approximation used by the epilogues (float32)");
  fdivk::bind_distill(m);  // distillation (distill_cpu.cpp)
}
