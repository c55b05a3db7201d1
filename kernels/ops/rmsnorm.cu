// Fused residual add + RMSNorm (the pre-norm of every Mamba-2 block and the
// final norm), forward and backward, and the bias helpers of the
// projections.
//
// The residual stream is fp32 (MAMBA2_SPEC.md §8 item 7): the forward pass
// forms res = residual + x (+ bias) in fp32, keeps it for the next block and
// for the backward pass, and normalises it; the normalised output, which
// feeds a GEMM, is written in the activation dtype.
//
// Row kernels (forward, backward): one block per row. The row is cut into
// groups of V columns, V = kNormVec = 4 where d and every pointer allow one
// access per group (16 bytes of f32, 8 of bf16), else V = 1; thread i owns
// groups i, i + threads, …, at most K = 1, 2, 4 or 8 of them, chosen with
// the thread count so that the groups fill the block evenly (d = 768: 192
// threads of one group; d = 2560: 160 threads of four). A thread first
// issues the loads of all its groups, then sums its squares (or dot
// products), and after the block sum computes its outputs from the values
// still in registers: the row is read once, with all its loads in flight at
// the same time, and never re-read. Rows too long for 8 groups a thread
// (d > 8192, or d > 2048 on the one-column path) take the wide kernels,
// which stream the row twice.
//
// The weight gradient keeps its two passes: per block of kRowsPerPartial
// rows a partial, each column summed in row order (a thread owns V columns
// and issues the loads of kDwBatch rows before it adds them), then
// launch_reduce_partials adds the partials in block order.
#include <string.h>

#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kNormThreads = 256;
constexpr int kNormVec = 4;       // columns per access on the vector path
constexpr int kNormMaxGroups = 8;  // groups per thread held in registers, at most
constexpr int kDwBatch = 8;        // rows whose loads a dw-partial thread issues together

// The f32 values of the bf16 in the low and the high half of u (exact: a
// bf16 is the upper half of an f32).
__device__ __forceinline__ float bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

// Two bf16 values rounded from f32 (lo at the lower address), as the 32 bits
// that hold them.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  unsigned u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// V consecutive values of T as one access: Raw holds them as loaded, so that
// all the loads of a row are issued before any of them is converted. V = 4
// needs the address aligned to 4·sizeof(T). Plain loads, not the read-only
// path: residual may be the res_out the same kernel writes.
template <typename T, int V>
struct Pack;

template <>
struct Pack<float, 1> {
  using Raw = float;
  static __device__ __forceinline__ Raw zero() { return 0.0f; }
  static __device__ __forceinline__ Raw ld(const float* p) { return *p; }
  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[1]) { f[0] = r; }
  static __device__ __forceinline__ void st(float* p, const float (&f)[1]) { *p = f[0]; }
};

template <>
struct Pack<__nv_bfloat16, 1> {
  using Raw = unsigned short;
  static __device__ __forceinline__ Raw zero() { return 0; }
  static __device__ __forceinline__ Raw ld(const __nv_bfloat16* p) {
    return *reinterpret_cast<const unsigned short*>(p);
  }
  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[1]) { f[0] = bf16_lo(unsigned(r)); }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, const float (&f)[1]) { *p = __float2bfloat16_rn(f[0]); }
};

template <>
struct Pack<float, 4> {
  using Raw = float4;
  static __device__ __forceinline__ Raw zero() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
  static __device__ __forceinline__ Raw ld(const float* p) { return *reinterpret_cast<const float4*>(p); }
  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[4]) {
    f[0] = r.x;
    f[1] = r.y;
    f[2] = r.z;
    f[3] = r.w;
  }
  static __device__ __forceinline__ void st(float* p, const float (&f)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  }
};

template <>
struct Pack<__nv_bfloat16, 4> {
  using Raw = uint2;
  static __device__ __forceinline__ Raw zero() { return make_uint2(0u, 0u); }
  static __device__ __forceinline__ Raw ld(const __nv_bfloat16* p) { return *reinterpret_cast<const uint2*>(p); }
  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[4]) {
    f[0] = bf16_lo(r.x);
    f[1] = bf16_hi(r.x);
    f[2] = bf16_lo(r.y);
    f[3] = bf16_hi(r.y);
  }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, const float (&f)[4]) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]));
  }
};

