// Kernels of the chunked SSD scan (docs/MAMBA2_SPEC.md §3 and §4.6). The
// host side that validates, carves the workspace and launches them is
// ssd.cu. Layout conventions shared by every kernel:
//
//   positions of one chunk: t = c·Q + i, i < q = min(Q, L − c·Q); positions
//   i ≥ q are the padding of §3.3 (dt = 0, x = B = C = 0), never read from
//   memory and never written.
//   dt, cs      (Bt·H, nc·Q) f32: clamped dt and the per-chunk inclusive
//               cumsum of dt·A; padded positions hold dt = 0 and repeat the
//               last cumsum, so cs[c·Q + Q − 1] is the chunk total Λ_c.
//   st          (Bt·H, nc + 1, P, N) f32: chunk states, then in place the
//               states Hin_c entering each chunk; st[nc] is the final state.
//   cb          (Bt·G, nc, Q, Q) f32: C_i·B_j, written for the tiles j ≤ i.
//   gst         (Bt·H, nc + 1, P, N) f32 (backward): gst[c] = ∂loss/∂Hin_c
//               after state passing, gst[c + 1] = Gc_c.
//   dcb         (Bt·G, nc, Q, Q) f32 (backward): dCB summed over the heads of
//               a group, lower tiles (zero above the diagonal).
//   *_part      per-tile partial sums, reduced later in a fixed order.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "tile.cuh"

namespace m2k {
namespace ssd {

constexpr int MAXQ = 256;

// Blocks of each tile kernel that must fit on one multiprocessor at once:
// the compiler caps the kernel's registers at 65536 / (NT·MINB). The tile
// kernels wait on memory much of the time, and other resident blocks hide
// that wait. Measured on an H200 (docs/benchmarks.md, "SSD scan on the GPU")
// at 2, 3 and 4 for every tile kernel: 3 was the fastest, or within 1% of
// it, for each; 4 spills registers in chunk_dbc, chunk_dx and
// chunk_scan_fwd. chunk_dcb's shared memory (two operand buffers, three f32
// tiles) leaves room for three blocks anyway. Building with -DM2K_SSD_MINB=n sets it
// to n, to measure again.
#ifdef M2K_SSD_MINB
constexpr int MINB = M2K_SSD_MINB;
#else
constexpr int MINB = 3;
#endif

// Heads of a group that one block of chunk_dcb or chunk_dbc handles. Their
// outputs (dCB, and dB and dC) are sums over the group's heads; with more
// heads than this the heads are split over several blocks, each writing its
// partial sum to the workspace, and a second kernel adds the partial sums in
// split order (so the result stays bitwise reproducible).
constexpr int HEADS_PER_BLOCK = 4;

// Sizes of one call, with the derived tile counts.
struct Geo {
    int Bt, L, H, P, N, G, R;    // R = H / G heads per group
    int Q, nc, Lp;               // chunk, chunks, padded length nc·Q
    int nI, nPt, nNt, nEb;       // row tiles per chunk, P tiles, N tiles, state element blocks
    int hs, nS;                  // heads per split of a group, splits (ceil(R / hs))
    int64_t PN;
    int64_t xs, dts, bs, css, ys;  // row strides of x, dt_raw, B, C, y
    float dt_lo, dt_hi;
    int d_hdim;
};

__device__ __forceinline__ float softplus_f(float u) { return u > 20.f ? u : log1pf(expf(u)); }

// Shared-memory layout of a kernel: two A tiles, two B tiles (mma_pipeline
// fills one pair while the tensor cores read the other), nf f32 tiles, then
// extra floats.
template <typename T> struct Smem {
    T* A[2];
    T* B[2];
    float* F;  // nf consecutive f32 tiles of TM×LDC
    float* X;  // extra floats
    __device__ Smem(unsigned char* raw, int nf) {
        A[0] = reinterpret_cast<T*>(raw);
        A[1] = reinterpret_cast<T*>(raw + a_bytes<T>());
        B[0] = reinterpret_cast<T*>(raw + 2 * a_bytes<T>());
        B[1] = reinterpret_cast<T*>(raw + 2 * a_bytes<T>() + b_bytes<T>());
        F = reinterpret_cast<float*>(raw + 2 * (a_bytes<T>() + b_bytes<T>()));
        X = F + nf * TM * LDC;
    }
    static constexpr int bytes(int nf, int extra_floats) {
        return 2 * (a_bytes<T>() + b_bytes<T>()) + nf * f_bytes() + extra_floats * 4;
    }
};

constexpr __device__ int steps(int n) { return (n + TK - 1) / TK; }  // reduction steps of TK over n

// How mma_a finds B in memory: NK, a TN-row tile of a row-major tensor
// with k contiguous (the product is A·Bᵀ); KN, the first K rows of a
// row-major tensor, a TN-wide tile of its columns (A·B).
enum class BLayout { NK, KN };

// acc += A·B over k < K, A the rows r < arows of a TM-row tile of a
// row-major tensor (rows lda apart) with k contiguous, B as BL says (rows
// ldb apart; blim: its valid rows for NK, columns for KN).
template <BLayout BL, typename T, typename SA, typename SB>
__device__ __forceinline__ void mma_a(Acc<T>& acc, const Smem<T>& s, const SA* a, int64_t lda, int arows,
                                      const SB* b, int64_t ldb, int blim, int K) {
    constexpr bool nk = BL == BLayout::NK;
    constexpr Lay LB = nk ? Lay::Col : Lay::Row;  // an NK tile arrives as Bᵀ
    Frag<TM, TK, SA> fa;
    std::conditional_t<nk, Frag<TN, TK, SB>, Frag<TK, TN, SB>> fb;
    mma_pipeline<Lay::Row, LB>(
        acc, s.A, s.B, steps(K),
        [&](int k) {
            fa.fetch(a + k * TK, lda, arows, K - k * TK);
            if constexpr (nk)
                fb.fetch(b + k * TK, ldb, blim, K - k * TK);
            else
                fb.fetch(b + int64_t(k) * TK * ldb, ldb, K - k * TK, blim);
        },
        [&](int, T* A, T* B) {
            put_to(fa, RowsTo<T>{A, Ld<T>::A});
            put_to(fb, RowsTo<T>{B, nk ? Ld<T>::Bc : Ld<T>::B});
        });
}

// ---------------------------------------------------------------- forward

// dt, the per-chunk cumsum of dt·A, and the total log-decay per (b, h).
// Grid Bt·H, block NT (≥ Q).
template <typename T>
__global__ void __launch_bounds__(NT) chunk_cumsum_kernel(Geo g, const T* __restrict__ dt_raw,
                                                          const float* __restrict__ dt_bias,
                                                          const float* __restrict__ A_log, float* __restrict__ dt_out,
                                                          float* __restrict__ cs_out, float* __restrict__ log_decay) {
    using Scan = cub::BlockScan<float, NT>;
    __shared__ typename Scan::TempStorage tmp;
    const int bh = blockIdx.x, b = bh / g.H, h = bh % g.H, i = threadIdx.x;
    const float bias = dt_bias[h], A = -expf(A_log[h]);
    double total = 0;
    for (int c = 0; c < g.nc; ++c) {
        const int t = c * g.Q + i;
        float dt = 0.f;
        if (i < g.Q && t < g.L) {
            const float u = to_f32(dt_raw[(int64_t(b) * g.L + t) * g.dts + h]) + bias;
            dt = fminf(fmaxf(softplus_f(u), g.dt_lo), g.dt_hi);
        }
        float run;
        Scan(tmp).InclusiveSum(dt * A, run);
        __syncthreads();
        if (i < g.Q) {
            dt_out[int64_t(bh) * g.Lp + t] = dt;
            cs_out[int64_t(bh) * g.Lp + t] = run;
        }
        if (i == g.Q - 1) total += run;
    }
    if (i == g.Q - 1 && log_decay) log_decay[bh] = float(total);
}

// Maps a linear index to the lower-triangular tile (I, J), J ≤ I.
__device__ __forceinline__ void tri_tile(int z, int& I, int& J) {
    I = 0;
    while ((I + 1) * (I + 2) / 2 <= z) ++I;
    J = z - I * (I + 1) / 2;
}

// CB[i, j] = C_i · B_j for the tiles j ≤ i of chunk c of (b, group).
// Grid (Bt·G, nc, nI(nI+1)/2).
template <typename T>
__global__ void __launch_bounds__(NT, MINB) bmm_chunk_kernel(Geo g, const T* __restrict__ B, const T* __restrict__ C,
                                                       float* __restrict__ cb) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem<T> s(smem_raw, 1);
    const int bg = blockIdx.x, c = blockIdx.y, b = bg / g.G, grp = bg % g.G;
    int I, J;
    tri_tile(blockIdx.z, I, J);
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0), I0 = I * TM, J0 = J * TN;
    const T* Cp = C + (int64_t(b) * g.L + t0 + I0) * g.css + int64_t(grp) * g.N;
    const T* Bp = B + (int64_t(b) * g.L + t0 + J0) * g.bs + int64_t(grp) * g.N;
    Acc<T> acc;
    acc.zero();
    mma_a<BLayout::NK>(acc, s, Cp, g.css, q - I0, Bp, g.bs, q - J0, g.N);
    acc.store(s.F);
    __syncthreads();
    float* out = cb + (int64_t(bg) * g.nc + c) * g.Q * g.Q;
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int r = idx / TN, k = idx % TN, i = I0 + r, j = J0 + k;
        if (i < g.Q && j < g.Q) out[int64_t(i) * g.Q + j] = s.F[r * LDC + k];
    }
}

