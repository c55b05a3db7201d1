// Tile primitives of the SSD kernels: a 64×64 f32 accumulator fed from
// shared-memory operand tiles, and the loaders that stage global tensors
// into shared memory. Every kernel of the scan runs 256 threads.
//
// The accumulator has one interface and two implementations:
//   - __nv_bfloat16 operands: tensor cores (wmma m16n16k16, f32 accumulate);
//     each of the 8 warps owns a 16×32 slice of the tile.
//   - float operands: plain f32 FMA (no TF32), each thread owning a 4×4
//     block, so that the f32 path stays a true f32 computation.
// Operands are always staged as A[m][k] (row-major, lda) and B[k][n]
// (row-major, ldb); the loaders transpose on the way in where needed.
#pragma once

#include <mma.h>

#include <type_traits>

#include "../common/m2k_internal.cuh"

namespace m2k {
namespace ssd {

constexpr int NT = 256;  // threads per block
constexpr int TM = 64;   // tile rows
constexpr int TN = 64;   // tile columns
constexpr int TK = 32;   // reduction step staged in shared memory
constexpr int LDC = TN + 4;  // leading dimension of f32 tiles in shared memory

// Leading dimensions of the operand tiles: multiples of 8 elements for wmma
// (16-byte rows, 32-byte aligned fragments), odd-ish padding for the FMA path
// to keep its column reads free of bank conflicts.
template <typename T> struct Ld;
template <> struct Ld<float> {
    static constexpr int A = TK + 1;
    static constexpr int B = TN + 4;
};
template <> struct Ld<__nv_bfloat16> {
    static constexpr int A = TK + 8;
    static constexpr int B = TN + 8;
};

// Bytes of shared memory of one A tile (TM×TK), one B tile (TK×TN) and one f32
// tile (TM×TN), each rounded up to 128 bytes.
template <typename T> __host__ __device__ constexpr int a_bytes() { return ((TM * Ld<T>::A * int(sizeof(T)) + 127) / 128) * 128; }
template <typename T> __host__ __device__ constexpr int b_bytes() { return ((TK * Ld<T>::B * int(sizeof(T)) + 127) / 128) * 128; }
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
    // c += A(64×kk) · B(kk×64); kk a multiple of 16.
    __device__ __forceinline__ void mma(const float* As, const float* Bs, int kk) {
        const int r0 = ty() * 4, c0 = tx();
#pragma unroll 4
        for (int k = 0; k < kk; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = As[(r0 + r) * Ld<float>::A + k];
#pragma unroll
            for (int q = 0; q < 4; ++q) b[q] = Bs[k * Ld<float>::B + c0 + 16 * q];
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

template <> struct Acc<__nv_bfloat16> {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2];
    __device__ __forceinline__ int wr() const { return (threadIdx.x / 32 % 4) * 16; }
    __device__ __forceinline__ int wc() const { return (threadIdx.x / 32 / 4) * 32; }
    __device__ __forceinline__ void zero() {
        nvcuda::wmma::fill_fragment(c[0], 0.f);
        nvcuda::wmma::fill_fragment(c[1], 0.f);
    }
    __device__ __forceinline__ void mma(const __nv_bfloat16* As, const __nv_bfloat16* Bs, int kk) {
        using namespace nvcuda;
        const int r0 = wr(), c0 = wc();
        for (int k = 0; k < kk; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b0, b1;
            wmma::load_matrix_sync(a, As + r0 * Ld<__nv_bfloat16>::A + k, Ld<__nv_bfloat16>::A);
            wmma::load_matrix_sync(b0, Bs + k * Ld<__nv_bfloat16>::B + c0, Ld<__nv_bfloat16>::B);
            wmma::load_matrix_sync(b1, Bs + k * Ld<__nv_bfloat16>::B + c0 + 16, Ld<__nv_bfloat16>::B);
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

// The loaders below stage an R×C tile of a global tensor (rows sld elements
// apart) into shared memory, as zeros outside r < rlim, c < clim, converted
// to D through f32 (exact for bf16 → f32 → bf16). They issue all their
// global loads before the first shared store, so that each thread has all
// its loads in flight at once. Where the tile's rows are 16-byte aligned
// (the source pointer and the row stride), each load is one 16-byte vector
// of consecutive columns (8 bf16 or 4 f32), else one element.

template <typename S> struct Vec {
    static constexpr int N = 16 / int(sizeof(S));  // elements per 16-byte vector
};

template <typename S> __device__ __forceinline__ bool vec_ok(const S* src, int64_t sld) {
    return reinterpret_cast<uintptr_t>(src) % 16 == 0 && sld % Vec<S>::N == 0;
}

__device__ __forceinline__ void unpack(const uint4& u, float* v) {  // 4 f32
    v[0] = __uint_as_float(u.x);
    v[1] = __uint_as_float(u.y);
    v[2] = __uint_as_float(u.z);
    v[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack_bf16(const uint4& u, float* v) {  // 8 bf16
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

// Calls put(r, c, v) for each vector of V = Vec<S>::N consecutive columns
// c … c + V − 1 of row r of the tile, v holding them as f32 (zeros outside
// the limits). Every thread takes R·C / (V·NT) vectors.
template <int R, int C, typename S, typename Put>
__device__ __forceinline__ void load_tile(const S* src, int64_t sld, int rlim, int clim, Put put) {
    constexpr int V = Vec<S>::N, CV = C / V, IT = R * CV / NT;
    static_assert(C % V == 0 && R * CV % NT == 0, "tile not a multiple of the block's vectors");
    float v[IT][V];
    if (vec_ok(src, sld)) {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int idx = threadIdx.x + it * NT, r = idx / CV, c = idx % CV * V;
            if (r < rlim && c + V <= clim) {
                const uint4 u = __ldg(reinterpret_cast<const uint4*>(src + r * sld + c));
                if constexpr (V == 8)
                    unpack_bf16(u, v[it]);
                else
                    unpack(u, v[it]);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) v[it][e] = (r < rlim && c + e < clim) ? to_f32(src[r * sld + c + e]) : 0.f;
            }
        }
    } else {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int idx = threadIdx.x + it * NT, r = idx / CV, c = idx % CV * V;
#pragma unroll
            for (int e = 0; e < V; ++e) v[it][e] = (r < rlim && c + e < clim) ? to_f32(src[r * sld + c + e]) : 0.f;
        }
    }
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int idx = threadIdx.x + it * NT;
        put(idx / CV, idx % CV * V, v[it]);
    }
}

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

// dst[r][c] = src[r·sld + c].
template <int R, int C, typename D, typename S>
__device__ __forceinline__ void load_rows(D* dst, int ldd, const S* src, int64_t sld, int rlim, int clim) {
    load_tile<R, C>(src, sld, rlim, clim, [&](int r, int c, const float* v) {
        if constexpr (std::is_same<D, __nv_bfloat16>::value) {
            store_bf16<Vec<S>::N>(dst + r * ldd + c, v);
        } else {
#pragma unroll
            for (int e = 0; e < Vec<S>::N; ++e) dst[r * ldd + c + e] = from_f32<D>(v[e]);
        }
    });
}

// Transposing load: dst[c][r] = src[r·sld + c] (global reads stay coalesced
// along c).
template <int R, int C, typename D, typename S>
__device__ __forceinline__ void load_cols(D* dst, int ldd, const S* src, int64_t sld, int rlim, int clim) {
    load_tile<R, C>(src, sld, rlim, clim, [&](int r, int c, const float* v) {
#pragma unroll
        for (int e = 0; e < Vec<S>::N; ++e) dst[(c + e) * ldd + r] = from_f32<D>(v[e]);
    });
}

// Transposing load with a per-source-row scale: dst[c][r] = w[r]·src[r·sld + c].
template <int R, int C, typename D, typename S>
__device__ __forceinline__ void load_cols_scaled(D* dst, int ldd, const S* src, int64_t sld, int rlim, int clim,
                                                 const float* w) {
    load_tile<R, C>(src, sld, rlim, clim, [&](int r, int c, const float* v) {
        const float wr = w[r];
#pragma unroll
        for (int e = 0; e < Vec<S>::N; ++e) dst[(c + e) * ldd + r] = from_f32<D>(wr * v[e]);
    });
}

// Deterministic reductions over groups of 4 consecutive lanes.
__device__ __forceinline__ float sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

}  // namespace ssd
}  // namespace m2k
