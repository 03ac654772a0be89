// Python binding of the CUDA distillation epilogue (distill_launchers.h, distill_epilogue.cu): the
// torch-side checks, then the launcher. No CUDA header here (the stream is an opaque pointer), as
// bindings_cuda.cpp; bind_distill adds it to the extension module at the end of bindings_cuda.cpp.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "distill_launchers.h"
#include "launchers.h"

namespace fdivk_cuda {

std::tuple<at::Tensor, at::Tensor> distill_epilogue_cuda(at::Tensor& zt, at::Tensor& zs, const at::Tensor& labels,
                                                         const std::optional<at::Tensor>& wt, int64_t form, double c,
                                                         double f0, double f_inf, double a0, double inv_t,
                                                         double kappa, double hard_weight, int64_t stream) {
  TORCH_CHECK(zt.is_cuda() && zs.is_cuda() && labels.is_cuda(), "fdiv cuda distillation: tensors must be on a GPU");
  TORCH_CHECK(zt.dim() == 2 && zs.sizes() == zt.sizes() && zt.scalar_type() == at::kFloat &&
                  zs.scalar_type() == at::kFloat && zt.is_contiguous() && zs.is_contiguous(),
              "fdiv cuda distillation: zt and zs must be contiguous float32 [n, V] of one shape");
  const int64_t n = zt.size(0), V = zt.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong,
              "fdiv cuda distillation: labels must be int64 [n]");
  TORCH_CHECK(form >= 0 && form <= 7 && inv_t > 0, "fdiv cuda distillation: bad form or temperature");
  const bool coef = wt.has_value() && wt->defined();
  if (coef) {
    TORCH_CHECK(wt->dim() == 1 && wt->size(0) == n && wt->scalar_type() == at::kFloat && wt->is_contiguous() &&
                    wt->is_cuda(),
                "fdiv cuda distillation: wt must be contiguous float32 [n] on the GPU");
  }
  at::Tensor div = at::empty({n}, zt.options()), nll = at::empty({n}, zt.options());
  const bool swap = form == 7 && c < 0.5;
  FdivDistillArgs a{};
  a.form = static_cast<int>(form);
  a.inv_t = static_cast<float>(inv_t);
  a.div_scale = static_cast<float>(kappa * inv_t);
  a.hard_weight = static_cast<float>(hard_weight);
  a.c = static_cast<float>(c);
  a.log_c = form == 2 ? static_cast<float>(std::log(c)) : 0.0f;
  a.log_1mc = form == 2 ? static_cast<float>(std::log1p(-c)) : 0.0f;
  a.ac = static_cast<float>(swap ? 1.0 - c : c);
  a.swap = swap ? 1.0f : 0.0f;
  a.f0_inf = !std::isfinite(f0);
  a.f_inf_inf = !std::isfinite(f_inf);
  a.a0_inf = !std::isfinite(a0);
  a.f0 = a.f0_inf ? 0.0f : static_cast<float>(f0);
  a.f_inf = a.f_inf_inf ? 0.0f : static_cast<float>(f_inf);
  a.a0 = a.a0_inf ? 0.0f : static_cast<float>(a0);
  a.hard = hard_weight > 0;
  a.raw = hard_weight > 0 && inv_t != 1.0;
  const int err = fdiv_cuda_distill_epilogue(zt.data_ptr<float>(), zs.data_ptr<float>(), labels.data_ptr<int64_t>(),
                                             coef ? wt->data_ptr<float>() : nullptr, div.data_ptr<float>(),
                                             nll.data_ptr<float>(), n, V, a, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "fdiv cuda distillation epilogue failed: ", fdiv_cuda_error_string(err));
  return {div, nll};
}

void bind_distill(pybind11::module_& m) {
  m.def("distill_epilogue", &distill_epilogue_cuda,
        "distillation chunk epilogue: (zt[n,V] f32, zs[n,V] f32, labels[n] int64, wt[n] f32|None, form, c, f0, f_inf, "
        "a0, inv_t, kappa, hard_weight, stream) -> (div[n], nll[n]); with wt, zs is overwritten by dL/dzs",
        py::arg("zt"), py::arg("zs"), py::arg("labels"), py::arg("wt"), py::arg("form"), py::arg("c"), py::arg("f0"),
        py::arg("f_inf"), py::arg("a0"), py::arg("inv_t"), py::arg("kappa"), py::arg("hard_weight"),
        py::arg("stream"));
}

}  // namespace fdivk_cuda
