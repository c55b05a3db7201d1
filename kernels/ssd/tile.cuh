// Tile primitives of the SSD kernels: a 64×64 f32 accumulator fed from
// shared-memory operand tiles, and the loaders that stage global tensors
// into shared memory. Every kernel of the scan runs 256 threads.
//
// The accumulator has one interface and two implementations:
//   - __nv_bfloat16 operands: tensor cores (wmma m16n16k16, f32 accumulate);
//     each of the 8 warps owns a 16×32 slice of the tile.
//   - float operands: plain f32 FMA (no TF32), each thread owning a 4×4
//     block, so that the f32 path stays a true f32 computation.
// Operands are staged row by row as they arrive from global memory: A as
// [m][k] or [k][m], B as [k][n] or [n][k] (Lay), never transposed on the
// way in.
#pragma once

#include <mma.h>

#include <type_traits>

#include "../common/m2k_internal.cuh"

namespace m2k {
namespace ssd {

constexpr int NT = 256;  // threads per block
constexpr int TM = 64;   // tile rows
constexpr int TN = 64;   // tile columns
// Reduction step staged in shared memory: one step of mma_pipeline loads a
// TM×TK and a TK×TN operand tile. Building with -DM2K_SSD_TK=n sets it to n
// (a multiple of 16), to measure other steps.
#ifdef M2K_SSD_TK
constexpr int TK = M2K_SSD_TK;
#else
constexpr int TK = 32;
#endif
static_assert(TK % 16 == 0, "TK must be a multiple of 16 (the tensor-core k step)");
constexpr int LDC = TN + 4;  // leading dimension of f32 tiles in shared memory

// How an operand tile lies in shared memory. Row: A as [m][k], B as [k][n].
// Col: A as [k][m], B as [n][k], i.e. the tile's transpose stored row by
// row. A tile whose source is the transpose of the operand (x for xᵀ·B, a
// row-major tensor read as the B of A·Bᵀ) is stored Col as it arrives: with
// 16-byte vector stores instead of the scattered 2-byte stores of a
// transpose, which conflicted 8-way on the shared-memory banks.
enum class Lay { Row, Col };

// Leading dimensions of the operand tiles (Ac, Bc: of the Col layouts):
// multiples of 8 elements for wmma (16-byte rows, 32-byte aligned
// fragments), odd-ish padding for the FMA path to keep its column reads
// free of bank conflicts.
template <typename T> struct Ld;
template <> struct Ld<float> {
    static constexpr int A = TK + 1, Ac = TM + 4;
    static constexpr int B = TN + 4, Bc = TK + 1;
};
template <> struct Ld<__nv_bfloat16> {
    static constexpr int A = TK + 8, Ac = TM + 8;
    static constexpr int B = TN + 8, Bc = TK + 8;
};
template <typename T, Lay L> __host__ __device__ constexpr int lda() { return L == Lay::Row ? Ld<T>::A : Ld<T>::Ac; }
template <typename T, Lay L> __host__ __device__ constexpr int ldb() { return L == Lay::Row ? Ld<T>::B : Ld<T>::Bc; }

// Bytes of shared memory of one A tile (TM×TK), one B tile (TK×TN), in
// either layout, and one f32 tile (TM×TN), each rounded up to 128 bytes.
__host__ __device__ constexpr int round128(int b) { return (b + 127) / 128 * 128; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }
template <typename T> __host__ __device__ constexpr int a_bytes() {
    return round128(imax(TM * Ld<T>::A, TK * Ld<T>::Ac) * int(sizeof(T)));
}
template <typename T> __host__ __device__ constexpr int b_bytes() {
    return round128(imax(TK * Ld<T>::B, TN * Ld<T>::Bc) * int(sizeof(T)));
}
__host__ __device__ constexpr int f_bytes() { return TM * LDC * 4; }

template <typename T> struct Acc;

template <> struct Acc<float> {
    float c[4][4];
    __device__ __forceinline__ int ty() const { return threadIdx.x / 16; }
    __device__ __forceinline__ int tx() const { return threadIdx.x % 16; }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) c[r][q] = 0.f;
    }
    // c += A(64×kk) · B(kk×64); kk a multiple of 16; A and B laid out as LA, LB say.
    template <Lay LA, Lay LB> __device__ __forceinline__ void mma(const float* As, const float* Bs, int kk) {
        const int r0 = ty() * 4, c0 = tx();
#pragma unroll 4
        for (int k = 0; k < kk; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int r = 0; r < 4; ++r)
                a[r] = LA == Lay::Row ? As[(r0 + r) * Ld<float>::A + k] : As[k * Ld<float>::Ac + r0 + r];
#pragma unroll
            for (int q = 0; q < 4; ++q)
                b[q] = LB == Lay::Row ? Bs[k * Ld<float>::B + c0 + 16 * q] : Bs[(c0 + 16 * q) * Ld<float>::Bc + k];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int q = 0; q < 4; ++q) c[r][q] = fmaf(a[r], b[q], c[r][q]);
        }
    }
    __device__ __forceinline__ void store(float* Cs) const {
        const int r0 = ty() * 4, c0 = tx();
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) Cs[(r0 + r) * LDC + c0 + 16 * q] = c[r][q];
    }
    __device__ __forceinline__ void load(const float* Cs) {
        const int r0 = ty() * 4, c0 = tx();
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) c[r][q] = Cs[(r0 + r) * LDC + c0 + 16 * q];
    }
};