// res_out = residual + x + bias (each term optional), rstd = (mean res² +
// eps)^-½, out = res·rstd·w. residual may alias res_out. V divides d; the
// thread owns groups threadIdx.x + i·blockDim.x for i < K (those below
// d/V), which blockDim.x·K must cover.
template <typename T, int V, int K>
__global__ void __launch_bounds__(kNormThreads)
    add_rmsnorm_fwd_kernel(T* __restrict__ out, float* res_out, float* __restrict__ rstd, const float* residual,
                           const T* __restrict__ x, const float* __restrict__ bias, const float* __restrict__ w,
                           int64_t d, float eps) {
  using PF = Pack<float, V>;
  using PT = Pack<T, V>;
  __shared__ float scratch[33];
  const int64_t row = int64_t(blockIdx.x) * d;
  const int64_t groups = d / V;
  // Every load before any store: residual may be res_out.
  typename PF::Raw rr[K], br[K], wr[K];
  typename PT::Raw xr[K];
#pragma unroll
  for (int i = 0; i < K; ++i) {
    rr[i] = PF::zero();
    br[i] = PF::zero();
    wr[i] = PF::zero();
    xr[i] = PT::zero();
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j < groups) {
      const int64_t c = j * V;
      if (residual) rr[i] = PF::ld(residual + row + c);
      if (x) xr[i] = PT::ld(x + row + c);
      if (bias) br[i] = PF::ld(bias + c);
      wr[i] = PF::ld(w + c);
    }
  }
  float v[K][V];
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    float a[V], xv[V], bv[V];
    PF::unpack(rr[i], a);
    PT::unpack(xr[i], xv);
    PF::unpack(br[i], bv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      v[i][u] = a[u] + xv[u] + bv[u];
      ss += v[i][u] * v[i][u];
    }
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j < groups) PF::st(res_out + row + j * V, v[i]);
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / float(d) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j >= groups) continue;
    float wv[V], y[V];
    PF::unpack(wr[i], wv);
#pragma unroll
    for (int u = 0; u < V; ++u) y[u] = v[i][u] * r * wv[u];
    PT::st(out + row + j * V, y);
  }
}

// dres (+)= r·(dout·w − x̂·mean(dout·w·x̂)) with x̂ = res·r; dx_out, when given,
// receives the updated dres in the activation dtype. Groups as in
// add_rmsnorm_fwd_kernel.
template <typename T, int V, int K>
__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_bwd_kernel(float* __restrict__ dres, T* __restrict__ dx_out, const T* __restrict__ dout,
                       const float* __restrict__ res, const float* __restrict__ rstd, const float* __restrict__ w,
                       int64_t d, int accumulate) {
  using PF = Pack<float, V>;
  using PT = Pack<T, V>;
  __shared__ float scratch[33];
  const int64_t row = int64_t(blockIdx.x) * d;
  const int64_t groups = d / V;
  const float r = rstd[blockIdx.x];
  typename PT::Raw gr[K];
  typename PF::Raw xr[K], wr[K], dr[K];
#pragma unroll
  for (int i = 0; i < K; ++i) {
    gr[i] = PT::zero();
    xr[i] = PF::zero();
    wr[i] = PF::zero();
    dr[i] = PF::zero();
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j < groups) {
      const int64_t c = j * V;
      gr[i] = PT::ld(dout + row + c);
      xr[i] = PF::ld(res + row + c);
      wr[i] = PF::ld(w + c);
      if (accumulate) dr[i] = PF::ld(dres + row + c);
    }
  }
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    float gv[V], xv[V], wv[V];
    PT::unpack(gr[i], gv);
    PF::unpack(xr[i], xv);
    PF::unpack(wr[i], wv);
#pragma unroll
    for (int u = 0; u < V; ++u) dot += gv[u] * wv[u] * xv[u] * r;
  }
  dot = block_sum(dot, scratch);
  const float m = dot / float(d);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j >= groups) continue;
    float gv[V], xv[V], wv[V], dv[V], y[V];
    PT::unpack(gr[i], gv);
    PF::unpack(xr[i], xv);
    PF::unpack(wr[i], wv);
    PF::unpack(dr[i], dv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const float xh = xv[u] * r;
      float g = r * (gv[u] * wv[u] - xh * m);
      if (accumulate) g += dv[u];
      y[u] = g;
    }
    PF::st(dres + row + j * V, y);
    if (dx_out) PT::st(dx_out + row + j * V, y);
  }
}

