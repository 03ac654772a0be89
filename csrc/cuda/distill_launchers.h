// extern "C" launcher of the CUDA distillation epilogue (csrc/cuda/distill_epilogue.cu), called by
// csrc/cuda/distill_bindings_cuda.cpp. Plain C types only, as launchers.h: the .cu needs no torch
// headers and compiles with `nvcc -std=c++17 -arch=sm_90 -c` alone.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The form's constants (fdiv_kernels/kernels/distill_cuda.py fills them from the spec; the math is
// fdiv_kernels/formulas/distill.py's chunk_epilogue): form = FORM_IDS[name]; c = js's beta or
// alpha's a; ac, swap = the a of alpha's term (1 - a and 1 when a < 1/2); f0, f_inf, a0 = the
// limits where one probability is 0, each flagged *_inf when infinite.
typedef struct {
  int form;
  float inv_t, div_scale, hard_weight;
  float c, log_c, log_1mc, ac, swap;
  float f0, f_inf, a0;
  int f0_inf, f_inf_inf, a0_inf, hard, raw;
} FdivDistillArgs;

// zt, zs: float32 [rows, V] row-major raw logits (bias added); labels int64 [rows]; wt float32
// [rows] row weights or NULL (values only). Writes div/nll float32 [rows]; with wt, zt is scratch
// and zs becomes dL/dzs. One block per row. Returns a cudaError_t as int (0 = success).
int fdiv_cuda_distill_epilogue(float* zt, float* zs, const int64_t* labels, const float* wt, float* div, float* nll,
                               int64_t rows, int64_t V, FdivDistillArgs args, void* stream);

#ifdef __cplusplus
}
#endif
