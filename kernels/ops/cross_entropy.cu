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
//
// One block of kCEThreads threads per row. The row is cut into chunks of 8
// logits (the last one may be shorter); thread i owns chunks i, i + 512, …
// and reads each with one 16-byte access in bf16 (two in f32) when the
// logits pointer and the row stride keep every chunk 16-byte aligned
// (decided at launch), else element by element: the same chunks either way,
// so the two paths give the same bits. It issues kCEUnroll chunks' loads at
// a time, and keeps an online (max, sum of exp) that it rescales at most
// once per chunk: the chunk's maximum first, then one exp per logit. The
// threads' (max, sum) pairs are merged by warp butterflies, then the warp
// results by one more butterfly in every warp, so that all threads hold the
// same log-sum-exp after a single barrier.
//
// With the gradient, the row is read a second time. When the row fits in
// the shared memory of a block (vocab 50280 in bf16: 100.6 KB, two blocks an
// SM), the first pass keeps each chunk there as it loads it, so that the
// logits are read from memory once; otherwise the second pass re-reads
// them. The gradient pass writes each chunk with 16-byte stores.
#include <math.h>

#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kCEThreads = 512;
constexpr int kCEUnroll = 4;  // chunks whose loads a thread issues together
constexpr int kChunk = 8;     // logits per chunk: 16 bytes of bf16
constexpr int kWarps = kCEThreads / 32;
// Shared memory of a block outside the row cache (the warp results), with
// room to spare, counted against the per-block limit.
constexpr int64_t kCEStaticSmem = 1024;

// Eight consecutive logits as loaded: bf16 two to a 32-bit word (the lower
// address in the low half), f32 as they are. get(j) is the f32 value of
// logit j (exact for bf16, the upper half of an f32).
template <typename T>
struct Pack8;

template <>
struct Pack8<__nv_bfloat16> {
  uint32_t w[4];
  __device__ __forceinline__ float get(int j) const {
    const uint32_t u = w[j >> 1];
    return __uint_as_float((j & 1) ? (u & 0xffff0000u) : (u << 16));
  }
};

template <>
struct Pack8<float> {
  float f[8];
  __device__ __forceinline__ float get(int j) const { return f[j]; }
};

__device__ __forceinline__ uint32_t bf16_bits(__nv_bfloat16 v) { return uint32_t(__bfloat16_as_ushort(v)); }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return bf16_bits(__float2bfloat16_rn(lo)) | (bf16_bits(__float2bfloat16_rn(hi)) << 16);
}

// Loads logits [0, cnt) of p, cnt ≤ 8, the others read as −∞ (no part in
// the max or the sum; nothing is read for cnt = 0). vec: p is 16-byte
// aligned, and a full chunk is one or two 16-byte loads. Plain loads, not
// the read-only path: the same kernel overwrites the logits.
__device__ __forceinline__ void load8(Pack8<__nv_bfloat16>& q, const __nv_bfloat16* p, int cnt, bool vec) {
  if (vec && cnt == kChunk) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    q.w[0] = u.x;
    q.w[1] = u.y;
    q.w[2] = u.z;
    q.w[3] = u.w;
    return;
  }
  const uint32_t ninf = 0xff80u;  // bf16 −∞
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = 2 * i < cnt ? bf16_bits(p[2 * i]) : ninf;
    const uint32_t hi = 2 * i + 1 < cnt ? bf16_bits(p[2 * i + 1]) : ninf;
    q.w[i] = lo | (hi << 16);
  }
}

__device__ __forceinline__ void load8(Pack8<float>& q, const float* p, int cnt, bool vec) {
  if (vec && cnt == kChunk) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    q.f[0] = a.x;
    q.f[1] = a.y;
    q.f[2] = a.z;
    q.f[3] = a.w;
    q.f[4] = b.x;
    q.f[5] = b.y;
    q.f[6] = b.z;
    q.f[7] = b.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) q.f[i] = i < cnt ? p[i] : -INFINITY;
}

// Stores v[0, cnt) at p (rounded to bf16 to nearest even), as load8.
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&v)[8], int cnt, bool vec) {
  if (vec && cnt == kChunk) {
    uint4 u;
    u.x = pack_bf16x2(v[0], v[1]);
    u.y = pack_bf16x2(v[2], v[3]);
    u.z = pack_bf16x2(v[4], v[5]);
    u.w = pack_bf16x2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < cnt) p[i] = __float2bfloat16_rn(v[i]);
  }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[8], int cnt, bool vec) {
  if (vec && cnt == kChunk) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < cnt) p[i] = v[i];
  }
}

