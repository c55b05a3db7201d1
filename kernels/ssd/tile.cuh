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

// The loaders below issue all their global loads before the first shared
// store (two unrolled passes), so that each thread has R·C/NT loads in
// flight instead of one.

// dst[r][c] = src[r·sld + c] for r < R, c < C, zero outside r < rlim, c < clim;
// converted to D through f32 (exact for bf16 → f32 → bf16).
template <int R, int C, typename D, typename S>
__device__ __forceinline__ void load_rows(D* dst, int ldd, const S* src, int64_t sld, int rlim, int clim) {
    static_assert(R * C % NT == 0, "tile not a multiple of the block");
    constexpr int IT = R * C / NT;
    float v[IT];
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int idx = threadIdx.x + it * NT, r = idx / C, c = idx % C;
        v[it] = (r < rlim && c < clim) ? to_f32(src[r * sld + c]) : 0.f;
    }
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int idx = threadIdx.x + it * NT, r = idx / C, c = idx % C;
        dst[r * ldd + c] = from_f32<D>(v[it]);
    }
}

// Transposing load: dst[c][r] = src[r·sld + c] (global reads stay coalesced
// along c).
template <int R, int C, typename D, typename S>
__device__ __forceinline__ void load_cols(D* dst, int ldd, const S* src, int64_t sld, int rlim, int clim) {
    static_assert(R * C % NT == 0, "tile not a multiple of the block");
    constexpr int IT = R * C / NT;
    float v[IT];
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int idx = threadIdx.x + it * NT, r = idx / C, c = idx % C;
        v[it] = (r < rlim && c < clim) ? to_f32(src[r * sld + c]) : 0.f;
    }
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int idx = threadIdx.x + it * NT, r = idx / C, c = idx % C;
        dst[c * ldd + r] = from_f32<D>(v[it]);
    }
}

// Transposing load with a per-source-row scale: dst[c][r] = w[r]·src[r·sld + c].
template <int R, int C, typename D, typename S>
__device__ __forceinline__ void load_cols_scaled(D* dst, int ldd, const S* src, int64_t sld, int rlim, int clim,
                                                 const float* w) {
    static_assert(R * C % NT == 0, "tile not a multiple of the block");
    constexpr int IT = R * C / NT;
    float v[IT];
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int idx = threadIdx.x + it * NT, r = idx / C, c = idx % C;
        v[it] = (r < rlim && c < clim) ? to_f32(src[r * sld + c]) : 0.f;
    }
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int idx = threadIdx.x + it * NT, r = idx / C, c = idx % C;
        dst[c * ldd + r] = from_f32<D>(w[r] * v[it]);
    }
}

// Deterministic reductions over groups of 4 consecutive lanes.
__device__ __forceinline__ float sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

}  // namespace ssd
}  // namespace m2k
