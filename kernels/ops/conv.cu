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
// Work split. Block (x, y) owns one run of kConvRun positions of one
// sequence (x = b·runs + run) and a span of channels (y). Each thread owns a
// group of V adjacent channels and walks the run, keeping the last W inputs
// of each of its channels in registers, so every input is read from memory
// once per run (plus the W−1 positions before it).
//
// Why it is fast. The kernels do a few flops per byte, so their speed is the
// number of loads in flight. Two things provide them:
//   - V = kConvVec = 4 channels per thread where the strides, the column
//     offset and the pointers allow it (decided at launch): one 16-byte
//     (f32) or 8-byte (bf16) access per position, a warp covering 512 or
//     256 contiguous bytes of a row. The cd mod 4 channels past the last
//     whole group, and every channel of a shape that is not aligned, go to a
//     second launch of the same kernel with V = 1.
//   - A thread issues the loads of kConvBatch positions before it computes
//     any of them (they are independent: only the arithmetic carries from one
//     position to the next), so each warp has kConvBatch loads per input
//     tensor outstanding instead of one.
// Four channels rather than eight bf16: the backward pass holds 4W + 2
// floats per channel (weights, inputs, dpre, dw, bias, dbias) besides the
// batch in flight, which for eight channels would come to over 200 registers
// a thread; the bytes in flight per position and channel are the same
// either way.
//
// The backward pass walks its run from the end, recomputing the
// pre-activation (cheaper than storing it), so that the W future values of
// dpre that an input position needs are at hand (it reads the W−1 positions
// past the run for them). The weight and bias gradients of a run are summed
// in descending position order into partial[run] (both launches write the
// same layout, each its own channels), and the runs are then added in index
// order by launch_reduce_partials: the summation order depends on the shape
// alone.
#include <string.h>

#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kConvMaxThreads = 256;  // threads per block, at most
constexpr int64_t kConvRun = 64;      // positions per block; fixes the dw summation order
constexpr int kConvBatch = 8;         // positions whose loads a thread issues together
constexpr int kConvVec = 4;           // channels per thread on the vector path
constexpr int kMaxConvWidth = 8;
// Largest cd accepted (65535 blocks of 128 channels); the launches below
// need far fewer blocks along y.
constexpr int64_t kMaxConvChannels = 65535LL * 128;

struct ConvShape {
  int64_t bt, l, cd, ld, off;
};

// Two bf16 values rounded from f32 (lo at the lower address), as the 32 bits
// that hold them.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  unsigned u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// The f32 values of the bf16 in the low and the high half of u (exact: a
// bf16 is the upper half of an f32).
__device__ __forceinline__ float bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

// V consecutive values of T as one access: Raw holds them as loaded, so that
// a batch of loads is issued before any of them is converted. V = 4 needs
// the address aligned to 4·sizeof(T).
template <typename T, int V>
struct Pack;

template <>
struct Pack<float, 1> {
  using Raw = float;
  static __device__ __forceinline__ Raw ld(const float* p) { return *p; }
  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[1]) { f[0] = r; }
  static __device__ __forceinline__ void st(float* p, const float (&f)[1]) { *p = f[0]; }
};

template <>
struct Pack<__nv_bfloat16, 1> {
  using Raw = unsigned short;
  static __device__ __forceinline__ Raw ld(const __nv_bfloat16* p) {
    return *reinterpret_cast<const unsigned short*>(p);
  }
  static __device__ __forceinline__ void unpack(const Raw& r, float (&f)[1]) { f[0] = bf16_lo(unsigned(r)); }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, const float (&f)[1]) { *p = __float2bfloat16_rn(f[0]); }
};

template <>
struct Pack<float, 4> {
  using Raw = float4;
  static __device__ __forceinline__ Raw ld(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
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
  static __device__ __forceinline__ Raw ld(const __nv_bfloat16* p) {
    return __ldg(reinterpret_cast<const uint2*>(p));
  }
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

// The pre-conv input of channel c at position tt of sequence b: the halo or
// zero for tt < 0.
template <int W, typename T>
__device__ __forceinline__ float conv_in(const ConvShape& s, const T* src, const T* halo, int64_t b, int64_t tt,
                                         int64_t c) {
  if (tt >= 0) return load(src, (b * s.l + tt) * s.ld + s.off + c);
  if (!halo) return 0.0f;
  return load(halo, (b * (W - 1) + W - 1 + tt) * s.cd + c);
}

// The weights, and the bias (zero without one), of channels c … c+V−1.
template <int W, int V>
__device__ __forceinline__ void conv_params(float (&w)[W][V], float (&b0)[V], const float* __restrict__ weight,
                                            const float* __restrict__ bias, int64_t c) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int k = 0; k < W; ++k) w[k][v] = __ldg(weight + (c + v) * W + k);
    b0[v] = bias ? __ldg(bias + c + v) : 0.0f;
  }
}