// out[p, n] = Σ_j w_j X_j[p] Y_j[n] over chunk c of (b, h):
//   STATE:  X = x, Y = B, w_j = exp(Λ_c − cs_j)·dt_j → st[c + 1] (the chunk state S_c)
//   DSTATE: X = dy, Y = C, w_j = exp(cs_j)           → gst[c] (dP_c of §4.6 B1)
// Grid (Bt·H, nc, nPt·nNt).
template <typename T, bool DSTATE>
__global__ void __launch_bounds__(NT, MINB) chunk_state_kernel(Geo g, const T* __restrict__ X, int64_t xs,
                                                         const T* __restrict__ Y, int64_t ys,
                                                         const float* __restrict__ dt, const float* __restrict__ cs,
                                                         float* __restrict__ out) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem<T> s(smem_raw, 1);
    float* w = s.X;  // [MAXQ]
    const int bh = blockIdx.x, c = blockIdx.y, b = bh / g.H, h = bh % g.H, grp = h / g.R;
    const int pt = blockIdx.z / g.nNt, nt = blockIdx.z % g.nNt, p0 = pt * TM, n0 = nt * TN;
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0);
    const float* csc = cs + int64_t(bh) * g.Lp + t0;
    const float* dtc = dt + int64_t(bh) * g.Lp + t0;
    const float lam = csc[g.Q - 1];
    for (int j = threadIdx.x; j < g.Q; j += NT)
        w[j] = j >= q ? 0.f : DSTATE ? expf(fminf(csc[j], 0.f)) : expf(fminf(lam - csc[j], 0.f)) * dtc[j];
    __syncthreads();
    const T* Xp = X + (int64_t(b) * g.L + t0) * xs + int64_t(h) * g.P + p0;
    const T* Yp = Y + (int64_t(b) * g.L + t0) * ys + int64_t(grp) * g.N + n0;
    Acc<T> acc;
    acc.zero();
    Frag<TK, TM, T> fx;  // rows j of x: the A operand (w·x)ᵀ, stored Col
    Frag<TK, TN, T> fy;
    mma_pipeline<Lay::Col, Lay::Row>(
        acc, s.A, s.B, steps(q),
        [&](int k) {
            const int j0 = k * TK;
            fx.fetch(Xp + j0 * xs, xs, q - j0, g.P - p0);
            fy.fetch(Yp + j0 * ys, ys, q - j0, g.N - n0);
        },
        [&](int k, T* A, T* B) {
            put_to(fx, RowsScaledTo<T>{A, Ld<T>::Ac, w + k * TK});
            put_to(fy, RowsTo<T>{B, Ld<T>::B});
        });
    acc.store(s.F);
    __syncthreads();
    float* o = out + (int64_t(bh) * (g.nc + 1) + c + (DSTATE ? 0 : 1)) * g.PN;
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int r = idx / TN, k = idx % TN;
        if (p0 + r < g.P && n0 + k < g.N) o[int64_t(p0 + r) * g.N + n0 + k] = s.F[r * LDC + k];
    }
}

// Chunks whose loads a thread of the forward state passing issues together
// before it runs the recurrence over them: the loads do not depend on the
// recurrence, and one at a time each would wait out the memory latency
// alone (measured: 68 → 32 µs per call at batch 8, L 2048, H 24). The
// backward's recurrence has a block reduction per chunk, and batching its
// loads the same way made it slower (63 → 77 µs), so it loads one chunk at
// a time.
constexpr int SP_BATCH = 8;

