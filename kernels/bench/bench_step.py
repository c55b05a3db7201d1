"""The PyTorch baseline of tools/gpubench: full training steps of the Mamba-2
language model built by mamba_ssm (MambaLMHeadModel with Mamba2 layers and its
Triton kernels), at the same shapes, on one GPU; and the table that sets the
two results side by side.

    python3 kernels/bench/bench_step.py --mamba .mamba_ref --json torch.json
    python3 kernels/bench/bench_step.py --table --ours ours.json --theirs torch.json [--out step-bench.md]

--mamba is a directory holding the mamba_ssm Python package sources; the
package's __init__ (which imports compiled extensions) is not run. The step
is the usual mixed-precision recipe: fp32 parameters, torch.autocast bf16
around forward and loss, backward, clip_grad_norm_, fused AdamW (weight decay
0.1 on the matrices and the embedding, none on norms, biases, A_log, D and
dt_bias; betas 0.9, 0.95, eps 1e-8), with tools/gpubench's defaults for the
learning rate (constant) and the clipping norm, which its device step uses too.

Without the causal_conv1d package, Mamba2 runs with use_mem_eff_path=False
(its fused path, mamba_split_conv1d_scan_combined, needs causal_conv1d's
compiled functions): in_proj, nn.Conv1d + SiLU (the module's own fallback),
the Triton mamba_chunk_scan_combined, the Triton gated RMSNorm, out_proj. The
blocks' residual add + RMSNorm and the final norm are mamba_ssm's Triton
layer_norm_fn (fused_add_norm, residual in fp32). Modules that a training step
does not use and that fail to import here are replaced by stubs, and the
output names them.

Timing: CUDA events at the start of the step, after the backward, after the
clipping and after the optimizer step; the host waits for the last before the
next step. Median over the timed steps after the warm-up (the first step
compiles and autotunes the Triton kernels). Memory: torch.cuda's peak
allocated bytes over the timed steps (reset after the warm-up) and over the
whole run, and the device's total − free memory sampled after the first
backward and after every step.
"""
import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
import types

GIB = float(1 << 30)

# Modules that mixer_seq_simple imports but a Mamba2 language model's
# training step never calls, with the names the importers take from them.
OPTIONAL_MODULES = [
    ("mamba_ssm.modules.mamba_simple", ["Mamba"]),
    ("mamba_ssm.modules.mamba3", ["Mamba3"]),
    ("mamba_ssm.modules.mha", ["MHA"]),
    ("mamba_ssm.modules.mlp", ["GatedMLP"]),
    ("mamba_ssm.utils.generation", ["GenerationMixin"]),
    ("mamba_ssm.utils.hf", ["load_config_hf", "load_state_dict_hf"]),
]


