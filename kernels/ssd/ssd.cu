// Host side of the chunked SSD scan: argument checks, workspace layout and
// the launch sequences of m2k_ssd_fwd and m2k_ssd_bwd (m2kernels.h, ssd
// section). The kernels are in kernels.cuh.
#include <math.h>

#include <initializer_list>

#include "kernels.cuh"

namespace m2k {
namespace ssd {
namespace {

// The workspace, carved in this order by carve(): the forward's part (dt to
// cb), then the backward's. A backward given the forward's workspace carves
// its own part alone and takes the forward's from that workspace.
struct Ws {
    float* dt;
    float* cs;
    float* st;
    float* cb;
    float* gst;
    float* dcb;
    float* dcb_part;  // only with several head splits (g.nS > 1)
    float* dbc_part;  // likewise
    float* dlam_part;
    float* da_part;
    float* ddt_part;
    float* u_part;
    float* v_part;
    float* dD_part;
    double* bh_part;
    double* dD_bh;
};

// Carves the parts of kind (M2K_SSD_WS_*) from base (nullptr: sizes only)
// and returns the bytes used.
int64_t carve(const Geo& g, void* base, int kind, Ws* w) {
    Carver cv(base);
    const int64_t BH = int64_t(g.Bt) * g.H, BG = int64_t(g.Bt) * g.G;
    if (kind != M2K_SSD_WS_BWD_SAVED) {
        w->dt = cv.take<float>(BH * g.Lp);
        w->cs = cv.take<float>(BH * g.Lp);
        w->st = cv.take<float>(BH * (g.nc + 1) * g.PN);
        w->cb = cv.take<float>(BG * g.nc * g.Q * g.Q);
    }
    if (kind != M2K_SSD_WS_FWD) {
        w->gst = cv.take<float>(BH * (g.nc + 1) * g.PN);
        w->dcb = cv.take<float>(BG * g.nc * g.Q * g.Q);
        w->dcb_part = g.nS > 1 ? cv.take<float>(BG * g.nc * g.nS * g.Q * g.Q) : nullptr;
        w->dbc_part = g.nS > 1 ? cv.take<float>(BG * g.nc * 2 * (g.nS + 1) * g.Q * g.N) : nullptr;
        w->dlam_part = cv.take<float>(BH * g.nc * g.nEb);
        w->da_part = cv.take<float>(BH * g.nc * (g.nI * (g.nI + 1) / 2) * 2 * TM);
        w->ddt_part = cv.take<float>(BH * g.nPt * g.Lp);
        w->u_part = cv.take<float>(BH * g.nNt * g.Lp);
        w->v_part = cv.take<float>(BH * g.nNt * g.Lp);
        w->dD_part = cv.take<float>(BH * g.nc * g.nI * g.P);
        w->bh_part = cv.take<double>(BH * g.nc * 2);
        w->dD_bh = cv.take<double>(BH * g.P);
    }
    return cv.used;
}

// Validates the shape against the rules of m2kernels.h and fills g.
int make_geo(const m2k_ssd_shape* s, Geo* g) {
    if (!s) return fail(M2K_ERR_INVALID_ARG, "ssd: shape is NULL");
    const struct {
        const char* name;
        int64_t v;
    } sizes[] = {{"batch", s->batch}, {"seqlen", s->seqlen}, {"nheads", s->nheads}, {"headdim", s->headdim},
                 {"dstate", s->dstate}, {"ngroups", s->ngroups}, {"chunk", s->chunk}};
    for (const auto& f : sizes)
        if (f.v <= 0 || f.v > (int64_t(1) << 30))
            return fail(M2K_ERR_INVALID_ARG, "ssd: shape.%s must be in [1, 2^30], got %lld", f.name, (long long)f.v);
    if (s->nheads % s->ngroups != 0)
        return fail(M2K_ERR_INVALID_ARG, "ssd: shape.nheads = %lld must be a multiple of ngroups = %lld",
                    (long long)s->nheads, (long long)s->ngroups);
    if (s->dtype != M2K_F32 && s->dtype != M2K_BF16)
        return fail(M2K_ERR_INVALID_ARG, "ssd: shape.dtype must be M2K_F32 (0) or M2K_BF16 (1), got %lld",
                    (long long)s->dtype);
    if (s->d_has_hdim != 0 && s->d_has_hdim != 1)
        return fail(M2K_ERR_INVALID_ARG, "ssd: shape.d_has_hdim must be 0 or 1, got %lld", (long long)s->d_has_hdim);
    if (isnan(s->dt_min) || isnan(s->dt_max) || s->dt_min < 0 || s->dt_min > s->dt_max)
        return fail(M2K_ERR_INVALID_ARG, "ssd: shape.dt_min, dt_max must satisfy 0 <= dt_min <= dt_max, got [%g, %g]",
                    s->dt_min, s->dt_max);
    if (s->chunk > MAXQ)
        return fail(M2K_ERR_UNSUPPORTED, "ssd: shape.chunk must be at most %d, got %lld", MAXQ, (long long)s->chunk);
    if (s->headdim > 256)
        return fail(M2K_ERR_UNSUPPORTED, "ssd: shape.headdim must be at most 256, got %lld", (long long)s->headdim);
    if (s->dstate > 256)
        return fail(M2K_ERR_UNSUPPORTED, "ssd: shape.dstate must be at most 256, got %lld", (long long)s->dstate);
    g->Bt = int(s->batch);
    g->L = int(s->seqlen);
    g->H = int(s->nheads);
    g->P = int(s->headdim);
    g->N = int(s->dstate);
    g->G = int(s->ngroups);
    g->R = g->H / g->G;
    g->Q = int(s->chunk < s->seqlen ? s->chunk : s->seqlen);
    g->nc = int(ceil_div(g->L, g->Q));
    g->Lp = g->nc * g->Q;
    g->nI = int(ceil_div(g->Q, TM));
    g->nPt = int(ceil_div(g->P, TN));
    g->nNt = int(ceil_div(g->N, TN));
    g->PN = int64_t(g->P) * g->N;
    g->nEb = int(ceil_div(g->PN, NT));
    g->hs = g->R < HEADS_PER_BLOCK ? g->R : HEADS_PER_BLOCK;
    g->nS = int(ceil_div(g->R, g->hs));
    const struct {
        const char* name;
        int64_t v, dense;
        int64_t* out;
    } strides[] = {{"x_stride", s->x_stride, int64_t(g->H) * g->P, &g->xs},
                   {"dt_stride", s->dt_stride, g->H, &g->dts},
                   {"b_stride", s->b_stride, int64_t(g->G) * g->N, &g->bs},
                   {"c_stride", s->c_stride, int64_t(g->G) * g->N, &g->css},
                   {"y_stride", s->y_stride, int64_t(g->H) * g->P, &g->ys}};
    for (const auto& f : strides) {
        if (f.v != 0 && f.v < f.dense)
            return fail(M2K_ERR_INVALID_ARG, "ssd: shape.%s must be 0 (dense) or >= %lld, got %lld", f.name,
                        (long long)f.dense, (long long)f.v);
        *f.out = f.v ? f.v : f.dense;
    }
    const bool no_clamp = s->dt_min == 0 && s->dt_max == 0;
    g->dt_lo = no_clamp ? 0.f : float(s->dt_min);
    g->dt_hi = no_clamp ? INFINITY : float(s->dt_max);
    g->d_hdim = int(s->d_has_hdim);
    return M2K_OK;
}

struct Ptr {
    const char* name;
    const void* p;
};

int require(std::initializer_list<Ptr> ps) {
    for (const auto& p : ps)
        if (!p.p) return fail(M2K_ERR_INVALID_ARG, "ssd: args.%s is NULL", p.name);
    return M2K_OK;
}

// Raises the dynamic shared-memory limit of a kernel where it needs more than
// the default 48 KB, and asks for the largest shared-memory carveout, so that
// the MINB blocks its registers allow also fit in shared memory.
template <typename K> int allow_smem(K kernel, int bytes) {
    if (int e = status(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            int(cudaSharedmemCarveoutMaxShared))))
        return e;
    if (bytes <= 48 * 1024) return M2K_OK;
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (bytes > optin)
        return fail(M2K_ERR_UNSUPPORTED, "ssd: needs %d bytes of shared memory per block, the device allows %d", bytes,
                    optin);
    return status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Shared-memory bytes of each kernel.
template <typename T> constexpr int smem_bmm() { return Smem<T>::bytes(1, 0); }
template <typename T> constexpr int smem_state() { return Smem<T>::bytes(1, MAXQ); }
template <typename T> constexpr int smem_scan() { return Smem<T>::bytes(1, 2 * MAXQ); }
template <typename T> constexpr int smem_dcb() { return Smem<T>::bytes(3, 2 * MAXQ); }
template <typename T> constexpr int smem_dbc() { return Smem<T>::bytes(3, 2 * MAXQ); }
template <typename T> constexpr int smem_dx() { return Smem<T>::bytes(1, 2 * MAXQ); }

// Steps (0)–(3) of the forward, shared by m2k_ssd_fwd and the backward's
// recomputation: dt and cs, CB, chunk states, state passing.
template <typename T>
int forward_states(const Geo& g, const Ws& w, const T* x, const void* dt_raw, const void* dt_bias,
                   const void* A_log, const T* B, const T* C, const void* init, void* final_state, void* log_decay,
                   cudaStream_t st) {
    const int BH = g.Bt * g.H, BG = g.Bt * g.G;
    chunk_cumsum_kernel<T><<<BH, NT, 0, st>>>(g, static_cast<const T*>(dt_raw), static_cast<const float*>(dt_bias),
                                              static_cast<const float*>(A_log), w.dt, w.cs,
                                              static_cast<float*>(log_decay));
    if (int e = allow_smem(bmm_chunk_kernel<T>, smem_bmm<T>())) return e;
    bmm_chunk_kernel<T><<<dim3(BG, g.nc, g.nI * (g.nI + 1) / 2), NT, smem_bmm<T>(), st>>>(g, B, C, w.cb);
    if (int e = allow_smem(chunk_state_kernel<T, false>, smem_state<T>())) return e;
    chunk_state_kernel<T, false><<<dim3(BH, g.nc, g.nPt * g.nNt), NT, smem_state<T>(), st>>>(g, x, g.xs, B, g.bs, w.dt,
                                                                                            w.cs, w.st);
    state_passing_fwd_kernel<<<dim3(BH, g.nEb), NT, 0, st>>>(g, w.cs, w.st, static_cast<const float*>(init),
                                                            static_cast<float*>(final_state));
    return launch_status();
}

template <typename T> int forward(const Geo& g, const Ws& w, const m2k_ssd_fwd_args* a, cudaStream_t st) {
    const T* x = static_cast<const T*>(a->x);
    const T* B = static_cast<const T*>(a->B);
    const T* C = static_cast<const T*>(a->C);
    if (int e = forward_states<T>(g, w, x, a->dt_raw, a->dt_bias, a->A_log, B, C, a->init_state, a->final_state,
                                  a->log_decay, st))
        return e;
    if (int e = allow_smem(chunk_scan_fwd_kernel<T>, smem_scan<T>())) return e;
    chunk_scan_fwd_kernel<T><<<dim3(g.Bt * g.H, g.nc, g.nI * g.nPt), NT, smem_scan<T>(), st>>>(
        g, x, C, static_cast<const float*>(a->D), w.dt, w.cs, w.st, w.cb, static_cast<T*>(a->y));
    return launch_status();
}

template <typename T> int backward(const Geo& g, const Ws& w, const m2k_ssd_bwd_args* a, cudaStream_t st) {
    const T* x = static_cast<const T*>(a->x);
    const T* B = static_cast<const T*>(a->B);
    const T* C = static_cast<const T*>(a->C);
    const T* dy = static_cast<const T*>(a->dy);
    const int BH = g.Bt * g.H, BG = g.Bt * g.G;
    if (!a->fwd_workspace) {
        if (int e = forward_states<T>(g, w, x, a->dt_raw, a->dt_bias, a->A_log, B, C, a->init_state, nullptr, nullptr,
                                      st))
            return e;
    }
    // B1: dP_c into gst[c].
    if (int e = allow_smem(chunk_state_kernel<T, true>, smem_state<T>())) return e;
    chunk_state_kernel<T, true><<<dim3(BH, g.nc, g.nPt * g.nNt), NT, smem_state<T>(), st>>>(g, dy, g.ys, C, g.css,
                                                                                           w.dt, w.cs, w.gst);
    // B2.
    state_passing_bwd_kernel<<<dim3(BH, g.nEb), NT, 0, st>>>(g, w.cs, w.st, w.gst,
                                                            static_cast<const float*>(a->dfinal_state),
                                                            static_cast<float*>(a->dinit_state), w.dlam_part);
    // B3, B4.
    if (int e = allow_smem(chunk_dcb_kernel<T>, smem_dcb<T>())) return e;
    const int nTri = g.nI * (g.nI + 1) / 2;
    chunk_dcb_kernel<T><<<dim3(BG, g.nc, nTri * g.nS), NT, smem_dcb<T>(), st>>>(g, x, dy, w.dt, w.cs, w.cb, w.dcb,
                                                                              w.dcb_part, w.da_part);
    if (g.nS > 1) dcb_sum_kernel<<<dim3(BG * g.nc, nTri), NT, 0, st>>>(g, w.dcb_part, w.dcb);
    if (int e = allow_smem(chunk_dbc_kernel<T>, smem_dbc<T>())) return e;
    const int slots = g.nS > 1 ? g.nS + 1 : 1;
    chunk_dbc_kernel<T><<<dim3(BG, g.nc, g.nI * g.nNt * 2 * slots), NT, smem_dbc<T>(), st>>>(
        g, x, dy, B, C, w.dt, w.cs, w.st, w.gst, w.dcb, static_cast<T*>(a->dB), static_cast<T*>(a->dC), w.dbc_part,
        w.u_part, w.v_part);
    if (g.nS > 1)
        dbc_sum_kernel<T><<<dim3(BG * g.nc * 2, int(ceil_div(int64_t(g.Q) * g.N, NT))), NT, 0, st>>>(
            g, w.dbc_part, static_cast<T*>(a->dB), static_cast<T*>(a->dC));
    if (int e = allow_smem(chunk_dx_kernel<T>, smem_dx<T>())) return e;
    chunk_dx_kernel<T><<<dim3(BH, g.nc, g.nI * g.nPt), NT, smem_dx<T>(), st>>>(
        g, x, dy, B, static_cast<const float*>(a->D), w.dt, w.cs, w.cb, w.gst, static_cast<T*>(a->dx), w.ddt_part,
        w.dD_part);
    chunk_da_kernel<T><<<dim3(BH, g.nc), NT, 0, st>>>(
        g, static_cast<const T*>(a->dt_raw), static_cast<const float*>(a->dt_bias),
        static_cast<const float*>(a->A_log), w.dt, w.cs, w.dlam_part, w.da_part, w.ddt_part, w.u_part, w.v_part,
        w.dD_part, static_cast<T*>(a->ddt_raw), w.bh_part, w.dD_bh);
    const int np = g.d_hdim && g.P > 32 ? g.H * g.P : 32 * g.H;  // warps of heads, or threads of D[h, p]
    ssd_params_kernel<<<int(ceil_div(np, NT)), NT, 0, st>>>(g, static_cast<const float*>(a->A_log), w.bh_part,
                                                           w.dD_bh, static_cast<float*>(a->ddt_bias),
                                                           static_cast<float*>(a->dA_log), static_cast<float*>(a->dD));
    return launch_status();
}

// Checks a workspace of kind (M2K_SSD_WS_*) given as base, bytes (what
// names it in errors) and carves it into w.
int workspace(const Geo& g, const char* what, const void* base, int64_t bytes, int kind, Ws* w) {
    const int64_t need = carve(g, nullptr, kind, w);
    if (!base) return fail(M2K_ERR_INVALID_ARG, "ssd: args.%s is NULL", what);
    if (reinterpret_cast<uintptr_t>(base) % 256 != 0)
        return fail(M2K_ERR_INVALID_ARG, "ssd: args.%s must be 256-byte aligned", what);
    if (bytes < need)
        return fail(M2K_ERR_WORKSPACE, "ssd: args.%s_bytes = %lld, need %lld", what, (long long)bytes,
                    (long long)need);
    carve(g, const_cast<void*>(base), kind, w);
    return M2K_OK;
}

}  // namespace
}  // namespace ssd
}  // namespace m2k