// add_rmsnorm_fwd_kernel for rows too long to hold in registers: one column
// per thread, res_out re-read for the output pass.
template <typename T>
__global__ void add_rmsnorm_fwd_wide_kernel(T* __restrict__ out, float* res_out, float* __restrict__ rstd,
                                            const float* residual, const T* __restrict__ x,
                                            const float* __restrict__ bias, const float* __restrict__ w, int64_t d,
                                            float eps) {
  __shared__ float scratch[33];
  const int64_t row = int64_t(blockIdx.x) * d;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float v = residual ? residual[row + c] : 0.0f;
    if (x) v += load(x, row + c);
    if (bias) v += bias[c];
    res_out[row + c] = v;
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / float(d) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    store(out, row + c, res_out[row + c] * r * w[c]);
  }
}

// rmsnorm_bwd_kernel for rows too long to hold in registers: one column per
// thread, dout and res re-read for the output pass.
template <typename T>
__global__ void rmsnorm_bwd_wide_kernel(float* __restrict__ dres, T* __restrict__ dx_out,
                                        const T* __restrict__ dout, const float* __restrict__ res,
                                        const float* __restrict__ rstd, const float* __restrict__ w, int64_t d,
                                        int accumulate) {
  __shared__ float scratch[33];
  const int64_t row = int64_t(blockIdx.x) * d;
  const float r = rstd[blockIdx.x];
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    dot += load(dout, row + c) * w[c] * res[row + c] * r;
  }
  dot = block_sum(dot, scratch);
  const float m = dot / float(d);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float xh = res[row + c] * r;
    float g = r * (load(dout, row + c) * w[c] - xh * m);
    if (accumulate) g += dres[row + c];
    dres[row + c] = g;
    if (dx_out) store(dx_out, row + c, g);
  }
}

// partial[p, c] = Σ_{rows of block p} dout·res·rstd, summed in row order: the
// first pass of dw. The thread owns columns j·V … j·V+V−1; V divides d.
template <typename T, int V>
__global__ void rmsnorm_dw_partial_kernel(float* __restrict__ partial, const T* __restrict__ dout,
                                          const float* __restrict__ res, const float* __restrict__ rstd, int64_t n,
                                          int64_t d) {
  using PF = Pack<float, V>;
  using PT = Pack<T, V>;
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= d / V) return;
  const int64_t c = j * V;
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerPartial, r1 = min(r0 + kRowsPerPartial, n);
  float acc[V];
#pragma unroll
  for (int u = 0; u < V; ++u) acc[u] = 0.0f;
  int64_t t = r0;
  for (; t + kDwBatch <= r1; t += kDwBatch) {
    typename PT::Raw gr[kDwBatch];
    typename PF::Raw xr[kDwBatch];
    float rs[kDwBatch];
#pragma unroll
    for (int i = 0; i < kDwBatch; ++i) {
      gr[i] = PT::ld(dout + (t + i) * d + c);
      xr[i] = PF::ld(res + (t + i) * d + c);
      rs[i] = rstd[t + i];
    }
#pragma unroll
    for (int i = 0; i < kDwBatch; ++i) {
      float gv[V], xv[V];
      PT::unpack(gr[i], gv);
      PF::unpack(xr[i], xv);
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] += gv[u] * xv[u] * rs[i];
    }
  }
  for (; t < r1; ++t) {
    float gv[V], xv[V];
    PT::unpack(PT::ld(dout + t * d + c), gv);
    PF::unpack(PF::ld(res + t * d + c), xv);
    const float rs = rstd[t];
#pragma unroll
    for (int u = 0; u < V; ++u) acc[u] += gv[u] * xv[u] * rs;
  }
  PF::st(partial + int64_t(blockIdx.x) * d + c, acc);
}

// partial[p, c] = Σ_{rows of block p} x[t, c]: the first pass of a bias gradient.
template <typename T>
__global__ void column_sum_partial_kernel(float* __restrict__ partial, const T* __restrict__ x, int64_t n,
                                          int64_t w, int64_t ldx) {
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= w) return;
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerPartial, r1 = min(r0 + kRowsPerPartial, n);
  float acc = 0.0f;
  for (int64_t t = r0; t < r1; ++t) acc += load(x, t * ldx + c);
  partial[int64_t(blockIdx.x) * w + c] = acc;
}

