// Runtime wrappers of the common section of m2kernels.h: devices, memory,
// streams, events and dtype conversion.
#include <string.h>

#include "m2k_internal.cuh"

namespace m2k {

static thread_local char detail_buf[512];

int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail_buf, sizeof detail_buf, fmt, ap);
    va_end(ap);
    return code;
}

void clear_detail() { detail_buf[0] = 0; }

}  // namespace m2k

using namespace m2k;

extern "C" {

int m2k_abi_version(void) { return M2K_ABI_VERSION; }

const char* m2k_error_string(int code) {
    if (code == M2K_OK) return "success";
    if (code > 0 && code < M2K_ERR_CUBLAS_BASE) return cudaGetErrorString(static_cast<cudaError_t>(code));
    switch (code) {
    case M2K_ERR_CUBLAS_BASE + 1: return "cuBLAS: not initialized";
    case M2K_ERR_CUBLAS_BASE + 3: return "cuBLAS: allocation failed";
    case M2K_ERR_CUBLAS_BASE + 7: return "cuBLAS: invalid value";
    case M2K_ERR_CUBLAS_BASE + 8: return "cuBLAS: architecture mismatch";
    case M2K_ERR_CUBLAS_BASE + 11: return "cuBLAS: mapping error";
    case M2K_ERR_CUBLAS_BASE + 13: return "cuBLAS: execution failed";
    case M2K_ERR_CUBLAS_BASE + 14: return "cuBLAS: internal error";
    case M2K_ERR_CUBLAS_BASE + 15: return "cuBLAS: not supported";
    case M2K_ERR_CUBLAS_BASE + 16: return "cuBLAS: license error";
    case M2K_ERR_INVALID_ARG: return "m2k: invalid argument";
    case M2K_ERR_UNSUPPORTED: return "m2k: unsupported shape";
    case M2K_ERR_WORKSPACE: return "m2k: workspace too small";
    }
    if (code > M2K_ERR_CUBLAS_BASE && code < M2K_ERR_INVALID_ARG) return "cuBLAS: unknown status";
    return "m2k: unknown status";
}

const char* m2k_last_error_detail(void) { return m2k::detail_buf; }

int m2k_device_count(int* count) {
    clear_detail();
    if (!count) return fail(M2K_ERR_INVALID_ARG, "m2k_device_count: count is NULL");
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
        *count = 0;
        cudaGetLastError();
    }
    return status(e);
}

int m2k_set_device(int device) { return status(cudaSetDevice(device)); }

int m2k_get_device(int* device) {
    clear_detail();
    if (!device) return fail(M2K_ERR_INVALID_ARG, "m2k_get_device: device is NULL");
    return status(cudaGetDevice(device));
}

int m2k_device_props(int device, char* name, int64_t name_len, int64_t* total_mem_bytes,
                     int* multiprocessors, int* cc_major, int* cc_minor) {
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) return status(e);
    if (name && name_len > 0) {
        strncpy(name, p.name, size_t(name_len) - 1);
        name[name_len - 1] = 0;
    }
    if (total_mem_bytes) *total_mem_bytes = int64_t(p.totalGlobalMem);
    if (multiprocessors) *multiprocessors = p.multiProcessorCount;
    if (cc_major) *cc_major = p.major;
    if (cc_minor) *cc_minor = p.minor;
    return M2K_OK;
}

int m2k_mem_get_info(int64_t* free_bytes, int64_t* total_bytes) {
    size_t f = 0, t = 0;
    cudaError_t e = cudaMemGetInfo(&f, &t);
    if (free_bytes) *free_bytes = int64_t(f);
    if (total_bytes) *total_bytes = int64_t(t);
    return status(e);
}

int m2k_device_synchronize(void) { return status(cudaDeviceSynchronize()); }

int m2k_malloc(void** ptr, int64_t bytes) {
    clear_detail();
    if (!ptr) return fail(M2K_ERR_INVALID_ARG, "m2k_malloc: ptr is NULL");
    *ptr = nullptr;
    if (bytes < 0) return fail(M2K_ERR_INVALID_ARG, "m2k_malloc: bytes must be >= 0, got %lld", (long long)bytes);
    if (bytes == 0) return M2K_OK;
    return status(cudaMalloc(ptr, size_t(bytes)));
}

int m2k_free(void* ptr) { return ptr ? status(cudaFree(ptr)) : M2K_OK; }

int m2k_host_alloc(void** ptr, int64_t bytes) {
    clear_detail();
    if (!ptr) return fail(M2K_ERR_INVALID_ARG, "m2k_host_alloc: ptr is NULL");
    *ptr = nullptr;
    if (bytes < 0) return fail(M2K_ERR_INVALID_ARG, "m2k_host_alloc: bytes must be >= 0, got %lld", (long long)bytes);
    if (bytes == 0) return M2K_OK;
    return status(cudaHostAlloc(ptr, size_t(bytes), cudaHostAllocPortable));
}

int m2k_host_free(void* ptr) { return ptr ? status(cudaFreeHost(ptr)) : M2K_OK; }

static int check_bytes(const char* fn, int64_t bytes) {
    clear_detail();
    if (bytes < 0) return fail(M2K_ERR_INVALID_ARG, "%s: bytes must be >= 0, got %lld", fn, (long long)bytes);
    return M2K_OK;
}

int m2k_memset(void* ptr, int value, int64_t bytes, void* stream) {
    if (int s = check_bytes("m2k_memset", bytes)) return s;
    if (bytes == 0) return M2K_OK;
    return status(cudaMemsetAsync(ptr, value, size_t(bytes), as_stream(stream)));
}

