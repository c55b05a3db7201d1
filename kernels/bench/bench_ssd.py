"""Times the chunked SSD scan of libm2kernels.so against mamba_ssm's Triton
mamba_chunk_scan_combined, forward and forward+backward, on one GPU, and
cross-checks their outputs and gradients.

    python3 kernels/bench/bench_ssd.py --lib kernels/build/libm2kernels.so --mamba .mamba_ref

--mamba is a directory holding the mamba_ssm Python package sources (only its
Triton kernels are imported; its compiled extensions are not needed). Timing:
CUDA events around each repetition, after warm-up; the median is reported.
"""
import argparse
import ctypes
import os
import statistics
import sys
import types

import torch

F32, BF16 = 0, 1


class Shape(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("batch", "seqlen", "nheads", "headdim", "dstate", "ngroups", "chunk",
                                               "dtype", "d_has_hdim")] + \
               [("dt_min", ctypes.c_double), ("dt_max", ctypes.c_double)] + \
               [(n, ctypes.c_int64) for n in ("x_stride", "dt_stride", "b_stride", "c_stride", "y_stride")]


_P = ctypes.c_void_p


class FwdArgs(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("x", "dt_raw", "dt_bias", "A_log", "B", "C", "D", "init_state", "y",
                                  "final_state", "log_decay", "workspace")] + [("workspace_bytes", ctypes.c_int64)]


class BwdArgs(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("x", "dt_raw", "dt_bias", "A_log", "B", "C", "D", "init_state", "dy",
                                  "dfinal_state", "dx", "ddt_raw", "dB", "dC", "ddt_bias", "dA_log", "dD",
                                  "dinit_state", "workspace")] + [("workspace_bytes", ctypes.c_int64)] + \
               [("fwd_workspace", _P), ("fwd_workspace_bytes", ctypes.c_int64)]


