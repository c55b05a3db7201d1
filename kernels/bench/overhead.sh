#!/usr/bin/env bash
# The per-step cost of small models on the CUDA backend, before and after
# the step-overhead work, in one run: tools/gpubench on the MQAR sweep's
# tiny model (--preset mqar-tiny: d_model 64, 2 layers, vocabulary 8192,
# d_state 64, batch 64 × 256, f32) driven by the backend's calls (--loop
# model) and by worker/train's TrainStep on the MQAR task (--loop trainer),
# the sweep's largest point (d_model 128, d_state 256), the tiny model in
# bf16, and the 130M step; each as it runs now ("new") and as it ran before
# ("base": the LM head over every position, no prefetch of the next step's
# batches, and with --base the library built from that older kernel tree),
# then a markdown table.
#
#   kernels/bench/overhead.sh [--no-build] [--base DIR] [--no-130m] [--ncu] [--steps N]
#
# Run from the repository root on the GPU machine, with .devbin/gpubench
# built (`go build -o .devbin/gpubench ./tools/gpubench`, anywhere: no cgo).
# It builds libm2kernels.so into kernels/build/ (and DIR's into
# DIR/kernels/build/; DIR holds an older commit's kernels/, e.g. from
# `git archive OLD kernels | tar -x -C DIR`) unless --no-build is given and
# the libraries exist. --ncu also profiles three tiny steps of each variant
# under Nsight Compute (kernel durations only, clocks left alone). Results
# go to $OUT (else a temporary directory): overhead.md, one JSON per run,
# logs, and Go CPU profiles of the tiny trainer loop.
set -uo pipefail

build=1
big=1
ncu=0
steps=50
base=""
while (($#)); do
    case "$1" in
    --no-build) build=0 ;;
    --base) base="$2"; shift ;;
    --no-130m) big=0 ;;
    --ncu) ncu=1 ;;
    --steps) steps="$2"; shift ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "overhead.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

root="$(pwd)"
if [[ ! -f "$root/kernels/m2kernels.h" ]]; then
    echo "overhead.sh: run from the repository root" >&2
    exit 2
fi
bench="$root/.devbin/gpubench"
if [[ ! -x "$bench" ]]; then
    echo "overhead.sh: .devbin/gpubench is missing: go build -o .devbin/gpubench ./tools/gpubench" >&2
    exit 2
fi
dir="${OUT:-$(mktemp -d -t overhead.XXXXXX)}"
mkdir -p "$dir"
lib="$root/kernels/build/libm2kernels.so"
export M2K_LIB="$lib"

{
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo "- nvcc: $(nvcc --version 2>/dev/null | tail -2 | head -1)"
    echo "- commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$dir/overhead-env.txt"
cat "$dir/overhead-env.txt"

# build KERNELS_DIR NAME: builds KERNELS_DIR/build/libm2kernels.so.
build() {
    local src="$1" name="$2" t0=$SECONDS
    if ! "$src/build.sh" "$src/build" >"$dir/overhead-build-$name.log" 2>&1; then
        tail -40 "$dir/overhead-build-$name.log" >&2
        echo "overhead.sh: the $name library did not build" >&2
        return 1
    fi
    echo "built the $name libm2kernels.so in $((SECONDS - t0)) s" >&2
}
baselib="$lib"
if [[ -n "$base" ]]; then
    baselib="$base/kernels/build/libm2kernels.so"
fi
if ((build)) || [[ ! -f "$lib" || ! -f "$baselib" ]]; then
    build "$root/kernels" new &
    p1=$!
    p2=""
    if [[ -n "$base" ]]; then
        build "$base/kernels" base &
        p2=$!
    fi
    wait "$p1" || exit 1
    if [[ -n "$p2" ]]; then wait "$p2" || exit 1; fi
fi

status=0
# run NAME VARIANT ARGS...: one gpubench run of variant new or base.
run() {
    local name="$1" v="$2" l="$lib"
    shift 2
    local extra=()
    if [[ "$v" == base ]]; then
        l="$baselib"
        extra=(--dense-head)
        [[ " $* " == *" trainer "* ]] && extra+=(--no-prefetch)
    fi
    echo "== $name ($v)" >&2
    if ! "$bench" --lib "$l" "$@" "${extra[@]}" --json "$dir/overhead-$name-$v.json" >"$dir/overhead-$name-$v.log" 2>&1; then
        echo "overhead.sh: $name ($v) failed:" >&2
        tail -20 "$dir/overhead-$name-$v.log" >&2
        status=1
    fi
}

tiny=(--preset mqar-tiny --warmup 5 --steps "$steps")
for v in new base; do
    run tiny-model "$v" "${tiny[@]}"
    run tiny-trainer "$v" "${tiny[@]}" --loop trainer --cpuprofile "$dir/overhead-tiny-trainer-$v.prof"
    run large-trainer "$v" "${tiny[@]}" --loop trainer --d-model 128 --d-state 256
    run tiny-bf16 "$v" "${tiny[@]}" --precision bf16
    if ((big)); then
        run 130m "$v" --warmup 3 --steps 10
    fi
done
# Once more in the other order, so that a drift of the machine shows.
for v in base new; do
    run tiny-trainer-again "$v" "${tiny[@]}" --loop trainer
done

if ((ncu)); then
    for v in new base; do
        echo "== ncu (three tiny trainer steps, $v)" >&2
        l="$lib"
        extra=()
        if [[ "$v" == base ]]; then
            l="$baselib"
            extra=(--dense-head --no-prefetch)
        fi
        ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --page raw \
            --log-file "$dir/overhead-ncu-$v.csv" "$bench" --lib "$l" --preset mqar-tiny --loop trainer \
            --warmup 1 --steps 1 "${extra[@]}" >"$dir/overhead-ncu-$v.log" 2>&1 ||
            { echo "overhead.sh: ncu ($v) failed" >&2; tail -20 "$dir/overhead-ncu-$v.log" >&2; status=1; }
    done
fi

python3 - "$dir" >"$dir/overhead.md" <<'EOF'
import glob, json, os, sys
d = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(d, "overhead-*-*.json"))):
    name, v = os.path.basename(f)[len("overhead-"):-len(".json")].rsplit("-", 1)
    rows.setdefault(name, {})[v] = json.load(open(f))
