// Causal depthwise conv1d + SiLU over the xBC columns of the in_proj output
// (MAMBA2_SPEC.md §2.2, §4.3), forward and backward, with the halo: the
// d_conv−1 pre-conv positions of the previous sequence shard.
//
// Shapes (row-major, last index fastest): bt sequences of l positions with
// cd channels and kernel width W. The input xBC is read from a strided
// matrix (row stride ld, first channel at column off) so that the in_proj
// output needs no copy; the conv weight is (cd, W) with the last tap
// multiplying the current position; halo is (bt, W−1, cd).
//
// Each thread owns one channel and walks a run of kConvRun positions of one
// sequence, keeping the W inputs of its window in registers. The backward
// pass walks its run from the end, recomputing the pre-activation (cheaper
// than storing it), so that the W future values of dpre that an input
// position needs are at hand; the weight and bias gradients are summed per
// run and the runs are added in a fixed order.
#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kConvThreads = 128;
constexpr int64_t kConvRun = 64;  // positions per thread; fixes the dw summation order
constexpr int kMaxConvWidth = 8;

struct ConvShape {
  int64_t bt, l, cd, ld, off;
};

// The pre-conv input of channel c at position tt of sequence b: the halo or
// zero for tt < 0.
template <int W, typename T>
__device__ __forceinline__ float conv_in(const ConvShape& s, const T* src, const T* halo, int64_t b, int64_t tt,
                                         int64_t c) {
  if (tt >= 0) return load(src, (b * s.l + tt) * s.ld + s.off + c);
  if (!halo) return 0.0f;
  return load(halo, (b * (W - 1) + W - 1 + tt) * s.cd + c);
}

// pre = bias + Σ_k w[c,k]·x[t+k−(W−1)], act = silu(pre); act has row stride
// ld_act.
template <int W, typename T>
__global__ void conv_fwd_kernel(ConvShape s, T* __restrict__ act, int64_t ld_act, const T* __restrict__ src,
                                const T* __restrict__ halo, const float* __restrict__ weight,
                                const float* __restrict__ bias) {
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= s.cd) return;
  const int64_t runs = ceil_div(s.l, kConvRun);
  const int64_t b = blockIdx.x / runs, t0 = (blockIdx.x % runs) * kConvRun, t1 = min(t0 + kConvRun, s.l);
  float w[W], x[W];
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = weight[c * W + k];
  const float b0 = bias ? bias[c] : 0.0f;
#pragma unroll
  for (int k = 0; k < W - 1; ++k) x[k + 1] = conv_in<W>(s, src, halo, b, t0 + k - (W - 1), c);
  for (int64_t t = t0; t < t1; ++t) {
#pragma unroll
    for (int k = 0; k < W - 1; ++k) x[k] = x[k + 1];
    x[W - 1] = conv_in<W>(s, src, halo, b, t, c);
    float v = b0;
#pragma unroll
    for (int k = 0; k < W; ++k) v += w[k] * x[k];
    store(act, (b * s.l + t) * ld_act + c, siluf_(v));
  }
}

// dpre = dact·silu'(pre); dsrc[q] = Σ_k w[k]·dpre[q−k+W−1] (written into the
// xBC columns of dsrc, same strides as src); dhalo[b, j] = Σ_{k≤j} w[k]·dpre[j−k]
// (f32); per-run partials of dw[c,k] = Σ dpre[t]·x[t+k−(W−1)] and dbias[c] =
// Σ dpre[t] at partial[run, c·W + k] and partial[run, cd·W + c].
template <int W, typename T>
__global__ void conv_bwd_kernel(ConvShape s, T* __restrict__ dsrc, float* __restrict__ dhalo,
                                float* __restrict__ partial, const T* __restrict__ dact, int64_t ld_act,
                                const T* __restrict__ src, const T* __restrict__ halo,
                                const float* __restrict__ weight, const float* __restrict__ bias) {
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= s.cd) return;
  const int64_t runs = ceil_div(s.l, kConvRun);
  const int64_t b = blockIdx.x / runs, t0 = (blockIdx.x % runs) * kConvRun, t1 = min(t0 + kConvRun, s.l);
  // The last position whose dpre an input of this run needs.
  const int64_t thi = min(t1 + W - 1, s.l) - 1;
  float w[W], x[W], dp[W], gw[W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    w[k] = weight[c * W + k];
    dp[k] = 0.0f;
    gw[k] = 0.0f;
  }
  const float b0 = bias ? bias[c] : 0.0f;
  float gb = 0.0f;
  // x[k] holds the input at position t + k − (W−1).
  for (int64_t t = thi; t >= t0; --t) {
    if (t == thi) {
#pragma unroll
      for (int k = 0; k < W; ++k) x[k] = conv_in<W>(s, src, halo, b, t + k - (W - 1), c);
    } else {
#pragma unroll
      for (int k = W - 1; k > 0; --k) x[k] = x[k - 1];
      x[0] = conv_in<W>(s, src, halo, b, t - (W - 1), c);
    }
    float pre = b0;
#pragma unroll
    for (int k = 0; k < W; ++k) pre += w[k] * x[k];
    const float g = load(dact, (b * s.l + t) * ld_act + c) * silu_gradf_(pre);
#pragma unroll
    for (int k = W - 1; k > 0; --k) dp[k] = dp[k - 1];
    dp[0] = g;  // dp[j] = dpre[t + j]
    if (t < t1) {
      float v = 0.0f;
#pragma unroll
      for (int k = 0; k < W; ++k) v += w[k] * dp[W - 1 - k];
      store(dsrc, (b * s.l + t) * s.ld + s.off + c, v);
#pragma unroll
      for (int k = 0; k < W; ++k) gw[k] += g * x[k];
      gb += g;
    }
  }
  if (dhalo && t0 == 0) {
    // dp[j] = dpre[j] now (zero past the end of the sequence).
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      float v = 0.0f;
#pragma unroll
      for (int k = 0; k <= j; ++k) v += w[k] * dp[j - k];
      dhalo[(b * (W - 1) + j) * s.cd + c] = v;
    }
  }
  float* p = partial + int64_t(blockIdx.x) * (s.cd * (W + 1));
