#!/usr/bin/env bash
# Where a training step's GPU time goes, kernel by kernel: Nsight Compute
# times every kernel of a few gpubench steps (--clock-control none, one
# metric, gpu__time_duration.sum), and the kernels are summed by name into
# a table of milliseconds per step, sorted by time.
#
#   kernels/bench/step_profile.sh [--no-build] [--steps N] [-- GPUBENCH FLAGS...]
#
# gpubench runs N timed steps after one warm-up step and then N back-to-back
# steps (2N + 1 in all, default N = 1), every kernel of them profiled; the
# table divides by 2N + 1. Kernels run one at a time under ncu, so the sum
# is GPU time without overlap, launch gaps and host time excluded: compare
# it with the step time gpubench reports outside ncu; ncu's per-kernel cost
# makes the run take minutes for the 130M model (some 1,000 kernels a
# step). GPUBENCH FLAGS pick
# another model (e.g. -- --d-model 2560 --n-layer 64 --batch 2).
#
# Run from the repository root on the GPU machine, with .devbin/gpubench.
# With OUT set the table goes to $OUT/step-profile.md, the raw CSV beside it.
set -uo pipefail

steps=1
build=1
while (($#)); do
    case "$1" in
    --no-build) build=0 ;;
    --steps) steps="$2"; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "step_profile.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ "$steps" =~ ^[1-9][0-9]*$ ]]; then
    echo "step_profile.sh: --steps must be a positive integer, got $steps" >&2
    exit 2
fi
if [[ ! -x .devbin/gpubench ]]; then
    echo "step_profile.sh: .devbin/gpubench is missing: go build -o .devbin/gpubench ./tools/gpubench" >&2
    exit 2
fi
dir="${OUT:-$(mktemp -d -t step-profile.XXXXXX)}"
mkdir -p "$dir"
lib="$PWD/kernels/build/libm2kernels.so"
if ((build)) || [[ ! -f "$lib" ]]; then
    if ! kernels/build.sh kernels/build >"$dir/build.log" 2>&1; then
        tail -40 "$dir/build.log" >&2
        echo "step_profile.sh: the library did not build (log: $dir/build.log)" >&2
        exit 1
    fi
fi

M2K_LIB="$lib" ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    .devbin/gpubench --warmup 1 --steps "$steps" "$@" >"$dir/step-profile.csv" 2>"$dir/step-profile.log"
rc=$?
if ((rc != 0)); then
    tail -20 "$dir/step-profile.log" >&2
    echo "step_profile.sh: ncu or gpubench failed (exit $rc; logs in $dir)" >&2
    exit 1
fi
python3 kernels/bench/step_profile.py "$dir/step-profile.csv" --steps $((2 * steps + 1)) | tee "$dir/step-profile.md"