print(open(os.path.join(d, "overhead-env.txt")).read())
print("| run | loop | precision | parameters | tokens/step | step ms, events (new / base) | step ms, wall | back to back, ms per step | tokens/s back to back (new / base) | new / base |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, r in rows.items():
    new, base = r.get("new"), r.get("base")
    ref = new or base
    def f(x, k, fmt="%.2f"):
        return fmt % x[k] if x else "-"
    ratio = "%.2f" % (new["tokens_per_s_back_to_back"] / base["tokens_per_s_back_to_back"]) if new and base else "-"
    print(f"| {name} | {ref['loop']} | {ref['precision']} | {ref['parameters']:,} | {ref['tokens_per_step']:,} | "
          f"{f(new,'step_ms')} / {f(base,'step_ms')} | {f(new,'step_wall_ms')} / {f(base,'step_wall_ms')} | "
          f"{f(new,'back_to_back_ms')} / {f(base,'back_to_back_ms')} | "
          f"{f(new,'tokens_per_s_back_to_back','%.0f')} / {f(base,'tokens_per_s_back_to_back','%.0f')} | {ratio} |")

# Kernel time of the second of the three profiled trainer steps (a step
# ends with the AdamW kernel): the device's busy time, against the step.
import csv
for v in ("new", "base"):
    p = os.path.join(d, f"overhead-ncu-{v}.csv")
    if not os.path.exists(p):
        continue
    rows = list(csv.reader(open(p)))
    hi = [i for i, r in enumerate(rows) if r and r[0] == "ID"]
    if not hi:
        continue
    h = rows[hi[0]]
    data = [r for r in rows[hi[0] + 2:] if len(r) == len(h)]
    ki, ti = h.index("Kernel Name"), h.index("gpu__time_duration.sum")
    steps, cur = [], []
    for r in data:
        cur.append(r)
        if "adamw" in r[ki].lower():
            steps.append(cur)
            cur = []
    if len(steps) < 2:
        continue
    s = steps[1]
    busy = sum(float(r[ti].replace(",", "")) for r in s) / 1e6
    jp = os.path.join(d, f"overhead-tiny-trainer-{v}.json")
    tr = json.load(open(jp)) if os.path.exists(jp) else None
    frac = f", {100 * busy / tr['step_ms']:.0f}% of the {tr['step_ms']:.2f} ms step" if tr else ""
    print(f"\n- tiny trainer step, {v}: {len(s)} kernels, {busy:.2f} ms of kernel time (ncu){frac}")
EOF
cat "$dir/overhead.md"
echo "results: $dir ($SECONDS s)" >&2
exit "$status"