#pragma unroll
  for (int k = 0; k < W; ++k) p[c * W + k] = gw[k];
  p[s.cd * W + c] = gb;
}

template <int W, typename T>
void launch_fwd(const ConvShape& s, void* act, int64_t ld_act, const void* src, const void* halo, const void* weight,
                const void* bias, cudaStream_t st) {
  dim3 grid(unsigned(s.bt * ceil_div(s.l, kConvRun)), unsigned(ceil_div(s.cd, kConvThreads)));
  conv_fwd_kernel<W, T><<<grid, kConvThreads, 0, st>>>(s, (T*)act, ld_act, (const T*)src, (const T*)halo,
                                                        (const float*)weight, (const float*)bias);
}

template <int W, typename T>
void launch_bwd(const ConvShape& s, void* dsrc, void* dw, void* dbias, void* dhalo, const void* dact, int64_t ld_act,
                const void* src, const void* halo, const void* weight, const void* bias, void* workspace,
                cudaStream_t st) {
  const int64_t parts = s.bt * ceil_div(s.l, kConvRun);
  dim3 grid(unsigned(parts), unsigned(ceil_div(s.cd, kConvThreads)));
  float* partial = (float*)workspace;
  conv_bwd_kernel<W, T><<<grid, kConvThreads, 0, st>>>(s, (T*)dsrc, (float*)dhalo, partial, (const T*)dact, ld_act,
                                                        (const T*)src, (const T*)halo, (const float*)weight,
                                                        (const float*)bias);
  const int64_t stride = s.cd * (W + 1);
  if (dw) launch_reduce_partials((float*)dw, partial, parts, s.cd * W, stride, st);
  if (dbias) launch_reduce_partials((float*)dbias, partial + s.cd * W, parts, s.cd, stride, st);
}

template <typename T>
int dispatch_fwd(int64_t width, const ConvShape& s, void* act, int64_t ld_act, const void* src, const void* halo,
                 const void* weight, const void* bias, cudaStream_t st) {
  switch (width) {
#define M2K_CONV_CASE(W) \
  case W:                \
    launch_fwd<W, T>(s, act, ld_act, src, halo, weight, bias, st); break;
    M2K_CONV_CASE(1) M2K_CONV_CASE(2) M2K_CONV_CASE(3) M2K_CONV_CASE(4)
    M2K_CONV_CASE(5) M2K_CONV_CASE(6) M2K_CONV_CASE(7) M2K_CONV_CASE(8)
#undef M2K_CONV_CASE
    default:
      return m2k::fail(M2K_ERR_UNSUPPORTED, "width = %lld: must be in [1, %d]", (long long)width, kMaxConvWidth);
  }
  return launch_status();
}

template <typename T>
int dispatch_bwd(int64_t width, const ConvShape& s, void* dsrc, void* dw, void* dbias, void* dhalo, const void* dact,
                 int64_t ld_act, const void* src, const void* halo, const void* weight, const void* bias,
                 void* workspace, cudaStream_t st) {
  switch (width) {
#define M2K_CONV_CASE(W)                                                                             \
  case W:                                                                                            \
    launch_bwd<W, T>(s, dsrc, dw, dbias, dhalo, dact, ld_act, src, halo, weight, bias, workspace, st); \
    break;
    M2K_CONV_CASE(1) M2K_CONV_CASE(2) M2K_CONV_CASE(3) M2K_CONV_CASE(4)
    M2K_CONV_CASE(5) M2K_CONV_CASE(6) M2K_CONV_CASE(7) M2K_CONV_CASE(8)
#undef M2K_CONV_CASE
    default:
      return m2k::fail(M2K_ERR_UNSUPPORTED, "width = %lld: must be in [1, %d]", (long long)width, kMaxConvWidth);
  }
  return launch_status();
}