// State passing (step 3), in place: st[0] = initial state, st[c + 1] =
// exp(Λ_c)·st[c] + S_c; the final state is st[nc]. Grid (Bt·H, nEb).
__global__ void __launch_bounds__(NT) state_passing_fwd_kernel(Geo g, const float* __restrict__ cs,
                                                               float* __restrict__ st,
                                                               const float* __restrict__ init,
                                                               float* __restrict__ final_state) {
    const int bh = blockIdx.x;
    const int64_t e = int64_t(blockIdx.y) * NT + threadIdx.x;
    if (e >= g.PN) return;
    float* base = st + int64_t(bh) * (g.nc + 1) * g.PN + e;
    const float* lam = cs + int64_t(bh) * g.Lp + g.Q - 1;  // Λ_c = lam[c·Q]
    float s = init ? init[int64_t(bh) * g.PN + e] : 0.f;
    base[0] = s;
    for (int c0 = 0; c0 < g.nc; c0 += SP_BATCH) {
        float v[SP_BATCH], dec[SP_BATCH];
#pragma unroll
        for (int k = 0; k < SP_BATCH; ++k) {
            if (c0 + k < g.nc) {
                v[k] = base[int64_t(c0 + k + 1) * g.PN];
                dec[k] = expf(fminf(lam[int64_t(c0 + k) * g.Q], 0.f));
            }
        }
#pragma unroll
        for (int k = 0; k < SP_BATCH; ++k) {
            if (c0 + k < g.nc) {
                s = dec[k] * s + v[k];
                base[int64_t(c0 + k + 1) * g.PN] = s;
            }
        }
    }
    if (final_state) final_state[int64_t(bh) * g.PN + e] = s;
}

// Output (steps 1 and 4 plus D·x) of a 64-row, 64-column tile of chunk c of
// (b, h): y_i = exp(cs_i)·Hin_c C_i + Σ_{j≤i} CB[i,j]·exp(cs_i − cs_j)·dt_j·x_j
// + D·x_i. Grid (Bt·H, nc, nI·nPt).
template <typename T>
__global__ void __launch_bounds__(NT, MINB) chunk_scan_fwd_kernel(Geo g, const T* __restrict__ x, const T* __restrict__ C,
                                                            const float* __restrict__ D,
                                                            const float* __restrict__ dt, const float* __restrict__ cs,
                                                            const float* __restrict__ st,
                                                            const float* __restrict__ cb, T* __restrict__ y) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem<T> s(smem_raw, 1);
    float* cs_s = s.X;
    float* dt_s = s.X + MAXQ;
    const int bh = blockIdx.x, c = blockIdx.y, b = bh / g.H, h = bh % g.H, grp = h / g.R;
    const int I = blockIdx.z / g.nPt, pt = blockIdx.z % g.nPt, I0 = I * TM, p0 = pt * TN;
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0);
    if (I0 >= q) return;
    for (int j = threadIdx.x; j < g.Q; j += NT) {
        cs_s[j] = cs[int64_t(bh) * g.Lp + t0 + j];
        dt_s[j] = dt[int64_t(bh) * g.Lp + t0 + j];
    }
    Acc<T> acc;
    acc.zero();
    // Off-diagonal part: C_I (rows × N) · Hin_cᵀ (N × P).
    const T* Cp = C + (int64_t(b) * g.L + t0 + I0) * g.css + int64_t(grp) * g.N;
    const float* hin = st + (int64_t(bh) * (g.nc + 1) + c) * g.PN + int64_t(p0) * g.N;
    mma_a<BLayout::NK>(acc, s, Cp, g.css, q - I0, hin, int64_t(g.N), g.P - p0, g.N);
    acc.store(s.F);
    __syncthreads();
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int r = idx / TN, k = idx % TN;
        s.F[r * LDC + k] *= I0 + r < q ? expf(fminf(cs_s[I0 + r], 0.f)) : 0.f;
    }
    __syncthreads();
    acc.load(s.F);
    // Diagonal block: (CB ∘ decay · diag(dt)) X over j ≤ i.
    const float* cbc = cb + ((int64_t(b) * g.G + grp) * g.nc + c) * g.Q * g.Q;
    const T* xp = x + (int64_t(b) * g.L + t0) * g.xs + int64_t(h) * g.P + p0;
    const int jend = min(I0 + TM, q);
    {
        Frag<TM, TK, float> fm;
        Frag<TK, TN, T> fx;
        mma_pipeline<Lay::Row, Lay::Row>(
            acc, s.A, s.B, steps(jend),
            [&](int k) {
                const int j0 = k * TK;
                fm.fetch(cbc + int64_t(I0) * g.Q + j0, g.Q, q - I0, jend - j0);
                fx.fetch(xp + j0 * g.xs, g.xs, q - j0, g.P - p0);
            },
            [&](int k, T* A, T* B) {
                const int j0 = k * TK;
                fm.put([&](int r, int c, const float* v) {
                    const int i = I0 + r;
                    float o[Vec<float>::N];
#pragma unroll
                    for (int e = 0; e < Vec<float>::N; ++e) {
                        const int j = j0 + c + e;
                        o[e] = (i < q && j <= i) ? v[e] * expf(fminf(cs_s[i] - cs_s[j], 0.f)) * dt_s[j] : 0.f;
                    }
                    store_row<Vec<float>::N>(A + r * Ld<T>::A + c, o);
                });
                put_to(fx, RowsTo<T>{B, Ld<T>::B});
            });
    }
    acc.store(s.F);
    // y = the tile + D·x, V consecutive columns of a row per thread and
    // step, x read and y written as vectors where aligned.
    Frag<TM, TN, T> fxe;
    const int64_t row0 = int64_t(b) * g.L + t0 + I0;
    fxe.fetch(x + row0 * g.xs + int64_t(h) * g.P + p0, g.xs, q - I0, g.P - p0);
    __syncthreads();
    constexpr int V = Vec<T>::N, CV = TN / V;
    T* yp = y + row0 * g.ys + int64_t(h) * g.P + p0;
    const bool vec = vec_ok(yp, g.ys);
#pragma unroll
    for (int it = 0; it < Frag<TM, TN, T>::IT; ++it) {
        const int idx = threadIdx.x + it * NT, r = idx / CV, cc = idx % CV * V;
        if (I0 + r >= q) continue;
        float xv[V], o[V];
        unpack<T>(fxe.u[it], xv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const int p = p0 + cc + e;
            const float d = p < g.P ? (g.d_hdim ? D[h * g.P + p] : D[h]) : 0.f;
            o[e] = s.F[r * LDC + cc + e] + d * xv[e];
        }
        const int n = min(V, g.P - p0 - cc);
        if (vec && n == V) {
            store_row<V>(yp + int64_t(r) * g.ys + cc, o);
        } else {
            for (int e = 0; e < n; ++e) yp[int64_t(r) * g.ys + cc + e] = from_f32<T>(o[e]);
        }
    }
}

// --------------------------------------------------------------- backward

