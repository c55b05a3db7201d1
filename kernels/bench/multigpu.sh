#!/usr/bin/env bash
# Data-parallel training of mamba2-130m on the GPUs of one machine: the
# CUDA backend over our gRPC collectives (tools/distbench -backend cuda
# -preset 130m) against PyTorch DistributedDataParallel over NCCL with
# mamba_ssm's model and Triton kernels (kernels/bench/bench_ddp.py), both at
# the published global batch of 256 × 2,048 tokens per optimizer step, for
# dp = 1, 2, 4, … up to the GPU count; then a markdown table of tokens/s and
# scaling efficiency with the ratios, and distbench's search for the longest
# sequence that sequence parallelism fits (-long-sp 1,2,4,…).
#
#   kernels/bench/multigpu.sh [--no-build] [--no-torch] [--no-long] [--steps N] [--grid G] [--budget S]
#                             [--distbench-flags "FLAGS"]
#
# Run from the repository root on the GPU machine. It needs .devbin/distbench
# (`go build -o .devbin/distbench ./tools/distbench`, built anywhere: no cgo,
# no CUDA) and, unless --no-torch, the mamba_ssm Python sources in
# .mamba_ref/mamba_ssm (see docs/benchmarks.md). It builds libm2kernels.so
# into kernels/build/ first unless --no-build is given and the library
# exists, and exports M2K_LIB and NCCL_NVLS_ENABLE=0,
# TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 (NVLink
# multicast stays off). Three parts, in this order: distbench over --grid
# (default 1x1,2x1,4x1,… up to the GPU count; JSON in ours.json), bench_ddp.py
# at the grid's dp values with sp 1 (ddp.json), and unless --no-long
# distbench's longest-sequence search (long.log). --steps N (default 3) is
# the timed steps per layout of both; --distbench-flags adds flags to both
# distbench runs (e.g. "-rounds 1 -overlap-baseline=false" to halve the
# first part's time). With OUT set the table goes to $OUT/multigpu.md and
# the JSON results and logs beside it; otherwise they go to a temporary
# directory, whose name is printed. The table is rewritten after each part,
# so a run cut short leaves what it had. --budget S (default 570) bounds the
# whole script in seconds: the first part may take what is left less 35% of
# the budget kept for PyTorch and 20% for the search, PyTorch what is left
# less the search's 20%, the search the rest.
# Environment: M2K_DIRS, M2K_NVCC_FLAGS (passed to kernels/build.sh); M2_COMMIT names the
# commit in the table where the checkout has no git metadata.
set -uo pipefail
# shellcheck source=kernels/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BENCH_TOOL=multigpu.sh
BENCH_KILL_AFTER=20

steps=3
build=1
torch=1
long=1
budget=570
grid=""
extra=""
# value OPTION ARGS...: fails unless OPTION is followed by a value.
value() {
    if (($# < 2)); then
        echo "multigpu.sh: $1 needs a value (see --help)" >&2
        exit 2
    fi
}
while (($#)); do
    case "$1" in
    --no-build) build=0 ;;
    --no-torch) torch=0 ;;
    --no-long) long=0 ;;
    --steps) value "$@"; steps="$2"; shift ;;
    --grid) value "$@"; grid="$2"; shift ;;
    --budget) value "$@"; budget="$2"; shift ;;
    --distbench-flags) value "$@"; extra="$2"; shift ;;
    -h | --help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "multigpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ ! "$steps" =~ ^[1-9][0-9]*$ ]]; then
    echo "multigpu.sh: --steps must be a positive integer, got '$steps'" >&2
    exit 2
fi
if [[ ! "$budget" =~ ^[1-9][0-9]*$ ]]; then
    echo "multigpu.sh: --budget must be a positive number of seconds, got '$budget'" >&2
    exit 2
fi
read -r -a extra_flags <<<"$extra"

root="$(pwd)"
if [[ ! -f "$root/kernels/m2kernels.h" ]]; then
    echo "multigpu.sh: run from the repository root" >&2
    exit 2
fi
if [[ ! -x "$root/.devbin/distbench" ]]; then
    echo "multigpu.sh: .devbin/distbench is missing: go build -o .devbin/distbench ./tools/distbench" >&2
    exit 2
fi
if ((torch)) && [[ ! -f "$root/.mamba_ref/mamba_ssm/models/mixer_seq_simple.py" ]]; then
    echo "multigpu.sh: the mamba_ssm sources are missing from .mamba_ref/ (docs/benchmarks.md says how to unpack them; --no-torch skips PyTorch)" >&2
    exit 2
fi

# The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries when it is
# set (nvidia-smi lists every GPU regardless), else nvidia-smi's list.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    ngpu=${#visible[@]}
else
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fi
if ((ngpu < 1)); then
    echo "multigpu.sh: no GPU found (nvidia-smi -L lists none)" >&2
    exit 2
fi

# pow2 prints 1,2,4,… up to the GPU count, with $1 after each number.
pow2() {
    local w=1 out=""
    while ((w <= ngpu)); do
        out+="${out:+,}$w$1"
        w=$((w * 2))
    done
    echo "$out"
}
[[ -n "$grid" ]] || grid="$(pow2 x1)"
sizes=""
IFS=, read -r -a layouts <<<"$grid"
for l in "${layouts[@]}"; do
    if [[ ! "$l" =~ ^([1-9][0-9]*)x([1-9][0-9]*)$ ]]; then
        echo "multigpu.sh: --grid: '$l' is not a layout DPxSP (e.g. 2x1)" >&2
        exit 2
    fi
    dp=${BASH_REMATCH[1]} sp=${BASH_REMATCH[2]}
    if ((dp * sp > ngpu)); then
        echo "multigpu.sh: --grid: $l needs $((dp * sp)) GPUs, this machine has $ngpu" >&2
        exit 2
    fi
    ((sp == 1)) && sizes+="${sizes:+ }$dp"
