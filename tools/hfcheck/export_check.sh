#!/usr/bin/env bash
# Checks exported checkpoints against transformers, one command, no Go needed:
#
#   tools/hfcheck/export_check.sh [ROOT] [--tol T]
#
# ROOT (default .hfcheck/export) holds one directory per case, each with
# model/ (written by `m2ctl checkpoint export`) and logits.safetensors
# (written by `m2ctl model logits --model CASE/model`); export_prep.sh lays
# it out. For every case, export_check.py loads model/ with transformers'
# Mamba2ForCausalLM.from_pretrained and compares its float64 logits with
# ours. Prints each case's max |difference| and PASS/FAIL against the
# tolerance (default 1e-4), and exits non-zero if any case fails or none is
# found. Needs python3 with torch, transformers and safetensors.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root=".hfcheck/export"
if [[ $# -gt 0 && "$1" != --* ]]; then root="$1"; shift; fi
tol=(--tol 1e-4)
if [[ $# -gt 0 ]]; then
  [[ "$1" == --tol && $# -eq 2 ]] || { echo "usage: $0 [ROOT] [--tol T]" >&2; exit 2; }
  tol=(--tol "$2")
fi
if ! python3 -c 'import torch, transformers, safetensors, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")'; then
  echo "export_check: needs python3 with torch, transformers and safetensors" >&2
  exit 2
fi
cases=()
for d in "$root"/*/; do
  [[ -f "$d/model/config.json" && -f "$d/logits.safetensors" ]] && cases+=("${d%/}")
done
if [[ ${#cases[@]} -eq 0 ]]; then
  echo "export_check: no case under $root (want CASE/model/config.json and CASE/logits.safetensors; run tools/hfcheck/export_prep.sh where Go is)" >&2
  exit 2
fi
failed=0
summary=()
for c in "${cases[@]}"; do
  echo "== $c"
  if python3 "$here/export_check.py" --model "$c/model" --logits "$c/logits.safetensors" "${tol[@]}"; then
    summary+=("PASS $c")
  else
    summary+=("FAIL $c"); failed=1
  fi
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
