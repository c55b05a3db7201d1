// AdamW over the flat fp32 parameter, gradient and moment buffers, and the
// global gradient norm.
//
// The update follows model/optim.go (PyTorch's AdamW) operation by
// operation, each rounded to fp32 on its own (no fused multiply-adds), and
// the scalars are formed in double on the host exactly as the CPU optimizer
// forms them, so that the GPU update matches the CPU one bit for bit.
//
// The norm sums squares in double over fixed blocks of 2^14 elements (the
// grouping of model.GradNorm) and adds the block sums in a fixed tree, so
// its bits depend on the buffer alone.
#include <math.h>

#include <algorithm>

#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int64_t kNormBlock = 1 << 14;  // elements per partial, as model.GradNorm
constexpr int kNormThreads = 256;

struct AdamScalars {
  float b1, omb1, b2, omb2, eps, shrink, step_size, sqrt_bc2, grad_scale;
};

// True when element i lies in one of the sorted, disjoint [start, end)
// ranges (pairs in ranges[0 .. 2·nranges)).
__device__ __forceinline__ bool in_ranges(const int64_t* __restrict__ ranges, int64_t nranges, int64_t i) {
  int64_t lo = 0, hi = nranges;  // find the last range with start <= i
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (ranges[2 * mid] <= i) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo > 0 && i < ranges[2 * (lo - 1) + 1];
}

__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, int64_t n, const int64_t* __restrict__ nodecay, int64_t nranges,
                             AdamScalars a) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float gi = g[i];
    if (a.grad_scale != 1.0f) gi = __fmul_rn(gi, a.grad_scale);
    const float mi = __fadd_rn(__fmul_rn(a.b1, m[i]), __fmul_rn(a.omb1, gi));
    const float vi = __fadd_rn(__fmul_rn(a.b2, v[i]), __fmul_rn(__fmul_rn(a.omb2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), a.sqrt_bc2), a.eps);
    const float shrink = (nranges > 0 && in_ranges(nodecay, nranges, i)) ? 1.0f : a.shrink;
    p[i] = __fsub_rn(__fmul_rn(p[i], shrink), __fdiv_rn(__fmul_rn(a.step_size, mi), denom));
  }
}

__global__ void sumsq_partial_kernel(double* __restrict__ part, const float* __restrict__ g, int64_t n) {
  __shared__ double scratch[33];
  const int64_t i0 = int64_t(blockIdx.x) * kNormBlock, i1 = min(i0 + kNormBlock, n);
  double acc = 0.0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const double x = g[i];
    acc += x * x;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

__global__ void norm_final_kernel(double* __restrict__ out, const double* __restrict__ part, int64_t parts) {
  __shared__ double scratch[33];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) acc += part[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *out = sqrt(acc);
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

extern "C" int m2k_adamw(void* params, const void* grads, void* m, void* v, int64_t n, const void* nodecay_ranges,
                         int64_t nranges, double lr, double beta1, double beta2, double eps, double weight_decay,
                         int64_t step, float grad_scale, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_PTR(params);
  M2K_CHECK_PTR(grads);
  M2K_CHECK_PTR(m);
  M2K_CHECK_PTR(v);
  M2K_ARG(n >= 1, "n = %lld: must be positive", (long long)n);
  M2K_ARG(nranges >= 0, "nranges = %lld: must be >= 0", (long long)nranges);
  M2K_ARG(nranges == 0 || nodecay_ranges, "nodecay_ranges is NULL with nranges = %lld", (long long)nranges);
  M2K_ARG(step >= 1, "step = %lld: must be >= 1 (the count of updates including this one)", (long long)step);
  M2K_ARG(lr >= 0, "lr = %g: must be >= 0", lr);
  M2K_ARG(beta1 >= 0 && beta1 < 1, "beta1 = %g: must be in [0, 1)", beta1);
  M2K_ARG(beta2 >= 0 && beta2 < 1, "beta2 = %g: must be in [0, 1)", beta2);
  M2K_ARG(eps > 0, "eps = %g: must be positive", eps);
  M2K_ARG(weight_decay >= 0, "weight_decay = %g: must be >= 0", weight_decay);
  M2K_ARG(grad_scale >= 0.0f && grad_scale <= 1e30f, "grad_scale = %g: must be finite and >= 0", double(grad_scale));
  // The scalars exactly as model.AdamW.Update forms them.
  const double bc1 = 1 - pow(beta1, double(step));
  const double bc2 = 1 - pow(beta2, double(step));
  AdamScalars a;
  a.b1 = float(beta1);
  a.omb1 = float(1 - beta1);
  a.b2 = float(beta2);
  a.omb2 = float(1 - beta2);
  a.eps = float(eps);
  a.shrink = float(1 - lr * weight_decay);
  a.step_size = float(lr / bc1);
  a.sqrt_bc2 = float(sqrt(bc2));
  a.grad_scale = grad_scale;
  const int threads = 256;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(n, threads), 132 * 32));
  adamw_kernel<<<blocks, threads, 0, (cudaStream_t)stream>>>((float*)params, (const float*)grads, (float*)m,
                                                              (float*)v, n, (const int64_t*)nodecay_ranges, nranges,
                                                              a);
  return launch_status();
}

extern "C" int m2k_grad_norm_workspace(int64_t n, int64_t* bytes) {
  m2k::clear_detail();
  M2K_CHECK_PTR(bytes);
  M2K_ARG(n >= 1, "n = %lld: must be positive", (long long)n);
  *bytes = align_up(ceil_div(n, kNormBlock) * int64_t(sizeof(double)));
  return M2K_OK;
}

extern "C" int m2k_grad_norm(const void* grads, int64_t n, void* out, void* workspace, int64_t workspace_bytes,
                             void* stream) {
  m2k::clear_detail();
  M2K_CHECK_PTR(grads);
  M2K_CHECK_PTR(out);
  M2K_CHECK_PTR(workspace);
  M2K_ARG(n >= 1, "n = %lld: must be positive", (long long)n);
  const int64_t parts = ceil_div(n, kNormBlock);
  const int64_t need = parts * int64_t(sizeof(double));
  M2K_REQUIRE(workspace_bytes >= need, M2K_ERR_WORKSPACE,
              "workspace_bytes = %lld: m2k_grad_norm_workspace requires %lld", (long long)workspace_bytes,
              (long long)need);
  cudaStream_t s = (cudaStream_t)stream;
  sumsq_partial_kernel<<<unsigned(parts), kNormThreads, 0, s>>>((double*)workspace, (const float*)grads, n);
  norm_final_kernel<<<1, kNormThreads, 0, s>>>((double*)out, (const double*)workspace, parts);
  return launch_status();
}
