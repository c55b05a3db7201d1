/*
 * m2kernels.h — the whole C ABI of libm2kernels.so, the CUDA backend of m2train.
 *
 * Rules that hold for every function below:
 *   - Plain C types only. Device pointers are void* / const void*, CUDA streams
 *     and events are void* (NULL is the legacy default stream), sizes are int64_t.
 *   - Every function returns int: 0 on success, otherwise a status code as
 *     described in the common section; m2k_error_string names it.
 *   - Every kernel launch takes `void* stream` as its last argument and is
 *     asynchronous with respect to the host unless stated otherwise.
 *   - Activations are f32 or bf16 (argument or field `dtype`, M2K_F32 or
 *     M2K_BF16); accumulation, states, norm statistics, dt and decays are always
 *     f32, and so are parameters and their gradients unless stated otherwise.
 *   - Tensors are row-major with the last index fastest.
 *
 * The file is divided into sections, each owned by one part of the library:
 * common (runtime wrappers), ssd (the chunked selective scan), ops (the other
 * layer operations) and gemm (cuBLASLt matrix products).
 */
#ifndef M2KERNELS_H
#define M2KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ==== common ==== */

/* ABI version; bumped whenever a signature or struct layout in this file changes. */
#define M2K_ABI_VERSION 1

/* Activation dtypes. */
#define M2K_F32 0
#define M2K_BF16 1

/* Status codes.
 *   0                       success
 *   1 .. 999                a cudaError_t value, unchanged
 *   1000 + s                cuBLAS / cuBLASLt status s (cublasStatus_t)
 *   M2K_ERR_INVALID_ARG     an argument broke a documented rule (NULL pointer,
 *                           non-positive size, unknown dtype, misaligned workspace)
 *   M2K_ERR_UNSUPPORTED     a shape outside what the kernels implement
 *   M2K_ERR_WORKSPACE       the workspace given is smaller than required
 * After an M2K_ERR_* code, m2k_last_error_detail() on the same host thread says
 * which argument and which rule. */
#define M2K_OK 0
#define M2K_ERR_CUBLAS_BASE 1000
#define M2K_ERR_INVALID_ARG 2001
#define M2K_ERR_UNSUPPORTED 2002
#define M2K_ERR_WORKSPACE 2003

/* Returns M2K_ABI_VERSION as compiled into the library. */
int m2k_abi_version(void);
/* A static, human-readable name for a status code (never NULL). */
const char* m2k_error_string(int code);
/* Detail of the last M2K_ERR_* status returned on this host thread ("" if none). */
const char* m2k_last_error_detail(void);

/* Devices. */
int m2k_device_count(int* count);
int m2k_set_device(int device);
int m2k_get_device(int* device);
/* name: buffer of name_len bytes, NUL-terminated on return (truncated if short). */
int m2k_device_props(int device, char* name, int64_t name_len, int64_t* total_mem_bytes,
                     int* multiprocessors, int* cc_major, int* cc_minor);
int m2k_mem_get_info(int64_t* free_bytes, int64_t* total_bytes);
int m2k_device_synchronize(void);

/* Memory. m2k_malloc of 0 bytes returns NULL and success; m2k_free(NULL) is a no-op.
 * Allocations are aligned to at least 256 bytes. */
int m2k_malloc(void** ptr, int64_t bytes);
int m2k_free(void* ptr);
int m2k_memset(void* ptr, int value, int64_t bytes, void* stream);
/* Synchronous copies (return when the copy is complete). */
int m2k_memcpy_h2d(void* dst, const void* src, int64_t bytes);
int m2k_memcpy_d2h(void* dst, const void* src, int64_t bytes);
int m2k_memcpy_d2d(void* dst, const void* src, int64_t bytes);
/* Asynchronous copies on stream (host memory should be pinned for real overlap). */
int m2k_memcpy_h2d_async(void* dst, const void* src, int64_t bytes, void* stream);
int m2k_memcpy_d2h_async(void* dst, const void* src, int64_t bytes, void* stream);
int m2k_memcpy_d2d_async(void* dst, const void* src, int64_t bytes, void* stream);

/* Streams (non-blocking with respect to the legacy default stream). */
int m2k_stream_create(void** stream);
int m2k_stream_destroy(void* stream);
int m2k_stream_synchronize(void* stream);

/* Events, for timing. */
int m2k_event_create(void** event);
int m2k_event_destroy(void* event);
int m2k_event_record(void* event, void* stream);
int m2k_event_synchronize(void* event);
int m2k_event_elapsed_ms(float* ms, void* start, void* end);

/* Elementwise conversion of n values on device. f32 -> bf16 rounds to nearest even. */
int m2k_f32_to_bf16(void* dst_bf16, const void* src_f32, int64_t n, void* stream);
int m2k_bf16_to_f32(void* dst_f32, const void* src_bf16, int64_t n, void* stream);

/* ==== ssd ==== */

