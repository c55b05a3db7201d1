// Cross-entropy over the vocabulary for a block of positions, with the
// gradient written over the logits in place: the LM head produces the logits
// of a block of rows with a GEMM, this op turns them into per-row losses and
// dlogits = (softmax − onehot)·grad_scale, and two more GEMMs take dlogits
// to the gradients of the hidden states and the head matrix. Only one block
// of logits exists at a time; no probability tensor is kept.
//
// A row whose target is negative is not counted: its loss is zero and its
// gradient row is zero (model/ref's convention for positions without a
// target). A target at or above the vocabulary size is a caller error; the
// row's loss is NaN so that it cannot pass unnoticed.
#include <math.h>

#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kCEThreads = 512;  // a power of two: the (max, sum) tree halves it

struct MaxSum {
  float m, s;
};

// Combine two partial softmax denominators taken relative to their own maxima.
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

template <typename T>
__global__ void ce_kernel(T* __restrict__ logits, int64_t ld, const int32_t* __restrict__ targets,
                          float* __restrict__ row_loss, int64_t vocab, float grad_scale, int compute_grad) {
  __shared__ float sm[kCEThreads], ss[kCEThreads];
  const int64_t row = blockIdx.x;
  T* lg = logits + row * ld;
  const int32_t tgt = targets[row];
  if (tgt < 0) {
    if (threadIdx.x == 0) row_loss[row] = 0.0f;
    if (compute_grad) {
      for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) store(lg, j, 0.0f);
    }
    return;
  }
  // Online (max, sum of exp) per thread over a strided slice of the row.
  MaxSum acc{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = load(lg, j);
    if (v > acc.m) {
      acc.s = acc.s * expf(acc.m - v) + 1.0f;
      acc.m = v;
    } else {
      acc.s += expf(v - acc.m);
    }
  }
  sm[threadIdx.x] = acc.m;
  ss[threadIdx.x] = acc.s;
  __syncthreads();
  for (int stride = kCEThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      MaxSum c = combine(MaxSum{sm[threadIdx.x], ss[threadIdx.x]},
                         MaxSum{sm[threadIdx.x + stride], ss[threadIdx.x + stride]});
      sm[threadIdx.x] = c.m;
      ss[threadIdx.x] = c.s;
    }
    __syncthreads();
  }
  const float lse = sm[0] + logf(ss[0]);
  if (threadIdx.x == 0) {
    row_loss[row] = int64_t(tgt) < vocab ? lse - load(lg, tgt) : __int_as_float(0x7fc00000);
  }
  if (!compute_grad) return;
  // Thread 0 has just read the target's logit, which the thread owning
  // index tgt overwrites below.
  __syncthreads();
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float g = expf(load(lg, j) - lse) * grad_scale;
    if (j == tgt) g -= grad_scale;
    store(lg, j, g);
  }
}

// loss_sum += Σ row_loss in a fixed order (double accumulation).
__global__ void loss_sum_kernel(double* __restrict__ loss_sum, const float* __restrict__ row_loss, int64_t n) {
  __shared__ double scratch[33];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += double(row_loss[i]);
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *loss_sum += acc;
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

extern "C" int m2k_cross_entropy(int dtype, void* logits, int64_t ld, const void* targets, int64_t n, int64_t vocab,
                                 float grad_scale, int compute_grad, void* row_loss, void* loss_sum, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(logits);
  M2K_CHECK_PTR(targets);
  M2K_CHECK_PTR(row_loss);
  M2K_ARG(n >= 1 && n <= INT32_MAX, "n = %lld: must be in [1, 2^31)", (long long)n);
  M2K_ARG(vocab >= 1 && vocab <= INT32_MAX, "vocab = %lld: must be in [1, 2^31)", (long long)vocab);
  M2K_ARG(ld >= vocab, "ld = %lld: must be at least vocab = %lld", (long long)ld, (long long)vocab);
  cudaStream_t s = (cudaStream_t)stream;
  const int32_t* tg = (const int32_t*)targets;
  if (dtype == M2K_F32) {
    ce_kernel<<<unsigned(n), kCEThreads, 0, s>>>((float*)logits, ld, tg, (float*)row_loss, vocab, grad_scale,
                                                 compute_grad);
  } else {
    ce_kernel<<<unsigned(n), kCEThreads, 0, s>>>((__nv_bfloat16*)logits, ld, tg, (float*)row_loss, vocab, grad_scale,
                                                 compute_grad);
  }
  if (loss_sum) loss_sum_kernel<<<1, 256, 0, s>>>((double*)loss_sum, (const float*)row_loss, n);
  return launch_status();
}
