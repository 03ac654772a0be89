// CUDA epilogues of the fused LM-head primitive (the GEMMs run in cuBLAS through torch).
//
// Only CUDA headers here (no torch): `nvcc -std=c++17 -arch=sm_90 -c` compiles this file alone.
// Math (per row, z = cap(raw + b) / T, cap(x) = c tanh(x / c)):
//   forward : lse = logsumexp z, logp = z[y] - lse, ent = lse - sum p z (online, one read of the row)
//   backward: coef = dz/draw * (g onehot(y) + (k - g) p - e p (z - (lse - ent))),  p = exp(z - lse)
// fp32/bf16/fp16 logits in, fp32 math and accumulation, fp32/bf16/fp16 coefficient out.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "launchers.h"

namespace {

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

struct Transform {
  bool has_cap;
  float cap, inv_cap, inv_t;
};

// z and dz/draw of one raw logit (bias already added). Explicitly rounded products (__fmul_rn:
// never contracted into an FMA with what follows), so every kernel that recomputes z from the
// same raw value gets the same bits: the forward's lse bounds p = exp(z - lse) <= 1 exactly.
__device__ __forceinline__ float apply(const Transform& tf, float raw, float* dz) {
  if (tf.has_cap) {
    const float th = tanhf(__fmul_rn(raw, tf.inv_cap));
    if (dz != nullptr) *dz = (1.0f - th * th) * tf.inv_t;
    return __fmul_rn(__fmul_rn(tf.cap, th), tf.inv_t);
  }
  if (dz != nullptr) *dz = tf.inv_t;
  return __fmul_rn(raw, tf.inv_t);
}

__device__ __forceinline__ float add_bias(float raw, const float* bias, int64_t v) {
  return bias != nullptr ? __fadd_rn(raw, bias[v]) : raw;
}

// Online softmax state: m = running max, s = sum exp(z - m), t = sum exp(z - m) (z - m).
struct Online {
  float m, s, t;
};

__device__ __forceinline__ void push(Online& st, float z) {
  if (z == -INFINITY) return;  // masked token (-inf bias): adds nothing, and avoids 0 * -inf
  if (z > st.m) {
    const float a = st.m == -INFINITY ? 0.0f : expf(st.m - z);
    const float shift = st.m == -INFINITY ? 0.0f : (st.m - z) * st.s;
    st.t = a * (st.t + shift);
    st.s = a * st.s + 1.0f;
    st.m = z;
  } else {
    const float d = z - st.m;
    const float e = expf(d);
    st.s += e;
    st.t += e * d;
  }
}

__device__ __forceinline__ Online merge(const Online& a, const Online& b) {
  if (a.s == 0.0f) return b;
  if (b.s == 0.0f) return a;
  const float m = fmaxf(a.m, b.m);
  const float ea = expf(a.m - m), eb = expf(b.m - m);
  Online r;
  r.m = m;
  r.s = ea * a.s + eb * b.s;
  r.t = ea * (a.t + (a.m - m) * a.s) + eb * (b.t + (b.m - m) * b.s);
  return r;
}

__device__ __forceinline__ Online warp_merge(Online st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.t = __shfl_xor_sync(0xffffffffu, st.t, off);
    st = merge(st, o);
  }
  return st;
}

constexpr int kFwdMaxThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kFwdMaxThreads) forward_kernel(const T* __restrict__ logits, int64_t V, int64_t ld, const float* __restrict__ bias,
                               const int64_t* __restrict__ labels, Transform tf, float* __restrict__ lse,
                               float* __restrict__ logp, float* __restrict__ ent) {
  __shared__ Online partial[32];
  const int64_t row = blockIdx.x;
  const T* z_row = logits + row * ld;
  Online st{-INFINITY, 0.0f, 0.0f};
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    push(st, apply(tf, add_bias(to_f32(z_row[v]), bias, v), nullptr));
  }
  st = warp_merge(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? partial[lane] : Online{-INFINITY, 0.0f, 0.0f};
    st = warp_merge(st);
    if (lane == 0) {
      const int64_t y = labels[row];
      const float raw_y = add_bias(to_f32(z_row[y]), bias, y);
      const float log_s = logf(st.s);
      const float l = st.m + log_s;
      lse[row] = l;
      logp[row] = apply(tf, raw_y, nullptr) - l;
      if (ent != nullptr) ent[row] = log_s - st.t / st.s;
    }
  }
}