template <typename T>
__global__ void add_bias_kernel(T* __restrict__ x, const float* __restrict__ bias, int64_t w, int64_t ldx) {
  const int64_t row = int64_t(blockIdx.x) * ldx;
  for (int64_t c = threadIdx.x; c < w; c += blockDim.x) {
    store(x, row + c, load(x, row + c) + bias[c]);
  }
}

int check_rows(int64_t n, int64_t d, const char* dname) {
  M2K_ARG(n >= 1 && n <= INT32_MAX, "n = %lld: must be in [1, 2^31)", (long long)n);
  M2K_ARG(d >= 1 && d <= 65535 * int64_t(kColumnThreads), "%s = %lld: must be in [1, %lld]", dname, (long long)d,
          65535 * (long long)kColumnThreads);
  return M2K_OK;
}

int64_t partial_blocks(int64_t n) { return ceil_div(n, kRowsPerPartial); }

// Whether p is aligned to an access of kNormVec values of `size` bytes (NULL,
// an absent optional tensor, is).
inline bool vec_aligned(const void* p, size_t size) {
  return reinterpret_cast<uintptr_t>(p) % (uintptr_t(kNormVec) * size) == 0;
}

// A row kernel's launch for rows of d values: v columns per access, k groups
// a thread (1, 2, 4 or 8; 0 when the row needs more and the wide kernels
// take it) and the threads of a block, a multiple of 32 with threads·k ≥
// d/v. vec: whether every tensor allows kNormVec columns per access.
struct RowPlan {
  int v, k;
  unsigned threads;
};

inline RowPlan row_plan(int64_t d, bool vec) {
  const int v = vec && d % kNormVec == 0 ? kNormVec : 1;
  const int64_t groups = d / v;
  int k = 1;
  while (k <= kNormMaxGroups && int64_t(k) * kNormThreads < groups) k *= 2;
  if (k > kNormMaxGroups) return RowPlan{v, 0, 0};
  return RowPlan{v, k, unsigned(ceil_div(ceil_div(groups, k), 32) * 32)};
}

template <typename T, int V>
void launch_fwd_rows(const RowPlan& pl, void* out, void* res_out, void* rstd, const void* residual, const void* x,
                     const void* bias, const void* w, int64_t n, int64_t d, float eps, cudaStream_t s) {
  auto kernel = add_rmsnorm_fwd_kernel<T, V, 8>;
  if (pl.k == 1) kernel = add_rmsnorm_fwd_kernel<T, V, 1>;
  if (pl.k == 2) kernel = add_rmsnorm_fwd_kernel<T, V, 2>;
  if (pl.k == 4) kernel = add_rmsnorm_fwd_kernel<T, V, 4>;
  kernel<<<unsigned(n), pl.threads, 0, s>>>((T*)out, (float*)res_out, (float*)rstd, (const float*)residual,
                                            (const T*)x, (const float*)bias, (const float*)w, d, eps);
}

template <typename T>
int add_rmsnorm_fwd(void* out, void* res_out, void* rstd, const void* residual, const void* x, const void* bias,
                    const void* w, int64_t n, int64_t d, float eps, cudaStream_t s) {
  const bool vec = vec_aligned(out, sizeof(T)) && vec_aligned(res_out, sizeof(float)) &&
                   vec_aligned(residual, sizeof(float)) && vec_aligned(x, sizeof(T)) &&
                   vec_aligned(bias, sizeof(float)) && vec_aligned(w, sizeof(float));
  const RowPlan pl = row_plan(d, vec);
  if (pl.k == 0) {
    add_rmsnorm_fwd_wide_kernel<T><<<unsigned(n), row_threads(d, kNormThreads), 0, s>>>(
        (T*)out, (float*)res_out, (float*)rstd, (const float*)residual, (const T*)x, (const float*)bias,
        (const float*)w, d, eps);
  } else if (pl.v == kNormVec) {
    launch_fwd_rows<T, kNormVec>(pl, out, res_out, rstd, residual, x, bias, w, n, d, eps, s);
  } else {
    launch_fwd_rows<T, 1>(pl, out, res_out, rstd, residual, x, bias, w, n, d, eps, s);
  }
  return launch_status();
}

