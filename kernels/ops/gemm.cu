// Matrix products through cuBLASLt with row-major semantics:
//
//   C = alpha·op(A)·op(B) + beta·C
//
// op(A) is m×k, op(B) is k×n, C is m×n; A is stored m×k (k×m when trans_a)
// with row stride lda, B is stored k×n (n×k when trans_b) with row stride
// ldb, C has row stride ldc — the convention of model/linalg.Gemm.
//
// cuBLASLt is column-major. A row-major matrix with row stride ld is, read
// column-major, its transpose with leading dimension ld, so the row-major
// product C = op(A)·op(B) is computed as the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ:
// the operands swap places and each keeps its own transpose flag.
//
// Precision: bf16 inputs accumulate in fp32 (CUBLAS_COMPUTE_32F) with a bf16
// or f32 output; f32 inputs use true fp32 arithmetic (CUBLAS_COMPUTE_32F,
// never the TF32 fast path) with an f32 output.
//
// The handle owns a cuBLASLt handle, a device workspace and a cache of
// matmul plans (descriptors and the heuristic's algorithm) keyed by shape,
// types, transposes, strides and operand alignment, so the heuristic runs
// once per distinct call. A fixed algorithm per key keeps results bitwise
// reproducible across calls.
#include <cublasLt.h>

#include <mutex>
#include <unordered_map>

#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr size_t kGemmWorkspace = size_t(32) << 20;

struct GemmKey {
  int din, dout, ta, tb;
  int64_t m, n, k, lda, ldb, ldc;
  int align_a, align_b, align_c;
  bool operator==(const GemmKey& o) const {
    return din == o.din && dout == o.dout && ta == o.ta && tb == o.tb && m == o.m && n == o.n && k == o.k &&
           lda == o.lda && ldb == o.ldb && ldc == o.ldc && align_a == o.align_a && align_b == o.align_b &&
           align_c == o.align_c;
  }
};

struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) {
      h ^= v;
      h *= 1099511628211ull;
    };
    mix(uint64_t(k.din)), mix(uint64_t(k.dout)), mix(uint64_t(k.ta)), mix(uint64_t(k.tb));
    mix(uint64_t(k.m)), mix(uint64_t(k.n)), mix(uint64_t(k.k));
    mix(uint64_t(k.lda)), mix(uint64_t(k.ldb)), mix(uint64_t(k.ldc));
    mix(uint64_t(k.align_a)), mix(uint64_t(k.align_b)), mix(uint64_t(k.align_c));
    return size_t(h);
  }
};

struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
};

void destroy_plan(GemmPlan& p) {
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.c) cublasLtMatrixLayoutDestroy(p.c);
  if (p.op) cublasLtMatmulDescDestroy(p.op);
  p = GemmPlan{};
}

int cublas_status(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS ? M2K_OK : M2K_ERR_CUBLAS_BASE + int(s); }

// The largest power of two (up to 256) dividing the address: what the
// heuristic may assume about an operand.
int alignment_of(const void* p) {
  uintptr_t v = uintptr_t(p);
  int a = 256;
  while (a > 1 && (v % uintptr_t(a)) != 0) a >>= 1;
  return a;
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

// The opaque handle behind m2k_gemm_create.
struct m2k_gemm_handle {
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  std::mutex mu;
  std::unordered_map<GemmKey, GemmPlan, GemmKeyHash> plans;
};

namespace {

#define M2K_LT(call)                                        \
  do {                                                      \
    cublasStatus_t st_ = (call);                            \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                     \
      destroy_plan(p);                                      \
      return cublas_status(st_);                            \
    }                                                       \
  } while (0)

// Builds the plan of key: descriptors of the column-major product
// Cᵀ (n×m) = op(B)ᵀ (n×k) · op(A)ᵀ (k×m), and the heuristic's first choice.
int make_plan(m2k_gemm_handle* h, const GemmKey& key, GemmPlan* out) {
  GemmPlan p;
  const cudaDataType_t tin = key.din == M2K_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  const cudaDataType_t tout = key.dout == M2K_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  M2K_LT(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // The first cuBLASLt operand is B: stored k×n (row-major) it reads as the
  // n×k column-major Bᵀ = op(B)ᵀ when not transposed; stored n×k it reads as
  // k×n and needs a transpose.
  const cublasOperation_t opl = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opr = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  M2K_LT(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opl, sizeof opl));
  M2K_LT(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opr, sizeof opr));
  // Layout rows/cols are those of the stored matrix read column-major.
  M2K_LT(cublasLtMatrixLayoutCreate(&p.a, tin, key.tb ? key.k : key.n, key.tb ? key.n : key.k, key.ldb));
  M2K_LT(cublasLtMatrixLayoutCreate(&p.b, tin, key.ta ? key.m : key.k, key.ta ? key.k : key.m, key.lda));
  M2K_LT(cublasLtMatrixLayoutCreate(&p.c, tout, key.n, key.m, key.ldc));

  cublasLtMatmulPreference_t pref = nullptr;
  M2K_LT(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kGemmWorkspace;
  const uint32_t al_l = uint32_t(key.align_b), al_r = uint32_t(key.align_a), al_c = uint32_t(key.align_c);
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                           sizeof ws);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_l, sizeof al_l);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_r, sizeof al_r);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c);
  cublasLtMatmulHeuristicResult_t result;
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(h->lt, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS) {
    destroy_plan(p);
    return cublas_status(st);
  }
  if (found == 0) {
    destroy_plan(p);
    return m2k::fail(M2K_ERR_UNSUPPORTED,
                     "cuBLASLt has no algorithm for m=%lld n=%lld k=%lld trans_a=%d trans_b=%d dtype_in=%d "
                     "dtype_out=%d lda=%lld ldb=%lld ldc=%lld",
                     (long long)key.m, (long long)key.n, (long long)key.k, key.ta, key.tb, key.din, key.dout,
                     (long long)key.lda, (long long)key.ldb, (long long)key.ldc);
  }
  p.algo = result.algo;
  *out = p;
  return M2K_OK;
}

