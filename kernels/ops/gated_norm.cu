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
//
// Chunks. A group's K channels are cut into chunks of 8 (the last one may be
// shorter). A chunk is one 16-byte access in bf16 (two in f32) when K is a
// multiple of 8 and the pointers and strides of its tensor allow it, checked
// at launch for y/out/dy/dout/w/partials together and for z/dz apart (z is a
// column slice of in_proj's output); otherwise its elements are accessed one
// by one. Either way a thread owns the same chunks and sums them in the same
// order, so the two paths give the same bits.
//
// Teams. The threads that share one (row, group) form a team: with C chunks
// per group, a team of ts = C rounded up to a power of two (C ≤ 32: an
// aligned run of lanes of one warp, so that a small group does not idle a
// whole warp) or to a multiple of 32 (C ≤ 512: the whole block), each thread
// owning one chunk; for 512 < C ≤ 1024 half as many threads own two chunks
// each. Lane l of a team owns chunks l, l + ts. A team issues every load of
// its (row, group) at once, sums its squares (or the backward dot product) by
// a butterfly over the team's lanes (then the warp totals in warp order), and
// computes its outputs from the values still in registers: each element is
// read from memory once. Wider groups (K > 8192) take the wide kernels, which
// stream the group twice.
//
// Forward: one team per (row, group), consecutive teams on consecutive
// groups of a row (130M: K = 1536, blocks of 192 threads, one row each).
//
// Backward with the norm: a team owns one group for a block of
// kRowsPerPartial rows and walks them in order, loading row t+1 while it
// works on row t (one chunk a thread; with two, the next row is loaded after
// the current one, to keep registers in check). Besides dy and dz it adds
// each row's dout·y·silu(z)·r into per-thread column accumulators, so dw's
// per-row-block partial comes out of the same pass over dout, y and z, in
// row order. A block holds one team (ts > 32) or the teams of consecutive
// groups (ts ≤ 32). gated_dw_reduce_kernel then adds the partials of each
// column into dw, spreading the row blocks over 32 lanes of threads per
// column (lane l sums blocks l, l + 32, … in order, then the lanes are added
// in lane order): the order depends on n and E only.
//
// The no-norm kernels are elementwise: one chunk per thread per step.
#include "ops_util.cuh"

