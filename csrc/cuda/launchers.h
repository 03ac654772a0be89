// extern "C" launchers of the CUDA epilogues (csrc/cuda/token_stats_epilogue.cu).
//
// Plain C types only, so the binding (bindings_cuda.cpp) needs no CUDA headers and the .cu needs
// no torch headers: the .cu compiles with `nvcc -std=c++17 -arch=sm_90 -c` in seconds.
// `stream` is a cudaStream_t passed as an opaque pointer (torch.cuda.current_stream().cuda_stream).
// Every launcher returns a cudaError_t as int (0 = success); fdiv_cuda_error_string() names it.
//
// Logits chunks are row-major [rows, ld] with V <= ld valid columns; `dtype` of a buffer is one of
// FDIV_F32, FDIV_BF16, FDIV_F16. `bias` is float32 [V] or NULL; softcap <= 0 means no soft-cap.
#pragma once

#include <stdint.h>

#define FDIV_F32 0
#define FDIV_BF16 1
#define FDIV_F16 2

#ifdef __cplusplus
extern "C" {
#endif

// Forward epilogue. raw logits (h W^T, without bias) -> per row
//   z = cap(raw + bias) / T, lse = logsumexp z, logp = z[y] - lse, ent = lse - sum softmax(z) z.
// lse/logp are float32 [rows]; ent may be NULL. One block per row, online log-sum-exp.
int fdiv_cuda_forward_epilogue(const void* logits, int logits_dtype, int64_t rows, int64_t V, int64_t ld,
                               const float* bias, const int64_t* labels, float softcap, float temperature,
                               float* lse, float* logp, float* ent, void* stream);

// Backward epilogue: coef = dz/draw * (g onehot(y) + (k - g) p - e p (z - (lse - ent))) with
// p = exp(z - lse), written to `coef` (coef_dtype, same [rows, ld] layout; may alias `logits` when
// the dtypes match). grad_ent / ent may be NULL (no entropy gradient).
int fdiv_cuda_backward_epilogue(const void* logits, int logits_dtype, void* coef, int coef_dtype, int64_t rows,
                                int64_t V, int64_t ld, const float* bias, const int64_t* labels, float softcap,
                                float temperature, const float* lse, const float* ent, const float* grad_logp,
                                const float* grad_lse, const float* grad_ent, void* stream);

// One-pass coefficient (fdiv_kernels/ops/fused.py): `z` is float32 raw logits h W^T (row stride
// ld_in); coef (coef_dtype, row stride ld_out) may share z's storage row by row, e.g. a bf16 coef
// with ld_out = 2 * ld_in written over the first half of each float32 row. One block per row.
int fdiv_cuda_coef_epilogue(const float* z, int64_t ld_in, void* coef, int coef_dtype, int64_t ld_out, int64_t rows,
                            int64_t V, const float* bias, const int64_t* labels, float softcap, float temperature,
                            const float* lse, const float* ent, const float* grad_logp, const float* grad_lse,
                            const float* grad_ent, void* stream);

const char* fdiv_cuda_error_string(int err);

#ifdef __cplusplus
}
#endif
