// Package hf reads and writes Mamba-2 checkpoints in the two public formats:
// Hugging Face transformers (Mamba2ForCausalLM: config.json with hidden_size,
// num_heads, ..., and model.safetensors or its sharded index) and mamba_ssm
// (MambaLMHeadModel: config.json with d_model, ssm_cfg, ...). It maps their
// configurations to model.Config and their named tensors to the flat
// parameter buffer described by model.Layout, and it writes checkpoints that
// transformers loads unchanged.
//
// The package owns the translation only; the byte format is package
// model/safetensors and the architecture is package model. Every mismatch
// between a checkpoint and the configured model is reported with the tensor's
// name, expected shape and actual shape, all problems at once.
package hf
