// Row copies by index: the gather that packs the positions with a counted
// target before the LM head, and the scatter that puts their hidden-state
// gradients back in place. A training step whose targets count only some
// positions (the MQAR task counts a quarter of them) then runs the head's
// three products and the cross-entropy over those rows alone.
#include "ops_util.cuh"

namespace m2k_ops {
namespace {

// Threads per block: one row per block, the columns strided over at most
// this many threads.
constexpr int kRowThreads = 256;

// gather: dst[i, :] = src[idx[i], :] (a row of NaN for an index outside
// [0, rows), so that a bad index shows up instead of reading out of bounds);
// scatter: dst[idx[i], :] = src[i, :] (an index outside [0, rows) copies
// nothing).
template <typename T>
__global__ void copy_rows_kernel(T* __restrict__ dst, int64_t ld_dst, const T* __restrict__ src, int64_t ld_src,
                                 const int32_t* __restrict__ idx, int64_t width, int64_t rows, int scatter) {
  const int64_t i = blockIdx.x;
  const int32_t j = idx[i];
  const bool ok = j >= 0 && int64_t(j) < rows;
  if (scatter) {
    if (!ok) return;
    T* d = dst + int64_t(j) * ld_dst;
    const T* s = src + i * ld_src;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) d[c] = s[c];
    return;
  }
  T* d = dst + i * ld_dst;
  if (!ok) {
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) store(d, c, __int_as_float(0x7fc00000));
    return;
  }
  const T* s = src + int64_t(j) * ld_src;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) d[c] = s[c];
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

extern "C" int m2k_copy_rows(int dtype, void* dst, int64_t ld_dst, const void* src, int64_t ld_src, const void* idx,
                             int64_t n, int64_t width, int64_t rows, int scatter, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(dst);
  M2K_CHECK_PTR(src);
  M2K_CHECK_PTR(idx);
  M2K_ARG(n >= 0 && n <= INT32_MAX, "n = %lld: must be in [0, 2^31)", (long long)n);
  M2K_ARG(width >= 1, "width = %lld: must be positive", (long long)width);
  M2K_ARG(rows >= 1 && rows <= INT32_MAX, "rows = %lld: must be in [1, 2^31)", (long long)rows);
  M2K_ARG(ld_dst >= width, "ld_dst = %lld: must be at least width = %lld", (long long)ld_dst, (long long)width);
  M2K_ARG(ld_src >= width, "ld_src = %lld: must be at least width = %lld", (long long)ld_src, (long long)width);
  if (n == 0) return M2K_OK;
  const int64_t warps = ceil_div(width, 32) * 32;
  const unsigned threads = unsigned(warps < kRowThreads ? warps : kRowThreads);
  cudaStream_t s = (cudaStream_t)stream;
  const int32_t* ix = (const int32_t*)idx;
  if (dtype == M2K_F32) {
    copy_rows_kernel<<<unsigned(n), threads, 0, s>>>((float*)dst, ld_dst, (const float*)src, ld_src, ix, width, rows,
                                                     scatter);
  } else {
    copy_rows_kernel<<<unsigned(n), threads, 0, s>>>((__nv_bfloat16*)dst, ld_dst, (const __nv_bfloat16*)src, ld_src,
                                                     ix, width, rows, scatter);
  }
  return launch_status();
}
