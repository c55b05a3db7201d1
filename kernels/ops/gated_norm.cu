// Gated RMSNorm over rows of width E split into G norm groups of K = E/G
// channels (MAMBA2_SPEC.md §2.5, mamba_ssm's grouped form), forward and
// backward, with the norm_before_gate and no-norm variants:
//
//   gate after the norm (default):  s = y·silu(z),  out = s·r·w
//   norm before the gate:           s = y,          out = s·r·w·silu(z)
//   no norm:                        out = y·silu(z)
//
// with r = (mean over the group of s² + eps)^-½, kept per (row, group) in
// fp32. z is read from a strided matrix (row stride ldz) so that it can be
// the z columns of the in_proj output; dz is written with the same stride.
// One block per (row, group).
#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kGatedThreads = 128;

struct GatedShape {
  int64_t n, e, groups, ldz;
  float eps;
  int before_gate;
};

template <typename T>
__global__ void gated_norm_fwd_kernel(GatedShape g, T* __restrict__ out, float* __restrict__ rstd,
                                      const T* __restrict__ y, const T* __restrict__ z, const float* __restrict__ w) {
  __shared__ float scratch[33];
  const int64_t t = blockIdx.x / g.groups, gr = blockIdx.x % g.groups, k = g.e / g.groups;
  const int64_t i0 = gr * k, i1 = i0 + k;
  const T* yr = y + t * g.e;
  const T* zr = z + t * g.ldz;
  float ss = 0.0f;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    float s = load(yr, i);
    if (!g.before_gate) s *= siluf_(load(zr, i));
    ss += s * s;
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / float(k) + g.eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const float gate = siluf_(load(zr, i));
    float s = load(yr, i);
    if (!g.before_gate) s *= gate;
    float o = s * r * w[i];
    if (g.before_gate) o *= gate;
    store(out, t * g.e + i, o);
  }
}

// The no-norm variant: out = y·silu(z), elementwise.
template <typename T>
__global__ void gate_fwd_kernel(GatedShape g, T* __restrict__ out, const T* __restrict__ y, const T* __restrict__ z) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < g.e; i += blockDim.x) {
    store(out, t * g.e + i, load(y, t * g.e + i) * siluf_(load(z, t * g.ldz + i)));
  }
}

template <typename T>
__global__ void gate_bwd_kernel(GatedShape g, T* __restrict__ dy, T* __restrict__ dz, const T* __restrict__ dout,
                                const T* __restrict__ y, const T* __restrict__ z) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < g.e; i += blockDim.x) {
    const float zi = load(z, t * g.ldz + i), d = load(dout, t * g.e + i);
    store(dy, t * g.e + i, d * siluf_(zi));
    store(dz, t * g.ldz + i, d * load(y, t * g.e + i) * silu_gradf_(zi));
  }
}

// With gg = dout·w (·silu(z) when the norm comes first) and m = mean(gg·s·r),
// ds = r·(gg − s·r·m); dy and dz follow by the chain rule through s (or
// through the gate after the norm).
template <typename T>
__global__ void gated_norm_bwd_kernel(GatedShape g, T* __restrict__ dy, T* __restrict__ dz,
                                      const T* __restrict__ dout, const float* __restrict__ rstd,
                                      const T* __restrict__ y, const T* __restrict__ z, const float* __restrict__ w) {
  __shared__ float scratch[33];
  const int64_t t = blockIdx.x / g.groups, gr = blockIdx.x % g.groups, k = g.e / g.groups;
  const int64_t i0 = gr * k, i1 = i0 + k;
  const T* yr = y + t * g.e;
  const T* zr = z + t * g.ldz;
  const T* dr = dout + t * g.e;
  const float r = rstd[blockIdx.x];
  float dot = 0.0f;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const float gate = siluf_(load(zr, i));
    float s = load(yr, i), gg = load(dr, i) * w[i];
    if (g.before_gate) {
      gg *= gate;
    } else {
      s *= gate;
    }
    dot += gg * s * r;
  }
  dot = block_sum(dot, scratch);
  const float m = dot / float(k);
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const float zi = load(zr, i), gate = siluf_(zi), yi = load(yr, i), d = load(dr, i);
    if (g.before_gate) {
      const float gg = d * w[i] * gate;
      const float ds = r * (gg - yi * r * m);
      store(dy, t * g.e + i, ds);
      store(dz, t * g.ldz + i, d * yi * r * w[i] * silu_gradf_(zi));
    } else {
      const float s = yi * gate, gg = d * w[i];
      const float ds = r * (gg - s * r * m);
      store(dy, t * g.e + i, ds * gate);
      store(dz, t * g.ldz + i, ds * yi * silu_gradf_(zi));
    }
  }
}

// partial[p, i] = Σ_{rows of block p} dout·y·silu(z)·r (the same in both
// norm orders).
template <typename T>
__global__ void gated_norm_dw_partial_kernel(GatedShape g, float* __restrict__ partial, const T* __restrict__ dout,
                                             const float* __restrict__ rstd, const T* __restrict__ y,
                                             const T* __restrict__ z) {
  const int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= g.e) return;
  const int64_t gr = i / (g.e / g.groups);
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerPartial, r1 = min(r0 + kRowsPerPartial, g.n);
  float acc = 0.0f;
  for (int64_t t = r0; t < r1; ++t) {
    acc += load(dout, t * g.e + i) * load(y, t * g.e + i) * siluf_(load(z, t * g.ldz + i)) * rstd[t * g.groups + gr];
  }
  partial[int64_t(blockIdx.x) * g.e + i] = acc;
}