// Reverse state passing (§4.6 B2), in place in gst (gst[c] = dP_c on entry):
// gst[nc] = dfinal, then for c = nc−1 … 0: dΛ_c partial = ⟨Gc_c, Hin_c⟩ over
// this block's elements, gst[c] = exp(Λ_c)·gst[c + 1] + dP_c. dinit = gst[0].
// Grid (Bt·H, nEb); dlam_part (Bt·H, nc, nEb) holds the raw partial dots.
__global__ void __launch_bounds__(NT) state_passing_bwd_kernel(Geo g, const float* __restrict__ cs,
                                                               const float* __restrict__ st, float* __restrict__ gst,
                                                               const float* __restrict__ dfinal,
                                                               float* __restrict__ dinit,
                                                               float* __restrict__ dlam_part) {
    using Red = cub::BlockReduce<float, NT>;
    __shared__ typename Red::TempStorage tmp;
    const int bh = blockIdx.x, blk = blockIdx.y;
    const int64_t e = int64_t(blk) * NT + threadIdx.x;
    const bool ok = e < g.PN;
    float* gb = gst + int64_t(bh) * (g.nc + 1) * g.PN + e;
    const float* sb = st + int64_t(bh) * (g.nc + 1) * g.PN + e;
    float gv = (ok && dfinal) ? dfinal[int64_t(bh) * g.PN + e] : 0.f;
    if (ok) gb[int64_t(g.nc) * g.PN] = gv;
    for (int c = g.nc - 1; c >= 0; --c) {
        const float hin = ok ? sb[int64_t(c) * g.PN] : 0.f;
        const float d = Red(tmp).Sum(gv * hin);
        if (threadIdx.x == 0) dlam_part[(int64_t(bh) * g.nc + c) * g.nEb + blk] = d;
        __syncthreads();
        const float lam = cs[int64_t(bh) * g.Lp + int64_t(c) * g.Q + g.Q - 1];
        gv = expf(fminf(lam, 0.f)) * gv + (ok ? gb[int64_t(c) * g.PN] : 0.f);
        if (ok) gb[int64_t(c) * g.PN] = gv;
    }
    if (ok && dinit) dinit[int64_t(bh) * g.PN + e] = gv;
}

// dCB of tile (I, J ≤ I) of chunk c of (b, group), summed over the group's
// heads (§4.6 B3), and per head what the intra-chunk part of the log-decay
// gradient (§4.6 B4), da_k = Σ_{i≥k} Σ_{j<k} W[i,j] with W = CB ∘ dCB_h,
// needs from this tile (da_part (Bt·H, nc, nTri, 2·TM)):
//   [0, TM):    for k = J0 + kk: Σ_{i ∈ I, i ≥ k} Σ_{j ∈ J, j < k} W[i, j]
//   [TM, 2TM):  for i = I0 + r: Σ_{j ∈ J} W[i, j]   (the row sums)
// chunk_da_kernel assembles da_k from them without cancellation.
// Grid (Bt·G, nc, nI(nI+1)/2 · nS): split s takes the heads [s·hs, (s+1)·hs)
// of the group. With one split the block writes dCB itself; with several it
// writes its partial sum to dcb_part (Bt·G, nc, nS, Q, Q) and
// dcb_sum_kernel adds them.
template <typename T>
__global__ void __launch_bounds__(NT, MINB) chunk_dcb_kernel(Geo g, const T* __restrict__ x, const T* __restrict__ dy,
                                                       const float* __restrict__ dt, const float* __restrict__ cs,
                                                       const float* __restrict__ cb, float* __restrict__ dcb,
                                                       float* __restrict__ dcb_part, float* __restrict__ da_part) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem<T> s(smem_raw, 3);
    float* Ds = s.F;                 // D, then W, then its in-tile row prefix
    float* Gs = s.F + TM * LDC;      // dCB summed over heads
    float* CBs = s.F + 2 * TM * LDC; // CB tile (masked)
    float* cs_s = s.X;
    float* dt_s = s.X + MAXQ;
    const int bg = blockIdx.x, c = blockIdx.y, b = bg / g.G, grp = bg % g.G;
    const int nTri = g.nI * (g.nI + 1) / 2, tz = blockIdx.z % nTri, split = blockIdx.z / nTri;
    int I, J;
    tri_tile(tz, I, J);
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0), I0 = I * TM, J0 = J * TN;
    if (I0 >= q) return;
    const int h_lo = split * g.hs, h_hi = min(g.R, h_lo + g.hs);
    const int64_t cbase = (int64_t(bg) * g.nc + c) * g.Q * g.Q;
    const int rr = threadIdx.x / 4, seg = threadIdx.x % 4;  // 4 threads per row / column
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int r = idx / TN, k = idx % TN, i = I0 + r, j = J0 + k;
        CBs[r * LDC + k] = (i < q && j <= i) ? cb[cbase + int64_t(i) * g.Q + j] : 0.f;
        Gs[r * LDC + k] = 0.f;
    }
    for (int hh = h_lo; hh < h_hi; ++hh) {
        const int h = grp * g.R + hh;
        const int64_t bh = int64_t(b) * g.H + h;
        __syncthreads();
        for (int j = threadIdx.x; j < g.Q; j += NT) {
            cs_s[j] = cs[bh * g.Lp + t0 + j];
            dt_s[j] = dt[bh * g.Lp + t0 + j];
        }
        const T* dyp = dy + (int64_t(b) * g.L + t0 + I0) * g.ys + int64_t(h) * g.P;
        const T* xp = x + (int64_t(b) * g.L + t0 + J0) * g.xs + int64_t(h) * g.P;
        Acc<T> acc;
        acc.zero();
        mma_a<BLayout::NK>(acc, s, dyp, g.ys, q - I0, xp, g.xs, q - J0, g.P);
        acc.store(Ds);
        __syncthreads();
        for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
            const int r = idx / TN, k = idx % TN, i = I0 + r, j = J0 + k;
            float dv = 0.f;
            if (i < q && j <= i) dv = expf(fminf(cs_s[i] - cs_s[j], 0.f)) * dt_s[j] * Ds[r * LDC + k];
            Gs[r * LDC + k] += dv;
            Ds[r * LDC + k] = CBs[r * LDC + k] * dv;
        }
        __syncthreads();
        float* part = da_part + ((bh * g.nc + c) * nTri + tz) * (2 * TM);
        // In-tile exclusive row prefix of W, and the row sums.
        {
            float* row = Ds + rr * LDC + seg * 16;
            float run = 0.f;
#pragma unroll
            for (int k = 0; k < 16; ++k) {
                const float v = row[k];
                row[k] = run;
                run += v;
            }
            float incl = run;
            float up = __shfl_up_sync(0xffffffffu, incl, 1, 4);
            if (seg >= 1) incl += up;
            up = __shfl_up_sync(0xffffffffu, incl, 2, 4);
            if (seg >= 2) incl += up;
            float excl = __shfl_up_sync(0xffffffffu, incl, 1, 4);
            if (seg == 0) excl = 0.f;
#pragma unroll
            for (int k = 0; k < 16; ++k) row[k] += excl;
            if (seg == 3) part[TM + rr] = incl;
        }
        __syncthreads();
        // Column sums of the prefix over the rows i ≥ k.
        {
            const int k = J0 + rr;
            float sum = 0.f;
#pragma unroll
            for (int r = seg * 16; r < seg * 16 + 16; ++r)
                if (I0 + r >= k) sum += Ds[r * LDC + rr];
            sum = sum4(sum);
            if (seg == 0) part[rr] = sum;
        }
    }
    __syncthreads();
    float* out = g.nS == 1 ? dcb + cbase : dcb_part + ((int64_t(bg) * g.nc + c) * g.nS + split) * g.Q * g.Q;
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int r = idx / TN, k = idx % TN, i = I0 + r, j = J0 + k;
        if (i < g.Q && j < g.Q) out[int64_t(i) * g.Q + j] = Gs[r * LDC + k];
    }
}

