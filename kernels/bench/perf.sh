#!/usr/bin/env bash
# The GPU performance table: our kernels against the published PyTorch /
# mamba_ssm path on one GPU, each pair in the same run, with the ratios, the
# targets, our TFLOP/s and their fraction of the bf16 GEMM peak measured in
# the same run (kernels/bench/perf_table.py prints it).
#
#   kernels/bench/perf.sh [--no-build] [--parts "gemm ssd step130m step2.7b"] [--rounds R] [--budget S]
#
# Parts:
#   gemm      bf16 GEMM rate through torch.matmul (gemm_peak.py)
#   ssd       the SSD scan, forward and forward + backward, at the three
#             shapes of the table, R rounds (default 2), each shape and
#             round a fresh process: mamba_ssm autotunes its Triton kernels
#             in every process and its time moves with the pick, so the
#             table takes its fastest round and our median
#   step130m  the 130M training step (step.sh)
#   step2.7b  the 2.7B shape, all 64 layers at batch 2 × 2048 (step.sh
#             --model "--d-model 2560 --n-layer 64 --batch 2")
# All parts fit one call of about 15 minutes; to split them over calls, run
# with the same OUT and different --parts: each part leaves its JSON in
# $OUT/perf/ and the table is rebuilt from all of them.
#
# Run from the repository root on the GPU machine, with .devbin/gpubench
# and the mamba_ssm sources in .mamba_ref/ as step.sh needs them. OUT
# (default: a temporary directory) receives perf/ with the JSON, the logs
# and perf.md. --budget S (default 570) bounds the script; a part that
# would start with less than 30 s left is skipped and shows as not run.
# Environment: M2_COMMIT (the commit the table names; default git HEAD).
set -uo pipefail
# shellcheck source=kernels/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BENCH_TOOL=perf.sh

parts="gemm ssd step130m step2.7b"
rounds=2
build=1
budget=570
while (($#)); do
    case "$1" in
    --no-build) build=0 ;;
    --parts) parts="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "perf.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for p in $parts; do
    case "$p" in
    gemm | ssd | step130m | step2.7b) ;;
    *) echo "perf.sh: --parts: unknown part $p (gemm, ssd, step130m, step2.7b)" >&2; exit 2 ;;
    esac
done
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
    echo "perf.sh: --rounds must be a positive integer, got $rounds" >&2
    exit 2
fi
if [[ ! -f kernels/m2kernels.h ]]; then
    echo "perf.sh: run from the repository root" >&2
    exit 2
fi

dir="${OUT:-$(mktemp -d -t perf.XXXXXX)}/perf"
mkdir -p "$dir"
lib="$PWD/kernels/build/libm2kernels.so"
export M2_COMMIT="${M2_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
status=0

if ((build)) || [[ ! -f "$lib" ]]; then
    echo "== build libm2kernels.so" >&2
    if ! kernels/build.sh kernels/build >"$dir/build.log" 2>&1; then
        tail -40 "$dir/build.log" >&2
        echo "perf.sh: the library did not build (log: $dir/build.log)" >&2
        exit 1
    fi
fi

left() { echo $((budget - SECONDS)); }

# run NAME LIMIT CMD...: CMD through bench_run, logged to $dir/NAME.log.
run() {
    # shellcheck disable=SC2034 # set by bench_run; the table shows a missing part as not run
    local name="$1" limit="$2" part_status
    shift 2
    echo "== $name" >&2
    bench_run "$name" part_status "$limit" "$dir/$name.log" "$@"
}

declare -A ssd_flags=(
    [b8-l2048-h24]=""
    [b2-l8192-h24]="--batch 2 --seqlen 8192"
    [b2-l2048-h80]="--batch 2 --nheads 80"
)

for p in $parts; do
    case "$p" in
    gemm)
        run gemm "$(left)" python3 kernels/bench/gemm_peak.py --json "$dir/gemm.json"
        ;;
    ssd)
        for ((r = 1; r <= rounds; r++)); do
            for name in b8-l2048-h24 b2-l8192-h24 b2-l2048-h80; do
                rm -f "$dir/ssd-$name-r$r.json"
                read -r -a flags <<<"${ssd_flags[$name]}"
                run "ssd-$name-r$r" "$(left)" python3 kernels/bench/bench_ssd.py "${flags[@]}" --lib "$lib" \
                    --mamba .mamba_ref --json "$dir/ssd-$name-r$r.json"
            done
        done
        ;;
    step130m)
        run step-130m "$(left)" env OUT="$dir/step-130m" kernels/bench/step.sh --no-build --budget "$(left)"
        ;;
    step2.7b)
        run step-2.7b "$(left)" env OUT="$dir/step-2.7b" kernels/bench/step.sh --no-build --budget "$(left)" \
            --model "--d-model 2560 --n-layer 64 --batch 2"
        ;;
    esac
done

{
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "- commit: $M2_COMMIT"
    echo
    python3 kernels/bench/perf_table.py "$dir"
} >"$dir/perf.md"
cat "$dir/perf.md"
echo "results: $dir ($SECONDS s)" >&2
exit "$status"
