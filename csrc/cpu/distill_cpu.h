// The cpu backend's distillation epilogue (fdiv_kernels.distill_loss): one chunk of n rows of both
// models' logits -> per-row divergence and hard-label NLL, and (with row weights) the coefficient
// dL/dz_s written over the student's logits. The math is fdiv_kernels/formulas/distill.py's
// chunk_epilogue (docs/math.md, section 8); the GEMMs around it are the Python driver's
// (fdiv_kernels/kernels/distill_chunks.py).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fdivk {

// form = FORM_IDS[name] of fdiv_kernels/formulas/distill.py (kl, reverse_kl, js, tv,
// squared_hellinger, pearson, neyman, alpha), c = its parameter (js's beta, alpha's a), f0 = f(0),
// f_inf = lim f(r)/r, a0 = a(0) (each possibly inf: fdiv_kernels/kernels/distill_cpu.py passes them).
// zt, zs: [n, V] float32 contiguous raw logits (bias added); labels [n] int64 (read when
// hard_weight > 0); wt [n] float32 row weights or None (values only). Returns (div[n], nll[n]);
// with wt, zs is overwritten by wt (kappa inv_t (pa - p_s sum pa) + hard_weight (softmax(zs) - onehot)).
std::tuple<at::Tensor, at::Tensor> distill_epilogue_cpu(at::Tensor& zt, at::Tensor& zs, const at::Tensor& labels,
                                                        const std::optional<at::Tensor>& wt, int64_t form, double c,
                                                        double f0, double f_inf, double a0, double inv_t,
                                                        double kappa, double hard_weight);

// Adds distill_epilogue to the extension module (called at the end of bindings_cpu.cpp).
void bind_distill(pybind11::module_& m);

}  // namespace fdivk
