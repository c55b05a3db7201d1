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
#define M2K_ABI_VERSION 3

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

/* Pinned (page-locked) host memory, which asynchronous copies need to run beside kernels.
 * m2k_host_alloc of 0 bytes returns NULL and success; m2k_host_free(NULL) is a no-op. */
int m2k_host_alloc(void** ptr, int64_t bytes);
int m2k_host_free(void* ptr);

/* Streams (non-blocking with respect to the legacy default stream). */
int m2k_stream_create(void** stream);
int m2k_stream_destroy(void* stream);
int m2k_stream_synchronize(void* stream);
/* Work queued on stream after this call waits until event has completed. */
int m2k_stream_wait_event(void* stream, void* event);

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
    /* The workspace of the m2k_ssd_fwd call whose gradients these are (same
     * shape, same x, dt_raw, dt_bias, A_log, B, C and init_state), untouched
     * since: the backward reads the forward's intermediates (dt, the decay
     * cumsums, the chunk states, C·Bᵀ) from it instead of recomputing them,
     * and its own workspace then needs M2K_SSD_WS_BWD_SAVED bytes. NULL:
     * recompute (workspace of M2K_SSD_WS_BWD bytes). Read only. */
    const void* fwd_workspace;
    int64_t fwd_workspace_bytes;
} m2k_ssd_bwd_args;

/* What an SSD workspace is for (m2k_ssd_workspace_size). */
enum {
    M2K_SSD_WS_FWD = 0,       /* m2k_ssd_fwd; also what fwd_workspace must hold */
    M2K_SSD_WS_BWD = 1,       /* m2k_ssd_bwd without fwd_workspace */
    M2K_SSD_WS_BWD_SAVED = 2  /* m2k_ssd_bwd given fwd_workspace */
};

/* Bytes of workspace that the use `kind` (M2K_SSD_WS_*) needs for this shape. */
int m2k_ssd_workspace_size(const m2k_ssd_shape* shape, int kind, int64_t* bytes);
/* Forward scan: y, final_state, log_decay. */
int m2k_ssd_fwd(const m2k_ssd_shape* shape, const m2k_ssd_fwd_args* args, void* stream);
/* Backward scan: every gradient of the forward, given dy and dfinal_state;
 * takes the forward quantities it needs from fwd_workspace, or recomputes
 * them from the inputs. */
int m2k_ssd_bwd(const m2k_ssd_shape* shape, const m2k_ssd_bwd_args* args, void* stream);

/* ==== ops ==== */

/* The per-position operations of the Mamba-2 model (docs/MAMBA2_SPEC.md §1, §2,
 * §4), the CUDA twins of model/ref's CPU ops. n is the number of rows
 * (batch·length); "act" marks a tensor in the activation dtype, everything
 * else is f32. Parameter gradients (dw, dbias, demb) are ADDED into their
 * buffers and are reduced without floating-point atomics: per-block partials
 * in a workspace, then a fixed-order pass, so results are bitwise
 * reproducible. A function that takes a workspace has a *_workspace function
 * giving its size in bytes; the workspace is scratch, free again when the
 * stream reaches the end of the call. A NULL stream is the legacy default
 * stream. Unless stated otherwise tensors must not overlap. */

/* Embedding gather: out (n, d) act = emb[tokens[t]] with emb f32 (vocab, d) and
 * tokens int32 (n). A token outside [0, vocab) gives a row of NaN (validate
 * tokens on the host). */
int m2k_embedding_fwd(int dtype, void* out, const void* emb, const void* tokens, int64_t n, int64_t d,
                      int64_t vocab, void* stream);
int m2k_embedding_bwd_workspace(int64_t n, int64_t vocab, int64_t* bytes);
/* demb (vocab, d) f32 += scatter of dout (n, d) act by tokens; tokens outside
 * [0, vocab) are skipped. Deterministic: a stable sort by token, then each
 * token's rows summed in position order by one owner. */
int m2k_embedding_bwd(int dtype, void* demb, const void* dout, const void* tokens, int64_t n, int64_t d,
                      int64_t vocab, void* workspace, int64_t workspace_bytes, void* stream);

/* Fused residual add + RMSNorm (the pre-norm of each block and the final norm):
 *   res_out = residual + x + bias      f32 (n, d); residual f32, x act, bias f32 (d),
 *                                      each optional (NULL); residual may equal res_out
 *   rstd    = (mean(res_out²) + eps)^-½   f32 (n)
 *   out     = res_out·rstd·w           act (n, d), w f32 (d)
 * The first block passes the f32 embedding as residual and x = NULL; block i
 * passes the residual and the out_proj output of block i−1. */
