// Device helpers shared by the per-position operations in kernels/ops:
// activation loads and stores in either dtype, deterministic block
// reductions, and the fixed-order second pass that turns per-block column
// partials into a parameter gradient.
//
// Every reduction here has a fixed shape that depends only on the problem
// size, never on the GPU, the launch order or timing, so a result is
// bitwise reproducible run to run (no floating-point atomics anywhere).
#pragma once

// Argument checks of the entry points: on failure, record which argument
// broke which rule (m2k_last_error_detail) and return the status.
#define M2K_REQUIRE(cond, code, ...)                      \
  do {                                                    \
    if (!(cond)) return m2k::fail((code), __VA_ARGS__); \
  } while (0)
#define M2K_ARG(cond, ...) M2K_REQUIRE(cond, M2K_ERR_INVALID_ARG, __VA_ARGS__)
#define M2K_CHECK_DTYPE(d) \
  M2K_ARG((d) == M2K_F32 || (d) == M2K_BF16, "dtype = %d: must be M2K_F32 (0) or M2K_BF16 (1)", int(d))
#define M2K_CHECK_PTR(p) M2K_ARG((p) != nullptr, #p " is NULL: a device pointer is required")

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/m2k_internal.cuh"

namespace m2k_ops {
// Everything here has internal linkage: each .cu is its own translation
// unit, and kernels with external linkage in a header would be defined once
// per unit in the shared library.
namespace {

// Rows of a column reduction that one block sums before the partials are
// added in block order. A constant, so that the summation order (and the
// bits of every parameter gradient) depend on the problem size alone.
constexpr int kRowsPerPartial = 32;

// Threads per block of the column-partial kernels; one column per thread.
constexpr int kColumnThreads = 256;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Round a byte count up to the 256-byte alignment cudaMalloc gives, so that
// sub-buffers carved from one workspace stay aligned.
inline int64_t align_up(int64_t bytes) { return (bytes + 255) & ~int64_t(255); }

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i);

template <>
__device__ __forceinline__ float load<float>(const float* p, int64_t i) {
  return p[i];
}

template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, float v);

template <>
__device__ __forceinline__ void store<float>(float* p, int64_t i, float v) {
  p[i] = v;
}

template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float sigmoidf_(float u) { return 1.0f / (1.0f + expf(-u)); }

__device__ __forceinline__ float siluf_(float u) { return u * sigmoidf_(u); }

// d silu(u)/du = σ(u)·(1 + u·(1−σ(u))).
__device__ __forceinline__ float silu_gradf_(float u) {
  float s = sigmoidf_(u);
  return s * (1.0f + u * (1.0f - s));
}

// Butterfly sum over a warp: at every level lane i adds lane i^m, and since
// a+b == b+a exactly, all lanes end with the same bits.
template <typename F>
__device__ __forceinline__ F warp_sum(F v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a
// multiple of 32. scratch holds at least 33 values of F; the call ends with
// a barrier, so scratch may be reused right after.
template <typename F>
__device__ F block_sum(F v, F* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    F w = lane < nwarps ? scratch[lane] : F(0);
    w = warp_sum(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  F total = scratch[32];
  __syncthreads();
  return total;
}

// out[j] += Σ_p partial[p·stride + j] for j < width, the partials added in
// index order p = 0, 1, …: the fixed-order second pass of a column
// reduction. One thread per column. The additions form one dependent chain
// per column; the loads do not, so they are issued kReduceAhead at a time
// ahead of the chain (a narrow reduction, d_model 64 say, is one block that
// would otherwise wait on every load in turn).
constexpr int kReduceAhead = 16;

__global__ void reduce_partials_kernel(float* __restrict__ out, const float* __restrict__ partial,
                                       int64_t parts, int64_t width, int64_t stride) {
  int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  float acc = 0.0f;
  int64_t p = 0;
  for (; p + kReduceAhead <= parts; p += kReduceAhead) {
    float v[kReduceAhead];
#pragma unroll
    for (int u = 0; u < kReduceAhead; ++u) v[u] = partial[(p + u) * stride + j];
#pragma unroll
    for (int u = 0; u < kReduceAhead; ++u) acc += v[u];
  }
  for (; p < parts; ++p) acc += partial[p * stride + j];
  out[j] += acc;
}

// Threads of a one-block-per-row kernel over rows of d values: the 256 of a
// full block, or for a narrower row the warps that cover it. Each thread
// then holds the same columns as with 256, and the block sums (warp
// butterflies, then the warp totals, the missing warps adding +0 in both
// cases) give the same bits: only the idle warps go.
inline unsigned row_threads(int64_t d, int full = 256) {
  const int64_t w = ceil_div(d, 32) * 32;
  return unsigned(w < full ? w : full);
}

inline void launch_reduce_partials(float* out, const float* partial, int64_t parts, int64_t width,
                                   int64_t stride, cudaStream_t stream) {
  if (width <= 0) return;
  unsigned grid = unsigned(ceil_div(width, kColumnThreads));
  reduce_partials_kernel<<<grid, kColumnThreads, 0, stream>>>(out, partial, parts, width, stride);
}

using m2k::launch_status;


}  // namespace
}  // namespace m2k_ops