// dCB = Σ_s dcb_part[s] over the lower tiles, splits added in order.
// Grid (Bt·G·nc, nI(nI+1)/2).
__global__ void __launch_bounds__(NT) dcb_sum_kernel(Geo g, const float* __restrict__ dcb_part,
                                                     float* __restrict__ dcb) {
    int I, J;
    tri_tile(blockIdx.y, I, J);
    const int c = blockIdx.x % g.nc;
    if (I * TM >= min(g.Q, g.L - c * g.Q)) return;  // past the chunk's end: chunk_dcb wrote nothing
    const int64_t QQ = int64_t(g.Q) * g.Q;
    const float* src = dcb_part + int64_t(blockIdx.x) * g.nS * QQ;
    float* dst = dcb + int64_t(blockIdx.x) * QQ;
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int i = I * TM + idx / TN, j = J * TN + idx % TN;
        if (i >= g.Q || j >= g.Q) continue;
        const int64_t e = int64_t(i) * g.Q + j;
        float v = src[e];
        for (int sp = 1; sp < g.nS; ++sp) v += src[sp * QQ + e];
        dst[e] = v;
    }
}

// dC (which = 0) or dB (which = 1) of row tile I and column tile nt (of N)
// of chunk c of (b, group) (§4.6 B3), and the per-head decay terms v
// (off-diagonal) or u (chunk state) of B4 as partial sums over this N tile:
//   dC_i = Σ_h exp(cs_i)·Hin_hᵀ dY_i + Σ_{j≤i} dCB[i,j] B_j,   v_i = C_i · (term of head h)
//   dB_j = Σ_h dt_j exp(Λ−cs_j)·Gc_hᵀ x_j + Σ_{i≥j} dCB[i,j] C_i,   u_j = B_j · (term of head h)
// Grid (Bt·G, nc, nI·nNt·2·slots). With one split (nS = 1, one slot) the
// block takes every head and the group part and writes dC or dB. With
// several, slot s < nS takes the heads [s·hs, (s+1)·hs) and slot nS the
// group part alone, each writing its tile to dbc_part (Bt·G, nc, 2, nS + 1,
// Q, N), and dbc_sum_kernel adds the slots.
template <typename T>
__global__ void __launch_bounds__(NT, MINB) chunk_dbc_kernel(Geo g, const T* __restrict__ x, const T* __restrict__ dy,
                                                       const T* __restrict__ B, const T* __restrict__ C,
                                                       const float* __restrict__ dt, const float* __restrict__ cs,
                                                       const float* __restrict__ st, const float* __restrict__ gst,
                                                       const float* __restrict__ dcb, T* __restrict__ dB,
                                                       T* __restrict__ dC, float* __restrict__ dbc_part,
                                                       float* __restrict__ u_part, float* __restrict__ v_part) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem<T> s(smem_raw, 3);
    float* Ts = s.F;
    float* Os = s.F + TM * LDC;      // the output tile
    float* Dv = s.F + 2 * TM * LDC;  // C (dC) or B (dB) of the output tile, for the decay terms
    float* cs_s = s.X;
    float* dt_s = s.X + MAXQ;
    const int bg = blockIdx.x, c = blockIdx.y, b = bg / g.G, grp = bg % g.G;
    const int which = blockIdx.z % 2, tile = blockIdx.z / 2 % (g.nI * g.nNt), slot = blockIdx.z / 2 / (g.nI * g.nNt);
    const int I = tile / g.nNt, nt = tile % g.nNt, I0 = I * TM, n0 = nt * TN;
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0);
    if (I0 >= q) return;
    const bool split = g.nS > 1, group_part = !split || slot == g.nS;
    const int h_lo = split ? slot * g.hs : 0, h_hi = split ? min(g.R, h_lo + g.hs) : g.R;
    const int64_t cbase = (int64_t(bg) * g.nc + c) * g.Q * g.Q;
    const int64_t row0 = int64_t(b) * g.L + t0;  // first row of the chunk
    const T* Bg = B + row0 * g.bs + int64_t(grp) * g.N;
    const T* Cg = C + row0 * g.css + int64_t(grp) * g.N;
    // dC: rows of dY against Hin, dotted with C; dB: rows of x against Gc, dotted with B.
    const T* rows = which == 0 ? dy : x;
    const int64_t rs = which == 0 ? g.ys : g.xs;
    const float* mats = which == 0 ? st : gst;
    const T* dotv = which == 0 ? Cg : Bg;
    const int64_t ds = which == 0 ? g.css : g.bs;
    float* part = which == 0 ? v_part : u_part;
    const int rr = threadIdx.x / 4, seg = threadIdx.x % 4;
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) Os[(idx / TN) * LDC + idx % TN] = 0.f;
    if (h_lo < h_hi) load_rows<TM, TN>(Dv, LDC, dotv + int64_t(I0) * ds + n0, ds, q - I0, g.N - n0);
    Acc<T> acc;
    for (int hh = h_lo; hh < h_hi; ++hh) {
        const int h = grp * g.R + hh;
        const int64_t bh = int64_t(b) * g.H + h;
        __syncthreads();
        for (int j = threadIdx.x; j < g.Q; j += NT) {
            cs_s[j] = cs[bh * g.Lp + t0 + j];
            dt_s[j] = dt[bh * g.Lp + t0 + j];
        }
        const T* rp = rows + (row0 + I0) * rs + int64_t(h) * g.P;
        const float* mp = mats + (bh * (g.nc + 1) + c + which) * g.PN + n0;  // Hin_c or Gc_c = gst[c + 1]
        acc.zero();
        mma_a<BLayout::KN>(acc, s, rp, rs, q - I0, mp, int64_t(g.N), g.N - n0, g.P);
        acc.store(Ts);
        __syncthreads();
        {
            const int i = I0 + rr;
            float sc = 0.f;
            if (i < q)
                sc = which == 0 ? expf(fminf(cs_s[i], 0.f)) : dt_s[i] * expf(fminf(cs_s[g.Q - 1] - cs_s[i], 0.f));
            float acc_dot = 0.f;
#pragma unroll 4
            for (int k = seg * 16; k < seg * 16 + 16; ++k) {
                const float val = sc * Ts[rr * LDC + k];
                Os[rr * LDC + k] += val;
                acc_dot += val * Dv[rr * LDC + k];  // zero outside the tile's limits
            }
            acc_dot = sum4(acc_dot);
            if (seg == 0 && i < q) part[(bh * g.nNt + nt) * g.Lp + t0 + i] = acc_dot;
        }
    }
    __syncthreads();
    // Group part: dC += Σ_{j ≤ i} dCB[i, j] B_j, or dB += Σ_{i ≥ j} dCB[i, j] C_i
    // (zero in the head slots of a split).
    acc.zero();
    if (group_part && which == 0) {
        // Columns past the diagonal tile are not read: dCB is zero there.
        mma_a<BLayout::KN>(acc, s, dcb + cbase + int64_t(I0) * g.Q, int64_t(g.Q), q - I0, Bg + n0, g.bs, g.N - n0,
               min(I0 + TM, q));
    } else if (group_part) {
        Frag<TK, TM, float> fg;  // rows i of dCB: the A operand dCBᵀ, stored Col
        Frag<TK, TN, T> fc;
        mma_pipeline<Lay::Col, Lay::Row>(
            acc, s.A, s.B, steps(q - I0),
            [&](int k) {
                const int k0 = I0 + k * TK;
                fg.fetch(dcb + cbase + int64_t(k0) * g.Q + I0, g.Q, q - k0, q - I0);
                fc.fetch(Cg + int64_t(k0) * g.css + n0, g.css, q - k0, g.N - n0);
            },
            [&](int, T* A, T* B) {
                put_to(fg, RowsTo<T>{A, Ld<T>::Ac});
                put_to(fc, RowsTo<T>{B, Ld<T>::B});
            });
    }
    acc.store(Ts);
    __syncthreads();
    if (split) {
        float* o = dbc_part + (((int64_t(bg) * g.nc + c) * 2 + which) * (g.nS + 1) + slot) * g.Q * g.N;
        for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
            const int r = idx / TN, k = idx % TN, i = I0 + r, n = n0 + k;
            if (i < q && n < g.N) o[int64_t(i) * g.N + n] = Os[r * LDC + k] + Ts[r * LDC + k];
        }
        return;
    }
    T* out = which == 0 ? dC : dB;
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int r = idx / TN, k = idx % TN, i = I0 + r, n = n0 + k;
        if (i >= q || n >= g.N) continue;
        out[(row0 + i) * ds + int64_t(grp) * g.N + n] = from_f32<T>(Os[r * LDC + k] + Ts[r * LDC + k]);
    }
}