WS_FWD, WS_BWD, WS_BWD_SAVED = 0, 1, 2  # m2k_ssd_workspace_size kinds


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def import_mamba(src):
    # Register an empty mamba_ssm package so that importing its Triton module
    # does not run the package __init__ (which needs compiled extensions).
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [os.path.join(src, "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ssd_flops(Bt, L, H, P, N, G, Q):
    """Matrix-product FLOPs of one SSD forward by the chunked algorithm, the
    convention of our TFLOP/s figures: per chunk of Q positions and head, the
    chunk state (x^T B: 2QPN), the state's contribution to y (C Hin: 2QPN)
    and the causal half of (CB o decay) x (Q^2 P); per chunk and group the
    causal half of C B^T (Q^2 N). Backward is counted as twice the forward
    (the usual 1:2), its recomputation not at all."""
    nc = -(-L // Q)
    return nc * Bt * (H * (4 * Q * P * N + Q * Q * P) + G * Q * Q * N)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def report(a, lines, ours_fwdbwd, t, baseline):
    """Prints lines (with --profile, a per-kernel table of ours after them)
    and writes them to --out, and our times t to --json with the baseline's
    fields (None with --ours-only)."""
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                ours_fwdbwd()
            torch.cuda.synchronize()
        lines += ["", "per-kernel time of 10 x (our forward + backward):",
                  prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)]
    text = "\n".join(lines)
    print(text)
    if a.json:
        import json
        Bt, L, H, P, N, G, Q = a.batch, a.seqlen, a.nheads, a.headdim, a.dstate, a.ngroups, a.chunk
        doc = dict(tool="bench_ssd", device=torch.cuda.get_device_name(), torch=torch.__version__,
                   shape=dict(batch=Bt, seqlen=L, nheads=H, headdim=P, dstate=N, ngroups=G, chunk=Q, dtype="bf16"),
                   warmup=a.warmup, reps=a.reps, flops_fwd=ssd_flops(Bt, L, H, P, N, G, Q),
                   recompute=a.recompute,
                   ours_fwd_ms=t["ours_fwd"], ours_fwdbwd_ms=t["ours_fwdbwd"])
        doc.update(baseline or {})
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="kernels/build/libm2kernels.so")
    ap.add_argument("--mamba", default=".mamba_ref")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nheads", type=int, default=24)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="")
    ap.add_argument("--json", default="", help="also write the times, the shape and the cross-check as JSON here")
    ap.add_argument("--profile", action="store_true", help="also print the time of each of our kernels")
    ap.add_argument("--recompute", action="store_true",
                    help="our backward recomputes the forward's intermediates instead of reading the forward's "
                         "workspace (Options.RecomputeSSD of the trainer)")
    ap.add_argument("--ours-only", action="store_true",
                    help="time our kernels alone (no mamba_ssm: no baseline, no cross-check), to compare builds")
    a = ap.parse_args()

    lib = ctypes.CDLL(os.path.abspath(a.lib))
    for f in ("m2k_ssd_fwd", "m2k_ssd_bwd", "m2k_ssd_workspace_size"):
        getattr(lib, f).restype = ctypes.c_int
    lib.m2k_error_string.restype = ctypes.c_char_p
    lib.m2k_last_error_detail.restype = ctypes.c_char_p

    def check(code, what):
        if code:
            raise RuntimeError(f"{what}: {lib.m2k_error_string(code).decode()} ({code}): "
                               f"{lib.m2k_last_error_detail().decode()}")

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    Bt, L, H, P, N, G, Q = a.batch, a.seqlen, a.nheads, a.headdim, a.dstate, a.ngroups, a.chunk
    x = torch.randn(Bt, L, H, P, device=dev, dtype=bf)
    dt_raw = (torch.randn(Bt, L, H, device=dev) - 3).to(bf)
    dt_bias = torch.randn(H, device=dev) * 0.5
    A_log = torch.log(torch.rand(H, device=dev) * 15 + 1)
    B = torch.randn(Bt, L, G, N, device=dev, dtype=bf)
    C = torch.randn(Bt, L, G, N, device=dev, dtype=bf)
    D = torch.randn(H, device=dev)
    dy = torch.randn(Bt, L, H, P, device=dev, dtype=bf)

    shape = Shape(batch=Bt, seqlen=L, nheads=H, headdim=P, dstate=N, ngroups=G, chunk=Q, dtype=BF16)
    nfwd, nbwd = ctypes.c_int64(), ctypes.c_int64()
    check(lib.m2k_ssd_workspace_size(ctypes.byref(shape), WS_FWD, ctypes.byref(nfwd)), "workspace")
    check(lib.m2k_ssd_workspace_size(ctypes.byref(shape), WS_BWD if a.recompute else WS_BWD_SAVED,
                                     ctypes.byref(nbwd)), "workspace")
    ws_f = torch.empty(nfwd.value, dtype=torch.uint8, device=dev)
    ws_b = torch.empty(nbwd.value, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    fin = torch.empty(Bt, H, P, N, device=dev)
    g = {k: torch.empty_like(v) for k, v in dict(x=x, dt=dt_raw, B=B, C=C, dt_bias=dt_bias, A_log=A_log, D=D).items()}
    fa = FwdArgs(x=ptr(x), dt_raw=ptr(dt_raw), dt_bias=ptr(dt_bias), A_log=ptr(A_log), B=ptr(B), C=ptr(C), D=ptr(D),
                 y=ptr(y), final_state=ptr(fin), workspace=ptr(ws_f), workspace_bytes=nfwd.value)
    ba = BwdArgs(x=ptr(x), dt_raw=ptr(dt_raw), dt_bias=ptr(dt_bias), A_log=ptr(A_log), B=ptr(B), C=ptr(C), D=ptr(D),
                 dy=ptr(dy), dx=ptr(g["x"]), ddt_raw=ptr(g["dt"]), dB=ptr(g["B"]), dC=ptr(g["C"]),
                 ddt_bias=ptr(g["dt_bias"]), dA_log=ptr(g["A_log"]), dD=ptr(g["D"]), workspace=ptr(ws_b),
                 workspace_bytes=nbwd.value)
    if not a.recompute:  # the backward reads what the forward left in its workspace
        ba.fwd_workspace, ba.fwd_workspace_bytes = ptr(ws_f), nfwd.value

    def ours_fwd():
        s = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(lib.m2k_ssd_fwd(ctypes.byref(shape), ctypes.byref(fa), s), "m2k_ssd_fwd")

    def ours_fwdbwd():
        ours_fwd()
        s = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(lib.m2k_ssd_bwd(ctypes.byref(shape), ctypes.byref(ba), s), "m2k_ssd_bwd")

    if a.ours_only:
        t = {"ours_fwd": timed(ours_fwd, a.warmup, a.reps), "ours_fwdbwd": timed(ours_fwdbwd, a.warmup, a.reps)}
        lines = [f"device: {torch.cuda.get_device_name()}, library {a.lib}",
                 f"shape: batch {Bt}, L {L}, heads {H}, headdim {P}, d_state {N}, groups {G}, chunk {Q}, bf16; "
                 f"median of {a.reps} reps after {a.warmup} warm-up, CUDA events; our backward "
                 f"{'recomputes the forward' if a.recompute else 'reads the forward workspace'}",
                 "", "| pass | libm2kernels (ms) |", "|---|---|",
                 f"| forward | {t['ours_fwd']:.3f} |", f"| forward + backward | {t['ours_fwdbwd']:.3f} |"]
        report(a, lines, ours_fwdbwd, t, None)
        return
    scan = import_mamba(a.mamba)
    A = -torch.exp(A_log)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dt_raw, A, B, C, D, dt_bias)]

    def mamba_fwd():
        with torch.no_grad():
            return scan(x, dt_raw, A, B, C, Q, D=D, dt_bias=dt_bias, dt_softplus=True)

    def mamba_fwdbwd():
        for t in leaves:
            t.grad = None
        lx, ldt, lA, lB, lC, lD, lbias = leaves
        out = scan(lx, ldt, lA, lB, lC, Q, D=lD, dt_bias=lbias, dt_softplus=True)
        out.backward(dy)

    # Cross-check against mamba_ssm (both bf16, so differences are rounding).
    ours_fwdbwd()
    torch.cuda.synchronize()
    my = mamba_fwd()
    mamba_fwdbwd()
    lx, ldt, lA, lB, lC, lD, lbias = leaves
    checks = [("y", y, my), ("dx", g["x"], lx.grad), ("ddt_raw", g["dt"], ldt.grad), ("dB", g["B"], lB.grad),
              ("dC", g["C"], lC.grad), ("dD", g["D"], lD.grad), ("ddt_bias", g["dt_bias"], lbias.grad),
              ("dA_log", g["A_log"], lA.grad * A)]

    t = {
        "ours_fwd": timed(ours_fwd, a.warmup, a.reps),
        "mamba_fwd": timed(mamba_fwd, a.warmup, a.reps),
        "ours_fwdbwd": timed(ours_fwdbwd, a.warmup, a.reps),
        "mamba_fwdbwd": timed(mamba_fwdbwd, a.warmup, a.reps),
    }
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"shape: batch {Bt}, L {L}, heads {H}, headdim {P}, d_state {N}, groups {G}, chunk {Q}, bf16; "
             f"median of {a.reps} reps after {a.warmup} warm-up, CUDA events; our backward "
                 f"{'recomputes the forward' if a.recompute else 'reads the forward workspace'}",
             "",
             "| pass | mamba_ssm Triton (ms) | libm2kernels (ms) | ours / Triton |",
             "|---|---|---|---|",
             f"| forward | {t['mamba_fwd']:.3f} | {t['ours_fwd']:.3f} | {t['ours_fwd'] / t['mamba_fwd']:.2f} |",
             f"| forward + backward | {t['mamba_fwdbwd']:.3f} | {t['ours_fwdbwd']:.3f} | "
             f"{t['ours_fwdbwd'] / t['mamba_fwdbwd']:.2f} |",
             "",
             "max|ours − mamba_ssm| / max|mamba_ssm|: " + ", ".join(f"{n} {rel(o, m):.2e}" for n, o, m in checks)]
    doc = dict(triton_fwd_ms=t["mamba_fwd"], triton_fwdbwd_ms=t["mamba_fwdbwd"],
               max_rel_diff={n: rel(o, m) for n, o, m in checks})
    report(a, lines, ours_fwdbwd, t, doc)


if __name__ == "__main__":
    main()
