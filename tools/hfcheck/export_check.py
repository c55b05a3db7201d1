"""Check that an exported checkpoint loads in transformers and computes our logits.

Usage (on a machine with PyTorch and transformers; Go is not needed):
    python3 tools/hfcheck/export_check.py --model DIR --logits FILE [--tol 1e-4]

DIR is a directory written by `m2ctl checkpoint export` (config.json +
model.safetensors, float32 or bfloat16 weights). FILE is the output of
`m2ctl model logits --model DIR ...` on the same directory: it holds the
input ids (input_ids, int64 [batch, L]), our logits ([batch, L, V]) and our
loss. The script loads DIR with Mamba2ForCausalLM.from_pretrained, fails if
a weight is missing, unexpected or of the wrong shape, runs it in float64 on
the CPU on the same input ids, and prints the largest absolute difference of
the logits, the same relative to the largest logit, both losses and how
often the two models pick the same next token. It exits 0 when the largest
absolute difference is at most --tol and 1 otherwise.

Both sides compute from the same stored weights (bfloat16 ones are exact in
float64), so the difference measures the two implementations, not the
export's rounding: transformers' pure-PyTorch path keeps a few intermediates
in float32 even in a float64 model, which puts the agreement near 1e-7 of
the largest logit. The default tolerance of 1e-4 is that with ample margin
for logits up to a few hundred; a wrong or misnamed tensor moves logits by
orders of magnitude more. transformers' pure-PyTorch gated RMSNorm spans all
channels even when n_groups > 1, so for such a model FILE must come from
`m2ctl model logits --gated-norm-groups 1` (the script checks).
"""

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from transformers import Mamba2ForCausalLM


def read_ours(path):
    tensors = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        for name in ("input_ids", "logits", "loss"):
            if name not in f.keys():
                sys.exit(f"export_check: {path}: no tensor named {name}; write it with `m2ctl model logits`")
            tensors[name] = f.get_tensor(name)
    return tensors, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="exported Hugging Face directory")
    ap.add_argument("--logits", required=True, help="output of `m2ctl model logits` on that directory")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest absolute logit difference that passes")
    a = ap.parse_args()

    with open(os.path.join(a.model, "config.json")) as f:
        config = json.load(f)
    ours, meta = read_ours(a.logits)
    ids = ours["input_ids"].to(torch.int64)
    if ids.dim() != 2:
        sys.exit(f"export_check: {a.logits}: input_ids has shape {list(ids.shape)}, want [batch, L]")
    n_groups = int(config.get("n_groups", 1))
    norm_groups = int(meta.get("gated_norm_groups", n_groups))
    if n_groups > 1 and norm_groups != 1:
        sys.exit(f"export_check: the model has n_groups {n_groups} and {a.logits} normalises in {norm_groups} groups; "
                 "transformers' pure-PyTorch path normalises over all channels: "
                 "write the logits with `m2ctl model logits --gated-norm-groups 1`")

    model, info = Mamba2ForCausalLM.from_pretrained(a.model, output_loading_info=True)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = list(info.get(kind, []))
        if kind == "missing_keys" and config.get("tie_word_embeddings", False):
            keys = [k for k in keys if k != "lm_head.weight"]
        if keys:
            problems.append(f"{kind}: {keys}")
    if problems:
        print("export_check: FAIL: transformers did not load every weight of the export:\n  " + "\n  ".join(problems))
        sys.exit(1)
    stored = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    model = model.to(torch.float64).eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    theirs = out.logits
    mine = ours["logits"].to(torch.float64)
    if mine.shape != theirs.shape:
        print(f"export_check: FAIL: our logits have shape {list(mine.shape)}, transformers' {list(theirs.shape)}")
        sys.exit(1)

    diff = (mine - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    agree = (mine.argmax(-1) == theirs.argmax(-1)).double().mean().item()
    ok = diff <= a.tol
    print(f"model      {a.model} (loaded as {', '.join(stored)}; compared in float64 on the CPU)")
    print(f"tokens     {list(ids.shape)} from {a.logits}")
    print(f"loss       transformers {out.loss.item():.10f}  m2ctl {ours['loss'].item():.10f}")
    print(f"next token same argmax at {100 * agree:.2f}% of positions")
    print(f"logits     max |difference| {diff:.3e}, {diff / scale if scale else diff:.3e} of the largest |logit| {scale:.3g}")
    print(f"{'PASS' if ok else 'FAIL'}: max |difference| {diff:.3e} {'<=' if ok else '>'} tolerance {a.tol:g}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
