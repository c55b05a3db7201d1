// Fused residual add + RMSNorm (the pre-norm of every Mamba-2 block and the
// final norm), forward and backward, and the bias helpers of the
// projections.
//
// The residual stream is fp32 (MAMBA2_SPEC.md §8 item 7): the forward pass
// forms res = residual + x (+ bias) in fp32, keeps it for the next block and
// for the backward pass, and normalises it; the normalised output, which
// feeds a GEMM, is written in the activation dtype. One block per row.
#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kNormThreads = 256;

// res_out = residual + x + bias (each term optional), rstd = (mean res² +
// eps)^-½, out = res·rstd·w. residual may alias res_out.
template <typename T>
__global__ void add_rmsnorm_fwd_kernel(T* __restrict__ out, float* res_out, float* __restrict__ rstd,
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

// dres (+)= r·(dout·w − x̂·mean(dout·w·x̂)) with x̂ = res·r; dx_out, when given,
// receives the updated dres in the activation dtype.
template <typename T>
__global__ void rmsnorm_bwd_kernel(float* __restrict__ dres, T* __restrict__ dx_out, const T* __restrict__ dout,
                                   const float* __restrict__ res, const float* __restrict__ rstd,
                                   const float* __restrict__ w, int64_t d, int accumulate) {
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

// partial[p, c] = Σ_{rows of block p} dout·res·rstd: the first pass of dw.
template <typename T>
__global__ void rmsnorm_dw_partial_kernel(float* __restrict__ partial, const T* __restrict__ dout,
                                          const float* __restrict__ res, const float* __restrict__ rstd, int64_t n,
                                          int64_t d) {
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerPartial, r1 = min(r0 + kRowsPerPartial, n);
  float acc = 0.0f;
  for (int64_t t = r0; t < r1; ++t) acc += load(dout, t * d + c) * res[t * d + c] * rstd[t];
  partial[int64_t(blockIdx.x) * d + c] = acc;
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

template <typename T>
int add_rmsnorm_fwd(void* out, void* res_out, void* rstd, const void* residual, const void* x, const void* bias,
                    const void* w, int64_t n, int64_t d, float eps, cudaStream_t s) {
  const unsigned threads = row_threads(d, kNormThreads);
  add_rmsnorm_fwd_kernel<T><<<unsigned(n), threads, 0, s>>>((T*)out, (float*)res_out, (float*)rstd,
                                                            (const float*)residual, (const T*)x,
                                                            (const float*)bias, (const float*)w, d, eps);
  return launch_status();
}

template <typename T>
int rmsnorm_bwd(void* dres, void* dx_out, void* dw, const void* dout, const void* res, const void* rstd,
                const void* w, int64_t n, int64_t d, int accumulate, void* workspace, cudaStream_t s) {
  const unsigned threads = row_threads(d, kNormThreads);
  rmsnorm_bwd_kernel<T><<<unsigned(n), threads, 0, s>>>((float*)dres, (T*)dx_out, (const T*)dout,
                                                        (const float*)res, (const float*)rstd,
                                                        (const float*)w, d, accumulate);
  if (dw) {
    dim3 grid(unsigned(partial_blocks(n)), unsigned(ceil_div(d, kColumnThreads)));
    rmsnorm_dw_partial_kernel<T><<<grid, kColumnThreads, 0, s>>>((float*)workspace, (const T*)dout,
                                                                  (const float*)res, (const float*)rstd, n, d);
    launch_reduce_partials((float*)dw, (const float*)workspace, partial_blocks(n), d, d, s);
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