int m2k_add_rmsnorm_fwd(int dtype, void* out, void* res_out, void* rstd, const void* residual, const void* x,
                        const void* bias, const void* w, int64_t n, int64_t d, float eps, void* stream);
int m2k_rmsnorm_bwd_workspace(int64_t n, int64_t d, int64_t* bytes);
/* Backward of the norm given dout (n, d) act, res = the res_out of the forward,
 * rstd and w: dres (n, d) f32 receives the input gradient (added when
 * accumulate != 0, else overwritten) — the gradient of the residual stream,
 * which is also the gradient of the residual and x inputs; dx_out (optional, act)
 * receives a copy of the new dres; dw (optional) += Σ_rows dout·res·rstd. */
int m2k_rmsnorm_bwd(int dtype, void* dres, void* dx_out, void* dw, const void* dout, const void* res,
                    const void* rstd, const void* w, int64_t n, int64_t d, int accumulate, void* workspace,
                    int64_t workspace_bytes, void* stream);

/* Bias helpers of the projections: x (n, w) act with row stride ldx gets
 * bias f32 (w) added to every row; out f32 (w) += Σ_rows x (a bias gradient). */
int m2k_add_bias(int dtype, void* x, const void* bias, int64_t n, int64_t w, int64_t ldx, void* stream);
int m2k_column_sum_workspace(int64_t n, int64_t w, int64_t* bytes);
int m2k_column_sum(int dtype, void* out, const void* x, int64_t n, int64_t w, int64_t ldx, void* workspace,
                   int64_t workspace_bytes, void* stream);

/* Causal depthwise conv1d + SiLU over bt sequences of l positions, cd channels,
 * kernel width 1 ≤ width ≤ 8 (M2K_ERR_UNSUPPORTED otherwise):
 *   pre[b,t,c] = bias[c] + Σ_k weight[c,k]·src[b, t+k−(width−1), c],  act = silu(pre)
 * src act is read at row (b·l + t)·ld + off + c (the xBC columns of the in_proj
 * output); positions before the shard come from halo act (bt, width−1, cd) —
 * the previous shard's last width−1 rows of src — or are zero when halo is
 * NULL. weight f32 (cd, width), the last tap on the current position; bias f32
 * (cd) or NULL. act (bt·l, cd) act with row stride ld_act. */
int m2k_conv_fwd(int dtype, void* act, int64_t ld_act, const void* src, int64_t ld, int64_t off, const void* halo,
                 const void* weight, const void* bias, int64_t bt, int64_t l, int64_t cd, int64_t width,
                 void* stream);
int m2k_conv_bwd_workspace(int64_t bt, int64_t l, int64_t cd, int64_t width, int64_t* bytes);
/* Backward given dact (row stride ld_act) and the forward inputs (pre is
 * recomputed): dsrc act, strided like src, is overwritten in the cd xBC columns;
 * dw f32 (cd, width) and dbias f32 (cd) (each optional) are added into; dhalo
 * f32 (bt, width−1, cd) (optional) is overwritten with the gradient of the halo,
 * to be added by the previous shard into its dsrc. */
int m2k_conv_bwd(int dtype, void* dsrc, void* dw, void* dbias, void* dhalo, const void* dact, int64_t ld_act,
                 const void* src, int64_t ld, int64_t off, const void* halo, const void* weight, const void* bias,
                 int64_t bt, int64_t l, int64_t cd, int64_t width, void* workspace, int64_t workspace_bytes,
                 void* stream);

/* Gated RMSNorm, grouped (mamba_ssm): rows of e channels in `groups` groups of
 * e/groups, y act (n, e), z act read with row stride ldz (the z columns of the
 * in_proj output), w f32 (e), rstd f32 (n, groups):
 *   before_gate == 0:  out = norm(y·silu(z))·w
 *   before_gate != 0:  out = norm(y)·w·silu(z)
 *   enabled == 0:      out = y·silu(z)  (no norm; w, rstd, eps unused)  */
int m2k_gated_norm_fwd(int dtype, void* out, void* rstd, const void* y, const void* z, int64_t ldz, const void* w,
                       int64_t n, int64_t e, int64_t groups, float eps, int before_gate, int enabled, void* stream);
int m2k_gated_norm_bwd_workspace(int64_t n, int64_t e, int64_t* bytes);
/* dy act (n, e) and dz act (row stride ldz) are overwritten; dw (optional) +=. */
int m2k_gated_norm_bwd(int dtype, void* dy, void* dz, void* dw, const void* dout, const void* rstd, const void* y,
                       const void* z, int64_t ldz, const void* w, int64_t n, int64_t e, int64_t groups,
                       int before_gate, int enabled, void* workspace, int64_t workspace_bytes, void* stream);

