#!/usr/bin/env bash
# A full training step of mamba2-130m (d_model 768, 24 layers, vocabulary
# 50,288) at batch 8 × 2,048 tokens on one GPU: the CUDA backend
# (tools/gpubench, bf16) against PyTorch with mamba_ssm's model and Triton
# kernels (kernels/bench/bench_step.py), one after the other in the same run,
# then a markdown table of tokens/s and peak memory with the ratios.
#
#   kernels/bench/step.sh [--no-build] [--steps N] [--warmup W] [--micro-batches K] [--budget S]
#                         [--model "FLAGS"]
#
# --model passes FLAGS, any of --d-model, --n-layer, --vocab, --batch and
# --seq-len, to both sides (their flags share these names), e.g. the 2.7B
# shape: --model "--d-model 2560 --n-layer 64 --batch 2". The published
# reference figure under the table is printed for the default model only.
#
# Run from the repository root on the GPU machine. It needs .devbin/gpubench
# (`go build -o .devbin/gpubench ./tools/gpubench`, built anywhere: no cgo, no
# CUDA) and the mamba_ssm Python sources in .mamba_ref/mamba_ssm (see
# docs/benchmarks.md). It builds libm2kernels.so into kernels/build/ first
# unless --no-build is given and the library exists. With OUT set the table
# goes to $OUT/step-bench.md and the JSON results and logs beside it;
# otherwise they go to a temporary directory, whose name is printed. The
# table is written after each run, so a run cut short leaves what it had.
# --budget S (default 570) bounds the whole script in seconds: each run gets
# what is left of it (gpubench at most 300 s, bench_step.py at most 420 s,
# whose first step compiles and autotunes mamba_ssm's Triton kernels).
# Environment: M2K_DIRS, M2K_NVCC_FLAGS (passed to kernels/build.sh),
# M2_COMMIT (the commit the table names; default git HEAD).
set -uo pipefail
# shellcheck source=kernels/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BENCH_TOOL=step.sh

steps=10
warmup=3
micro=1
build=1
budget=570
model=()
while (($#)); do
    case "$1" in
    --no-build) build=0 ;;
    --steps) steps="$2"; shift ;;
    --warmup) warmup="$2"; shift ;;
    --micro-batches) micro="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --model) read -r -a model <<<"$2"; shift ;;
    -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "step.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

root="$(pwd)"
if [[ ! -f "$root/kernels/m2kernels.h" ]]; then
    echo "step.sh: run from the repository root" >&2
    exit 2
fi
if [[ ! -x "$root/.devbin/gpubench" ]]; then
    echo "step.sh: .devbin/gpubench is missing: go build -o .devbin/gpubench ./tools/gpubench" >&2
    exit 2
fi
if [[ ! -f "$root/.mamba_ref/mamba_ssm/models/mixer_seq_simple.py" ]]; then
    echo "step.sh: the mamba_ssm sources are missing from .mamba_ref/ (docs/benchmarks.md says how to unpack them)" >&2
    exit 2
fi
if [[ -n "${OUT:-}" ]]; then
    dir="$OUT"
else
    dir="$(mktemp -d -t step-bench.XXXXXX)"
fi
mkdir -p "$dir"
lib="$root/kernels/build/libm2kernels.so"
status=0

{
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo "- nvcc: $(nvcc --version 2>/dev/null | tail -2 | head -1)"
    echo "- commit: ${M2_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    ((${#model[@]})) && echo "- model flags: ${model[*]}"
} >"$dir/step-env.txt"
cat "$dir/step-env.txt"

if ((build)) || [[ ! -f "$lib" ]]; then
    echo "== build libm2kernels.so" >&2
    t0=$SECONDS
    if ! kernels/build.sh kernels/build >"$dir/step-build.log" 2>&1; then
        tail -40 "$dir/step-build.log" >&2
        echo "step.sh: the library did not build (log: $dir/step-build.log)" >&2
        exit 1
    fi
    echo "built in $((SECONDS - t0)) s" >&2
fi

common=(--steps "$steps" --warmup "$warmup" --micro-batches "$micro" "${model[@]}")
reference="PyTorch with mamba_ssm's CUDA kernels (causal_conv1d, fused path) on one H200: 121,800 tokens/s at 21.6 GiB"
((${#model[@]})) && reference=""
ours_status="not run"
theirs_status="not run"

# left prints the seconds a run may take: what the budget has left, at most $1.
left() {
    local l=$((budget - SECONDS))
    ((l > $1)) && l=$1
    echo "$l"
}

write_table() {
    {
        cat "$dir/step-env.txt"
        echo
        python3 kernels/bench/bench_step.py --table --ours "$dir/step-ours.json" --theirs "$dir/step-torch.json" \
            --ours-status "$ours_status" --theirs-status "$theirs_status" \
            --reference "$reference" \
            2>/dev/null
    } >"$dir/step-bench.md"
}

# bench NAME STATUSVAR LIMIT CMD...: CMD through bench_run, logged to
# $dir/step-NAME.log.
bench() {
    local name="$1" var="$2" limit="$3"
    shift 3
    bench_run "$name" "$var" "$limit" "$dir/step-$name.log" "$@"
}

rm -f "$dir/step-ours.json" "$dir/step-torch.json"
echo "== gpubench (libm2kernels, bf16)" >&2
bench ours ours_status "$(left 300)" env M2K_LIB="$lib" .devbin/gpubench "${common[@]}" --precision bf16 \
    --json "$dir/step-ours.json"
write_table

echo "== bench_step.py (PyTorch + mamba_ssm)" >&2
bench torch theirs_status "$(left 420)" python3 -u kernels/bench/bench_step.py --mamba .mamba_ref "${common[@]}" \
    --json "$dir/step-torch.json"
write_table

echo "== table" >&2
cat "$dir/step-bench.md"
echo "results: $dir ($SECONDS s)" >&2
exit "$status"
