# Shared by the benchmark scripts of kernels/bench (sourced, not run).
# shellcheck shell=bash

# bench_run NAME STATUSVAR LIMIT LOG CMD...: runs CMD under timeout(1) for
# at most LIMIT seconds, its output to the terminal and to LOG, and sets the
# variable STATUSVAR to "" when it succeeds, else to what a results table
# should say in its place; a failure also sets status=1 and says so on
# stderr. With LIMIT under 30 it does not start CMD ("skipped: budget
# spent"). BENCH_TOOL names the calling script in messages; with
# BENCH_KILL_AFTER=S, a command still running S seconds after timeout's
# TERM is killed, and its exit (137) counts as a time-out too. Returns CMD's
# exit status (1 when skipped).
bench_run() {
    local name="$1" var="$2" limit="$3" log="$4" rc
    shift 4
    if ((limit < 30)); then
        printf -v "$var" '%s' "skipped: budget spent"
        echo "${BENCH_TOOL:-bench}: no time left for $name" >&2
        # shellcheck disable=SC2034 # the calling script's exit status
        status=1
        return 1
    fi
    local kill=()
    [[ -n "${BENCH_KILL_AFTER:-}" ]] && kill=(--kill-after="$BENCH_KILL_AFTER")
    timeout "${kill[@]}" "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        printf -v "$var" '%s' ""
    elif ((rc == 124 || (rc == 137 && ${#kill[@]} > 0))); then
        printf -v "$var" '%s' "timed out after $limit s (see ${log##*/})"
    else
        printf -v "$var" '%s' "failed (exit $rc, see ${log##*/})"
    fi
    if ((rc != 0)); then
        echo "${BENCH_TOOL:-bench}: $name ${!var} (log: $log)" >&2
        # shellcheck disable=SC2034
        status=1
    fi
    return "$rc"
}
