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
# learning rate of --lrs (comma-separated), each rate in DIR/lr-RATE when
# there are several. The processes of a rate share its directory
# (results/NAME.json per point, written atomically); when they have ended,
# one more `m2ctl sweep mqar` over the whole grid finds every result in
# place, trains nothing and writes results.csv, results.md and
# sweep.{png,svg}; with several rates DIR/results.csv holds every row and
# DIR/sweep.{png,svg} each point's best rate. --limit stops
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
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
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
seqs=() dms=() dss=()
for pt in $points; do
    if ! [[ "$pt" =~ ^[0-9]+:[0-9]+:[0-9]+$ ]]; then
        echo "mqar-grid.sh: --points: $pt is not seq_len:d_model:d_state" >&2
        exit 2
    fi
    IFS=: read -r L D N <<<"$pt"
    seqs+=("$L") dms+=("$D") dss+=("$N")
done
join() { printf '%s\n' "$@" | sort -nu | paste -sd, -; }
if ! command -v "$m2ctl" >/dev/null; then
    echo "mqar-grid.sh: $m2ctl not found (go build -o m2ctl ./tools/m2ctl, then --m2ctl ./m2ctl)" >&2
    exit 2
fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if ((ngpu == 0)); then
    echo "mqar-grid.sh: no GPU (nvidia-smi -L lists none)" >&2
    exit 2
fi
mkdir -p "$out/logs"
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

# One directory per learning rate when there are several: a point's name
# does not carry its rate when a sweep has one, so two rates of a point in
# one directory would share their files.
dirs=()
for lr in ${lrs//,/ }; do
    if [[ "$lrs" == *,* ]]; then dirs+=("$out/lr-$lr"); else dirs+=("$out"); fi
done

start=$(date +%s)
i=0
pids=()
k=0
for lr in ${lrs//,/ }; do
    dir="${dirs[$k]}"
    k=$((k + 1))
    mkdir -p "$dir"
    for pt in $points; do
        IFS=: read -r L D N <<<"$pt"
        log="$out/logs/l$L-d$D-n$N-lr$lr.log"
        cmd=("$m2ctl" sweep mqar --out "$dir" "${common[@]}" --seq-lens "$L" --d-models "$D" --d-states "$N" --lrs "$lr")
        if ((limit > 0)); then cmd=(timeout "$limit" "${cmd[@]}"); fi
        CUDA_VISIBLE_DEVICES=$((i % ngpu)) "${cmd[@]}" >"$log" 2>&1 &
        pids+=($!)
        echo "point $pt lr $lr on GPU $((i % ngpu)): $log"
        i=$((i + 1))
    done
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
echo "$i point(s) in $(($(date +%s) - start)) s, $failed failed (their logs say why)"
status=$((failed > 0))

# The whole grid of each rate finds every result in place and trains
# nothing: it writes the tables and the figure.
k=0
for lr in ${lrs//,/ }; do
    dir="${dirs[$k]}"
    k=$((k + 1))
    "$m2ctl" sweep mqar --out "$dir" "${common[@]}" --seq-lens "$(join "${seqs[@]}")" --d-models "$(join "${dms[@]}")" \
        --d-states "$(join "${dss[@]}")" --lrs "$lr" >"$out/logs/grid-lr$lr.log" 2>&1 || status=1
done
if [[ "$lrs" == *,* ]]; then
    # Every rate's rows in one table; the figure takes each point's best.
    head -n 1 "${dirs[0]}/results.csv" >"$out/results.csv"
    for dir in "${dirs[@]}"; do tail -n +2 "$dir/results.csv" >>"$out/results.csv"; done
    "$m2ctl" plot sweep --table "$out/results.csv" --out "$out/sweep" || status=1
fi
cat "$out/results.csv"
exit $status
