// Row loops of the cpu distillation epilogue, in plain C++ (no torch headers: this translation unit
// is only loops, which GCC vectorises; see distill_rows_cpu.cpp).
#pragma once

#include <cstdint>

namespace fdivk {

// Per-call constants of the row loops (distill_cpu.cpp fills them from the form and the spec).
struct DistillRowArgs {
  int form;        // FORM_IDS of fdiv_kernels/formulas/distill.py
  float c;         // js's beta, alpha's a
  float log_c;     // js: log(beta)
  float log_1mc;   // js: log(1 - beta)
  bool swap;       // alpha < 1/2: its term in the dual form p_t f_(1-a)(p_s / p_t)
  float ac;        // alpha: the a of the term (1 - a when swapped)
  float f0, f_inf, a0;  // the limits (module docstring of formulas/distill.py), possibly inf
  float inv_t;     // 1 / T
  bool hard;       // hard_weight > 0
};

// One row: zt, zs [V] raw logits (zt is overwritten: scratch). Writes *div and *nll (0
// without the hard label); with coef, zs becomes
// coef_scale (pa - p_s sum pa) + hard_scale (softmax(zs) - onehot(y)).
void distill_row(float* zt, float* zs, int64_t V, int64_t y, const DistillRowArgs& a, bool coef, float coef_scale,
                 float hard_scale, float* div, float* nll);

}  // namespace fdivk