/* Cross-entropy of a block of n rows of logits act (row stride ld ≥ vocab)
 * against targets int32 (n): row_loss f32 (n) = logsumexp(row) − row[target];
 * a negative target is not counted (loss 0, gradient row 0); a target ≥ vocab
 * gives a NaN loss. With compute_grad != 0 the logits are overwritten by
 * (softmax − onehot(target))·grad_scale (grad_scale = 1/count for the mean loss).
 * loss_sum (optional) is a device double that receives += Σ row_loss, summed in
 * a fixed order. The LM head runs it per block of positions between the logits
 * GEMM and the two GEMMs of dhidden and dW, so only one block of logits exists. */
int m2k_cross_entropy(int dtype, void* logits, int64_t ld, const void* targets, int64_t n, int64_t vocab,
                      float grad_scale, int compute_grad, void* row_loss, void* loss_sum, void* stream);

/* Row copies by index, idx int32 (n), rows of width act values with row
 * strides ld_dst and ld_src (each ≥ width):
 *   scatter == 0 (gather):  dst[i, :] = src[idx[i], :]    for i < n; an index
 *                           outside [0, rows) gives a row of NaN
 *   scatter != 0:           dst[idx[i], :] = src[i, :]    for i < n; an index
 *                           outside [0, rows) copies nothing, other rows of dst
 *                           keep their values; the indices must be distinct
 * rows is the row count of the indexed matrix (src for a gather, dst for a
 * scatter). n = 0 does nothing. The LM head of a step whose targets count only
 * some positions gathers those rows of the final norm output, runs the head and
 * the cross-entropy over them alone, and scatters their gradient back. */
int m2k_copy_rows(int dtype, void* dst, int64_t ld_dst, const void* src, int64_t ld_src, const void* idx, int64_t n,
                  int64_t width, int64_t rows, int scatter, void* stream);

/* AdamW over flat f32 buffers of n elements, as model.AdamW (PyTorch):
 *   g = grads·grad_scale; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²
 *   params = params·(1 − lr·wd) − lr/(1−β1^step) · m / (√v/√(1−β2^step) + eps)
 * step counts updates including this one (≥ 1). Elements inside one of the
 * nranges [start, end) pairs of nodecay_ranges (int64 on device, 2·nranges
 * values, sorted and disjoint) get no weight decay. grad_scale is the
 * gradient-clipping coefficient (1 for none). Each operation is rounded to f32
 * separately, so the update matches the CPU optimizer bit for bit. */
int m2k_adamw(void* params, const void* grads, void* m, void* v, int64_t n, const void* nodecay_ranges,
              int64_t nranges, double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
              float grad_scale, void* stream);
int m2k_grad_norm_workspace(int64_t n, int64_t* bytes);
/* out (a device double) = ‖grads‖₂ over n f32 values, squares summed in double
 * over fixed blocks of 2^14 elements and the block sums added in a fixed tree. */
int m2k_grad_norm(const void* grads, int64_t n, void* out, void* workspace, int64_t workspace_bytes, void* stream);

/* ==== gemm ==== */

/* Matrix products through cuBLASLt, row-major (the convention of model/linalg.Gemm):
 *   C = alpha·op(A)·op(B) + beta·C
 * op(A) is m×k, op(B) is k×n, C is m×n. A is stored m×k (k×m when trans_a) with
 * row stride lda, B is stored k×n (n×k when trans_b) with row stride ldb, C has
 * row stride ldc. m, n, k ≥ 1. dtype_in M2K_BF16: A and B bf16, fp32
 * accumulation, C bf16 or f32 (dtype_out). dtype_in M2K_F32: true fp32 compute
 * (never TF32), C f32. C is read only when beta != 0.
 *
 * A handle holds a cuBLASLt handle, a 32 MiB device workspace and a cache of
 * plans (one heuristic query per distinct shape, types, strides and operand
 * alignment); one algorithm per plan keeps results reproducible. The
 * workspace is shared by the handle's calls: calls on different streams need
 * different handles. m2k_gemm_destroy synchronizes the device first. */
int m2k_gemm_create(void** handle);
int m2k_gemm_destroy(void* handle);
int m2k_gemm(void* handle, int dtype_in, int dtype_out, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
             float alpha, const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c, int64_t ldc,
             void* stream);

#ifdef __cplusplus
}
#endif

#endif /* M2KERNELS_H */