// dC (which = 0) and dB (which = 1) as the sum of chunk_dbc's nS + 1 slots,
// added in slot order. Grid (Bt·G·nc·2, ceil(Q·N / NT)).
template <typename T>
__global__ void __launch_bounds__(NT) dbc_sum_kernel(Geo g, const float* __restrict__ dbc_part, T* __restrict__ dB,
                                                     T* __restrict__ dC) {
    const int z = blockIdx.x, which = z % 2, c = z / 2 % g.nc, bg = z / 2 / g.nc, b = bg / g.G, grp = bg % g.G;
    const int64_t e = int64_t(blockIdx.y) * NT + threadIdx.x, QN = int64_t(g.Q) * g.N;
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0);
    if (e >= int64_t(q) * g.N) return;
    const int i = int(e / g.N), n = int(e % g.N);
    const float* src = dbc_part + int64_t(z) * (g.nS + 1) * QN + e;
    float v = src[0];
    for (int sl = 1; sl <= g.nS; ++sl) v += src[sl * QN];
    const int64_t row = int64_t(b) * g.L + t0 + i;
    if (which == 0)
        dC[row * g.css + int64_t(grp) * g.N + n] = from_f32<T>(v);
    else
        dB[row * g.bs + int64_t(grp) * g.N + n] = from_f32<T>(v);
}