int check_conv(int64_t bt, int64_t l, int64_t cd, int64_t width, int64_t ld, int64_t off, int64_t ld_act) {
  M2K_ARG(bt >= 1, "bt = %lld: must be positive", (long long)bt);
  M2K_ARG(l >= 1, "l = %lld: must be positive", (long long)l);
  M2K_ARG(cd >= 1 && ceil_div(cd, kConvThreads) <= 65535, "cd = %lld: must be in [1, %lld]", (long long)cd,
          65535LL * kConvThreads);
  M2K_REQUIRE(width >= 1 && width <= kMaxConvWidth, M2K_ERR_UNSUPPORTED, "width = %lld: must be in [1, %d]",
              (long long)width, kMaxConvWidth);
  M2K_ARG(off >= 0, "off = %lld: must be >= 0", (long long)off);
  M2K_ARG(ld >= off + cd, "ld = %lld: must be at least off + cd = %lld", (long long)ld, (long long)(off + cd));
  M2K_ARG(ld_act >= cd, "ld_act = %lld: must be at least cd = %lld", (long long)ld_act, (long long)cd);
  M2K_ARG(bt * ceil_div(l, kConvRun) <= INT32_MAX, "bt·ceil(l/%lld) = %lld: must be below 2^31", (long long)kConvRun,
          (long long)(bt * ceil_div(l, kConvRun)));
  return M2K_OK;
}

int64_t conv_workspace_bytes(int64_t bt, int64_t l, int64_t cd, int64_t width) {
  return bt * ceil_div(l, kConvRun) * cd * (width + 1) * int64_t(sizeof(float));
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

extern "C" int m2k_conv_fwd(int dtype, void* act, int64_t ld_act, const void* src, int64_t ld, int64_t off,
                            const void* halo, const void* weight, const void* bias, int64_t bt, int64_t l, int64_t cd,
                            int64_t width, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(act);
  M2K_CHECK_PTR(src);
  M2K_CHECK_PTR(weight);
  if (int st = check_conv(bt, l, cd, width, ld, off, ld_act)) return st;
  ConvShape s{bt, l, cd, ld, off};
  cudaStream_t st = (cudaStream_t)stream;
  if (dtype == M2K_F32) return dispatch_fwd<float>(width, s, act, ld_act, src, halo, weight, bias, st);
  return dispatch_fwd<__nv_bfloat16>(width, s, act, ld_act, src, halo, weight, bias, st);
}

extern "C" int m2k_conv_bwd_workspace(int64_t bt, int64_t l, int64_t cd, int64_t width, int64_t* bytes) {
  m2k::clear_detail();
  M2K_CHECK_PTR(bytes);
  if (int st = check_conv(bt, l, cd, width, cd, 0, cd)) return st;
  *bytes = align_up(conv_workspace_bytes(bt, l, cd, width));
  return M2K_OK;
}

extern "C" int m2k_conv_bwd(int dtype, void* dsrc, void* dw, void* dbias, void* dhalo, const void* dact,
                            int64_t ld_act, const void* src, int64_t ld, int64_t off, const void* halo,
                            const void* weight, const void* bias, int64_t bt, int64_t l, int64_t cd, int64_t width,
                            void* workspace, int64_t workspace_bytes, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(dsrc);
  M2K_CHECK_PTR(dact);
  M2K_CHECK_PTR(src);
  M2K_CHECK_PTR(weight);
  M2K_CHECK_PTR(workspace);
  if (int st = check_conv(bt, l, cd, width, ld, off, ld_act)) return st;
  M2K_ARG(dsrc != src, "dsrc aliases src: the backward pass reads src while it writes dsrc");
  const int64_t need = conv_workspace_bytes(bt, l, cd, width);
  M2K_REQUIRE(workspace_bytes >= need, M2K_ERR_WORKSPACE,
              "workspace_bytes = %lld: m2k_conv_bwd_workspace requires %lld", (long long)workspace_bytes,
              (long long)need);
  ConvShape s{bt, l, cd, ld, off};
  cudaStream_t st = (cudaStream_t)stream;
  if (dtype == M2K_F32) {
    return dispatch_bwd<float>(width, s, dsrc, dw, dbias, dhalo, dact, ld_act, src, halo, weight, bias, workspace,
                               st);
  }
  return dispatch_bwd<__nv_bfloat16>(width, s, dsrc, dw, dbias, dhalo, dact, ld_act, src, halo, weight, bias,
                                     workspace, st);
}
