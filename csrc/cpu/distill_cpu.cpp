// ATen driver of the cpu distillation epilogue (see distill_cpu.h): input checks, the per-call
// constants, rows in parallel with at::parallel_for over the plain-C++ row loops of
// distill_rows_cpu.cpp.
#include "distill_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "distill_rows_cpu.h"

namespace fdivk {

std::tuple<at::Tensor, at::Tensor> distill_epilogue_cpu(at::Tensor& zt, at::Tensor& zs, const at::Tensor& labels,
                                                        const std::optional<at::Tensor>& wt, int64_t form, double c,
                                                        double f0, double f_inf, double a0, double inv_t,
                                                        double kappa, double hard_weight) {
  TORCH_CHECK(zt.device().is_cpu() && zs.device().is_cpu() && labels.device().is_cpu(),
              "fdiv cpu distillation: tensors must be on the CPU");
  TORCH_CHECK(zt.dim() == 2 && zs.sizes() == zt.sizes() && zt.scalar_type() == at::kFloat &&
                  zs.scalar_type() == at::kFloat && zt.is_contiguous() && zs.is_contiguous(),
              "fdiv cpu distillation: zt and zs must be contiguous float32 [n, V] of one shape, got ", zt.sizes(),
              " and ", zs.sizes());
  const int64_t n = zt.size(0), V = zt.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong,
              "fdiv cpu distillation: labels must be int64 [n]");
  TORCH_CHECK(form >= 0 && form <= 7, "fdiv cpu distillation: unknown form ", form);
  TORCH_CHECK(inv_t > 0, "fdiv cpu distillation: inv_t must be > 0");
  const bool coef = wt.has_value() && wt->defined();
  if (coef) {
    TORCH_CHECK(wt->dim() == 1 && wt->size(0) == n && wt->scalar_type() == at::kFloat && wt->is_contiguous(),
                "fdiv cpu distillation: wt must be contiguous float32 [n]");
  }
  const auto f32 = zt.options();
  at::Tensor div = at::empty({n}, f32), nll = at::empty({n}, f32);
  if (n == 0) return {div, nll};
  DistillRowArgs a{};
  a.form = static_cast<int>(form);
  a.c = static_cast<float>(c);
  a.log_c = form == 2 ? static_cast<float>(std::log(c)) : 0.0f;
  a.log_1mc = form == 2 ? static_cast<float>(std::log1p(-c)) : 0.0f;
  a.swap = form == 7 && c < 0.5;
  a.ac = static_cast<float>(a.swap ? 1.0 - c : c);
  a.f0 = static_cast<float>(f0);
  a.f_inf = static_cast<float>(f_inf);
  a.a0 = static_cast<float>(a0);
  a.inv_t = static_cast<float>(inv_t);
  a.hard = hard_weight > 0;
  const float div_scale = static_cast<float>(kappa * inv_t);
  float* zt_p = zt.data_ptr<float>();
  float* zs_p = zs.data_ptr<float>();
  const int64_t* y_p = labels.data_ptr<int64_t>();
  const float* w_p = coef ? wt->data_ptr<float>() : nullptr;
  float* div_p = div.data_ptr<float>();
  float* nll_p = nll.data_ptr<float>();
  const float hw = static_cast<float>(hard_weight);
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float w = coef ? w_p[r] : 0.0f;
      distill_row(zt_p + r * V, zs_p + r * V, V, y_p[r], a, coef, w * div_scale, w * hw, div_p + r, nll_p + r);
    }
  });
  return {div, nll};
}

void bind_distill(pybind11::module_& m) {
  m.def("distill_epilogue", &distill_epilogue_cpu,
        "distillation chunk epilogue: (zt[n,V] f32, zs[n,V] f32, labels[n] int64, wt[n] f32|None, form, c, f0, f_inf, "
        "a0, inv_t, kappa, hard_weight) -> (div[n], nll[n]); with wt, zs is overwritten by dL/dzs",
        py::arg("zt"), py::arg("zs"), py::arg("labels"), py::arg("wt"), py::arg("form"), py::arg("c"), py::arg("f0"),
        py::arg("f_inf"), py::arg("a0"), py::arg("inv_t"), py::arg("kappa"), py::arg("hard_weight"));
}

}  // namespace fdivk