namespace m2k_ops {
namespace {

constexpr int kChunk = 8;             // elements per chunk: 16 bytes of bf16
constexpr int kMaxTeam = 512;         // threads of the largest team (and block)
constexpr int kMaxChunksPerThread = 2;  // chunks a thread keeps in registers, at most
constexpr int kSmallTeamBlock = 256;  // threads of a block of teams of at most 32
constexpr int kGateThreads = 256;     // threads of a block of the no-norm kernels
constexpr int kDwCols = 32;           // columns of a block of gated_dw_reduce_kernel
constexpr int kDwLanes = 32;          // threads that share one column there
constexpr int kDwAhead = 8;           // partial loads a dw-reduce thread issues together

struct GatedArgs {
  int64_t n, e, groups, k, ldz;
  int nc;  // chunks per group, ceil(k/8)
  int ts;  // threads per team
  float eps;
  bool before_gate;
  bool vy;  // chunk-wide accesses to y, out, dy, dout, w and the dw partials
  bool vz;  // chunk-wide accesses to z and dz
};

// Eight consecutive elements of a tensor as loaded: bf16 two to a 32-bit
// word (the lower address in the low half), f32 as they are. get(j) is the
// f32 value of element j (exact for bf16, the upper half of an f32).
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

// Loads elements [0, cnt) of p, cnt ≤ 8, the others read as zero (nothing is
// read for cnt = 0). vec: p is 16-byte aligned, and a full chunk is loaded
// with 16-byte accesses.
__device__ __forceinline__ void load8(Pack8<__nv_bfloat16>& q, const __nv_bfloat16* p, int cnt, bool vec) {
  if (vec && cnt == kChunk) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    q.w[0] = u.x;
    q.w[1] = u.y;
    q.w[2] = u.z;
    q.w[3] = u.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = 2 * i < cnt ? bf16_bits(p[2 * i]) : 0u;
    const uint32_t hi = 2 * i + 1 < cnt ? bf16_bits(p[2 * i + 1]) : 0u;
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
  for (int i = 0; i < 8; ++i) q.f[i] = i < cnt ? p[i] : 0.0f;
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

// Elements of chunk c of a group of k channels (0 past the end).
__device__ __forceinline__ int chunk_len(int64_t c, int64_t k) {
  const int64_t left = k - c * kChunk;
  return left <= 0 ? 0 : (left < kChunk ? int(left) : kChunk);
}

// Sum of v over the team, the same bits in every thread of it. A team of at
// most 32 threads is an aligned run of lanes of one warp: a butterfly over
// them. A larger team is the whole block: a butterfly per warp, then the warp
// totals in warp order through red (32 floats). That case has one barrier,
// and red may be written again only after the caller's next barrier (loops
// alternate two). Every thread of the block must call it.
__device__ __forceinline__ float team_sum(float v, int ts, float* red) {
  const int width = ts < 32 ? ts : 32;
  for (int m = width >> 1; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (ts <= 32) return v;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = red[0];
  for (int w = 1; w < (ts >> 5); ++w) total += red[w];
  return total;
}

// The normalised quantity of the forward: s = y·silu(z) after the norm, y
// before it.
__device__ __forceinline__ float fwd_s(float yi, float zi, bool before_gate) {
  return before_gate ? yi : yi * siluf_(zi);
}

// The output from s and r: (s·r)·w, times silu(z) when the norm comes first.
__device__ __forceinline__ float fwd_out(float s, float r, float wi, float zi, bool before_gate) {
  const float o = s * r * wi;
  return before_gate ? o * siluf_(zi) : o;
}

// Term of one element of the backward dot product Σ gg·s·r, with
// gg = dout·w (·silu(z) when the norm comes first) and s as in the forward;
// gate = silu(z).
__device__ __forceinline__ float bwd_dot_term(float d, float yi, float gate, float wi, float r, bool before_gate) {
  float s = yi, gg = d * wi;
  if (before_gate) {
    gg *= gate;
  } else {
    s *= gate;
  }
  return gg * s * r;
}

// dy and dz of one element, with m = mean(gg·s·r) over the group and
// sg = σ(z): ds = r·(gg − s·r·m), then the chain rule through s (or through
// the gate after the norm).
__device__ __forceinline__ void bwd_elem(float d, float yi, float zi, float sg, float wi, float r, float m,
                                         bool before_gate, float& dyo, float& dzo) {
  const float gate = zi * sg;                         // silu(z)
  const float grad = sg * (1.0f + zi * (1.0f - sg));  // silu'(z)
  if (before_gate) {
    const float gg = d * wi * gate;
    const float ds = r * (gg - yi * r * m);
    dyo = ds;
    dzo = d * yi * r * wi * grad;
  } else {
    const float s = yi * gate, gg = d * wi;
    const float ds = r * (gg - s * r * m);
    dyo = ds * gate;
    dzo = ds * yi * grad;
  }
}

// One team per (row, group); NV chunks a thread. Teams of at most 32
// threads share a block; a larger team is the block.
template <typename T, int NV>
__global__ void __launch_bounds__(kMaxTeam)
    gated_norm_fwd_kernel(GatedArgs a, T* __restrict__ out, float* __restrict__ rstd, const T* __restrict__ y,
                          const T* __restrict__ z, const float* __restrict__ w) {
  __shared__ float red[32];
  const int lane = int(threadIdx.x) % a.ts;
  const int64_t team = int64_t(blockIdx.x) * (blockDim.x / a.ts) + threadIdx.x / a.ts;
  const bool active = team < a.n * a.groups;
  const int64_t t = active ? team / a.groups : 0, gr = active ? team % a.groups : 0;
  const T* yg = y + t * a.e + gr * a.k;
  const T* zg = z + t * a.ldz + gr * a.k;
  const float* wg = w + gr * a.k;
  int cnt[NV];
  Pack8<T> yv[NV], zv[NV];
  Pack8<float> wv[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = lane + int64_t(j) * a.ts;
    cnt[j] = active ? chunk_len(c, a.k) : 0;
    load8(yv[j], yg + c * kChunk, cnt[j], a.vy);
    load8(zv[j], zg + c * kChunk, cnt[j], a.vz);
    load8(wv[j], wg + c * kChunk, cnt[j], a.vy);
  }
  float sv[NV][8];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    float part = 0.0f;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      sv[j][u] = fwd_s(yv[j].get(u), zv[j].get(u), a.before_gate);
      part += sv[j][u] * sv[j][u];
    }
    ss += part;
  }
  ss = team_sum(ss, a.ts, red);
  const float r = 1.0f / sqrtf(ss / float(a.k) + a.eps);
  if (active && lane == 0) rstd[team] = r;
  T* og = out + t * a.e + gr * a.k;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    if (cnt[j] == 0) continue;
    float o[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) o[u] = fwd_out(sv[j][u], r, wv[j].get(u), zv[j].get(u), a.before_gate);
    store8(og + (lane + int64_t(j) * a.ts) * kChunk, o, cnt[j], a.vy);
  }
}

// The forward for groups too wide for registers: one block per (row,
// group), the group read twice.
template <typename T>
__global__ void __launch_bounds__(kMaxTeam)
    gated_norm_fwd_wide_kernel(GatedArgs a, T* __restrict__ out, float* __restrict__ rstd, const T* __restrict__ y,
                               const T* __restrict__ z, const float* __restrict__ w) {
  __shared__ float red[32];
  const int64_t team = blockIdx.x;
  const int64_t t = team / a.groups, gr = team % a.groups;
  const T* yg = y + t * a.e + gr * a.k;
  const T* zg = z + t * a.ldz + gr * a.k;
  const float* wg = w + gr * a.k;
  T* og = out + t * a.e + gr * a.k;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < a.nc; c += blockDim.x) {
    const int cnt = chunk_len(c, a.k);
    Pack8<T> yv, zv;
    load8(yv, yg + c * kChunk, cnt, a.vy);
    load8(zv, zg + c * kChunk, cnt, a.vz);
    float part = 0.0f;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const float s = fwd_s(yv.get(u), zv.get(u), a.before_gate);
      part += s * s;
    }
    ss += part;
  }
  ss = team_sum(ss, blockDim.x, red);
  const float r = 1.0f / sqrtf(ss / float(a.k) + a.eps);
  if (threadIdx.x == 0) rstd[team] = r;
  for (int64_t c = threadIdx.x; c < a.nc; c += blockDim.x) {
    const int cnt = chunk_len(c, a.k);
    Pack8<T> yv, zv;
    Pack8<float> wv;
    load8(yv, yg + c * kChunk, cnt, a.vy);
    load8(zv, zg + c * kChunk, cnt, a.vz);
    load8(wv, wg + c * kChunk, cnt, a.vy);
    float o[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      o[u] = fwd_out(fwd_s(yv.get(u), zv.get(u), a.before_gate), r, wv.get(u), zv.get(u), a.before_gate);
    }
    store8(og + c * kChunk, o, cnt, a.vy);
  }
}