int check_gated(int64_t n, int64_t e, int64_t groups, int64_t ldz) {
  M2K_ARG(n >= 1, "n = %lld: must be positive", (long long)n);
  M2K_ARG(e >= 1 && e <= 65535LL * kColumnThreads, "e = %lld: must be in [1, %lld]", (long long)e,
          65535LL * kColumnThreads);
  M2K_ARG(groups >= 1 && e % groups == 0, "groups = %lld: must be positive and divide e = %lld", (long long)groups,
          (long long)e);
  M2K_ARG(n * groups <= INT32_MAX, "n·groups = %lld: must be below 2^31", (long long)(n * groups));
  M2K_ARG(ldz >= e, "ldz = %lld: must be at least e = %lld", (long long)ldz, (long long)e);
  return M2K_OK;
}

int64_t gated_workspace_bytes(int64_t n, int64_t e) {
  return ceil_div(n, kRowsPerPartial) * e * int64_t(sizeof(float));
}

template <typename T>
int gated_fwd(const GatedShape& g, int enabled, void* out, void* rstd, const void* y, const void* z, const void* w,
              cudaStream_t s) {
  if (!enabled) {
    gate_fwd_kernel<T><<<unsigned(g.n), kGatedThreads, 0, s>>>(g, (T*)out, (const T*)y, (const T*)z);
  } else {
    gated_norm_fwd_kernel<T><<<unsigned(g.n * g.groups), kGatedThreads, 0, s>>>(
        g, (T*)out, (float*)rstd, (const T*)y, (const T*)z, (const float*)w);
  }
  return launch_status();
}

template <typename T>
int gated_bwd(const GatedShape& g, int enabled, void* dy, void* dz, void* dw, const void* dout, const void* rstd,
              const void* y, const void* z, const void* w, void* workspace, cudaStream_t s) {
  if (!enabled) {
    gate_bwd_kernel<T><<<unsigned(g.n), kGatedThreads, 0, s>>>(g, (T*)dy, (T*)dz, (const T*)dout, (const T*)y,
                                                                (const T*)z);
    return launch_status();
  }
  gated_norm_bwd_kernel<T><<<unsigned(g.n * g.groups), kGatedThreads, 0, s>>>(
      g, (T*)dy, (T*)dz, (const T*)dout, (const float*)rstd, (const T*)y, (const T*)z, (const float*)w);
  if (dw) {
    const int64_t parts = ceil_div(g.n, kRowsPerPartial);
    dim3 grid(unsigned(parts), unsigned(ceil_div(g.e, kColumnThreads)));
    gated_norm_dw_partial_kernel<T><<<grid, kColumnThreads, 0, s>>>(g, (float*)workspace, (const T*)dout,
                                                                     (const float*)rstd, (const T*)y, (const T*)z);
    launch_reduce_partials((float*)dw, (const float*)workspace, parts, g.e, g.e, s);
  }
  return launch_status();
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

extern "C" int m2k_gated_norm_fwd(int dtype, void* out, void* rstd, const void* y, const void* z, int64_t ldz,
                                  const void* w, int64_t n, int64_t e, int64_t groups, float eps, int before_gate,
                                  int enabled, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(out);
  M2K_CHECK_PTR(y);
  M2K_CHECK_PTR(z);
  if (int st = check_gated(n, e, groups, ldz)) return st;
  if (enabled) {
    M2K_CHECK_PTR(rstd);
    M2K_CHECK_PTR(w);
    M2K_ARG(eps > 0.0f, "eps = %g: must be positive", double(eps));
  }
  GatedShape g{n, e, groups, ldz, eps, before_gate != 0};
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == M2K_F32) return gated_fwd<float>(g, enabled, out, rstd, y, z, w, s);
  return gated_fwd<__nv_bfloat16>(g, enabled, out, rstd, y, z, w, s);
}

extern "C" int m2k_gated_norm_bwd_workspace(int64_t n, int64_t e, int64_t* bytes) {
  m2k::clear_detail();
  M2K_CHECK_PTR(bytes);
  if (int st = check_gated(n, e, 1, e)) return st;
  *bytes = align_up(gated_workspace_bytes(n, e));
  return M2K_OK;
}

extern "C" int m2k_gated_norm_bwd(int dtype, void* dy, void* dz, void* dw, const void* dout, const void* rstd,
                                  const void* y, const void* z, int64_t ldz, const void* w, int64_t n, int64_t e,
                                  int64_t groups, int before_gate, int enabled, void* workspace,
                                  int64_t workspace_bytes, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(dy);
  M2K_CHECK_PTR(dz);
  M2K_CHECK_PTR(dout);
  M2K_CHECK_PTR(y);
  M2K_CHECK_PTR(z);
  if (int st = check_gated(n, e, groups, ldz)) return st;
  if (enabled) {
    M2K_CHECK_PTR(rstd);
    M2K_CHECK_PTR(w);
    if (dw) {
      M2K_CHECK_PTR(workspace);
      const int64_t need = gated_workspace_bytes(n, e);
      M2K_REQUIRE(workspace_bytes >= need, M2K_ERR_WORKSPACE,
                  "workspace_bytes = %lld: m2k_gated_norm_bwd_workspace requires %lld", (long long)workspace_bytes,
                  (long long)need);
    }
  }
  GatedShape g{n, e, groups, ldz, 0.0f, before_gate != 0};
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == M2K_F32) return gated_bwd<float>(g, enabled, dy, dz, dw, dout, rstd, y, z, w, workspace, s);
  return gated_bwd<__nv_bfloat16>(g, enabled, dy, dz, dw, dout, rstd, y, z, w, workspace, s);
}