done
# PyTorch runs the grid's data-parallel layouts: its dp values with sp 1, ascending.
sizes="$(tr ' ' '\n' <<<"$sizes" | sort -n -u | paste -s -d, -)"
long_sp="$(pow2 "")"

if [[ -n "${OUT:-}" ]]; then
    dir="$OUT"
else
    dir="$(mktemp -d -t multigpu.XXXXXX)"
fi
mkdir -p "$dir"
lib="$root/kernels/build/libm2kernels.so"
status=0

export M2K_LIB="$lib"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

{
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- devices: $ngpu × $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo "- interconnect: $(nvidia-smi nvlink --status -i 0 2>/dev/null | grep -c 'GB/s') NVLink links on GPU 0"
    echo "- nvcc: $(nvcc --version 2>/dev/null | tail -2 | head -1)"
    echo "- commit: ${M2_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "- grid: $grid; PyTorch world sizes: ${sizes:-none}; timed steps: $steps; distbench flags: ${extra:-none}"
    echo "- NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS"
} >"$dir/multigpu-env.txt"
cat "$dir/multigpu-env.txt"

if ((build)) || [[ ! -f "$lib" ]]; then
    echo "== build libm2kernels.so" >&2
    t0=$SECONDS
    if ! kernels/build.sh kernels/build >"$dir/build.log" 2>&1; then
        tail -40 "$dir/build.log" >&2
        echo "multigpu.sh: the library did not build (log: $dir/build.log)" >&2
        exit 1
    fi
    echo "built in $((SECONDS - t0)) s" >&2
fi

ours_status="not run"
theirs_status="not run"
long_status="not run"
((torch)) || theirs_status="not run (--no-torch)"
((long)) || long_status="not run (--no-long)"
[[ -n "$sizes" ]] || theirs_status="not run (no layout with sp 1 in --grid)"

# left prints the seconds a part may take: what the budget has left less
# $1 seconds kept for the parts after it.
left() {
    echo $((budget - SECONDS - $1))
}

# md prints the markdown of a distbench log: its tables, and its comment
# lines as bullets, each block set apart by a blank line.
md() {
    [[ -f "$1" ]] || return 0
    awk '
        /^\|/ { if (prev != "t") print ""; print; prev = "t"; next }
        /^# / { if (prev != "c") print ""; sub(/^# +/, "- "); print; prev = "c"; next }
    ' "$1"
}

write_table() {
    {
        cat "$dir/multigpu-env.txt"
        echo
        echo "## Data parallelism: tokens/s and scaling efficiency"
        echo
        python3 kernels/bench/bench_ddp.py --table --ours "$dir/ours.json" --theirs "$dir/ddp.json" \
            --ours-status "$ours_status" --theirs-status "$theirs_status" --grid "$grid" 2>&1 ||
            echo "(bench_ddp.py --table failed)"
        echo
        echo "## distbench (ours), as printed"
        if [[ -f "$dir/ours.log" ]]; then md "$dir/ours.log"; else echo; echo "$ours_status"; fi
        echo
        echo "## Longest sequence per sp (distbench -long-sp $long_sp)"
        if [[ -f "$dir/long.log" ]]; then md "$dir/long.log"; fi
        if [[ -n "$long_status" ]]; then echo; echo "$long_status"; fi
    } >"$dir/multigpu.md"
}

# bench NAME STATUSVAR LIMIT CMD...: CMD through bench_run, logged to
# $dir/NAME.log.
bench() {
    local name="$1" var="$2" limit="$3"
    shift 3
    bench_run "$name" "$var" "$limit" "$dir/$name.log" "$@"
}

keep_torch=$((torch && ${#sizes} > 0 ? budget * 35 / 100 : 0))
keep_long=$((long ? budget * 20 / 100 : 0))
rm -f "$dir/ours.json" "$dir/ddp.json" "$dir/long.json" "$dir/ours.log" "$dir/ddp.log" "$dir/long.log"
write_table

echo "== distbench -grid $grid (libm2kernels, bf16, gRPC)" >&2
limit=$(left $((keep_torch + keep_long)))
# distbench's own -timeout ends it (and its ranks) a little before timeout(1) would.
bench ours ours_status "$limit" .devbin/distbench -backend cuda -preset 130m -grid "$grid" -steps "$steps" \
    -mem=false -timeout "$((limit > 40 ? limit - 15 : limit))s" -json "$dir/ours.json" "${extra_flags[@]}"
write_table

if ((torch)) && [[ -n "$sizes" ]]; then
    echo "== bench_ddp.py --world-sizes $sizes (PyTorch DDP + mamba_ssm)" >&2
    limit=$(left "$keep_long")
    bench ddp theirs_status "$limit" python3 -u kernels/bench/bench_ddp.py --mamba .mamba_ref --world-sizes "$sizes" \
        --steps "$steps" --timeout "$((limit > 40 ? limit - 15 : limit))" --json "$dir/ddp.json"
    write_table
fi

if ((long)); then
    echo "== distbench -long-sp $long_sp (longest sequence)" >&2
    limit=$(left 0)
    bench long long_status "$limit" .devbin/distbench -backend cuda -preset 130m -mem-only -long-sp "$long_sp" \
        -timeout "$((limit > 40 ? limit - 15 : limit))s" -json "$dir/long.json" "${extra_flags[@]}"
    write_table
fi

echo "== table" >&2
cat "$dir/multigpu.md"
echo "results: $dir ($SECONDS s)" >&2
exit "$status"