// One forward position: x[0..W−2] hold the inputs of the W−1 positions
// before it, in the input of the position itself; out receives
// silu(bias + Σ_k w[k]·x[k]) for the V channels.
template <int W, typename T, int V>
__device__ __forceinline__ void conv_fwd_step(const float (&w)[W][V], const float (&b0)[V], float (&x)[W][V],
                                              const typename Pack<T, V>::Raw& in, T* out) {
#pragma unroll
  for (int k = 0; k < W - 1; ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) x[k][v] = x[k + 1][v];
  }
  Pack<T, V>::unpack(in, x[W - 1]);
  float y[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    float u = b0[v];
#pragma unroll
    for (int k = 0; k < W; ++k) u += w[k][v] * x[k][v];
    y[v] = siluf_(u);
  }
  Pack<T, V>::st(out, y);
}

// pre = bias + Σ_k w[c,k]·x[t+k−(W−1)], act = silu(pre); act has row stride
// ld_act. The thread owns channels c_begin + g·V … + V−1 for g < groups.
template <int W, typename T, int V>
__global__ void __launch_bounds__(kConvMaxThreads)
    conv_fwd_kernel(ConvShape s, int64_t c_begin, int64_t groups, T* __restrict__ act, int64_t ld_act,
                    const T* __restrict__ src, const T* __restrict__ halo, const float* __restrict__ weight,
                    const float* __restrict__ bias) {
  using P = Pack<T, V>;
  const int64_t g = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const int64_t c = c_begin + g * V;
  const int64_t runs = ceil_div(s.l, kConvRun);
  const int64_t b = blockIdx.x / runs, t0 = (blockIdx.x % runs) * kConvRun, t1 = min(t0 + kConvRun, s.l);
  float w[W][V], b0[V], x[W][V];
  conv_params<W, V>(w, b0, weight, bias, c);
  // x[k] holds the input at t + k − (W−1) once position t is in.
#pragma unroll
  for (int k = 0; k < W - 1; ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) x[k + 1][v] = conv_in<W>(s, src, halo, b, t0 + k - (W - 1), c + v);
  }
  const T* sp = src + b * s.l * s.ld + s.off + c;  // position t at sp + t·ld
  T* ap = act + b * s.l * ld_act + c;              // position t at ap + t·ld_act
  int64_t t = t0;
  for (; t + kConvBatch <= t1; t += kConvBatch) {
    typename P::Raw in[kConvBatch];
#pragma unroll
    for (int i = 0; i < kConvBatch; ++i) in[i] = P::ld(sp + (t + i) * s.ld);
#pragma unroll
    for (int i = 0; i < kConvBatch; ++i) conv_fwd_step<W, T, V>(w, b0, x, in[i], ap + (t + i) * ld_act);
  }
  for (; t < t1; ++t) conv_fwd_step<W, T, V>(w, b0, x, P::ld(sp + t * s.ld), ap + t * ld_act);
}

// Register state of one thread of the backward pass, for V channels.
template <int W, int V>
struct ConvBwdState {
  float w[W][V], b0[V];
  float x[W][V];   // x[k]: the input at t + k − (W−1) during the step at t
  float dp[W][V];  // dp[j]: dpre at t + j (zero past the sequence)
  float gw[W][V], gb[V];
};

// One backward position t, walking down: xin is the input at t − (W−1), da
// the gradient of act at t. The step shifts the windows, forms
// dpre[t] = da·silu'(pre[t]), and, when the run owns t, writes
// dsrc[t] = Σ_k w[k]·dpre[t−k+W−1] to out and adds the dw and dbias terms.
template <int W, typename T, int V>
__device__ __forceinline__ void conv_bwd_step(ConvBwdState<W, V>& r, const float (&xin)[V], const float (&da)[V],
                                              bool own, T* out) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int k = W - 1; k > 0; --k) {
      r.x[k][v] = r.x[k - 1][v];
      r.dp[k][v] = r.dp[k - 1][v];
    }
    r.x[0][v] = xin[v];
    float pre = r.b0[v];
