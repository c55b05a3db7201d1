// Embedding gather (forward) and the deterministic scatter-add of its
// gradient (backward).
//
// Backward without atomics: the positions are sorted by token with a stable
// radix sort (so equal tokens keep their position order), and each run of
// equal tokens is summed by one block in that order and added to its row of
// the gradient. Every row has one owner and a fixed summation order, so the
// result is bitwise reproducible.
#include <cub/device/device_radix_sort.cuh>

#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kEmbThreads = 256;

// out[t, :] = emb[tokens[t], :] (emb is f32 (V, D), out (n, D) in T). A token
// outside [0, V) gives a row of NaN, so an unchecked bad token shows up in
// the loss instead of reading out of bounds.
template <typename T>
__global__ void embedding_fwd_kernel(T* __restrict__ out, const float* __restrict__ emb,
                                     const int32_t* __restrict__ tokens, int64_t d, int64_t vocab) {
  const int64_t t = blockIdx.x;
  const int32_t id = tokens[t];
  const bool ok = id >= 0 && int64_t(id) < vocab;
  const float* row = emb + int64_t(ok ? id : 0) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    store(out, t * d + c, ok ? row[c] : __int_as_float(0x7fc00000));
  }
}

// Sort keys (the token, or vocab for a token out of range so that such
// positions gather at the end and are skipped) and the position indices.
__global__ void embedding_keys_kernel(uint32_t* __restrict__ keys, int32_t* __restrict__ pos,
                                      const int32_t* __restrict__ tokens, int64_t n, int64_t vocab) {
  int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  int32_t id = tokens[t];
  keys[t] = (id >= 0 && int64_t(id) < vocab) ? uint32_t(id) : uint32_t(vocab);
  pos[t] = int32_t(t);
}

// Block i owns the run of equal keys that starts at sorted index i (if one
// does): it sums dout over the run's positions in ascending position order
// and adds the sum into the token's row of demb.
template <typename T>
__global__ void embedding_bwd_kernel(float* __restrict__ demb, const T* __restrict__ dout,
                                     const uint32_t* __restrict__ keys, const int32_t* __restrict__ pos,
                                     int64_t n, int64_t d, int64_t vocab) {
  const int64_t i = blockIdx.x;
  const uint32_t key = keys[i];
  if (int64_t(key) >= vocab) return;
  if (i > 0 && keys[i - 1] == key) return;
  int64_t end = i + 1;
  while (end < n && keys[end] == key) ++end;
  float* row = demb + int64_t(key) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = i; j < end; ++j) acc += load(dout, int64_t(pos[j]) * d + c);
    row[c] += acc;
  }
}

// Workspace layout of the backward pass: keys in, keys out, positions in,
// positions out (n each, 256-byte aligned), then CUB's temporary storage.
struct EmbWorkspace {
  int64_t keys_in, keys_out, pos_in, pos_out, temp, temp_bytes, total;
};

int end_bit_for(int64_t vocab) {
  int bits = 1;
  while (bits < 32 && (int64_t(1) << bits) <= vocab) ++bits;  // keys go up to vocab itself
  return bits;
}

int emb_workspace(int64_t n, int64_t vocab, EmbWorkspace* w) {
  size_t temp = 0;
  cudaError_t e = cub::DeviceRadixSort::SortPairs(nullptr, temp, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                                  (const int32_t*)nullptr, (int32_t*)nullptr, n, 0,
                                                  end_bit_for(vocab));
  if (e != cudaSuccess) return m2k::status(e);
  int64_t a = align_up(n * 4);
  w->keys_in = 0;
  w->keys_out = a;
  w->pos_in = 2 * a;
  w->pos_out = 3 * a;
  w->temp = 4 * a;
  w->temp_bytes = int64_t(temp);
  w->total = 4 * a + align_up(int64_t(temp));
  return M2K_OK;
}

