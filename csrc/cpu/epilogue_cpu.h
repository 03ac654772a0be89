// Row epilogues of the CPU kernels: the per-row work on one segment of a logits tile, in plain C++
// (no torch headers: this translation unit is only loops, which GCC vectorises; kept apart from the
// ATen driver in token_stats_cpu.cpp, whose code stopped GCC from vectorising them).
//
// Every segment function is compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load
// time (GCC function multi-versioning), so one build runs everywhere and uses wide vectors.
#pragma once

#include <cmath>
#include <cstdint>

namespace fdivk {

struct Transform {
  bool has_cap;
  float cap;      // c
  float inv_cap;  // 1 / c
  float inv_t;    // 1 / T
};

// Online softmax state of one row over the vocabulary tiles seen so far:
// m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m).
struct Online {
  float m = -INFINITY, s = 0.0f, t = 0.0f;
};

inline void merge_into(Online& acc, const Online& o) {
  if (o.s == 0.0f) return;
  if (acc.s == 0.0f) {
    acc = o;
    return;
  }
  const float m = acc.m > o.m ? acc.m : o.m;
  const float ea = std::exp(acc.m - m), eo = std::exp(o.m - m);
  acc.t = ea * (acc.t + (acc.m - m) * acc.s) + eo * (o.t + (o.m - m) * o.s);
  acc.s = ea * acc.s + eo * o.s;
  acc.m = m;
}

// Transforms one row segment of raw logits in place (z = cap(raw) / T) and returns its state
// (m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m)). A segment of only -inf adds nothing.
Online forward_segment(float* z, int64_t n, const Transform& tf);

// z = cap(raw) / T in place; returns max z (-inf for a segment of only -inf). The one
// definition of the transform, shared by the forward and the two-pass backward (same bits).
float transform_segment(float* z, int64_t n, const Transform& tf);

// Two-pass backward: overwrites one row segment of *raw* logits with dL/draw (recomputing z with
// transform_segment, exactly as the forward did, so p = exp(z - lse) <= 1).
// a = k - g, e = dL/dent, mean_z = lse - ent; y = the label's column in the segment, or -1.
void backward_segment(float* c, int64_t V, int64_t y, const Transform& tf, float lse, float g, float a, float e,
                      float mean_z);

// One-pass: the segment holds z as stored by forward_segment; overwrites it with dL/draw.
void coef_segment(float* c, int64_t V, int64_t y, const Transform& tf, float lse, float g, float a, float e,
                  float mean_z);

// z[v] += b[v] over one row segment (the bias of the bf16 path, whose GEMM has none).
void add_row(float* z, const float* b, int64_t n);

// bf16 operands of the two gradient GEMMs of the bf16 path, from rows [r0, r1) of a float32
// coefficient tile c ([rows, cols], row stride cols), rounded to nearest even (NaN stays NaN):
// * rm: row-major [rows, ld_rm] (ld_rm >= cols; columns [cols, ld_rm) are set to 0): A of grad_h;
// * vnni: pairs of rows interleaved, [pairs][cols][2] (row r at pair r / 2, slot r % 2), each value
//   times vnni_scale before rounding: B of grad_weight. r0 is even; a row r1 == n_rows that is
//   odd (the last row has no partner) gets a zero partner.
void coef_to_bf16(const float* c, int64_t cols, int64_t r0, int64_t r1, int64_t n_rows, uint16_t* rm,
                  int64_t ld_rm, uint16_t* vnni, float vnni_scale);

// Layout changes of the bf16 path's operands, for a block of rows of the source (callers split
// the rows over threads): dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, in 32 x 32
// blocks. transpose_to_bf16 also rounds float32 to bf16 (nearest even).
void transpose_u16(const uint16_t* src, int64_t rows, int64_t cols, int64_t lds, uint16_t* dst, int64_t ldd);
void transpose_u32(const uint32_t* src, int64_t rows, int64_t cols, int64_t lds, uint32_t* dst, int64_t ldd);
void transpose_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t lds, uint16_t* dst, int64_t ldd);
// out[2 i] = a[i], out[2 i + 1] = b[i] (b == nullptr: 0), i < n: two rows in the vnni layout.
void interleave_u16(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* out);

// Test hooks: the vectorisable exp / tanh approximations used above, elementwise.
void exp_array(const float* x, float* out, int64_t n);
void tanh_array(const float* x, float* out, int64_t n);

}  // namespace fdivk