// dx of row tile J and column tile pt (of P) of chunk c of (b, h) (§4.6 B3):
//   br_j = exp(Λ−cs_j)·Gc B_j + Σ_{i≥j} exp(cs_i−cs_j)·CB[i,j]·dY_i
//   dx_j = dt_j·br_j + D·dY_j,   ddt_j (partial over this P tile) = x_j·br_j,
// and the partial Σ_j dY_j ∘ x_j of dD over the tile's rows.
// Grid (Bt·H, nc, nI·nPt).
template <typename T>
__global__ void __launch_bounds__(NT, MINB) chunk_dx_kernel(Geo g, const T* __restrict__ x, const T* __restrict__ dy,
                                                      const T* __restrict__ B, const float* __restrict__ D,
                                                      const float* __restrict__ dt, const float* __restrict__ cs,
                                                      const float* __restrict__ cb, const float* __restrict__ gst,
                                                      T* __restrict__ dx, float* __restrict__ ddt_part,
                                                      float* __restrict__ dD_part) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem<T> s(smem_raw, 1);
    float* cs_s = s.X;
    float* dt_s = s.X + MAXQ;
    const int bh = blockIdx.x, c = blockIdx.y, b = bh / g.H, h = bh % g.H, grp = h / g.R;
    const int J = blockIdx.z / g.nPt, pt = blockIdx.z % g.nPt, J0 = J * TM, p0 = pt * TN;
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0);
    if (J0 >= q) return;
    const int64_t row0 = int64_t(b) * g.L + t0;
    const int64_t cbase = (int64_t(b) * g.G + grp) * g.nc * g.Q * g.Q + int64_t(c) * g.Q * g.Q;
    for (int j = threadIdx.x; j < g.Q; j += NT) {
        cs_s[j] = cs[int64_t(bh) * g.Lp + t0 + j];
        dt_s[j] = dt[int64_t(bh) * g.Lp + t0 + j];
    }
    // Gc B_j: B_J (rows × N) · Gcᵀ (N × P).
    const T* Bp = B + (row0 + J0) * g.bs + int64_t(grp) * g.N;
    const float* gc = gst + (int64_t(bh) * (g.nc + 1) + c + 1) * g.PN + int64_t(p0) * g.N;
    Acc<T> acc;
    acc.zero();
    mma_a<BLayout::NK>(acc, s, Bp, g.bs, q - J0, gc, int64_t(g.N), g.P - p0, g.N);
    acc.store(s.F);
    __syncthreads();
    const float lam = cs_s[g.Q - 1];
    for (int idx = threadIdx.x; idx < TM * TN; idx += NT) {
        const int r = idx / TN, k = idx % TN, j = J0 + r;
        s.F[r * LDC + k] *= j < q ? expf(fminf(lam - cs_s[j], 0.f)) : 0.f;
    }
    __syncthreads();
    acc.load(s.F);
    // Intra-chunk part: M2ᵀ dY with M2[i, j] = exp(cs_i − cs_j)·CB[i, j], i ≥ j.
    const T* dyc = dy + row0 * g.ys + int64_t(h) * g.P + p0;
    {
        Frag<TK, TM, float> fm;  // rows i of CB: the A operand M2ᵀ, stored Col
        Frag<TK, TN, T> fd;
        mma_pipeline<Lay::Col, Lay::Row>(
            acc, s.A, s.B, steps(q - J0),
            [&](int k) {
                const int k0 = J0 + k * TK;
                fm.fetch(cb + cbase + int64_t(k0) * g.Q + J0, g.Q, q - k0, q - J0);
                fd.fetch(dyc + int64_t(k0) * g.ys, g.ys, q - k0, g.P - p0);
            },
            [&](int k, T* A, T* B) {
                const int k0 = J0 + k * TK;
                // A(r, kk) = M2[k0 + kk, J0 + r], at A[kk][r]: the fetched rows are i, its columns j.
                fm.put([&](int kk, int c, const float* v) {
                    const int i = k0 + kk;
                    float m[Vec<float>::N];
#pragma unroll
                    for (int e = 0; e < Vec<float>::N; ++e) {
                        const int j = J0 + c + e;
                        m[e] = (i < q && j <= i) ? v[e] * expf(fminf(cs_s[i] - cs_s[j], 0.f)) : 0.f;
                    }
                    store_row<Vec<float>::N>(A + kk * Ld<T>::Ac + c, m);
                });
                put_to(fd, RowsTo<T>{B, Ld<T>::B});
            });
    }
    acc.store(s.F);
    // The epilogue reads x and dY of the tile once, as vectors: a thread
    // takes V consecutive columns p of one row j per step of the fragment.
    // The operand buffers are free now; they hold dY∘x for dD's column sums.
    Frag<TM, TN, T> fxe, fde;
    fxe.fetch(x + (row0 + J0) * g.xs + int64_t(h) * g.P + p0, g.xs, q - J0, g.P - p0);
    fde.fetch(dy + (row0 + J0) * g.ys + int64_t(h) * g.P + p0, g.ys, q - J0, g.P - p0);
    static_assert(2 * (a_bytes<T>() + b_bytes<T>()) >= f_bytes(), "the operand buffers must hold an f32 tile");
    float* prod = reinterpret_cast<float*>(s.A[0]);
    __syncthreads();
    {
        constexpr int V = Vec<T>::N, CV = TN / V;
        T* dxp = dx + (row0 + J0) * g.xs + int64_t(h) * g.P + p0;
        const bool vec = vec_ok(dxp, g.xs);
#pragma unroll
        for (int it = 0; it < Frag<TM, TN, T>::IT; ++it) {
            const int idx = threadIdx.x + it * NT, r = idx / CV, cc = idx % CV * V, j = J0 + r;
            float xv[V], dv[V], o[V];
            unpack<T>(fxe.u[it], xv);
            unpack<T>(fde.u[it], dv);
            const float dtj = j < q ? dt_s[j] : 0.f;
            float ddt = 0.f;
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const int p = p0 + cc + e;
                const float br = s.F[r * LDC + cc + e];
                const float d = p < g.P ? (g.d_hdim ? D[h * g.P + p] : D[h]) : 0.f;
                o[e] = dtj * br + d * dv[e];
                ddt += xv[e] * br;
                prod[r * LDC + cc + e] = dv[e] * xv[e];  // zero outside the tile's limits
            }
            // The row's CV threads are consecutive lanes: add their parts.
#pragma unroll
            for (int m = 1; m < CV; m *= 2) ddt += __shfl_xor_sync(0xffffffffu, ddt, m);
            if (j < q) {
                const int n = min(V, g.P - p0 - cc);
                if (vec && n == V) {
                    store_row<V>(dxp + int64_t(r) * g.xs + cc, o);
                } else {
                    for (int e = 0; e < n; ++e) dxp[int64_t(r) * g.xs + cc + e] = from_f32<T>(o[e]);
                }
                if (cc == 0) ddt_part[(int64_t(bh) * g.nPt + pt) * g.Lp + t0 + j] = ddt;
            }
        }
    }
    __syncthreads();
    {
        const int rr = threadIdx.x / 4, seg = threadIdx.x % 4;  // column rr, rows seg·16 … seg·16 + 15
        const int p = p0 + rr;
        float sum = 0.f;
#pragma unroll 4
        for (int r = seg * 16; r < seg * 16 + 16; ++r) sum += prod[r * LDC + rr];
        sum = sum4(sum);
        if (seg == 0 && p < g.P) dD_part[((int64_t(bh) * g.nc + c) * g.nI + J) * g.P + p] = sum;
    }
}