// The checks common to the entry points; 0 when the shape is valid.
int check_emb_shape(int64_t n, int64_t d, int64_t vocab) {
  M2K_ARG(n >= 1 && n <= INT32_MAX, "n = %lld: must be in [1, 2^31)", (long long)n);
  M2K_ARG(d >= 1, "d = %lld: must be positive", (long long)d);
  M2K_ARG(vocab >= 1 && vocab < INT32_MAX, "vocab = %lld: must be in [1, 2^31 - 1)", (long long)vocab);
  return M2K_OK;
}

}  // namespace
}  // namespace m2k_ops

using namespace m2k_ops;

extern "C" int m2k_embedding_fwd(int dtype, void* out, const void* emb, const void* tokens, int64_t n, int64_t d,
                                 int64_t vocab, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(out);
  M2K_CHECK_PTR(emb);
  M2K_CHECK_PTR(tokens);
  if (int st = check_emb_shape(n, d, vocab)) return st;
  cudaStream_t s = (cudaStream_t)stream;
  const float* e = (const float*)emb;
  const int32_t* tok = (const int32_t*)tokens;
  const unsigned threads = row_threads(d, kEmbThreads);
  if (dtype == M2K_F32) {
    embedding_fwd_kernel<<<unsigned(n), threads, 0, s>>>((float*)out, e, tok, d, vocab);
  } else {
    embedding_fwd_kernel<<<unsigned(n), threads, 0, s>>>((__nv_bfloat16*)out, e, tok, d, vocab);
  }
  return launch_status();
}

extern "C" int m2k_embedding_bwd_workspace(int64_t n, int64_t vocab, int64_t* bytes) {
  m2k::clear_detail();
  M2K_CHECK_PTR(bytes);
  if (int st = check_emb_shape(n, 1, vocab)) return st;
  EmbWorkspace w;
  if (int st = emb_workspace(n, vocab, &w)) return st;
  *bytes = w.total;
  return M2K_OK;
}

extern "C" int m2k_embedding_bwd(int dtype, void* demb, const void* dout, const void* tokens, int64_t n, int64_t d,
                                 int64_t vocab, void* workspace, int64_t workspace_bytes, void* stream) {
  m2k::clear_detail();
  M2K_CHECK_DTYPE(dtype);
  M2K_CHECK_PTR(demb);
  M2K_CHECK_PTR(dout);
  M2K_CHECK_PTR(tokens);
  M2K_CHECK_PTR(workspace);
  if (int st = check_emb_shape(n, d, vocab)) return st;
  EmbWorkspace w;
  if (int st = emb_workspace(n, vocab, &w)) return st;
  M2K_REQUIRE(workspace_bytes >= w.total, M2K_ERR_WORKSPACE,
              "workspace_bytes = %lld: m2k_embedding_bwd_workspace requires %lld", (long long)workspace_bytes,
              (long long)w.total);
  cudaStream_t s = (cudaStream_t)stream;
  char* base = (char*)workspace;
  uint32_t* keys_in = (uint32_t*)(base + w.keys_in);
  uint32_t* keys_out = (uint32_t*)(base + w.keys_out);
  int32_t* pos_in = (int32_t*)(base + w.pos_in);
  int32_t* pos_out = (int32_t*)(base + w.pos_out);
  embedding_keys_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, s>>>(keys_in, pos_in, (const int32_t*)tokens, n,
                                                                   vocab);
  size_t temp = size_t(w.temp_bytes);
  cudaError_t e = cub::DeviceRadixSort::SortPairs(base + w.temp, temp, keys_in, keys_out, pos_in, pos_out, n, 0,
                                                  end_bit_for(vocab), s);
  if (e != cudaSuccess) return m2k::status(e);
  const unsigned threads = row_threads(d, kEmbThreads);
  if (dtype == M2K_F32) {
    embedding_bwd_kernel<<<unsigned(n), threads, 0, s>>>((float*)demb, (const float*)dout, keys_out, pos_out, n,
                                                         d, vocab);
  } else {
    embedding_bwd_kernel<<<unsigned(n), threads, 0, s>>>((float*)demb, (const __nv_bfloat16*)dout, keys_out,
                                                         pos_out, n, d, vocab);
  }
  return launch_status();
}