using namespace m2k;
using namespace m2k::ssd;

extern "C" {

int m2k_ssd_workspace_size(const m2k_ssd_shape* shape, int kind, int64_t* bytes) {
    clear_detail();
    if (!bytes) return fail(M2K_ERR_INVALID_ARG, "m2k_ssd_workspace_size: bytes is NULL");
    if (kind != M2K_SSD_WS_FWD && kind != M2K_SSD_WS_BWD && kind != M2K_SSD_WS_BWD_SAVED)
        return fail(M2K_ERR_INVALID_ARG,
                    "m2k_ssd_workspace_size: kind must be M2K_SSD_WS_FWD (0), M2K_SSD_WS_BWD (1) or "
                    "M2K_SSD_WS_BWD_SAVED (2), got %d",
                    kind);
    Geo g;
    if (int e = make_geo(shape, &g)) return e;
    Ws w;
    *bytes = carve(g, nullptr, kind, &w);
    return M2K_OK;
}

int m2k_ssd_fwd(const m2k_ssd_shape* shape, const m2k_ssd_fwd_args* a, void* stream) {
    clear_detail();
    Geo g;
    if (int e = make_geo(shape, &g)) return e;
    if (!a) return fail(M2K_ERR_INVALID_ARG, "m2k_ssd_fwd: args is NULL");
    if (int e = require({{"x", a->x}, {"dt_raw", a->dt_raw}, {"dt_bias", a->dt_bias}, {"A_log", a->A_log},
                         {"B", a->B}, {"C", a->C}, {"D", a->D}, {"y", a->y}}))
        return e;
    Ws w;
    if (int e = workspace(g, "workspace", a->workspace, a->workspace_bytes, M2K_SSD_WS_FWD, &w)) return e;
    cudaStream_t st = as_stream(stream);
    return shape->dtype == M2K_BF16 ? forward<__nv_bfloat16>(g, w, a, st) : forward<float>(g, w, a, st);
}

int m2k_ssd_bwd(const m2k_ssd_shape* shape, const m2k_ssd_bwd_args* a, void* stream) {
    clear_detail();
    Geo g;
    if (int e = make_geo(shape, &g)) return e;
    if (!a) return fail(M2K_ERR_INVALID_ARG, "m2k_ssd_bwd: args is NULL");
    if (int e = require({{"x", a->x}, {"dt_raw", a->dt_raw}, {"dt_bias", a->dt_bias}, {"A_log", a->A_log},
                         {"B", a->B}, {"C", a->C}, {"D", a->D}, {"dy", a->dy}, {"dx", a->dx}, {"ddt_raw", a->ddt_raw},
                         {"dB", a->dB}, {"dC", a->dC}, {"ddt_bias", a->ddt_bias}, {"dA_log", a->dA_log},
                         {"dD", a->dD}}))
        return e;
    Ws w;
    if (a->fwd_workspace) {
        if (int e = workspace(g, "fwd_workspace", a->fwd_workspace, a->fwd_workspace_bytes, M2K_SSD_WS_FWD, &w))
            return e;
        if (int e = workspace(g, "workspace", a->workspace, a->workspace_bytes, M2K_SSD_WS_BWD_SAVED, &w)) return e;
    } else if (int e = workspace(g, "workspace", a->workspace, a->workspace_bytes, M2K_SSD_WS_BWD, &w)) {
        return e;
    }
    cudaStream_t st = as_stream(stream);
    return shape->dtype == M2K_BF16 ? backward<__nv_bfloat16>(g, w, a, st) : backward<float>(g, w, a, st);
}

}  // extern "C"