// The no-norm forward: out = y·silu(z), one chunk per thread per step.
template <typename T>
__global__ void gate_fwd_kernel(GatedArgs a, T* __restrict__ out, const T* __restrict__ y, const T* __restrict__ z) {
  const int64_t per_row = ceil_div(a.e, kChunk), total = a.n * per_row;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = q / per_row, c = q - t * per_row;
    const int cnt = chunk_len(c, a.e);
    Pack8<T> yv, zv;
    load8(yv, y + t * a.e + c * kChunk, cnt, a.vy);
    load8(zv, z + t * a.ldz + c * kChunk, cnt, a.vz);
    float o[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) o[u] = yv.get(u) * siluf_(zv.get(u));
    store8(out + t * a.e + c * kChunk, o, cnt, a.vy);
  }
}

// The no-norm backward: dy = dout·silu(z), dz = dout·y·silu'(z).
template <typename T>
__global__ void gate_bwd_kernel(GatedArgs a, T* __restrict__ dy, T* __restrict__ dz, const T* __restrict__ dout,
                                const T* __restrict__ y, const T* __restrict__ z) {
  const int64_t per_row = ceil_div(a.e, kChunk), total = a.n * per_row;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = q / per_row, c = q - t * per_row;
    const int cnt = chunk_len(c, a.e);
    Pack8<T> dv, yv, zv;
    load8(dv, dout + t * a.e + c * kChunk, cnt, a.vy);
    load8(yv, y + t * a.e + c * kChunk, cnt, a.vy);
    load8(zv, z + t * a.ldz + c * kChunk, cnt, a.vz);
    float gy[8], gz[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const float zi = zv.get(u), d = dv.get(u), sg = sigmoidf_(zi);
      gy[u] = d * (zi * sg);
      gz[u] = d * yv.get(u) * (sg * (1.0f + zi * (1.0f - sg)));
    }
    store8(dy + t * a.e + c * kChunk, gy, cnt, a.vy);
    store8(dz + t * a.ldz + c * kChunk, gz, cnt, a.vz);
  }
}