/* The chunked SSD scan of Mamba-2 (docs/MAMBA2_SPEC.md §3 forward, §4.6 backward),
 * the CUDA twin of Go package model/ssd (Forward / Backward).
 *
 * Letters: Bt batch, L sequence length, H heads, P head dim, N state dim,
 * G groups (head h reads B and C of group h / (H/G)), Q chunk length.
 *
 *   dt   = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max)   (softplus(u) = u for u > 20)
 *   A    = -exp(A_log)
 *   h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ      (per b, h: P×N), h_{-1} = init_state
 *   y_t  = h_t C_t + D x_t
 *
 * Tensors and their dtypes (act = shape.dtype):
 *   x        (Bt, L, H, P)  act     row stride x_stride  (≥ H·P; 0 means H·P)
 *   dt_raw   (Bt, L, H)     act     row stride dt_stride (≥ H;   0 means H)
 *   B, C     (Bt, L, G, N)  act     row strides b_stride, c_stride (≥ G·N; 0 means G·N)
 *   y        (Bt, L, H, P)  act     row stride y_stride  (≥ H·P; 0 means H·P)
 *   dt_bias, A_log (H), D (H) or (H·P) with d_has_hdim: f32
 *   init_state, final_state (Bt, H, P, N): f32; log_decay (Bt, H): f32, Σ_t dt_t·A
 * A row stride is the distance in elements between positions t and t+1 of one
 * sequence; sequence b starts at b·L·stride. Gradients have the layout of the
 * tensor they are the gradient of (dy that of y, dx that of x, ...).
 *
 * Rules: all sizes ≥ 1; H % G == 0; 1 ≤ chunk ≤ 256 (a chunk longer than L is
 * taken as L); headdim ≤ 256; dstate ≤ 256; 0 ≤ dt_min ≤ dt_max, with
 * dt_min == dt_max == 0 meaning no clamp; workspace 256-byte aligned and at least
 * m2k_ssd_workspace_size bytes. Tensors must not overlap, except that x/B/C (and
 * dx/dB/dC) may be interleaved column ranges of one buffer.
 *
 * The forward and backward overwrite every output element; parameter gradients
 * are sums over batch and time within one call, reduced in a fixed order (the
 * results are bitwise reproducible; no floating-point atomics are used). */
typedef struct m2k_ssd_shape {
    int64_t batch;      /* Bt */
    int64_t seqlen;     /* L */
    int64_t nheads;     /* H */
    int64_t headdim;    /* P */
    int64_t dstate;     /* N */
    int64_t ngroups;    /* G */
    int64_t chunk;      /* Q */
    int64_t dtype;      /* M2K_F32 or M2K_BF16: x, dt_raw, B, C, y and their gradients */
    int64_t d_has_hdim; /* 0: D has H entries; 1: D has H·P entries */
    double dt_min;      /* dt clamp; {0, 0} means none */
    double dt_max;
    int64_t x_stride;   /* row strides in elements, 0 = dense */
    int64_t dt_stride;
    int64_t b_stride;
    int64_t c_stride;
    int64_t y_stride;
} m2k_ssd_shape;

typedef struct m2k_ssd_fwd_args {
    const void* x;
    const void* dt_raw;
    const void* dt_bias;    /* f32 (H) */
    const void* A_log;      /* f32 (H) */
    const void* B;
    const void* C;
    const void* D;          /* f32 (H) or (H·P) */
    const void* init_state; /* f32 (Bt,H,P,N); NULL means zeros */
    void* y;
    void* final_state;      /* f32 (Bt,H,P,N); NULL to skip */
    void* log_decay;        /* f32 (Bt,H); NULL to skip */
    void* workspace;
    int64_t workspace_bytes;
} m2k_ssd_fwd_args;

typedef struct m2k_ssd_bwd_args {
    /* forward inputs, as given to m2k_ssd_fwd */
    const void* x;
    const void* dt_raw;
    const void* dt_bias;
    const void* A_log;
    const void* B;
    const void* C;
    const void* D;
    const void* init_state;  /* NULL means zeros */
    /* incoming gradients */
    const void* dy;          /* act, layout of y */
    const void* dfinal_state;/* f32 (Bt,H,P,N); NULL means zeros */
    /* gradients written (overwritten) */
    void* dx;                /* act, layout of x */
    void* ddt_raw;           /* act, layout of dt_raw */
    void* dB;                /* act, layout of B */
    void* dC;                /* act, layout of C */
    void* ddt_bias;          /* f32 (H) */
    void* dA_log;            /* f32 (H) */
    void* dD;                /* f32, shape of D */
    void* dinit_state;       /* f32 (Bt,H,P,N); NULL to skip */
    void* workspace;
    int64_t workspace_bytes;
} m2k_ssd_bwd_args;

/* Bytes of workspace that m2k_ssd_fwd (backward = 0) or m2k_ssd_bwd (backward = 1)
 * needs for this shape. */
int m2k_ssd_workspace_size(const m2k_ssd_shape* shape, int backward, int64_t* bytes);
/* Forward scan: y, final_state, log_decay. */
int m2k_ssd_fwd(const m2k_ssd_shape* shape, const m2k_ssd_fwd_args* args, void* stream);
/* Backward scan: every gradient of the forward, given dy and dfinal_state;
 * recomputes the forward quantities it needs from the inputs. */
int m2k_ssd_bwd(const m2k_ssd_shape* shape, const m2k_ssd_bwd_args* args, void* stream);

/* ==== ops ==== */

/* ==== gemm ==== */

#ifdef __cplusplus
}
#endif

#endif /* M2KERNELS_H */
