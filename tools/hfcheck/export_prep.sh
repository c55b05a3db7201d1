#!/usr/bin/env bash
# Prepares the inputs of export_check.sh where Go is (no Python needed):
#
#   tools/hfcheck/export_prep.sh [ROOT]      (default .hfcheck/export)
#
# It builds m2ctl, trains two small models and exports them with
# `m2ctl checkpoint export`, then writes our logits of each export with
# `m2ctl model logits` (float64, seeded random tokens). Cases, one directory
# each under ROOT, every one holding model/ and logits.safetensors:
#   demo-float32, demo-bfloat16  `m2ctl demo` (checkpoints in s3://demo through
#                                its gateway), exported as float32 / bfloat16
#   groups2-float32              a 2-group model trained by `m2ctl train` to a
#                                local location; its logits use one gated-norm
#                                group, as transformers' PyTorch path does
# Then, on a machine with python3, torch and transformers (no Go needed), in a
# copy of the repository that holds ROOT:  tools/hfcheck/export_check.sh ROOT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="${1:-.hfcheck/export}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
go build -o "$work/m2ctl" ./tools/m2ctl
m2ctl="$work/m2ctl"
rm -rf "$root"
mkdir -p "$root"

# The demo, through its S3 gateway; the gateway leaves the objects as files.
"$m2ctl" demo --dir "$work/demo" --steps 60
demo_ckpt="$work/demo/s3/demo/checkpoints/demo"
"$m2ctl" checkpoint inspect "$demo_ckpt"
for dt in float32 bfloat16; do
  "$m2ctl" checkpoint export "$demo_ckpt" "$root/demo-$dt/model" --dtype "$dt"
  "$m2ctl" model logits --model "$root/demo-$dt/model" --random-tokens 2x256 --seed 7 \
    --precision float64 --out "$root/demo-$dt/logits.safetensors"
done

# A model with two groups of B/C heads, trained to a local location.
cat > "$work/groups2.yaml" <<SPEC
name: groups2
model:
  config: {d_model: 64, n_layer: 2, vocab_size: 272, d_state: 16, headdim: 16, expand: 2, ngroups: 2, chunk_size: 32}
data: {path: $work/demo/data, seq_len: 128}
batch: {micro_batch: 4, global_batch: 4}
optimizer: {lr: 0.003}
schedule: {warmup_steps: 5, total_steps: 40}
checkpoint: {location: $work/ckpt, every_steps: 40}
seed: 3
backend: cpu
SPEC
"$m2ctl" train "$work/groups2.yaml"
"$m2ctl" checkpoint export "$work/ckpt/groups2" "$root/groups2-float32/model"
"$m2ctl" model logits --model "$root/groups2-float32/model" --random-tokens 2x256 --seed 7 \
  --precision float64 --gated-norm-groups 1 --out "$root/groups2-float32/logits.safetensors"

du -sh "$root"
echo "prepared $(ls "$root" | wc -l) cases in $root; check them with: tools/hfcheck/export_check.sh $root"