#pragma unroll
    for (int k = 0; k < W; ++k) pre += r.w[k][v] * r.x[k][v];
    r.dp[0][v] = da[v] * silu_gradf_(pre);
  }
  if (!own) return;
  float y[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const float g = r.dp[0][v];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += r.w[k][v] * r.dp[W - 1 - k][v];
    y[v] = acc;
#pragma unroll
    for (int k = 0; k < W; ++k) r.gw[k][v] += g * r.x[k][v];
    r.gb[v] += g;
  }
  Pack<T, V>::st(out, y);
}

// dpre = dact·silu'(pre); dsrc[q] = Σ_k w[k]·dpre[q−k+W−1] (written into the
// xBC columns of dsrc, same strides as src); dhalo[b, j] = Σ_{k≤j} w[k]·dpre[j−k]
// (f32); per-run partials of dw[c,k] = Σ dpre[t]·x[t+k−(W−1)] and dbias[c] =
// Σ dpre[t] at partial[run, c·W + k] and partial[run, cd·W + c]. The thread
// owns channels c_begin + g·V … + V−1 for g < groups.
template <int W, typename T, int V>
__global__ void __launch_bounds__(kConvMaxThreads)
    conv_bwd_kernel(ConvShape s, int64_t c_begin, int64_t groups, T* __restrict__ dsrc, float* __restrict__ dhalo,
                    float* __restrict__ partial, const T* __restrict__ dact, int64_t ld_act,
                    const T* __restrict__ src, const T* __restrict__ halo, const float* __restrict__ weight,
                    const float* __restrict__ bias) {
  using P = Pack<T, V>;
  const int64_t g = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const int64_t c = c_begin + g * V;
  const int64_t runs = ceil_div(s.l, kConvRun);
  const int64_t b = blockIdx.x / runs, t0 = (blockIdx.x % runs) * kConvRun, t1 = min(t0 + kConvRun, s.l);
  // The last position whose dpre an input of this run needs.
  const int64_t thi = min(t1 + W - 1, s.l) - 1;
  ConvBwdState<W, V> r;
  conv_params<W, V>(r.w, r.b0, weight, bias, c);
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      r.dp[k][v] = 0.0f;
      r.gw[k][v] = 0.0f;
    }
    r.gb[v] = 0.0f;
  }
  // Before the step at t, x[1..W−1] must hold the inputs at t+1−(W−1) … t,
  // which the step shifts into place: x[j] = input at t+1−(W−1)+j for j < W−1.
#pragma unroll
  for (int j = 0; j < W - 1; ++j) {
#pragma unroll
    for (int v = 0; v < V; ++v) r.x[j][v] = conv_in<W>(s, src, halo, b, thi - (W - 2) + j, c + v);
  }
  const T* sp = src + b * s.l * s.ld + s.off + c;  // position t at sp + t·ld
  const T* dap = dact + b * s.l * ld_act + c;      // position t at dap + t·ld_act
  T* dsp = dsrc + b * s.l * s.ld + s.off + c;
  // Steps whose input position t − (W−1) is in the sequence, kConvBatch at a
  // time, then one at a time; then the first W−1 positions of a sequence,
  // whose inputs come from the halo.
  const int64_t tlo = max(t0, int64_t(W - 1));
  int64_t t = thi;
  for (; t - (kConvBatch - 1) >= tlo; t -= kConvBatch) {
    typename P::Raw xr[kConvBatch], dr[kConvBatch];
#pragma unroll
    for (int i = 0; i < kConvBatch; ++i) {
      xr[i] = P::ld(sp + (t - i - (W - 1)) * s.ld);
      dr[i] = P::ld(dap + (t - i) * ld_act);
    }
#pragma unroll
    for (int i = 0; i < kConvBatch; ++i) {
      float xin[V], da[V];
      P::unpack(xr[i], xin);
      P::unpack(dr[i], da);
      conv_bwd_step<W, T, V>(r, xin, da, t - i < t1, dsp + (t - i) * s.ld);
    }
  }
  for (; t >= tlo; --t) {
    float xin[V], da[V];
    P::unpack(P::ld(sp + (t - (W - 1)) * s.ld), xin);
    P::unpack(P::ld(dap + t * ld_act), da);
    conv_bwd_step<W, T, V>(r, xin, da, t < t1, dsp + t * s.ld);
  }
  for (; t >= t0; --t) {
    float xin[V], da[V];
#pragma unroll
    for (int v = 0; v < V; ++v) xin[v] = conv_in<W>(s, src, halo, b, t - (W - 1), c + v);
    P::unpack(P::ld(dap + t * ld_act), da);
    conv_bwd_step<W, T, V>(r, xin, da, t < t1, dsp + t * s.ld);
  }
  if (dhalo && t0 == 0) {
    // dp[j] = dpre[j] now (zero past the end of the sequence).
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k <= j; ++k) acc += r.w[k][v] * r.dp[j - k][v];
        dhalo[(b * (W - 1) + j) * s.cd + c + v] = acc;
      }
    }
  }
  float* p = partial + int64_t(blockIdx.x) * (s.cd * (W + 1));
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int k = 0; k < W; ++k) p[(c + v) * W + k] = r.gw[k][v];
    p[s.cd * W + c + v] = r.gb[v];
  }
}