template <typename T, int V>
void launch_bwd_rows(const RowPlan& pl, void* dres, void* dx_out, const void* dout, const void* res,
                     const void* rstd, const void* w, int64_t n, int64_t d, int accumulate, cudaStream_t s) {
  auto kernel = rmsnorm_bwd_kernel<T, V, 8>;
  if (pl.k == 1) kernel = rmsnorm_bwd_kernel<T, V, 1>;
  if (pl.k == 2) kernel = rmsnorm_bwd_kernel<T, V, 2>;
  if (pl.k == 4) kernel = rmsnorm_bwd_kernel<T, V, 4>;
  kernel<<<unsigned(n), pl.threads, 0, s>>>((float*)dres, (T*)dx_out, (const T*)dout, (const float*)res,
                                            (const float*)rstd, (const float*)w, d, accumulate);
}

// The dw partials with V columns a thread, the threads of a block spread
// evenly over the column groups in whole warps.
template <typename T, int V>
void launch_dw_partial(float* partial, const void* dout, const void* res, const void* rstd, int64_t n, int64_t d,
                       cudaStream_t s) {
  const int64_t groups = d / V;
  const int64_t ny = ceil_div(groups, kColumnThreads);
  const int64_t threads = ceil_div(ceil_div(groups, ny), 32) * 32;
  dim3 grid(unsigned(partial_blocks(n)), unsigned(ny));
  rmsnorm_dw_partial_kernel<T, V><<<grid, unsigned(threads), 0, s>>>(partial, (const T*)dout, (const float*)res,
                                                                      (const float*)rstd, n, d);
}

template <typename T>
int rmsnorm_bwd(void* dres, void* dx_out, void* dw, const void* dout, const void* res, const void* rstd,
                const void* w, int64_t n, int64_t d, int accumulate, void* workspace, cudaStream_t s) {
  const bool vec = vec_aligned(dres, sizeof(float)) && vec_aligned(dx_out, sizeof(T)) &&
                   vec_aligned(dout, sizeof(T)) && vec_aligned(res, sizeof(float)) && vec_aligned(w, sizeof(float));
  const RowPlan pl = row_plan(d, vec);
  if (pl.k == 0) {
    rmsnorm_bwd_wide_kernel<T><<<unsigned(n), row_threads(d, kNormThreads), 0, s>>>(
        (float*)dres, (T*)dx_out, (const T*)dout, (const float*)res, (const float*)rstd, (const float*)w, d,
        accumulate);
  } else if (pl.v == kNormVec) {
    launch_bwd_rows<T, kNormVec>(pl, dres, dx_out, dout, res, rstd, w, n, d, accumulate, s);
  } else {
    launch_bwd_rows<T, 1>(pl, dres, dx_out, dout, res, rstd, w, n, d, accumulate, s);
  }
  if (dw) {
    float* partial = (float*)workspace;
    const bool dw_vec = d % kNormVec == 0 && vec_aligned(dout, sizeof(T)) && vec_aligned(res, sizeof(float)) &&
                        vec_aligned(partial, sizeof(float));
    if (dw_vec) {
      launch_dw_partial<T, kNormVec>(partial, dout, res, rstd, n, d, s);
    } else {
      launch_dw_partial<T, 1>(partial, dout, res, rstd, n, d, s);
    }
    launch_reduce_partials((float*)dw, partial, partial_blocks(n), d, d, s);
  }
  return launch_status();
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

extern "C" int m2k_add_rmsnorm_fwd(int dtype, void* out, void* res_out, void* rstd, const void* residual,
                                   const void* x, const void* bias, const void* w, int64_t n, int64_t d, float eps,
                                   void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(out);
  M2K_CHECK_PTR(res_out);
  M2K_CHECK_PTR(rstd);
  M2K_CHECK_PTR(w);
  if (int st = check_rows(n, d, "d")) return st;
  M2K_ARG(eps > 0.0f, "eps = %g: must be positive", double(eps));
  M2K_ARG(!x || x != (const void*)res_out, "x aliases res_out: only residual may be updated in place");
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == M2K_F32) return add_rmsnorm_fwd<float>(out, res_out, rstd, residual, x, bias, w, n, d, eps, s);
  return add_rmsnorm_fwd<__nv_bfloat16>(out, res_out, rstd, residual, x, bias, w, n, d, eps, s);
}

