"""Compare m2ctl's numerics with Hugging Face transformers on a checkpoint.

Usage (on a machine with PyTorch and transformers):
    python3 tools/hfcheck/compare.py --model DIR --m2ctl PATH [--batch 2 --length 150 --seed 0]

It draws random input ids, runs `m2ctl model grads` on them (float64), loads
the same directory with transformers' Mamba2ForCausalLM in float64, and
reports the largest relative difference (to each tensor's largest magnitude)
of the logits, the loss and every parameter gradient. It exits non-zero if a
difference exceeds --tol. transformers' pure-PyTorch path keeps a few
intermediates in float32 even in a float64 model, which bounds the agreement
at roughly 1e-7. That path also normalises the gated RMSNorm over all
channels even when n_groups > 1 (mamba_ssm, and so m2train by default, norms
each group), so m2ctl runs with --gated-norm-groups 1 here.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import Mamba2ForCausalLM


def rel_err(got, want):
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--m2ctl", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--report", default="")
    a = ap.parse_args()

    with open(os.path.join(a.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (a.batch, a.length), generator=g, dtype=torch.int64)

    tmp = tempfile.mkdtemp()
    tokens, ours_path = os.path.join(tmp, "tokens.safetensors"), os.path.join(tmp, "ours.safetensors")
    save_file({"input_ids": ids}, tokens)
    # transformers' pure-PyTorch gated norm spans all channels whatever
    # n_groups is; m2ctl follows mamba_ssm (one norm per group) unless told.
    subprocess.run([a.m2ctl, "model", "grads", "--model", a.model, "--tokens", tokens,
                    "--out", ours_path, "--precision", "float64", "--gated-norm-groups", "1"], check=True)
    ours = load_file(ours_path)

    model = Mamba2ForCausalLM.from_pretrained(a.model, dtype=torch.float64)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()

    rows = [("logits", rel_err(ours["logits"], out.logits.detach())),
            ("loss", rel_err(ours["loss"], out.loss.detach().reshape(1)))]
    for name, p in model.named_parameters():
        rows.append(("grad." + name, rel_err(ours["grad." + name], p.grad)))
    worst = max(e for _, e in rows)
    lines = [f"{n:60s} {e:.3e}" for n, e in rows]
    lines.append(f"transformers loss {out.loss.item():.10f}  m2ctl loss {ours['loss'].item():.10f}")
    lines.append(f"max relative difference {worst:.3e} over {len(rows)} tensors (tolerance {a.tol:g})")
    text = "\n".join(lines)
    print(text)
    if a.report:
        with open(a.report, "w") as f:
            f.write(text + "\n")
    sys.exit(0 if worst <= a.tol else 1)


if __name__ == "__main__":
    main()
