// Shared host and device helpers of libm2kernels (not part of the ABI).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "../m2kernels.h"

namespace m2k {

// Records the detail string returned by m2k_last_error_detail for this thread
// and returns code, so that argument checks read `return fail(CODE, "...")`.
int fail(int code, const char* fmt, ...);
// Clears the detail string (called at the start of every checked entry point).
void clear_detail();

// Maps a cudaError_t to the ABI status (the value itself, 0 for success).
inline int status(cudaError_t e) { return static_cast<int>(e); }

// Returns the status of the launches just made: a launch-configuration error
// or an earlier asynchronous error, 0 if none.
inline int launch_status() { return status(cudaGetLastError()); }

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element conversion between the activation types and f32.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Carves 256-byte aligned sub-buffers out of one workspace allocation. With a
// null base it only measures.
struct Carver {
    char* base;
    int64_t used = 0;
    explicit Carver(void* b) : base(static_cast<char*>(b)) {}
    template <typename T> T* take(int64_t count) {
        int64_t off = (used + 255) & ~int64_t(255);
        used = off + count * int64_t(sizeof(T));
        return base ? reinterpret_cast<T*>(base + off) : nullptr;
    }
};

}  // namespace m2k