extern "C" int m2k_rmsnorm_bwd_workspace(int64_t n, int64_t d, int64_t* bytes) {
  m2k::clear_detail();
  M2K_CHECK_PTR(bytes);
  if (int st = check_rows(n, d, "d")) return st;
  *bytes = align_up(partial_blocks(n) * d * int64_t(sizeof(float)));
  return M2K_OK;
}

extern "C" int m2k_rmsnorm_bwd(int dtype, void* dres, void* dx_out, void* dw, const void* dout, const void* res,
                               const void* rstd, const void* w, int64_t n, int64_t d, int accumulate,
                               void* workspace, int64_t workspace_bytes, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(dres);
  M2K_CHECK_PTR(dout);
  M2K_CHECK_PTR(res);
  M2K_CHECK_PTR(rstd);
  M2K_CHECK_PTR(w);
  if (int st = check_rows(n, d, "d")) return st;
  if (dw) {
    M2K_CHECK_PTR(workspace);
    const int64_t need = partial_blocks(n) * d * int64_t(sizeof(float));
    M2K_REQUIRE(workspace_bytes >= need, M2K_ERR_WORKSPACE,
                "workspace_bytes = %lld: m2k_rmsnorm_bwd_workspace requires %lld", (long long)workspace_bytes,
                (long long)need);
  }
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == M2K_F32) {
    return rmsnorm_bwd<float>(dres, dx_out, dw, dout, res, rstd, w, n, d, accumulate, workspace, s);
  }
  return rmsnorm_bwd<__nv_bfloat16>(dres, dx_out, dw, dout, res, rstd, w, n, d, accumulate, workspace, s);
}

extern "C" int m2k_column_sum_workspace(int64_t n, int64_t w, int64_t* bytes) {
  m2k::clear_detail();
  M2K_CHECK_PTR(bytes);
  if (int st = check_rows(n, w, "w")) return st;
  *bytes = align_up(partial_blocks(n) * w * int64_t(sizeof(float)));
  return M2K_OK;
}

extern "C" int m2k_column_sum(int dtype, void* out, const void* x, int64_t n, int64_t w, int64_t ldx,
                              void* workspace, int64_t workspace_bytes, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(out);
  M2K_CHECK_PTR(x);
  M2K_CHECK_PTR(workspace);
  if (int st = check_rows(n, w, "w")) return st;
  M2K_ARG(ldx >= w, "ldx = %lld: must be at least w = %lld", (long long)ldx, (long long)w);
  const int64_t need = partial_blocks(n) * w * int64_t(sizeof(float));
  M2K_REQUIRE(workspace_bytes >= need, M2K_ERR_WORKSPACE,
              "workspace_bytes = %lld: m2k_column_sum_workspace requires %lld", (long long)workspace_bytes,
              (long long)need);
  cudaStream_t s = (cudaStream_t)stream;
  dim3 grid(unsigned(partial_blocks(n)), unsigned(ceil_div(w, kColumnThreads)));
  if (dtype == M2K_F32) {
    column_sum_partial_kernel<<<grid, kColumnThreads, 0, s>>>((float*)workspace, (const float*)x, n, w, ldx);
  } else {
    column_sum_partial_kernel<<<grid, kColumnThreads, 0, s>>>((float*)workspace, (const __nv_bfloat16*)x, n, w, ldx);
  }
  launch_reduce_partials((float*)out, (const float*)workspace, partial_blocks(n), w, w, s);
  return launch_status();
}

extern "C" int m2k_add_bias(int dtype, void* x, const void* bias, int64_t n, int64_t w, int64_t ldx, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(x);
  M2K_CHECK_PTR(bias);
  if (int st = check_rows(n, w, "w")) return st;
  M2K_ARG(ldx >= w, "ldx = %lld: must be at least w = %lld", (long long)ldx, (long long)w);
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == M2K_F32) {
    add_bias_kernel<<<unsigned(n), 256, 0, s>>>((float*)x, (const float*)bias, w, ldx);
  } else {
    add_bias_kernel<<<unsigned(n), 256, 0, s>>>((__nv_bfloat16*)x, (const float*)bias, w, ldx);
  }
  return launch_status();
}