// The backward with the norm: a team owns group blockIdx.y·(teams a block)
// + (its team in the block) for rows [32·blockIdx.x, +32), walked in order.
// With partial, partial[blockIdx.x, i] = Σ over those rows of
// dout·y·silu(z)·r, in row order. Prefetch: load row t+1 while working on
// row t.
template <typename T, int NV, bool kPrefetch>
__global__ void __launch_bounds__(kMaxTeam)
    gated_norm_bwd_kernel(GatedArgs a, T* __restrict__ dy, T* __restrict__ dz, float* __restrict__ partial,
                          const T* __restrict__ dout, const float* __restrict__ rstd, const T* __restrict__ y,
                          const T* __restrict__ z, const float* __restrict__ w) {
  __shared__ float red[2][32];
  const int lane = int(threadIdx.x) % a.ts;
  const int64_t gr = int64_t(blockIdx.y) * (blockDim.x / a.ts) + threadIdx.x / a.ts;
  const bool active = gr < a.groups;
  const int64_t gi = active ? gr : 0;
  const int64_t col0 = gi * a.k;  // the group's first column
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerPartial;
  const int rows = int(min(int64_t(kRowsPerPartial), a.n - r0));
  const bool want_dw = partial != nullptr;

  int cnt[NV];
  int64_t off[NV];  // the column of the chunk's first element
  Pack8<float> wv[NV];
  float acc[NV][8];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t c = lane + int64_t(j) * a.ts;
    cnt[j] = active ? chunk_len(c, a.k) : 0;
    off[j] = col0 + c * kChunk;
    load8(wv[j], w + off[j], cnt[j], a.vy);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc[j][u] = 0.0f;
  }

  Pack8<T> dv[NV], yv[NV], zv[NV];
  float rs;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    load8(dv[j], dout + r0 * a.e + off[j], cnt[j], a.vy);
    load8(yv[j], y + r0 * a.e + off[j], cnt[j], a.vy);
    load8(zv[j], z + r0 * a.ldz + off[j], cnt[j], a.vz);
  }
  rs = rstd[r0 * a.groups + gi];

  for (int it = 0; it < rows; ++it) {
    const int64_t t = r0 + it;
    Pack8<T> dn[NV], yn[NV], zn[NV];
    float rn = 0.0f;
    if (kPrefetch && it + 1 < rows) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        load8(dn[j], dout + (t + 1) * a.e + off[j], cnt[j], a.vy);
        load8(yn[j], y + (t + 1) * a.e + off[j], cnt[j], a.vy);
        load8(zn[j], z + (t + 1) * a.ldz + off[j], cnt[j], a.vz);
      }
      rn = rstd[(t + 1) * a.groups + gi];
    }

    // First pass: the dot product, keeping σ(z) for the second.
    float sg[NV][8];
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      float part = 0.0f;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float zi = zv[j].get(u);
        sg[j][u] = sigmoidf_(zi);
        part += bwd_dot_term(dv[j].get(u), yv[j].get(u), zi * sg[j][u], wv[j].get(u), rs, a.before_gate);
      }
      dot += part;
    }
    dot = team_sum(dot, a.ts, red[it & 1]);
    const float m = dot / float(a.k);

    // Second pass: dy, dz and the row's dw terms.
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (cnt[j] == 0) continue;
      float gy[8], gz[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float d = dv[j].get(u), yi = yv[j].get(u), zi = zv[j].get(u);
        bwd_elem(d, yi, zi, sg[j][u], wv[j].get(u), rs, m, a.before_gate, gy[u], gz[u]);
        if (want_dw) acc[j][u] += d * yi * (zi * sg[j][u]) * rs;
      }
      store8(dy + t * a.e + off[j], gy, cnt[j], a.vy);
      store8(dz + t * a.ldz + off[j], gz, cnt[j], a.vz);
    }

    if (it + 1 == rows) break;
    if (kPrefetch) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        dv[j] = dn[j];
        yv[j] = yn[j];
        zv[j] = zn[j];
      }
      rs = rn;
    } else {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        load8(dv[j], dout + (t + 1) * a.e + off[j], cnt[j], a.vy);
        load8(yv[j], y + (t + 1) * a.e + off[j], cnt[j], a.vy);
        load8(zv[j], z + (t + 1) * a.ldz + off[j], cnt[j], a.vz);
      }
      rs = rstd[(t + 1) * a.groups + gi];
    }
  }

  if (!want_dw) return;
  float* pp = partial + int64_t(blockIdx.x) * a.e;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    if (cnt[j] > 0) store8(pp + off[j], acc[j], cnt[j], a.vy);
  }
}