// The channels [0, returned) that may take the V = kConvVec path: every
// row start and group start of the tensors at ptrs is aligned to an access
// of kConvVec values of T. Zero when any is not.
template <typename T>
int64_t vector_channels(const ConvShape& s, int64_t ld_act, const void* p0, const void* p1, const void* p2) {
  const uintptr_t align = uintptr_t(kConvVec) * sizeof(T);
  if (s.ld % kConvVec != 0 || s.off % kConvVec != 0 || ld_act % kConvVec != 0) return 0;
  const void* const ptrs[3] = {p0, p1, p2};
  for (const void* p : ptrs) {
    if (p && reinterpret_cast<uintptr_t>(p) % align != 0) return 0;
  }
  return s.cd / kConvVec * kConvVec;
}

// Blocks along y and threads per block for `groups` thread-owned channel
// groups: at most kConvMaxThreads a block, spread evenly over the blocks in
// whole warps (448 groups: 2 blocks of 224 rather than 256 + 192).
struct ConvBlocks {
  unsigned ny, threads;
};

inline ConvBlocks conv_blocks(int64_t groups) {
  const int64_t ny = ceil_div(groups, kConvMaxThreads);
  const int64_t threads = ceil_div(ceil_div(groups, ny), 32) * 32;
  return ConvBlocks{unsigned(ny), unsigned(threads)};
}

template <int W, typename T>
void launch_fwd(const ConvShape& s, void* act, int64_t ld_act, const void* src, const void* halo, const void* weight,
                const void* bias, cudaStream_t st) {
  const unsigned nx = unsigned(s.bt * ceil_div(s.l, kConvRun));
  const int64_t cv = vector_channels<T>(s, ld_act, act, src, nullptr);
  if (cv > 0) {
    const ConvBlocks k = conv_blocks(cv / kConvVec);
    conv_fwd_kernel<W, T, kConvVec><<<dim3(nx, k.ny), k.threads, 0, st>>>(
        s, 0, cv / kConvVec, (T*)act, ld_act, (const T*)src, (const T*)halo, (const float*)weight,
        (const float*)bias);
  }
  if (cv < s.cd) {
    const ConvBlocks k = conv_blocks(s.cd - cv);
    conv_fwd_kernel<W, T, 1><<<dim3(nx, k.ny), k.threads, 0, st>>>(s, cv, s.cd - cv, (T*)act, ld_act,
                                                                   (const T*)src, (const T*)halo,
                                                                   (const float*)weight, (const float*)bias);
  }
}

template <int W, typename T>
void launch_bwd(const ConvShape& s, void* dsrc, void* dw, void* dbias, void* dhalo, const void* dact, int64_t ld_act,
                const void* src, const void* halo, const void* weight, const void* bias, void* workspace,
                cudaStream_t st) {
  const int64_t parts = s.bt * ceil_div(s.l, kConvRun);
  const unsigned nx = unsigned(parts);
  float* partial = (float*)workspace;
  const int64_t cv = vector_channels<T>(s, ld_act, dsrc, dact, src);
  if (cv > 0) {
    const ConvBlocks k = conv_blocks(cv / kConvVec);
    conv_bwd_kernel<W, T, kConvVec><<<dim3(nx, k.ny), k.threads, 0, st>>>(
        s, 0, cv / kConvVec, (T*)dsrc, (float*)dhalo, partial, (const T*)dact, ld_act, (const T*)src,
        (const T*)halo, (const float*)weight, (const float*)bias);
  }
  if (cv < s.cd) {
    const ConvBlocks k = conv_blocks(s.cd - cv);
    conv_bwd_kernel<W, T, 1><<<dim3(nx, k.ny), k.threads, 0, st>>>(
        s, cv, s.cd - cv, (T*)dsrc, (float*)dhalo, partial, (const T*)dact, ld_act, (const T*)src,
        (const T*)halo, (const float*)weight, (const float*)bias);
  }
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
  M2K_ARG(cd >= 1 && cd <= kMaxConvChannels, "cd = %lld: must be in [1, %lld]", (long long)cd,
          (long long)kMaxConvChannels);
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