constexpr int kBwdThreads = 256;
constexpr int kBwdItems = 8;  // columns per thread: a block covers 2048 columns of one row

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kBwdThreads) backward_kernel(const TIn* logits, TOut* coef, int64_t V, int64_t ld, const float* __restrict__ bias,
                                const int64_t* __restrict__ labels, Transform tf, const float* __restrict__ lse,
                                const float* __restrict__ ent, const float* __restrict__ grad_logp,
                                const float* __restrict__ grad_lse, const float* __restrict__ grad_ent) {
  const int64_t row = blockIdx.x;
  const int64_t y = labels[row];
  const float l = lse[row], g = grad_logp[row];
  const float a = grad_lse[row] - g;
  const float e = grad_ent != nullptr ? grad_ent[row] : 0.0f;
  const float mean_z = grad_ent != nullptr ? l - ent[row] : 0.0f;
  const TIn* in = logits + row * ld;
  TOut* out = coef + row * ld;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * kBwdThreads * kBwdItems + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kBwdItems; ++i) {
    const int64_t v = base + static_cast<int64_t>(i) * kBwdThreads;
    if (v < V) {
      float dz;
      const float z = apply(tf, add_bias(to_f32(in[v]), bias, v), &dz);
      const float p = expf(fminf(z - l, 0.0f));  // p <= 1 (a guard: z has the forward's bits)
      float c = p > 0.0f ? p * (a - e * (z - mean_z)) : 0.0f;  // z = -inf: p (z - mean_z) -> 0
      if (v == y) c += g;
      out[v] = from_f32<TOut>(c * dz);
    }
  }
}

// One-pass coefficient (fdiv_kernels/ops/fused.py): z holds raw = h W^T in float32 (row stride
// ld_in); coef = dz/draw * (g onehot(y) + (k - g) p - e p (z - (lse - ent))) is written as TOut
// with row stride ld_out, and may share z's storage row by row (coef row r starting at z row r's
// first byte, ld_out = ld_in * 4 / sizeof(TOut)). One block walks its row in order: each tile of
// kBwdThreads * kBwdItems columns is read into registers, then a barrier, then written. A write of
// tile j (bytes [2 b_j, 2 b_j + 2 T) for 16-bit TOut) only reaches float32 elements below
// b_j / 2 + T / 2, which were read before this tile's barrier (tile 0: by this tile), and never
// the bytes [4 b_{j+1}, ...) that tile j + 1 reads.
template <typename TOut>
__global__ void __launch_bounds__(kBwdThreads) coef_kernel(const float* z, int64_t ld_in, TOut* coef, int64_t ld_out,
                                                           int64_t V, const float* __restrict__ bias,
                                                           const int64_t* __restrict__ labels, Transform tf,
                                                           const float* __restrict__ lse, const float* __restrict__ ent,
                                                           const float* __restrict__ grad_logp,
                                                           const float* __restrict__ grad_lse,
                                                           const float* __restrict__ grad_ent) {
  const int64_t row = blockIdx.x;
  const int64_t y = labels[row];
  const float l = lse[row], g = grad_logp[row];
  const float a = grad_lse[row] - g;
  const float e = grad_ent != nullptr ? grad_ent[row] : 0.0f;
  const float mean_z = grad_ent != nullptr ? l - ent[row] : 0.0f;
  const float* in = z + row * ld_in;
  TOut* out = coef + row * ld_out;
  constexpr int64_t kTile = static_cast<int64_t>(kBwdThreads) * kBwdItems;
  for (int64_t base = 0; base < V; base += kTile) {
    float c[kBwdItems];
#pragma unroll
    for (int i = 0; i < kBwdItems; ++i) {
      const int64_t v = base + static_cast<int64_t>(i) * kBwdThreads + threadIdx.x;
      c[i] = 0.0f;
      if (v < V) {
        float dz;
        const float zv = apply(tf, add_bias(in[v], bias, v), &dz);
        const float p = expf(fminf(zv - l, 0.0f));  // p <= 1 (a guard: z has the forward's bits)
        float ci = p > 0.0f ? p * (a - e * (zv - mean_z)) : 0.0f;  // z = -inf: p (z - mean_z) -> 0
        if (v == y) ci += g;
        c[i] = ci * dz;
      }
    }
    __syncthreads();  // every read of this tile before any write into its bytes
#pragma unroll
    for (int i = 0; i < kBwdItems; ++i) {
      const int64_t v = base + static_cast<int64_t>(i) * kBwdThreads + threadIdx.x;
      if (v < V) out[v] = from_f32<TOut>(c[i]);
    }
  }
}