// The backward for groups too wide for registers: one block per (block of
// rows, group). First the mean m of every row (the group read once per
// row), then per chunk all the rows in order (read again), which gives dy,
// dz and the chunk's dw partial.
template <typename T>
__global__ void __launch_bounds__(kMaxTeam)
    gated_norm_bwd_wide_kernel(GatedArgs a, T* __restrict__ dy, T* __restrict__ dz, float* __restrict__ partial,
                               const T* __restrict__ dout, const float* __restrict__ rstd, const T* __restrict__ y,
                               const T* __restrict__ z, const float* __restrict__ w) {
  __shared__ float red[2][32];
  __shared__ float mean[kRowsPerPartial];
  const int64_t gr = blockIdx.y, col0 = gr * a.k;
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerPartial;
  const int rows = int(min(int64_t(kRowsPerPartial), a.n - r0));
  for (int it = 0; it < rows; ++it) {
    const int64_t t = r0 + it;
    const float rs = rstd[t * a.groups + gr];
    float dot = 0.0f;
    for (int64_t c = threadIdx.x; c < a.nc; c += blockDim.x) {
      const int cnt = chunk_len(c, a.k);
      Pack8<T> dv, yv, zv;
      Pack8<float> wv;
      load8(dv, dout + t * a.e + col0 + c * kChunk, cnt, a.vy);
      load8(yv, y + t * a.e + col0 + c * kChunk, cnt, a.vy);
      load8(zv, z + t * a.ldz + col0 + c * kChunk, cnt, a.vz);
      load8(wv, w + col0 + c * kChunk, cnt, a.vy);
      float part = 0.0f;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float zi = zv.get(u);
        part += bwd_dot_term(dv.get(u), yv.get(u), zi * sigmoidf_(zi), wv.get(u), rs, a.before_gate);
      }
      dot += part;
    }
    dot = team_sum(dot, blockDim.x, red[it & 1]);
    if (threadIdx.x == 0) mean[it] = dot / float(a.k);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < a.nc; c += blockDim.x) {
    const int cnt = chunk_len(c, a.k);
    const int64_t off = col0 + c * kChunk;
    Pack8<float> wv;
    load8(wv, w + off, cnt, a.vy);
    float acc[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) acc[u] = 0.0f;
    for (int it = 0; it < rows; ++it) {
      const int64_t t = r0 + it;
      const float rs = rstd[t * a.groups + gr], m = mean[it];
      Pack8<T> dv, yv, zv;
      load8(dv, dout + t * a.e + off, cnt, a.vy);
      load8(yv, y + t * a.e + off, cnt, a.vy);
      load8(zv, z + t * a.ldz + off, cnt, a.vz);
      float gy[8], gz[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float d = dv.get(u), yi = yv.get(u), zi = zv.get(u), sg = sigmoidf_(zi);
        bwd_elem(d, yi, zi, sg, wv.get(u), rs, m, a.before_gate, gy[u], gz[u]);
        acc[u] += d * yi * (zi * sg) * rs;
      }
      store8(dy + t * a.e + off, gy, cnt, a.vy);
      store8(dz + t * a.ldz + off, gz, cnt, a.vz);
    }
    if (partial) store8(partial + int64_t(blockIdx.x) * a.e + off, acc, cnt, a.vy);
  }
}

