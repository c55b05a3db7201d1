"""Sums Nsight Compute's kernel durations by kernel name into a table of
milliseconds per step (kernels/bench/step_profile.sh runs it):

    python3 kernels/bench/step_profile.py PROFILE.csv --steps K [--top N]

PROFILE.csv is ncu's --csv output of --metrics gpu__time_duration.sum (any
lines before its header, such as the profiled program's own output, are
skipped); K is how many steps the profile covers.
"""
import argparse
import csv
import io
import re
import sys

UNITS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
         "second": 1e3, "s": 1e3}


def short_name(name):
    """The kernel's own name: no return type, namespaces, template
    arguments or parameters (cuBLAS kernels keep their long names)."""
    n = re.sub(r"\(.*$", "", name.strip())
    depth, out = 0, []
    for ch in n:  # drop template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    n = "".join(out).split()[-1] if "".join(out).split() else n
    return n.split("::")[-1]


def read(path):
    with open(path, newline="") as f:
        text = f.read()
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit(f"step_profile.py: {path} holds no ncu CSV table (no \"ID\" header)")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    need = {"Kernel Name", "Metric Name", "Metric Unit", "Metric Value"}
    if rows and not need <= set(rows[0]):
        raise SystemExit(f"step_profile.py: {path}: columns {sorted(need - set(rows[0]))} missing")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, required=True, help="steps the profile covers")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    if a.steps < 1 or a.top < 1:
        raise SystemExit("step_profile.py: --steps and --top must be at least 1")
    total, count = {}, {}
    for r in read(a.csv):
        if r["Metric Name"] != "gpu__time_duration.sum":
            continue
        unit = r["Metric Unit"].strip()
        if unit not in UNITS:
            raise SystemExit(f"step_profile.py: unknown time unit {unit!r} for {r['Kernel Name']}")
        ms = float(r["Metric Value"].replace(",", "")) * UNITS[unit]
        k = short_name(r["Kernel Name"])
        total[k] = total.get(k, 0.0) + ms
        count[k] = count.get(k, 0) + 1
    if not total:
        raise SystemExit("step_profile.py: no gpu__time_duration.sum rows")
    step = sum(total.values()) / a.steps
    print(f"GPU time per step, kernels one at a time: {step:.2f} ms over {sum(count.values()) / a.steps:.0f} "
          f"launches ({a.steps} steps profiled)\n")
    print("| kernel | ms per step | share | launches per step |")
    print("|---|---|---|---|")
    ranked = sorted(total, key=total.get, reverse=True)
    for k in ranked[:a.top]:
        print(f"| `{k}` | {total[k] / a.steps:.2f} | {total[k] / a.steps / step:.1%} | {count[k] / a.steps:g} |")
    rest = ranked[a.top:]
    if rest:
        ms = sum(total[k] for k in rest) / a.steps
        print(f"| {len(rest)} others | {ms:.2f} | {ms / step:.1%} | {sum(count[k] for k in rest) / a.steps:g} |")


if __name__ == "__main__":
    sys.exit(main())