// The log-decay gradient per position (§4.6 B4) and the scalar chain of §4.4
// per (b, h) and chunk c: da_k = intra_k + Σ_{j<k} u_j + Σ_{i≥k} v_i + dΛ_c,
// ddt_raw = (ddt + A·da)·∂dt/∂dt_raw, and the (b, h, c) partial sums of the
// dt_bias and A_log gradients (bh_part (Bt·H, nc, 2)), each reduced in a
// fixed order; the blocks of chunk 0 also sum dD's partials of (b, h) over
// the chunks (dD_bh). Chunks are independent here, one block each.
// Grid (Bt·H, nc), block NT (≥ Q).
template <typename T>
__global__ void __launch_bounds__(NT) chunk_da_kernel(Geo g, const T* __restrict__ dt_raw,
                                                      const float* __restrict__ dt_bias,
                                                      const float* __restrict__ A_log, const float* __restrict__ dt,
                                                      const float* __restrict__ cs,
                                                      const float* __restrict__ dlam_part,
                                                      const float* __restrict__ da_part,
                                                      const float* __restrict__ ddt_part,
                                                      const float* __restrict__ u_part,
                                                      const float* __restrict__ v_part,
                                                      const float* __restrict__ dD_part, T* __restrict__ ddt_raw,
                                                      double* __restrict__ bh_part, double* __restrict__ dD_bh) {
    using Scan = cub::BlockScan<double, NT>;
    using Red = cub::BlockReduce<double, NT>;
    __shared__ union {
        typename Scan::TempStorage scan;
        typename Red::TempStorage red;
    } tmp;
    __shared__ double dlam_s;
    const int bh = blockIdx.x, c = blockIdx.y, b = bh / g.H, h = bh % g.H, i = threadIdx.x;
    const int nTri = g.nI * (g.nI + 1) / 2, K = i / TM, kk = i % TM;
    const float bias = dt_bias[h], A = -expf(A_log[h]);
    double term_bias = 0, term_A = 0;  // this position's terms of the dt_bias and A_log gradients
    const int t0 = c * g.Q, q = min(g.Q, g.L - t0), t = t0 + i;
    const bool valid = i < q;
    double ddt = 0, u = 0, v = 0, intra = 0;
    if (valid) {
        for (int pt = 0; pt < g.nPt; ++pt) ddt += ddt_part[(int64_t(bh) * g.nPt + pt) * g.Lp + t];
        for (int nt = 0; nt < g.nNt; ++nt) {
            u += u_part[(int64_t(bh) * g.nNt + nt) * g.Lp + t];
            v += v_part[(int64_t(bh) * g.nNt + nt) * g.Lp + t];
        }
        // Columns j of the block of k: tiles (I, K), I ≥ K.
        for (int I = K; I * TM < q; ++I)
            intra += da_part[((int64_t(bh) * g.nc + c) * nTri + I * (I + 1) / 2 + K) * (2 * TM) + kk];
    }
    // Columns j of earlier blocks J < K: Σ_{m ≥ k} Σ_{J<K} rowsum_J(m),
    // a suffix sum over the chunk for each block index K.
    for (int KB = 1; KB * TM < q; ++KB) {
        double f = 0;
        if (valid && K >= KB)
            for (int J = 0; J < KB; ++J)
                f += da_part[((int64_t(bh) * g.nc + c) * nTri + K * (K + 1) / 2 + J) * (2 * TM) + TM + kk];
        double pre, tot;
        Scan(tmp.scan).ExclusiveSum(f, pre, tot);
        __syncthreads();
        if (K == KB) intra += tot - pre;
    }
    if (i == 0) {
        double sdot = 0;
        for (int blk = 0; blk < g.nEb; ++blk) sdot += dlam_part[(int64_t(bh) * g.nc + c) * g.nEb + blk];
        const float lam = cs[int64_t(bh) * g.Lp + t0 + g.Q - 1];
        dlam_s = double(expf(fminf(lam, 0.f))) * sdot;
    }
    double upre, vpre, vtot;
    Scan(tmp.scan).ExclusiveSum(u, upre);
    __syncthreads();
    Scan(tmp.scan).ExclusiveSum(v, vpre, vtot);
    __syncthreads();
    if (valid) {
        const double da = intra + upre + (vtot - vpre) + dlam_s;
        const float uu = to_f32(dt_raw[(int64_t(b) * g.L + t) * g.dts + h]) + bias;
        const float sp = softplus_f(uu);
        float grad = 0.f;
        if (sp >= g.dt_lo && sp <= g.dt_hi) grad = uu > 20.f ? 1.f : 1.f / (1.f + expf(-uu));
        const double dtv = dt[int64_t(bh) * g.Lp + t];
        const double gr = (ddt + double(A) * da) * double(grad);
        ddt_raw[(int64_t(b) * g.L + t) * g.dts + h] = from_f32<T>(float(gr));
        term_bias = gr;
        term_A = dtv * da;
    }
    __syncthreads();
    const double sb = Red(tmp.red).Sum(term_bias);
    __syncthreads();
    const double sa = Red(tmp.red).Sum(term_A);
    if (i == 0) {
        bh_part[2 * (int64_t(bh) * g.nc + c)] = sb;
        bh_part[2 * (int64_t(bh) * g.nc + c) + 1] = sa;
    }
    if (c != 0) return;
    for (int p = i; p < g.P; p += NT) {
        double sum = 0;
        for (int cc = 0; cc < g.nc; ++cc) {
            const int qc = min(g.Q, g.L - cc * g.Q);
            for (int J = 0; J * TM < qc; ++J) sum += dD_part[((int64_t(bh) * g.nc + cc) * g.nI + J) * g.P + p];
        }
        dD_bh[int64_t(bh) * g.P + p] = sum;
    }
}

// acc + v(lane 0) + v(lane 1) + … + v(lane n−1), added in lane order, on
// every lane of the warp (each lane runs the same chain, so all get the
// same bits). The loads behind v are the warp's, 32 at a time; only the
// additions are sequential. A full warp's 32 shuffles are issued before
// the additions, so that the chain waits on adds alone.
__device__ __forceinline__ double add_lanes_in_order(double acc, double v, int n) {
    if (n == 32) {
        double w[32];
#pragma unroll
        for (int u = 0; u < 32; ++u) w[u] = __shfl_sync(0xffffffffu, v, u);
#pragma unroll
        for (int u = 0; u < 32; ++u) acc += w[u];
        return acc;
    }
    for (int u = 0; u < n; ++u) acc += __shfl_sync(0xffffffffu, v, u);
    return acc;
}

// Parameter gradients: sums over the batch and the chunks, in that order, of
// the (b, h, c) partials of dt_bias and A_log, and over the batch of the
// (b, h) partials of D. Warp h sums head h's (the values in the order of one
// loop over b and c, and for D per head over (b, p), fetched 32 at a time by
// the warp's lanes); with D per channel, thread h·P + p sums D[h, p] over b.
// Grid: max(32·H, H·P with D per channel) threads in blocks of NT.
__global__ void __launch_bounds__(NT) ssd_params_kernel(Geo g, const float* __restrict__ A_log,
                                                        const double* __restrict__ bh_part,
                                                        const double* __restrict__ dD_bh,
                                                        float* __restrict__ ddt_bias, float* __restrict__ dA_log,
                                                        float* __restrict__ dD) {
    const int idx = blockIdx.x * NT + threadIdx.x;
    const int h = idx >> 5, lane = idx & 31;
    // A warp lies in one block (NT is a multiple of 32), so a whole warp
    // takes this branch or none of it.
    if (h < g.H) {
        double sb = 0, sa = 0, sd = 0;
        const int64_t nbc = int64_t(g.Bt) * g.nc;
        for (int64_t k0 = 0; k0 < nbc; k0 += 32) {
            const int64_t k = k0 + lane;  // = b·nc + c
            double vb = 0, va = 0;
            if (k < nbc) {
                const int64_t at = 2 * (((k / g.nc) * g.H + h) * g.nc + k % g.nc);
                vb = bh_part[at];
                va = bh_part[at + 1];
            }
            const int n = nbc - k0 < 32 ? int(nbc - k0) : 32;
            sb = add_lanes_in_order(sb, vb, n);
            sa = add_lanes_in_order(sa, va, n);
        }
        if (!g.d_hdim) {
            const int64_t total = int64_t(g.Bt) * g.P;
#pragma unroll 4
            for (int64_t k0 = 0; k0 < total; k0 += 32) {
                const int64_t k = k0 + lane;  // = b·P + p
                double v = 0;
                if (k < total) v = dD_bh[((k / g.P) * g.H + h) * g.P + k % g.P];
                sd = add_lanes_in_order(sd, v, total - k0 < 32 ? int(total - k0) : 32);
            }
        }
        if (lane == 0) {
            ddt_bias[h] = float(sb);
            dA_log[h] = float(sa * -exp(double(A_log[h])));
            if (!g.d_hdim) dD[h] = float(sd);
        }
    }
    if (g.d_hdim && idx < g.H * g.P) {
        const int hh = idx / g.P, p = idx % g.P;
        double sd = 0;
        for (int b = 0; b < g.Bt; ++b) sd += dD_bh[(int64_t(b) * g.H + hh) * g.P + p];
        dD[idx] = float(sd);
    }
}

}  // namespace ssd
}  // namespace m2k
