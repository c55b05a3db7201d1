"""Prints the GPU performance table of kernels/bench/perf.sh from the JSON
results it leaves in one directory:

    python3 kernels/bench/perf_table.py DIR

DIR/gemm.json (gemm_peak.py), DIR/ssd-NAME-rR.json (bench_ssd.py, round R
of shape NAME, each round a fresh process), DIR/step-130m/ and
DIR/step-2.7b/ (step.sh: step-ours.json, step-torch.json). Whatever is
missing shows as "not run". Against several rounds, the published side is
its fastest round (mamba_ssm autotunes its Triton kernels anew in every
process, and the pick moves its time by up to 1.7x) and ours the median.

Needs only the standard library, so the table can be rebuilt anywhere.
"""
import glob
import json
import os
import statistics
import sys

GIB = 1 << 30

# name: (label, bench_ssd.py flags) -- perf.sh runs the same list.
SSD_SHAPES = {
    "b8-l2048-h24": "batch 8, L 2048, 24 heads",
    "b2-l8192-h24": "batch 2, L 8192, 24 heads",
    "b2-l2048-h80": "batch 2, L 2048, 80 heads (the 2.7B width)",
}
STEPS = {
    "130m": ("130M training step, batch 8 × 2048, bf16", 3.0),
    "2.7b": ("2.7B shape (d_model 2560, 64 layers, 80 heads), batch 2 × 2048, bf16", 2.0),
}
STEP_MEMORY_TARGET_GIB = 17.8  # the 130M step's peak memory target


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ssd_rounds(d, name):
    rounds = (load(p) for p in sorted(glob.glob(os.path.join(d, f"ssd-{name}-r*.json"))))
    return [r for r in rounds if r]


def fmt_ms(v):
    return f"{v:.3f} ms"


def tflops(flops, ms):
    return flops / (ms / 1e3) / 1e12


class Table:
    def __init__(self, peak):
        self.peak = peak
        self.rows = []

    def add(self, what, theirs, ours, ratio, target, met, rate):
        frac = f"{rate / self.peak:.1%}" if (rate is not None and self.peak) else "n/a"
        self.rows.append([what, theirs, ours, ratio, target, met, f"{rate:.1f}" if rate is not None else "n/a", frac])

    def missing(self, what, target, why):
        self.rows.append([what, why, why, "", target, "not measured", "", ""])

    def render(self):
        head = ["what", "published path", "libm2kernels", "ours / published", "target", "met",
                "ours TFLOP/s", "of bf16 GEMM peak"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def ssd_rows(d, t, notes):
    for name, label in SSD_SHAPES.items():
        rs = ssd_rounds(d, name)
        passes = [("forward + backward", "fwdbwd", 3)]
        if name == "b8-l2048-h24":
            passes.append(("forward alone", "fwd", 1))
        for pname, key, mult in passes:
            what = f"SSD scan {pname}, {label}"
            if not rs:
                t.missing(what, "≤ 0.5×", "not run")
                continue
            theirs = min(r[f"triton_{key}_ms"] for r in rs)
            ours = statistics.median(r[f"ours_{key}_ms"] for r in rs)
            ratio = ours / theirs
            spread = ""
            if len(rs) > 1:
                lo, hi = min(r[f"triton_{key}_ms"] for r in rs), max(r[f"triton_{key}_ms"] for r in rs)
                spread = f" (fastest of {len(rs)}; {lo:.3f}-{hi:.3f})"
            t.add(what, fmt_ms(theirs) + spread, fmt_ms(ours), f"{ratio:.2f}×", "≤ 0.5×",
                  "yes" if ratio <= 0.5 else "no", tflops(mult * rs[0]["flops_fwd"], ours))
        if rs:
            worst = max(max(v for v in r["max_rel_diff"].values()) for r in rs)
            notes.append(f"SSD {label}: largest max|ours − mamba_ssm| / max|mamba_ssm| over the outputs and "
                         f"gradients, {worst:.1e} (bf16 rounding is about 4e-3).")


def step_rows(d, t, notes):
    for name, (label, target) in STEPS.items():
        sub = os.path.join(d, f"step-{name}")
        ours, theirs = load(os.path.join(sub, "step-ours.json")), load(os.path.join(sub, "step-torch.json"))
        tgt = f"≥ {target:g}×" + (f", peak ≤ {STEP_MEMORY_TARGET_GIB} GiB" if name == "130m" else "")
        if not ours or not theirs:
            t.missing(label, tgt, "not run" if not (ours or theirs) else
                      ("ours not run" if not ours else "published path not run"))
            continue
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        mem = ours["model_peak_bytes"] / GIB
        met = ratio >= target and (name != "130m" or mem <= STEP_MEMORY_TARGET_GIB)
        rate = 6 * ours["parameters"] * ours["tokens_per_s"] / 1e12
        t.add(label, f"{theirs['tokens_per_s']:,.0f} tokens/s, {theirs['peak_allocated_bytes'] / GIB:.2f} GiB",
              f"{ours['tokens_per_s']:,.0f} tokens/s, {mem:.2f} GiB", f"{ratio:.2f}×", tgt,
              "yes" if met else "no", rate)
        notes.append(f"{label}: {ours['parameters']:,} parameters; loss after {ours['warmup_steps'] + ours['timed_steps']} "
                     f"steps on the same seeded tokens {ours['loss_first']:.3f} → {ours['loss_last']:.3f} (ours), "
                     f"{theirs['loss_first']:.3f} → {theirs['loss_last']:.3f} (PyTorch).")


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: perf_table.py DIR")
    d = sys.argv[1]
    if not os.path.isdir(d):
        raise SystemExit(f"perf_table.py: {d} is not a directory")
    gemm = load(os.path.join(d, "gemm.json"))
    t = Table(gemm["tflops"] if gemm else None)
    notes = []
    ssd_rows(d, t, notes)
    step_rows(d, t, notes)
    print(t.render())
    print()
    if gemm:
        print(f"- bf16 GEMM peak measured in the same run: {gemm['tflops']:.1f} TFLOP/s "
              f"({gemm['size']}³ products through torch.matmul, {gemm['device']}).")
    else:
        print("- bf16 GEMM peak: not run, so no fractions.")
    print("- TFLOP/s: the SSD scan's matrix-product FLOPs by the chunked algorithm (bench_ssd.py's ssd_flops; "
          "backward counted as twice the forward); the training step's 6 × parameters × tokens/s.")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
