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
  m.def("exp_approx", &fdivk::exp_approx, "elementwise exp approximation used by the epilogues (float32)");
  m.def("tanh_approx", &fdivk::tanh_approx, "elementwise tanh approximation used by the epilogues (float32)");
  fdivk::bind_distill(m);  // distillation (distill_cpu.cpp)
}