template <Lay L> struct WmmaLayout;
template <> struct WmmaLayout<Lay::Row> {
    using type = nvcuda::wmma::row_major;
};
template <> struct WmmaLayout<Lay::Col> {
    using type = nvcuda::wmma::col_major;
};

template <> struct Acc<__nv_bfloat16> {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2];
    __device__ __forceinline__ int wr() const { return (threadIdx.x / 32 % 4) * 16; }
    __device__ __forceinline__ int wc() const { return (threadIdx.x / 32 / 4) * 32; }
    __device__ __forceinline__ void zero() {
        nvcuda::wmma::fill_fragment(c[0], 0.f);
        nvcuda::wmma::fill_fragment(c[1], 0.f);
    }
    template <Lay LA, Lay LB>
    __device__ __forceinline__ void mma(const __nv_bfloat16* As, const __nv_bfloat16* Bs, int kk) {
        using namespace nvcuda;
        using BF = __nv_bfloat16;
        constexpr int la = lda<BF, LA>(), lb = ldb<BF, LB>();
        const int r0 = wr(), c0 = wc();
        for (int k = 0; k < kk; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, BF, typename WmmaLayout<LA>::type> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, BF, typename WmmaLayout<LB>::type> b0, b1;
            wmma::load_matrix_sync(a, LA == Lay::Row ? As + r0 * la + k : As + k * la + r0, la);
            if constexpr (LB == Lay::Row) {
                wmma::load_matrix_sync(b0, Bs + k * lb + c0, lb);
                wmma::load_matrix_sync(b1, Bs + k * lb + c0 + 16, lb);
            } else {
                wmma::load_matrix_sync(b0, Bs + c0 * lb + k, lb);
                wmma::load_matrix_sync(b1, Bs + (c0 + 16) * lb + k, lb);
            }
            wmma::mma_sync(c[0], a, b0, c[0]);
            wmma::mma_sync(c[1], a, b1, c[1]);
        }
    }
    __device__ __forceinline__ void store(float* Cs) const {
        using namespace nvcuda;
        wmma::store_matrix_sync(Cs + wr() * LDC + wc(), c[0], LDC, wmma::mem_row_major);
        wmma::store_matrix_sync(Cs + wr() * LDC + wc() + 16, c[1], LDC, wmma::mem_row_major);
    }
    __device__ __forceinline__ void load(const float* Cs) {
        using namespace nvcuda;
        wmma::load_matrix_sync(c[0], Cs + wr() * LDC + wc(), LDC, wmma::mem_row_major);
        wmma::load_matrix_sync(c[1], Cs + wr() * LDC + wc() + 16, LDC, wmma::mem_row_major);
    }
};

// Tiles are staged in two steps, so that a kernel can issue the global loads
// of its next tile before it multiplies the current one (mma_pipeline):
// Frag::fetch loads this thread's part of an R×C tile of a global tensor
// (rows sld elements apart; zeros outside r < rlim, c < clim) into
// registers, and Frag::put hands it, converted to f32, to a writer that
// stores it into shared memory (RowsTo, RowsScaledTo, or a kernel's
// own, which may transform it). Where the tile's rows are 16-byte aligned
// (the source pointer and the row stride), each load is one 16-byte vector
// of consecutive columns (8 bf16 or 4 f32), else one element; the registers
// hold the raw vectors, 4 per 16 bytes of tile.

template <typename S> struct Vec {
    static constexpr int N = 16 / int(sizeof(S));  // elements per 16-byte vector
};

template <typename S> __device__ __forceinline__ bool vec_ok(const S* src, int64_t sld) {
    return reinterpret_cast<uintptr_t>(src) % 16 == 0 && sld % Vec<S>::N == 0;
}

