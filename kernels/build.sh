#!/usr/bin/env bash
# Builds libm2kernels.so from kernels/{common,ssd,ops}/*.cu with nvcc.
#
#   kernels/build.sh [OUT_DIR]        (default OUT_DIR: kernels/build)
#
# Environment:
#   M2K_DIRS         source dirs under kernels/ to build (default "common ssd ops");
#                    lets one part be built while another is mid-edit
#   NVCC             the compiler (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
#   M2K_NVCC_FLAGS   extra flags for every compile (e.g. "-lineinfo" or "-Xptxas -v")
#   M2K_JOBS         parallel compiles (default: number of CPUs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/build}"
dirs="${M2K_DIRS:-common ssd ops}"
nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
jobs="${M2K_JOBS:-$(nproc 2>/dev/null || echo 4)}"

if [[ ! -x "$nvcc" ]]; then
    echo "build.sh: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 1
fi

mkdir -p "$out/obj"
out="$(cd "$out" && pwd)"

srcs=()
for d in $dirs; do
    if [[ ! -d "$here/$d" ]]; then
        echo "build.sh: no source dir kernels/$d" >&2
        exit 1
    fi
    for f in "$here/$d"/*.cu; do
        [[ -e "$f" ]] && srcs+=("$f")
    done
done
if [[ ${#srcs[@]} -eq 0 ]]; then
    echo "build.sh: no .cu files in: $dirs" >&2
    exit 1
fi

flags=(-O3 -std=c++17
    -gencode arch=compute_90a,code=sm_90a
    -gencode arch=compute_90,code=compute_90
    -Xcompiler -fPIC
    -I"$here")
# shellcheck disable=SC2206
extra=(${M2K_NVCC_FLAGS:-})

compile() {
    local src="$1" rel obj
    rel="${src#"$here"/}"
    obj="$out/obj/${rel//\//_}.o"
    echo "nvcc $rel"
    "$nvcc" "${flags[@]}" "${extra[@]}" -c "$src" -o "$obj"
}
objs=()
pids=()
fail=0
for src in "${srcs[@]}"; do
    rel="${src#"$here"/}"
    objs+=("$out/obj/${rel//\//_}.o")
    compile "$src" &
    pids+=($!)
    if (( ${#pids[@]} >= jobs )); then
        wait "${pids[0]}" || fail=1
        pids=("${pids[@]:1}")
    fi
done
for p in "${pids[@]}"; do
    wait "$p" || fail=1
done
if (( fail )); then
    echo "build.sh: compilation failed" >&2
    exit 1
fi

"$nvcc" -shared -o "$out/libm2kernels.so" "${objs[@]}" -lcublasLt -lcublas
echo "built $out/libm2kernels.so"