// Chunk c of the row cache in shared memory (16 bytes a chunk in bf16, 32 in
// f32; a short last chunk is kept with its −∞ fill).
__device__ __forceinline__ void cache_put(uint4* cache, int64_t c, const Pack8<__nv_bfloat16>& q) {
  cache[c] = make_uint4(q.w[0], q.w[1], q.w[2], q.w[3]);
}

__device__ __forceinline__ void cache_put(uint4* cache, int64_t c, const Pack8<float>& q) {
  float4* f = reinterpret_cast<float4*>(cache) + 2 * c;
  f[0] = make_float4(q.f[0], q.f[1], q.f[2], q.f[3]);
  f[1] = make_float4(q.f[4], q.f[5], q.f[6], q.f[7]);
}

__device__ __forceinline__ void cache_get(Pack8<__nv_bfloat16>& q, const uint4* cache, int64_t c) {
  const uint4 u = cache[c];
  q.w[0] = u.x;
  q.w[1] = u.y;
  q.w[2] = u.z;
  q.w[3] = u.w;
}

__device__ __forceinline__ void cache_get(Pack8<float>& q, const uint4* cache, int64_t c) {
  const float4* f = reinterpret_cast<const float4*>(cache) + 2 * c;
  const float4 a = f[0], b = f[1];
  q.f[0] = a.x;
  q.f[1] = a.y;
  q.f[2] = a.z;
  q.f[3] = a.w;
  q.f[4] = b.x;
  q.f[5] = b.y;
  q.f[6] = b.z;
  q.f[7] = b.w;
}

// A softmax denominator s = Σ exp(x − m) relative to the running maximum m;
// {−∞, 0} is empty.
struct MaxSum {
  float m, s;
};

// Merges two partial denominators. Symmetric to the bit (the products are
// rounded apart, never fused, and a + b == b + a), so that both lanes of a
// butterfly step get the same result.
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return MaxSum{m, 0.0f};
  return MaxSum{m, __fmul_rn(a.s, expf(a.m - m)) + __fmul_rn(b.s, expf(b.m - m))};
}

// Adds a chunk to the running (max, sum): the chunk's max first, so that
// the sum is rescaled at most once, then one exp per logit.
template <typename T>
__device__ __forceinline__ void absorb(MaxSum& acc, const Pack8<T>& q) {
  float x[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) x[u] = q.get(u);
  const float mx = fmaxf(fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])), fmaxf(fmaxf(x[4], x[5]), fmaxf(x[6], x[7])));
  const float m = fmaxf(acc.m, mx);
  if (m == -INFINITY) return;  // only −∞ so far
  float s = acc.s;
  if (m > acc.m) s *= expf(acc.m - m);  // from the empty state: 0·0
  float e[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) e[u] = expf(x[u] - m);
  acc.m = m;
  acc.s = s + (((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7])));
}

// Butterfly merge over the 32 lanes of a warp: every lane ends with the same
// bits.
__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, other);
  }
  return v;
}