Transform make_transform(float softcap, float temperature) {
  Transform tf;
  tf.has_cap = softcap > 0.0f;
  tf.cap = tf.has_cap ? softcap : 1.0f;
  tf.inv_cap = tf.has_cap ? 1.0f / softcap : 1.0f;
  tf.inv_t = 1.0f / temperature;
  return tf;
}

template <typename T>
int launch_forward(const void* logits, int64_t rows, int64_t V, int64_t ld, const float* bias, const int64_t* labels,
                   Transform tf, float* lse, float* logp, float* ent, cudaStream_t stream) {
  const int threads = V >= 16384 ? kFwdMaxThreads : 256;
  forward_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const T*>(logits), V, ld, bias, labels, tf, lse, logp, ent);
  return static_cast<int>(cudaGetLastError());
}

template <typename TIn, typename TOut>
int launch_backward(const void* logits, void* coef, int64_t rows, int64_t V, int64_t ld, const float* bias,
                    const int64_t* labels, Transform tf, const float* lse, const float* ent, const float* grad_logp,
                    const float* grad_lse, const float* grad_ent, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kBwdThreads) * kBwdItems;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((V + per_block - 1) / per_block));
  backward_kernel<TIn, TOut><<<grid, kBwdThreads, 0, stream>>>(
      static_cast<const TIn*>(logits), static_cast<TOut*>(coef), V, ld, bias, labels, tf, lse, ent, grad_logp,
      grad_lse, grad_ent);
  return static_cast<int>(cudaGetLastError());
}

