#!/usr/bin/env bash
# GPU test driver: builds libm2kernels.so, runs every test binary in .devbin/
# (built elsewhere with `go test -c -tags gpu -o .devbin/NAME.test ./PKG`),
# optionally again under compute-sanitizer, and writes a markdown report.
#
#   kernels/gpu-report.sh [--sanitizer] [--only-sanitizer] [--run REGEX] [REPORT.md]
#
# Run from the repository root on a machine with a GPU and nvcc. REPORT.md
# defaults to $OUT/gpu-report.md when OUT is set, else ./gpu-report.md; the
# full logs go next to it (gpu-report-logs/). The test binaries print one line
# per compared kernel output:
#   KERNEL name dtype max_abs=.. max_rel=.. [elem_rel=..] tol=.. PASS|FAIL
# and the report tabulates them.
#
#   --sanitizer       also run each binary under compute-sanitizer memcheck, and
#                     the kernel binaries (kernels, ops) under racecheck, with
#                     -test.short (tests keep to small shapes). Under racecheck
#                     the whole-model binary (gpu) computes NaNs with no hazard
#                     reported, and racecheck flags hazards inside cuBLASLt's
#                     own GEMM kernels, so that binary gets memcheck only; every
#                     kernel of ours it runs is race-checked in kernels and ops.
#                     gpuinfo talks to NVML only and makes no CUDA runtime
#                     call, so it runs plain (the sanitizer has nothing to
#                     instrument and stops with an error of its own).
#                     Under racecheck the tests that run cuBLASLt GEMMs are
#                     skipped (--racecheck-skip): racecheck reports hazards
#                     inside cuBLASLt's Hopper split-K kernels (nvjet_*, whose
#                     TMA/mbarrier synchronisation it does not model), and
#                     excluding those kernels by name makes the tool fail with
#                     an internal error. memcheck runs them; the kernels of
#                     ours that those tests compose with the GEMMs are
#                     race-checked by their own tests.
#   --racecheck "A B" the binaries racecheck runs (default "kernels ops")
#   --memcheck "A B"  the binaries memcheck runs (default "gpu kernels ops")
#   --racecheck-skip RE  tests racecheck leaves out (default
#                     "TestGemmGPU|TestLMHeadLossGPU", the cuBLASLt ones)
#   --only-sanitizer  skip the plain runs
#   --run REGEX       pass -test.run REGEX to every plain run
#   --tests "A B"     run only .devbin/A.test, .devbin/B.test (default: every binary)
# Environment: M2_COMMIT (the commit the report names; default git HEAD),
# M2K_DIRS (passed to build.sh), M2K_NVCC_FLAGS (likewise; -lineinfo
# is added under --sanitizer so reports name source lines).
set -uo pipefail

sanitizer=0
plain=1
run_re=""
tests=""
racecheck_bins="kernels ops"
memcheck_bins="gpu kernels ops"
racecheck_skip="TestGemmGPU|TestLMHeadLossGPU"
report=""
while (($#)); do
    case "$1" in
    --sanitizer) sanitizer=1 ;;
    --only-sanitizer) sanitizer=1; plain=0 ;;
    --run) run_re="$2"; shift ;;
    --tests) tests="$2"; shift ;;
    --racecheck) racecheck_bins="$2"; shift ;;
    --memcheck) memcheck_bins="$2"; shift ;;
    --racecheck-skip) racecheck_skip="$2"; shift ;;
    -h | --help) sed -n '2,42p' "$0"; exit 0 ;;
    *) report="$1" ;;
    esac
    shift
done
if [[ -z "$report" ]]; then
    report="${OUT:-.}/gpu-report.md"
fi
root="$(pwd)"
if [[ ! -f "$root/kernels/m2kernels.h" ]]; then
    echo "gpu-report.sh: run from the repository root" >&2
    exit 2
fi
logdir="$(dirname "$report")/gpu-report-logs"
mkdir -p "$logdir"
status=0

# The package directory a test binary belongs to (its working directory).
pkgdir() {
    case "$(basename "$1" .test)" in
    kernels) echo kernels ;;
    ops) echo kernels/ops ;;
    *) echo . ;;
    esac
}