def _unused(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a stub of bench_step.py (its module failed to import)")
    return fail


def _stub(modname, names):
    mod = types.ModuleType(modname)
    mod.__bench_stub__ = True
    for n in names:
        if n == "GenerationMixin":
            mod.GenerationMixin = type("GenerationMixin", (), {})  # a base class of MambaLMHeadModel
        elif n[0].isupper():
            mod.__dict__[n] = type(n, (), {"__init__": _unused(n)})
        else:
            mod.__dict__[n] = _unused(n)
    return mod


def import_mamba(src, notes):
    """Imports MambaLMHeadModel and MambaConfig from the sources in src,
    without running the package __init__; optional modules that fail to
    import are stubbed and described in notes."""
    pkg_dir = os.path.join(os.path.abspath(src), "mamba_ssm")
    if not os.path.isfile(os.path.join(pkg_dir, "models", "mixer_seq_simple.py")):
        sys.exit(f"bench_step: no mamba_ssm sources in {src} (expected {pkg_dir}/models/mixer_seq_simple.py)")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [pkg_dir]
    sys.modules["mamba_ssm"] = pkg
    for modname, names in OPTIONAL_MODULES:
        try:
            importlib.import_module(modname)
        except Exception as e:  # a missing extension, or an API the installed packages no longer have
            for k in [k for k in sys.modules if k == modname or k.startswith(modname + ".")]:
                del sys.modules[k]
            sys.modules[modname] = _stub(modname, names)
            parent, _, child = modname.rpartition(".")
            setattr(sys.modules[parent], child, sys.modules[modname])
            notes.append(f"stub: {modname} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "not used by the training step")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    import mamba_ssm.modules.mamba2 as m2
    if m2.causal_conv1d_fn is None:
        notes.append("causal_conv1d absent: Mamba2 convolves with nn.Conv1d + SiLU (its fallback), "
                     "use_mem_eff_path=False")
    else:
        notes.append("causal_conv1d present: Mamba2 convolves with causal_conv1d_fn, use_mem_eff_path=False")
    return MambaLMHeadModel, MambaConfig


def build_model(a, device, notes):
    """mamba_ssm's language model in the published Mamba-2 configuration
    (that of mamba2-130m at the default width, depth and vocabulary), fp32
    parameters on device, initialised by mamba_ssm with seed a.seed."""
    import torch
    MambaLMHeadModel, MambaConfig = import_mamba(a.mamba, notes)
    torch.manual_seed(a.seed)
    ssm_cfg = dict(layer="Mamba2", d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                   use_mem_eff_path=False)
    cfg = MambaConfig(d_model=a.d_model, d_intermediate=0, n_layer=a.n_layer, vocab_size=a.vocab, ssm_cfg=ssm_cfg,
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16,
                      tie_embeddings=True)
    model = MambaLMHeadModel(cfg, device=device, dtype=torch.float32)
    model.train()
    return model


def param_groups(model, weight_decay):
    """Weight decay on the matrices, the conv weights and the embedding; none
    on vectors (norms, biases, A_log, D, dt_bias), as model.Layout marks."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run(a):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        sys.exit(f"bench_step: PyTorch is not installed: {e}")
    if not torch.cuda.is_available():
        sys.exit("bench_step: torch sees no CUDA device")
    try:
        import einops  # noqa: F401  mamba_ssm's modules use rearrange/repeat
    except ImportError:
        sys.exit("bench_step: the einops package is missing; mamba_ssm's modules need it")
    import triton

    dev = torch.device("cuda")
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    used_open = total - free

    notes = []
    model = build_model(a, dev, notes)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.lm_head.weight.shape[0]
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    g = torch.Generator(device=dev)
    g.manual_seed(a.seed)
    tokens = torch.randint(0, vocab, (a.batch, a.seq_len + 1), device=dev, generator=g)
    rows = a.batch // a.micro_batches
    micro = [(tokens[k * rows:(k + 1) * rows, :-1].contiguous(), tokens[k * rows:(k + 1) * rows, 1:].contiguous())
             for k in range(a.micro_batches)]
    clip = a.max_grad_norm if a.max_grad_norm > 0 else math.inf  # inf: the norm is computed, nothing is scaled
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    peak_used = used_open

    def sample():
        nonlocal peak_used
        f, t = torch.cuda.mem_get_info()
        peak_used = max(peak_used, t - f)

    def step(first):
        t0 = time.perf_counter()
        ev[0].record()
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for x, y in micro:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x).logits
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            (loss / a.micro_batches).backward()
            loss_sum += loss.detach()
            del logits, loss
        ev[1].record()
        if first:
            sample()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        ev[2].record()
        opt.step()
        ev[3].record()
        ev[3].synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        loss, norm = loss_sum.item() / a.micro_batches, norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            sys.exit(f"bench_step: training diverged: loss {loss}, gradient norm {norm}")
        sample()
        return dict(fwd_bwd=ev[0].elapsed_time(ev[1]), clip=ev[1].elapsed_time(ev[2]),
                    optimizer=ev[2].elapsed_time(ev[3]), total=ev[0].elapsed_time(ev[3]), wall=wall), loss

    timed, losses, first_wall, peak_alloc_warmup = [], [], 0.0, 0
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            peak_alloc_warmup = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        st, loss = step(i == 0)
        losses.append(loss)
        if i == 0:
            first_wall = st["wall"]
        if i >= a.warmup:
            timed.append(st)

    def med(k):
        return statistics.median(s[k] for s in timed)

    tokens_per_step = a.batch * a.seq_len
    r = dict(
        tool="pytorch+mamba_ssm", device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__,
        precision="torch.autocast bf16, fp32 parameters, gradients and AdamW moments (fused AdamW)",
        path="MambaLMHeadModel(Mamba2, use_mem_eff_path=False); fused_add_norm, residual_in_fp32",
        notes=notes,
        d_model=a.d_model, n_layer=a.n_layer, vocab_size=vocab, parameters=n_params,
        batch=a.batch, seq_len=a.seq_len, micro_batches=a.micro_batches, tokens_per_step=tokens_per_step,
        warmup_steps=a.warmup, timed_steps=a.steps, lr=a.lr, max_grad_norm=a.max_grad_norm,
        fwd_bwd_ms=med("fwd_bwd"), grad_norm_ms=med("clip"), optimizer_ms=med("optimizer"), step_ms=med("total"),
        step_wall_ms=med("wall"), step_ms_all=[round(s["total"], 3) for s in timed], first_step_wall_ms=first_wall,
        device_total_bytes=total, used_at_open_bytes=used_open, used_peak_bytes=peak_used,
        model_peak_bytes=peak_used - used_open,
        peak_allocated_bytes=torch.cuda.max_memory_allocated(),
        peak_allocated_warmup_bytes=max(peak_alloc_warmup, torch.cuda.max_memory_allocated()),
        peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        loss_first=losses[0], loss_last=losses[-1],
    )
    r["tokens_per_s"] = tokens_per_step / (r["step_ms"] / 1e3)
    r["tokens_per_s_wall"] = tokens_per_step / (r["step_wall_ms"] / 1e3)

    print(f"device: {r['device']}, torch {r['torch']}, triton {r['triton']}")
    print(f"model: mamba_ssm {r['path']}; d_model {a.d_model}, {a.n_layer} layers, vocab {vocab}; {n_params} parameters")
    print(f"step: batch {a.batch} x {a.seq_len} tokens ({tokens_per_step}), {a.micro_batches} micro-batch(es); "
          f"{r['precision']}; lr {a.lr}, clip {a.max_grad_norm}")
    for n in notes:
        print("note:", n)
    print(f"timing: median of {a.steps} steps after {a.warmup} warm-up, CUDA events; "
          f"first step {first_wall / 1e3:.1f} s (Triton compilation and autotuning)\n")
    rows_out = [("forward + backward (incl. zero_grad)", r["fwd_bwd_ms"]), ("clip_grad_norm_", r["grad_norm_ms"]),
                ("optimizer (fused AdamW)", r["optimizer_ms"])]
    for name, ms in rows_out:
        print(f"  {name:<38} {ms:9.2f} ms  {100 * ms / r['step_ms']:5.1f}%")
    print(f"  {'step (events)':<38} {r['step_ms']:9.2f} ms")
    print(f"  {'step (wall clock)':<38} {r['step_wall_ms']:9.2f} ms")
    print(f"  {'tokens/s (events)':<38} {r['tokens_per_s']:9.0f}")
    print(f"  {'tokens/s (wall clock)':<38} {r['tokens_per_s_wall']:9.0f}")
    print(f"\nall timed steps (ms): {r['step_ms_all']}\nloss: first step {r['loss_first']:.4f}, "
          f"last step {r['loss_last']:.4f}\n")
    print(f"  {'peak allocated, timed steps':<46} {r['peak_allocated_bytes'] / GIB:7.2f} GiB")
    print(f"  {'peak allocated, with warm-up (autotuning)':<46} {r['peak_allocated_warmup_bytes'] / GIB:7.2f} GiB")
    print(f"  {'peak reserved by the caching allocator':<46} {r['peak_reserved_bytes'] / GIB:7.2f} GiB")
    print(f"  {'device in use at peak (total - free)':<46} {peak_used / GIB:7.2f} GiB")
    print(f"  {'  in use after CUDA init (context)':<46} {used_open / GIB:7.2f} GiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
            f.write("\n")


def table(ours, theirs, reference, why=("", "")):
    """The markdown comparison of gpubench's JSON (ours) and this script's
    (theirs); either may be None when its run failed or has not run, which
    why (ours, theirs) then explains."""
    lines = []
    any_ = ours or theirs
    if any_ is None:
        return f"no results: gpubench {why[0] or 'failed'}, bench_step.py {why[1] or 'failed'} (see their logs)"
    dev = (theirs or {}).get("device") or (ours or {}).get("device", "?")
    lines.append(f"device: {dev}")
    a = any_
    lines.append(f"model: d_model {a['d_model']}, {a['n_layer']} layers, vocab {a['vocab_size']}, "
                 f"{a['parameters']:,} parameters; batch {a['batch']} x {a['seq_len']} tokens "
                 f"({a['tokens_per_step']:,} per step); median of {a['timed_steps']} steps after "
                 f"{a['warmup_steps']} warm-up, CUDA events")
    lines.append("")
    lines.append("| implementation | tokens/s | step ms | fwd+bwd ms | grad norm/clip ms | optimizer ms "
                 "| peak allocated GiB | device in use GiB |")
    lines.append("|---|---|---|---|---|---|---|---|")

    def row(name, r, alloc_key, reason):
        if r is None:
            return f"| {name} | {reason or 'failed'} | | | | | | |"
        return (f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                f"{r['grad_norm_ms']:.2f} | {r['optimizer_ms']:.2f} | {r[alloc_key] / GIB:.2f} | "
                f"{r['used_peak_bytes'] / GIB:.2f} |")

    lines.append(row(f"libm2kernels, gpubench ({(ours or {}).get('precision', 'bf16')})", ours, "model_peak_bytes",
                     why[0]))
    lines.append(row("PyTorch + mamba_ssm (autocast bf16)", theirs, "peak_allocated_bytes", why[1]))
    if ours and theirs:
        lines.append(f"| ours / PyTorch | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f} | "
                     f"{ours['step_ms'] / theirs['step_ms']:.2f} | {ours['fwd_bwd_ms'] / theirs['fwd_bwd_ms']:.2f} | "
                     f"{ours['grad_norm_ms'] / theirs['grad_norm_ms']:.2f} | "
                     f"{ours['optimizer_ms'] / theirs['optimizer_ms']:.2f} | "
                     f"{ours['model_peak_bytes'] / theirs['peak_allocated_bytes']:.2f} | "
                     f"{ours['used_peak_bytes'] / theirs['used_peak_bytes']:.2f} |")
    lines.append("")
    if ours and theirs:
        lines.append("- Ratios are ours / PyTorch in every column: above 1 is better for tokens/s, below 1 is better "
                     "for times and memory.")
    lines.append("- Peak allocated: ours is the device memory in use at its peak minus that in use when the library "
                 "opened (every cudaMalloc of the model, cuBLASLt's workspace and the loaded kernels); PyTorch's is "
                 "torch.cuda.max_memory_allocated over the timed steps. Device in use: total - free at the peak, "
                 "CUDA context and PyTorch's cache included.")
    if ours:
        lines.append(f"- Ours, arithmetic: parameters, gradients, moments and bf16 copies "
                     f"{ours['parameter_bytes'] / GIB:.2f} GiB + activations {ours['activation_bytes'] / GIB:.2f} GiB "
                     f"(gpu.ParameterBytes, gpu.ActivationBytes); loss {ours['loss_first']:.3f} -> "
                     f"{ours['loss_last']:.3f}; {ours.get('device', '')}.")
    if theirs:
        lines.append(f"- PyTorch: torch {theirs['torch']}, triton {theirs['triton']}; {theirs['path']}; "
                     f"{theirs['precision']}; peak allocated with the warm-up's autotuning "
                     f"{theirs['peak_allocated_warmup_bytes'] / GIB:.2f} GiB; loss {theirs['loss_first']:.3f} -> "
                     f"{theirs['loss_last']:.3f}.")
        for n in theirs.get("notes", []):
            lines.append(f"- PyTorch, {n}.")
    if reference:
        lines.append(f"- Not measured in this run: {reference}.")
    return "\n".join(lines)


def load(path):
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"bench_step: cannot read {path}: {e}", file=sys.stderr)
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mamba", default=".mamba_ref", help="directory holding the mamba_ssm package sources")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50288, help="vocabulary (padded to a multiple of 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping (the norm is computed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="", help="write the results as JSON to this file")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --ours and --theirs")
    ap.add_argument("--ours", default="", help="gpubench's JSON (with --table)")
    ap.add_argument("--theirs", default="", help="this script's JSON (with --table)")
    ap.add_argument("--ours-status", default="", help="with --table: what to print for a missing --ours result")
    ap.add_argument("--theirs-status", default="", help="with --table: what to print for a missing --theirs result")
    ap.add_argument("--reference", default="", help="a figure measured elsewhere, printed under the table")
    ap.add_argument("--out", default="", help="also write the table to this file (with --table)")
    a = ap.parse_args()
    if a.table:
        text = table(load(a.ours), load(a.theirs), a.reference, (a.ours_status, a.theirs_status))
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
        return
    for name in ("d_model", "n_layer", "vocab", "batch", "seq_len", "micro_batches", "steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.batch % a.micro_batches:
        ap.error(f"--micro-batches {a.micro_batches} must divide --batch {a.batch}")
    if a.max_grad_norm < 0:
        ap.error(f"--max-grad-norm must be >= 0, got {a.max_grad_norm}")
    run(a)


if __name__ == "__main__":
    main()
