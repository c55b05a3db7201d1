#!/usr/bin/env bash
# Trains the points of an MQAR sweep (m2ctl sweep mqar) at once on the GPUs
# of this machine, one process per point, points spread over the GPUs in
# turn, under the CUDA Multi-Process Service (MPS) so that the small models'
# kernels from different processes share each GPU instead of taking turns;
# then draws the table and the figure of the whole grid.
#
#   tools/mqar-grid.sh --out DIR [--m2ctl PATH] [--lrs 0.02] [--steps 12000] [--points "256:64:16 ..."]
#                      [--limit SECONDS] [--no-mps] [-- EXTRA SWEEP FLAGS]
#
# --points lists seq_len:d_model:d_state triples (default: the paper's grid,
# 256 and 512 × 64 and 128 × 16, 64 and 256); every point runs at every
# learning rate of --lrs (comma-separated), as a sweep of one point in
# DIR/points/lL-dD-nN-lrRATE (its spec, metrics, plots, checkpoint, result
# and log). When all have ended, DIR/results.csv holds the row of every
# point under DIR/points that finished, earlier runs into DIR included, and
# DIR/sweep.{png,svg} draws them, each point at its best rate (m2ctl plot
# sweep). A point run again with the same settings
# is not trained again (m2ctl sweep mqar keeps its result). --limit stops
# a point that runs longer than SECONDS (default: no limit). Needs the CUDA
# kernel library (kernels/build.sh kernels/build; $M2K_LIB) and, unless
# --no-mps, nvidia-cuda-mps-control; the MPS daemon it starts uses its own
# pipe directory under DIR and is stopped at the end.
set -uo pipefail

out=""
m2ctl="${M2CTL:-m2ctl}"
lrs="0.02"
steps=12000
points=""
limit=0
mps=1
extra=()
value() {
    if (($# < 2)); then
        echo "mqar-grid.sh: $1 needs a value (see --help)" >&2
        exit 2
    fi
}
while (($#)); do
    case "$1" in
    --out) value "$@"; out="$2"; shift ;;
    --m2ctl) value "$@"; m2ctl="$2"; shift ;;
    --lrs) value "$@"; lrs="$2"; shift ;;
    --steps) value "$@"; steps="$2"; shift ;;
    --points) value "$@"; points="$2"; shift ;;
    --limit) value "$@"; limit="$2"; shift ;;
    --no-mps) mps=0 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "mqar-grid.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$out" ]]; then
    echo "mqar-grid.sh: --out DIR is required" >&2
    exit 2
fi
if ! [[ "$steps" =~ ^[1-9][0-9]*$ && "$limit" =~ ^[0-9]+$ ]]; then
    echo "mqar-grid.sh: --steps must be a positive integer and --limit a number of seconds, got $steps and $limit" >&2
    exit 2
fi
if [[ -z "$points" ]]; then
    for L in 256 512; do for D in 64 128; do for N in 16 64 256; do points+="$L:$D:$N "; done; done; done
fi
for pt in $points; do
    if ! [[ "$pt" =~ ^[0-9]+:[0-9]+:[0-9]+$ ]]; then
        echo "mqar-grid.sh: --points: $pt is not seq_len:d_model:d_state" >&2
        exit 2
    fi
done
if ! command -v "$m2ctl" >/dev/null; then
    echo "mqar-grid.sh: $m2ctl not found (go build -o m2ctl ./tools/m2ctl, then --m2ctl ./m2ctl)" >&2
    exit 2
fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if ((ngpu == 0)); then
    echo "mqar-grid.sh: no GPU (nvidia-smi -L lists none)" >&2
    exit 2
fi
mkdir -p "$out"
common=(--steps "$steps" --backend cuda "${extra[@]}")

if ((mps)); then
    export CUDA_MPS_PIPE_DIRECTORY="$out/mps/pipe" CUDA_MPS_LOG_DIRECTORY="$out/mps/log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if ! env -u CUDA_VISIBLE_DEVICES nvidia-cuda-mps-control -d; then
        echo "mqar-grid.sh: the MPS daemon did not start (--no-mps runs without it)" >&2
        exit 1
    fi
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi

start=$(date +%s)
i=0
pids=()
dirs=()
for lr in ${lrs//,/ }; do
    for pt in $points; do
        IFS=: read -r L D N <<<"$pt"
        # Each point trains in a directory of its own, as a sweep of one
        # point: the name of a point does not carry its learning rate, so
        # two rates of a point in one directory would share their files.
        dir="$out/points/l$L-d$D-n$N-lr$lr"
        mkdir -p "$dir"
        dirs+=("$dir")
        cmd=("$m2ctl" sweep mqar --out "$dir" "${common[@]}" --seq-lens "$L" --d-models "$D" --d-states "$N" --lrs "$lr")
        if ((limit > 0)); then cmd=(timeout "$limit" "${cmd[@]}"); fi
        CUDA_VISIBLE_DEVICES=$((i % ngpu)) "${cmd[@]}" >"$dir/log" 2>&1 &
        pids+=($!)
        echo "point $pt lr $lr on GPU $((i % ngpu)): $dir/log"
        i=$((i + 1))
    done
done
failed=0
for k in "${!pids[@]}"; do
    if ! wait "${pids[$k]}"; then
        failed=$((failed + 1))
        echo "FAILED: ${dirs[$k]} (see its log)"
    fi
done
echo "$i point(s) in $(($(date +%s) - start)) s, $failed failed"

# One table of every point under DIR that has a result (this run's and
# earlier runs' into the same DIR), and the figure of it (each point at its
# best learning rate).
rows=0
: >"$out/results.csv"
for dir in "$out"/points/*/; do
    dir="${dir%/}"
    # A point that failed has no row (at most the header).
    (($(wc -l <"$dir/results.csv" 2>/dev/null || echo 0) >= 2)) || continue
    if ((rows == 0)); then head -n 1 "$dir/results.csv" >"$out/results.csv"; fi
    tail -n +2 "$dir/results.csv" >>"$out/results.csv"
    rows=$((rows + 1))
done
status=$((failed > 0))
if ((rows > 0)); then
    "$m2ctl" plot sweep --table "$out/results.csv" --out "$out/sweep" || status=1
    cat "$out/results.csv"
fi
exit $status