__device__ __forceinline__ unsigned raw_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned raw_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// The first n (≤ V) elements at p, element by element, the rest zero, as
// one raw vector.
template <typename S> __device__ __forceinline__ uint4 load_part(const S* p, int n) {
    constexpr int V = Vec<S>::N;
    unsigned w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < V; ++e) {
        if (e < n) {
            if constexpr (V == 8)
                w[e / 2] |= raw_bits(p[e]) << (16 * (e % 2));
            else
                w[e] = raw_bits(p[e]);
        }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename S> __device__ __forceinline__ void unpack(const uint4& u, float* v);
template <> __device__ __forceinline__ void unpack<float>(const uint4& u, float* v) {
    v[0] = __uint_as_float(u.x);
    v[1] = __uint_as_float(u.y);
    v[2] = __uint_as_float(u.z);
    v[3] = __uint_as_float(u.w);
}
template <> __device__ __forceinline__ void unpack<__nv_bfloat16>(const uint4& u, float* v) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

template <int R, int C, typename S> struct Frag {
    static constexpr int V = Vec<S>::N, CV = C / V, IT = R * CV / NT;
    static_assert(C % V == 0 && R * CV % NT == 0, "tile not a multiple of the block's vectors");
    uint4 u[IT];

    __device__ __forceinline__ void fetch(const S* src, int64_t sld, int rlim, int clim) {
        const bool vec = vec_ok(src, sld);
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int idx = threadIdx.x + it * NT, r = idx / CV, c = idx % CV * V;
            const int n = r < rlim ? min(V, max(0, clim - c)) : 0;
            if (vec && n == V)
                u[it] = __ldg(reinterpret_cast<const uint4*>(src + r * sld + c));
            else
                u[it] = n > 0 ? load_part(src + r * sld + c, n) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    // put(r, c, v): v holds columns c … c + V − 1 of row r as f32.
    template <typename Put> __device__ __forceinline__ void put(Put&& p) const {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int idx = threadIdx.x + it * NT;
            float v[V];
            unpack<S>(u[it], v);
            p(idx / CV, idx % CV * V, v);
        }
    }
};

// V f32 values as V bf16 in one 8- or 16-byte shared store (dst aligned to
// that size: Ld<__nv_bfloat16> rows are multiples of 16 bytes).
template <int V> __device__ __forceinline__ void store_bf16(__nv_bfloat16* dst, const float* v) {
    unsigned w[V / 2];
#pragma unroll
    for (int k = 0; k < V / 2; ++k) {
        const __nv_bfloat162 p = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        w[k] = *reinterpret_cast<const unsigned*>(&p);
    }
    if constexpr (V == 8)
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    else
        *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
}

// V values of a row, dst[c … c + V − 1], as D.
template <int V, typename D> __device__ __forceinline__ void store_row(D* dst, const float* v) {
    if constexpr (std::is_same<D, __nv_bfloat16>::value) {
        store_bf16<V>(dst, v);
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) dst[e] = from_f32<D>(v[e]);
    }
}

// Writers for Frag::put. dst[r][c] = v:
template <typename D> struct RowsTo {
    D* dst;
    int ldd;
    template <int V> __device__ __forceinline__ void at(int r, int c, const float* v) const {
        store_row<V>(dst + r * ldd + c, v);
    }
};
// With a per-row scale, dst[r][c] = w[r]·v:
template <typename D> struct RowsScaledTo {
    D* dst;
    int ldd;
    const float* w;
    template <int V> __device__ __forceinline__ void at(int r, int c, const float* v) const {
        const float wr = w[r];
        float o[V];
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = wr * v[e];
        store_row<V>(dst + r * ldd + c, o);
    }
};

template <int R, int C, typename S, typename W>
__device__ __forceinline__ void put_to(const Frag<R, C, S>& f, const W& w) {
    f.put([&](int r, int c, const float* v) { w.template at<Vec<S>::N>(r, c, v); });
}

// One-step loads: fetch, then store.
template <int R, int C, typename D, typename S>
__device__ __forceinline__ void load_rows(D* dst, int ldd, const S* src, int64_t sld, int rlim, int clim) {
    Frag<R, C, S> f;
    f.fetch(src, sld, rlim, clim);
    put_to(f, RowsTo<D>{dst, ldd});
}

// acc += Σ_k A_k·B_k over n steps of TK: fetch(k) loads step k's operands
// into registers (Frags the caller owns), put(k, A, B) stores them into the
// shared tiles A, B. The loads of step k + 1 are issued before the product
// of step k, into the other of two shared buffers, so one barrier per step
// suffices. Ends with a barrier: the buffers are free again.
// The shared tiles are laid out as LA and LB say.
template <Lay LA, Lay LB, typename T, typename Fetch, typename Put>
__device__ __forceinline__ void mma_pipeline(Acc<T>& acc, T* const* A, T* const* B, int n, Fetch&& fetch,
                                             Put&& put) {
    if (n <= 0) return;
    fetch(0);
    for (int k = 0; k < n; ++k) {
        put(k, A[k & 1], B[k & 1]);
        __syncthreads();
        if (k + 1 < n) fetch(k + 1);
        acc.template mma<LA, LB>(A[k & 1], B[k & 1], TK);
    }
    __syncthreads();
}

// Deterministic reductions over groups of 4 consecutive lanes.
__device__ __forceinline__ float sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

}  // namespace ssd
}  // namespace m2k