#undef M2K_LT

}  // namespace

extern "C" int m2k_gemm_create(void** handle) {
  m2k::clear_detail();
  M2K_CHECK_PTR(handle);
  *handle = nullptr;
  // cublasLtCreate asks the driver for the current context. The caller may be
  // on a host thread that has made no runtime call yet (Go moves goroutines
  // between threads), so make this thread's device's primary context current
  // first; without it the driver reports an invalid context.
  int dev = 0;
  cudaError_t ce = cudaGetDevice(&dev);
  if (ce == cudaSuccess) ce = cudaSetDevice(dev);
  if (ce != cudaSuccess) return static_cast<int>(ce);
  m2k_gemm_handle* h = new m2k_gemm_handle;
  cublasStatus_t st = cublasLtCreate(&h->lt);
  if (st != CUBLAS_STATUS_SUCCESS) {
    delete h;
    return cublas_status(st);
  }
  cudaError_t e = cudaMalloc(&h->workspace, kGemmWorkspace);
  if (e != cudaSuccess) {
    cublasLtDestroy(h->lt);
    delete h;
    return m2k::status(e);
  }
  *handle = h;
  return M2K_OK;
}

extern "C" int m2k_gemm_destroy(void* handle) {
  m2k::clear_detail();
  if (!handle) return M2K_OK;
  m2k_gemm_handle* h = (m2k_gemm_handle*)handle;
  for (auto& kv : h->plans) destroy_plan(kv.second);
  int status = M2K_OK;
  if (h->workspace) {
    // Calls in flight may still use the workspace.
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaFree(h->workspace);
    if (e != cudaSuccess) status = m2k::status(e);
  }
  cublasStatus_t st = cublasLtDestroy(h->lt);
  if (status == M2K_OK && st != CUBLAS_STATUS_SUCCESS) status = cublas_status(st);
  delete h;
  return status;
}

extern "C" int m2k_gemm(void* handle, int dtype_in, int dtype_out, int trans_a, int trans_b, int64_t m, int64_t n,
                        int64_t k, float alpha, const void* a, int64_t lda, const void* b, int64_t ldb, float beta,
                        void* c, int64_t ldc, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_PTR(handle);
  M2K_ARG(dtype_in == M2K_F32 || dtype_in == M2K_BF16, "dtype_in = %d: must be M2K_F32 (0) or M2K_BF16 (1)",
          dtype_in);
  M2K_ARG(dtype_out == M2K_F32 || dtype_out == M2K_BF16, "dtype_out = %d: must be M2K_F32 (0) or M2K_BF16 (1)",
          dtype_out);
  M2K_ARG(!(dtype_in == M2K_F32 && dtype_out == M2K_BF16),
          "dtype_out = M2K_BF16 with dtype_in = M2K_F32: f32 inputs give an f32 output");
  M2K_ARG(m >= 1, "m = %lld: must be positive", (long long)m);
  M2K_ARG(n >= 1, "n = %lld: must be positive", (long long)n);
  M2K_ARG(k >= 1, "k = %lld: must be positive", (long long)k);
  M2K_CHECK_PTR(a);
  M2K_CHECK_PTR(b);
  M2K_CHECK_PTR(c);
  const int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
  M2K_ARG(lda >= a_cols, "lda = %lld: must be at least %lld (the stored row width of A)", (long long)lda,
          (long long)a_cols);
  M2K_ARG(ldb >= b_cols, "ldb = %lld: must be at least %lld (the stored row width of B)", (long long)ldb,
          (long long)b_cols);
  M2K_ARG(ldc >= n, "ldc = %lld: must be at least n = %lld", (long long)ldc, (long long)n);
  m2k_gemm_handle* h = (m2k_gemm_handle*)handle;
  GemmKey key{dtype_in,  dtype_out, trans_a != 0,     trans_b != 0,     m, n, k, lda, ldb, ldc,
              alignment_of(a), alignment_of(b), alignment_of(c)};
  GemmPlan plan;
  {
    std::lock_guard<std::mutex> lock(h->mu);
    auto it = h->plans.find(key);
    if (it == h->plans.end()) {
      if (int st = make_plan(h, key, &plan)) return st;
      h->plans.emplace(key, plan);
    } else {
      plan = it->second;
    }
  }
  cublasStatus_t st = cublasLtMatmul(h->lt, plan.op, &alpha, b, plan.a, a, plan.b, &beta, c, plan.c, c, plan.c,
                                     &plan.algo, h->workspace, kGemmWorkspace, (cudaStream_t)stream);
  return cublas_status(st);
}