// dw[j] += Σ_p partial[p·e + j] over the parts row blocks: kDwLanes threads
// per column, lane l summing blocks l, l + kDwLanes, … in order (loads issued
// kDwAhead at a time), then the lane totals added in lane order.
__global__ void __launch_bounds__(kDwCols * kDwLanes)
    gated_dw_reduce_kernel(float* __restrict__ dw, const float* __restrict__ partial, int64_t parts, int64_t e) {
  __shared__ float lanes[kDwLanes][kDwCols + 1];
  const int tx = int(threadIdx.x) % kDwCols, ty = int(threadIdx.x) / kDwCols;
  const int64_t j = int64_t(blockIdx.x) * kDwCols + tx;
  float acc = 0.0f;
  if (j < e) {
    int64_t p = ty;
    for (; p + int64_t(kDwAhead - 1) * kDwLanes < parts; p += int64_t(kDwAhead) * kDwLanes) {
      float v[kDwAhead];
#pragma unroll
      for (int u = 0; u < kDwAhead; ++u) v[u] = partial[(p + int64_t(u) * kDwLanes) * e + j];
#pragma unroll
      for (int u = 0; u < kDwAhead; ++u) acc += v[u];
    }
    for (; p < parts; p += kDwLanes) acc += partial[p * e + j];
  }
  lanes[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < e) {
    float total = lanes[0][tx];
    for (int l = 1; l < kDwLanes; ++l) total += lanes[l][tx];
    dw[j] += total;
  }
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

// One partial row of e floats per block of kRowsPerPartial rows.
int64_t gated_workspace_bytes(int64_t n, int64_t e) {
  return ceil_div(n, kRowsPerPartial) * e * int64_t(sizeof(float));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Threads per team and chunks per thread for a group of k channels (nv = 0:
// the wide kernels). See the header.
struct TeamPlan {
  int ts, nv;
};

inline TeamPlan team_plan(int64_t k) {
  const int64_t nc = ceil_div(k, kChunk);
  if (nc <= 32) {
    int ts = 1;
    while (ts < nc) ts <<= 1;
    return TeamPlan{ts, 1};
  }
  if (nc <= kMaxTeam) return TeamPlan{int(ceil_div(nc, 32) * 32), 1};
  if (nc <= int64_t(kMaxTeam) * kMaxChunksPerThread) {
    return TeamPlan{int(ceil_div(ceil_div(nc, kMaxChunksPerThread), 32) * 32), kMaxChunksPerThread};
  }
  return TeamPlan{kMaxTeam, 0};
}

// Blocks of kGateThreads for the elementwise kernels (they loop over the
// rest).
inline unsigned gate_blocks(const GatedArgs& a) {
  const int64_t blocks = ceil_div(a.n * ceil_div(a.e, kChunk), kGateThreads);
  return unsigned(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));
}

// Fills in the chunk and team fields of a from its shape.
TeamPlan plan_args(GatedArgs& a) {
  a.k = a.e / a.groups;
  a.nc = int(ceil_div(a.k, kChunk));
  const TeamPlan p = team_plan(a.k);
  a.ts = p.ts;
  return p;
}

// Whether rows of ld elements of T keep 16-byte alignment from one to the
// next.
template <typename T>
bool rows_aligned(int64_t ld) {
  return (ld * int64_t(sizeof(T))) % 16 == 0;
}

template <typename T>
int gated_fwd(GatedArgs a, int enabled, void* out, void* rstd, const void* y, const void* z, const void* w,
              cudaStream_t s) {
  if (!enabled) {
    const bool full = a.e % kChunk == 0;
    a.vy = full && aligned16(out) && aligned16(y);
    a.vz = full && rows_aligned<T>(a.ldz) && aligned16(z);
    gate_fwd_kernel<T><<<gate_blocks(a), kGateThreads, 0, s>>>(a, (T*)out, (const T*)y, (const T*)z);
    return launch_status();
  }
  const TeamPlan p = plan_args(a);
  const bool full = a.k % kChunk == 0;  // then e is a multiple of 8 too
  a.vy = full && aligned16(out) && aligned16(y) && aligned16(w);
  a.vz = full && rows_aligned<T>(a.ldz) && aligned16(z);
  const int64_t teams = a.n * a.groups;  // below 2^31 (check_gated)
  if (p.nv == 0) {
    gated_norm_fwd_wide_kernel<T><<<unsigned(teams), kMaxTeam, 0, s>>>(a, (T*)out, (float*)rstd, (const T*)y,
                                                                      (const T*)z, (const float*)w);
    return launch_status();
  }
  const int threads = p.ts <= 32 ? kSmallTeamBlock : p.ts;
  const unsigned blocks = unsigned(ceil_div(teams, threads / p.ts));
  if (p.nv == 1) {
    gated_norm_fwd_kernel<T, 1><<<blocks, threads, 0, s>>>(a, (T*)out, (float*)rstd, (const T*)y, (const T*)z,
                                                           (const float*)w);
  } else {
    gated_norm_fwd_kernel<T, 2><<<blocks, threads, 0, s>>>(a, (T*)out, (float*)rstd, (const T*)y, (const T*)z,
                                                           (const float*)w);
  }
  return launch_status();
}

template <typename T>
int gated_bwd(GatedArgs a, int enabled, void* dy, void* dz, void* dw, const void* dout, const void* rstd,
              const void* y, const void* z, const void* w, void* workspace, cudaStream_t s) {
  if (!enabled) {
    const bool full = a.e % kChunk == 0;
    a.vy = full && aligned16(dy) && aligned16(dout) && aligned16(y);
    a.vz = full && rows_aligned<T>(a.ldz) && aligned16(z) && aligned16(dz);
    gate_bwd_kernel<T><<<gate_blocks(a), kGateThreads, 0, s>>>(a, (T*)dy, (T*)dz, (const T*)dout, (const T*)y,
                                                                (const T*)z);
    return launch_status();
  }
  const TeamPlan p = plan_args(a);
  float* partial = dw ? (float*)workspace : nullptr;
  const bool full = a.k % kChunk == 0;
  a.vy = full && aligned16(dy) && aligned16(dout) && aligned16(y) && aligned16(w) &&
         (partial == nullptr || aligned16(partial));
  a.vz = full && rows_aligned<T>(a.ldz) && aligned16(z) && aligned16(dz);
  const int64_t parts = ceil_div(a.n, kRowsPerPartial);
  // grid.y stays below 2^16: with one team a block, groups = e/k < e/256
  // (k > 256 there); with small teams ts ≤ k, so groups·ts/256 ≤ e/256; and
  // check_gated caps e at 65535·256.
  if (p.nv == 0) {
    gated_norm_bwd_wide_kernel<T><<<dim3(unsigned(parts), unsigned(a.groups)), kMaxTeam, 0, s>>>(
        a, (T*)dy, (T*)dz, partial, (const T*)dout, (const float*)rstd, (const T*)y, (const T*)z, (const float*)w);
  } else {
    int per_block = 1;  // teams a block
    if (p.ts <= 32) {
      per_block = 32 / p.ts;  // at least a warp
      while (per_block < a.groups && per_block * p.ts < kSmallTeamBlock) per_block <<= 1;
    }
    const dim3 grid(unsigned(parts), unsigned(ceil_div(a.groups, per_block)));
    const unsigned threads = unsigned(per_block * p.ts);
    if (p.nv == 1) {
      gated_norm_bwd_kernel<T, 1, true><<<grid, threads, 0, s>>>(a, (T*)dy, (T*)dz, partial, (const T*)dout,
                                                                 (const float*)rstd, (const T*)y, (const T*)z,
                                                                 (const float*)w);
    } else {
      gated_norm_bwd_kernel<T, 2, false><<<grid, threads, 0, s>>>(a, (T*)dy, (T*)dz, partial, (const T*)dout,
                                                                  (const float*)rstd, (const T*)y, (const T*)z,
                                                                  (const float*)w);
    }
  }
  if (dw) {
    gated_dw_reduce_kernel<<<unsigned(ceil_div(a.e, kDwCols)), kDwCols * kDwLanes, 0, s>>>(
        (float*)dw, partial, parts, a.e);
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
  GatedArgs a{};
  a.n = n;
  a.e = e;
  a.groups = groups;
  a.ldz = ldz;
  a.eps = eps;
  a.before_gate = before_gate != 0;
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == M2K_F32) return gated_fwd<float>(a, enabled, out, rstd, y, z, w, s);
  return gated_fwd<__nv_bfloat16>(a, enabled, out, rstd, y, z, w, s);
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
  GatedArgs a{};
  a.n = n;
  a.e = e;
  a.groups = groups;
  a.ldz = ldz;
  a.before_gate = before_gate != 0;
  cudaStream_t s = (cudaStream_t)stream;
  if (dtype == M2K_F32) return gated_bwd<float>(a, enabled, dy, dz, dw, dout, rstd, y, z, w, workspace, s);
  return gated_bwd<__nv_bfloat16>(a, enabled, dy, dz, dw, dout, rstd, y, z, w, workspace, s);
}