{
    echo "# GPU kernel report"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo "- nvcc: $(nvcc --version 2>/dev/null | tail -2 | head -1)"
    echo "- commit: ${M2_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} >"$report"

flags="${M2K_NVCC_FLAGS:-}"
((sanitizer)) && flags="$flags -lineinfo"
echo "== build" >&2
if M2K_NVCC_FLAGS="$flags" kernels/build.sh kernels/build >"$logdir/build.log" 2>&1; then
    echo "- build: ok (\`kernels/build.sh\`, dirs: ${M2K_DIRS:-common ssd ops})" >>"$report"
else
    echo "- build: **FAILED**" >>"$report"
    { echo; echo '```'; tail -40 "$logdir/build.log"; echo '```'; } >>"$report"
    cat "$logdir/build.log" >&2
    exit 1
fi
export M2K_LIB="$root/kernels/build/libm2kernels.so"

shopt -s nullglob
if [[ -n "$tests" ]]; then
    bins=()
    for t in $tests; do bins+=(".devbin/$t.test"); done
else
    bins=(.devbin/*.test)
fi
if ((${#bins[@]} == 0)); then
    echo "- no test binaries in .devbin/" >>"$report"
    exit 1
fi

table="$logdir/kernels.tsv"
models="$logdir/models.txt"
: >"$table"
: >"$models"
summary=()
hazards=()
for bin in "${bins[@]}"; do
    name="$(basename "$bin" .test)"
    dir="$(pkgdir "$bin")"
    abs="$root/$bin"
    if ((plain)); then
        echo "== $name" >&2
        args=(-test.v -test.count=1 -test.timeout=20m)
        [[ -n "$run_re" ]] && args+=(-test.run "$run_re")
        log="$logdir/$name.log"
        (cd "$dir" && "$abs" "${args[@]}") >"$log" 2>&1
        rc=$?
        ((rc)) && status=1
        grep -E '^KERNEL ' "$log" | sed "s/^KERNEL /$name /" >>"$table"
        grep -E '^MODEL ' "$log" | sed "s/^MODEL /$name /" >>"$models"
        pass=$(grep -c -E '^--- PASS' "$log")
        fail=$(grep -c -E '^--- FAIL' "$log")
        summary+=("| $name | $rc | $pass | $fail |")
        grep -E '^(--- FAIL|FAIL|panic|ok )' "$log" | head -20 >&2
    fi
    if ((sanitizer)); then
        tools=()
        [[ " $memcheck_bins " == *" $name "* ]] && tools+=(memcheck)
        [[ " $racecheck_bins " == *" $name "* ]] && tools+=(racecheck)
        for tool in "${tools[@]}"; do
            echo "== $name under $tool" >&2
            log="$logdir/$name.$tool.log"
            extra=()
            [[ "$tool" == racecheck && -n "$racecheck_skip" ]] && extra=(-test.skip "$racecheck_skip")
            (cd "$dir" && compute-sanitizer --tool "$tool" --error-exitcode 99 \
                "$abs" -test.short -test.count=1 -test.timeout=20m "${extra[@]}") >"$log" 2>&1
            rc=$?
            ((rc)) && status=1
            errs="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
            summary+=("| $name ($tool) | $rc | ${errs:-no summary line} | |")
            echo "$name $tool rc=$rc $errs" >&2
            if ((rc)); then
                # The first findings, so that the report alone says what failed.
                hazards+=("### $name under $tool" "" '```' "$(grep -E '^========= +(Error|Warning|Race|Invalid|Program hit|Internal)|^=========     at |^--- FAIL|^    .*_test.go:' "$log" | head -30)" '```' "")
            fi
        done
    fi
done

{
    echo
    echo "## Test binaries"
    echo
    echo "| binary | exit | tests passed / sanitizer summary | tests failed |"
    echo "|---|---|---|---|"
    printf '%s\n' "${summary[@]}"
    if ((${#hazards[@]})); then
        echo
        echo "## Sanitizer findings"
        echo
        printf '%s\n' "${hazards[@]}"
    fi
    if [[ -s "$table" ]]; then
        echo
        echo "## Kernels against the CPU reference"
        echo
        echo "max_rel = max|gpu − ref| / max|ref| over the tensor; elem_rel = max of |gpu − ref| / max(|ref|, 1e-3·max|ref|)."
        echo
        echo "| binary | kernel | dtype | max_abs | max_rel | elem_rel | tol | result |"
        echo "|---|---|---|---|---|---|---|---|"
        while read -r bin kern dt rest; do
            get() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$rest"; }
            verdict="${rest##* }"
            echo "| $bin | $kern | $dt | $(get max_abs) | $(get max_rel) | $(get elem_rel) | $(get tol) | $verdict |"
        done <"$table"
        echo
        echo "$(grep -c ' PASS$' "$table") outputs within tolerance, $(grep -c ' FAIL$' "$table") outside."
    fi
    if [[ -s "$models" ]]; then
        echo
        echo "## Whole model against the CPU reference"
        echo
        echo '```'
        cat "$models"
        echo '```'
        echo
        echo "$(grep -c ' PASS$' "$models") model checks within tolerance, $(grep -c ' FAIL$' "$models") outside."
    fi
} >>"$report"
grep -q ' FAIL$' "$table" "$models" && status=1
echo "report: $report (status $status)" >&2
exit $status