template <typename TIn>
int dispatch_backward_out(int coef_dtype, const void* logits, void* coef, int64_t rows, int64_t V, int64_t ld,
                          const float* bias, const int64_t* labels, Transform tf, const float* lse, const float* ent,
                          const float* grad_logp, const float* grad_lse, const float* grad_ent, cudaStream_t stream) {
  switch (coef_dtype) {
    case FDIV_F32:
      return launch_backward<TIn, float>(logits, coef, rows, V, ld, bias, labels, tf, lse, ent, grad_logp, grad_lse,
                                         grad_ent, stream);
    case FDIV_BF16:
      return launch_backward<TIn, __nv_bfloat16>(logits, coef, rows, V, ld, bias, labels, tf, lse, ent, grad_logp,
                                                 grad_lse, grad_ent, stream);
    case FDIV_F16:
      return launch_backward<TIn, __half>(logits, coef, rows, V, ld, bias, labels, tf, lse, ent, grad_logp, grad_lse,
                                          grad_ent, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

bool bad_shape(int64_t rows, int64_t V, int64_t ld) {
  return rows < 0 || V <= 0 || ld < V || rows > 2147483647LL || V > 2147483647LL * kBwdThreads;
}

}  // namespace

extern "C" int fdiv_cuda_forward_epilogue(const void* logits, int logits_dtype, int64_t rows, int64_t V, int64_t ld,
                                          const float* bias, const int64_t* labels, float softcap, float temperature,
                                          float* lse, float* logp, float* ent, void* stream) {
  if (bad_shape(rows, V, ld) || !(temperature > 0.0f)) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  const Transform tf = make_transform(softcap, temperature);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (logits_dtype) {
    case FDIV_F32:
      return launch_forward<float>(logits, rows, V, ld, bias, labels, tf, lse, logp, ent, s);
    case FDIV_BF16:
      return launch_forward<__nv_bfloat16>(logits, rows, V, ld, bias, labels, tf, lse, logp, ent, s);
    case FDIV_F16:
      return launch_forward<__half>(logits, rows, V, ld, bias, labels, tf, lse, logp, ent, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int fdiv_cuda_backward_epilogue(const void* logits, int logits_dtype, void* coef, int coef_dtype,
                                           int64_t rows, int64_t V, int64_t ld, const float* bias,
                                           const int64_t* labels, float softcap, float temperature, const float* lse,
                                           const float* ent, const float* grad_logp, const float* grad_lse,
                                           const float* grad_ent, void* stream) {
  if (bad_shape(rows, V, ld) || !(temperature > 0.0f)) return static_cast<int>(cudaErrorInvalidValue);
  if (grad_ent != nullptr && ent == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  const Transform tf = make_transform(softcap, temperature);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (logits_dtype) {
    case FDIV_F32:
      return dispatch_backward_out<float>(coef_dtype, logits, coef, rows, V, ld, bias, labels, tf, lse, ent, grad_logp,
                                          grad_lse, grad_ent, s);
    case FDIV_BF16:
      return dispatch_backward_out<__nv_bfloat16>(coef_dtype, logits, coef, rows, V, ld, bias, labels, tf, lse, ent,
                                                  grad_logp, grad_lse, grad_ent, s);
    case FDIV_F16:
      return dispatch_backward_out<__half>(coef_dtype, logits, coef, rows, V, ld, bias, labels, tf, lse, ent,
                                           grad_logp, grad_lse, grad_ent, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int fdiv_cuda_coef_epilogue(const float* z, int64_t ld_in, void* coef, int coef_dtype, int64_t ld_out,
                                       int64_t rows, int64_t V, const float* bias, const int64_t* labels, float softcap,
                                       float temperature, const float* lse, const float* ent, const float* grad_logp,
                                       const float* grad_lse, const float* grad_ent, void* stream) {
  if (bad_shape(rows, V, ld_in) || ld_out < V || !(temperature > 0.0f)) return static_cast<int>(cudaErrorInvalidValue);
  if (grad_ent != nullptr && ent == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  const Transform tf = make_transform(softcap, temperature);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(rows);
  switch (coef_dtype) {
    case FDIV_F32:
      coef_kernel<float><<<grid, kBwdThreads, 0, s>>>(z, ld_in, static_cast<float*>(coef), ld_out, V, bias, labels, tf,
                                                      lse, ent, grad_logp, grad_lse, grad_ent);
      break;
    case FDIV_BF16:
      coef_kernel<__nv_bfloat16><<<grid, kBwdThreads, 0, s>>>(z, ld_in, static_cast<__nv_bfloat16*>(coef), ld_out, V,
                                                              bias, labels, tf, lse, ent, grad_logp, grad_lse,
                                                              grad_ent);
      break;
    case FDIV_F16:
      coef_kernel<__half><<<grid, kBwdThreads, 0, s>>>(z, ld_in, static_cast<__half*>(coef), ld_out, V, bias, labels, tf,
                                                       lse, ent, grad_logp, grad_lse, grad_ent);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* fdiv_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