static int copy(const char* fn, void* dst, const void* src, int64_t bytes, cudaMemcpyKind kind) {
    if (int s = check_bytes(fn, bytes)) return s;
    if (bytes == 0) return M2K_OK;
    return status(cudaMemcpy(dst, src, size_t(bytes), kind));
}

static int copy_async(const char* fn, void* dst, const void* src, int64_t bytes, cudaMemcpyKind kind, void* stream) {
    if (int s = check_bytes(fn, bytes)) return s;
    if (bytes == 0) return M2K_OK;
    return status(cudaMemcpyAsync(dst, src, size_t(bytes), kind, as_stream(stream)));
}

int m2k_memcpy_h2d(void* dst, const void* src, int64_t bytes) {
    return copy("m2k_memcpy_h2d", dst, src, bytes, cudaMemcpyHostToDevice);
}
int m2k_memcpy_d2h(void* dst, const void* src, int64_t bytes) {
    return copy("m2k_memcpy_d2h", dst, src, bytes, cudaMemcpyDeviceToHost);
}
int m2k_memcpy_d2d(void* dst, const void* src, int64_t bytes) {
    return copy("m2k_memcpy_d2d", dst, src, bytes, cudaMemcpyDeviceToDevice);
}
int m2k_memcpy_h2d_async(void* dst, const void* src, int64_t bytes, void* stream) {
    return copy_async("m2k_memcpy_h2d_async", dst, src, bytes, cudaMemcpyHostToDevice, stream);
}
int m2k_memcpy_d2h_async(void* dst, const void* src, int64_t bytes, void* stream) {
    return copy_async("m2k_memcpy_d2h_async", dst, src, bytes, cudaMemcpyDeviceToHost, stream);
}
int m2k_memcpy_d2d_async(void* dst, const void* src, int64_t bytes, void* stream) {
    return copy_async("m2k_memcpy_d2d_async", dst, src, bytes, cudaMemcpyDeviceToDevice, stream);
}

int m2k_stream_create(void** stream) {
    clear_detail();
    if (!stream) return fail(M2K_ERR_INVALID_ARG, "m2k_stream_create: stream is NULL");
    cudaStream_t s = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    *stream = s;
    return status(e);
}
int m2k_stream_destroy(void* stream) { return stream ? status(cudaStreamDestroy(as_stream(stream))) : M2K_OK; }
int m2k_stream_synchronize(void* stream) { return status(cudaStreamSynchronize(as_stream(stream))); }
int m2k_stream_wait_event(void* stream, void* event) {
    clear_detail();
    if (!event) return fail(M2K_ERR_INVALID_ARG, "m2k_stream_wait_event: event is NULL");
    return status(cudaStreamWaitEvent(as_stream(stream), static_cast<cudaEvent_t>(event), 0));
}

int m2k_event_create(void** event) {
    clear_detail();
    if (!event) return fail(M2K_ERR_INVALID_ARG, "m2k_event_create: event is NULL");
    cudaEvent_t ev = nullptr;
    cudaError_t e = cudaEventCreate(&ev);
    *event = ev;
    return status(e);
}
int m2k_event_destroy(void* event) { return event ? status(cudaEventDestroy(static_cast<cudaEvent_t>(event))) : M2K_OK; }
int m2k_event_record(void* event, void* stream) {
    return status(cudaEventRecord(static_cast<cudaEvent_t>(event), as_stream(stream)));
}
int m2k_event_synchronize(void* event) { return status(cudaEventSynchronize(static_cast<cudaEvent_t>(event))); }
int m2k_event_elapsed_ms(float* ms, void* start, void* end) {
    clear_detail();
    if (!ms) return fail(M2K_ERR_INVALID_ARG, "m2k_event_elapsed_ms: ms is NULL");
    return status(cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
}

}  // extern "C"

namespace {

__global__ void f32_to_bf16_kernel(__nv_bfloat16* dst, const float* src, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void bf16_to_f32_kernel(float* dst, const __nv_bfloat16* src, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

int grid_for(int64_t n) { return int(n / 256 + 1 < 65536 ? n / 256 + 1 : 65536); }

}  // namespace

extern "C" {

int m2k_f32_to_bf16(void* dst_bf16, const void* src_f32, int64_t n, void* stream) {
    clear_detail();
    if (n < 0) return fail(M2K_ERR_INVALID_ARG, "m2k_f32_to_bf16: n must be >= 0, got %lld", (long long)n);
    if (n == 0) return M2K_OK;
    if (!dst_bf16 || !src_f32) return fail(M2K_ERR_INVALID_ARG, "m2k_f32_to_bf16: NULL pointer");
    f32_to_bf16_kernel<<<grid_for(n), 256, 0, as_stream(stream)>>>(static_cast<__nv_bfloat16*>(dst_bf16),
                                                                  static_cast<const float*>(src_f32), n);
    return launch_status();
}

int m2k_bf16_to_f32(void* dst_f32, const void* src_bf16, int64_t n, void* stream) {
    clear_detail();
    if (n < 0) return fail(M2K_ERR_INVALID_ARG, "m2k_bf16_to_f32: n must be >= 0, got %lld", (long long)n);
    if (n == 0) return M2K_OK;
    if (!dst_f32 || !src_bf16) return fail(M2K_ERR_INVALID_ARG, "m2k_bf16_to_f32: NULL pointer");
    bf16_to_f32_kernel<<<grid_for(n), 256, 0, as_stream(stream)>>>(static_cast<float*>(dst_f32),
                                                                  static_cast<const __nv_bfloat16*>(src_bf16), n);
    return launch_status();
}

}  // extern "C"