// One block per row. kCache: the row is kept in dynamic shared memory
// (ceil(vocab/8)·8 logits) between the two passes; only with compute_grad.
template <typename T, bool kCache>
__global__ void __launch_bounds__(kCEThreads, 2)
    ce_kernel(T* __restrict__ logits, int64_t ld, const int32_t* __restrict__ targets, float* __restrict__ row_loss,
              int64_t vocab, float grad_scale, int compute_grad, bool vec) {
  extern __shared__ uint4 ce_cache[];
  __shared__ float warp_m[kWarps], warp_s[kWarps];
  const int64_t row = blockIdx.x;
  T* lg = logits + row * ld;
  const int32_t tgt = targets[row];
  const int64_t nchunk = ceil_div(vocab, kChunk);
  const int64_t step = int64_t(kCEThreads) * kCEUnroll;
  if (tgt < 0) {
    if (threadIdx.x == 0) row_loss[row] = 0.0f;
    if (compute_grad) {
      const float zero[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t c = threadIdx.x; c < nchunk; c += kCEThreads) {
        const int cnt = int(min(int64_t(kChunk), vocab - c * kChunk));
        store8(lg + c * kChunk, zero, cnt, vec);
      }
    }
    return;
  }
  const bool valid = int64_t(tgt) < vocab;
  // The target's logit, read before any thread of the block writes the row
  // (the writes follow the barrier of the merge below).
  const float tv = threadIdx.x == 0 && valid ? load(lg, int64_t(tgt)) : 0.0f;

  MaxSum acc{-INFINITY, 0.0f};
  for (int64_t c0 = threadIdx.x; c0 < nchunk; c0 += step) {
    Pack8<T> q[kCEUnroll];
#pragma unroll
    for (int u = 0; u < kCEUnroll; ++u) {
      const int64_t c = c0 + int64_t(u) * kCEThreads;
      const int cnt = c < nchunk ? int(min(int64_t(kChunk), vocab - c * kChunk)) : 0;
      load8(q[u], lg + c * kChunk, cnt, vec);
    }
#pragma unroll
    for (int u = 0; u < kCEUnroll; ++u) {
      const int64_t c = c0 + int64_t(u) * kCEThreads;
      if (kCache && c < nchunk) cache_put(ce_cache, c, q[u]);
      absorb(acc, q[u]);  // a chunk past the end is all −∞: no change
    }
  }
  acc = warp_merge(acc);
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  if (lane == 0) {
    warp_m[warp] = acc.m;
    warp_s[warp] = acc.s;
  }
  __syncthreads();
  MaxSum tot{-INFINITY, 0.0f};
  if (lane < kWarps) tot = MaxSum{warp_m[lane], warp_s[lane]};
  tot = warp_merge(tot);
  const float lse = tot.m + logf(tot.s);
  if (threadIdx.x == 0) row_loss[row] = valid ? lse - tv : __int_as_float(0x7fc00000);
  if (!compute_grad) return;

  for (int64_t c0 = threadIdx.x; c0 < nchunk; c0 += step) {
    Pack8<T> q[kCEUnroll];
#pragma unroll
    for (int u = 0; u < kCEUnroll; ++u) {
      const int64_t c = c0 + int64_t(u) * kCEThreads;
      const int cnt = c < nchunk ? int(min(int64_t(kChunk), vocab - c * kChunk)) : 0;
      if (kCache) {
        if (cnt > 0) cache_get(q[u], ce_cache, c);
      } else {
        load8(q[u], lg + c * kChunk, cnt, vec);
      }
    }
#pragma unroll
    for (int u = 0; u < kCEUnroll; ++u) {
      const int64_t c = c0 + int64_t(u) * kCEThreads;
      const int cnt = c < nchunk ? int(min(int64_t(kChunk), vocab - c * kChunk)) : 0;
      if (cnt == 0) continue;
      const int64_t hot = int64_t(tgt) - c * kChunk;  // the target's place in the chunk, if in [0, 8)
      float g[8];
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        g[v] = expf(q[u].get(v) - lse) * grad_scale;
        if (v == hot) g[v] -= grad_scale;
      }
      store8(lg + c * kChunk, g, cnt, vec);
    }
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

// Whether a row cache of bytes fits the shared memory of one block, after
// raising ce_kernel<T, true>'s dynamic shared memory limit to it. A failed
// query or setting leaves no error behind and means no cache.
template <typename T>
bool enable_row_cache(int64_t bytes) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (bytes + kCEStaticSmem > int64_t(optin)) return false;
  if (cudaFuncSetAttribute(ce_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // A hint only: favour shared memory over L1 so that two blocks fit an SM.
  if (cudaFuncSetAttribute(ce_kernel<T, true>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           int(cudaSharedmemCarveoutMaxShared)) != cudaSuccess) {
    cudaGetLastError();
  }
  return true;
}

template <typename T>
void launch_ce(T* logits, int64_t ld, const int32_t* targets, float* row_loss, int64_t n, int64_t vocab,
               float grad_scale, int compute_grad, cudaStream_t s) {
  const bool vec = (reinterpret_cast<uintptr_t>(logits) & 15) == 0 && (ld * int64_t(sizeof(T))) % 16 == 0;
  const int64_t cache_bytes = ceil_div(vocab, kChunk) * kChunk * int64_t(sizeof(T));
  if (compute_grad && enable_row_cache<T>(cache_bytes)) {
    ce_kernel<T, true><<<unsigned(n), kCEThreads, size_t(cache_bytes), s>>>(logits, ld, targets, row_loss, vocab,
                                                                           grad_scale, compute_grad, vec);
    return;
  }
  ce_kernel<T, false><<<unsigned(n), kCEThreads, 0, s>>>(logits, ld, targets, row_loss, vocab, grad_scale,
                                                         compute_grad, vec);
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
    launch_ce((float*)logits, ld, tg, (float*)row_loss, n, vocab, grad_scale, compute_grad, s);
  } else {
    launch_ce((__nv_bfloat16*)logits, ld, tg, (float*)row_loss, n, vocab, grad_scale, compute_grad, s);
  }
  if (loss_sum) loss_sum_kernel<<<1, 256, 0, s>>>((double*)loss_sum, (const float*)row_loss, n);
  return launch_status();
}
