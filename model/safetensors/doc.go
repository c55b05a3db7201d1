// Package safetensors reads and writes the safetensors checkpoint format: an
// 8-byte little-endian header length, a JSON header mapping each tensor name
// to its dtype, shape and byte range (plus an optional "__metadata__" map of
// strings), then the raw little-endian tensor data.
//
// The package owns the byte format and the element conversions (including
// the float32↔bf16/f16 converters the CUDA backend shares). It knows nothing
// about models: package model/hf maps tensors to the Mamba-2 parameter layout.
//
// Reading validates the whole header before returning anything: every dtype
// is known, every shape matches its byte range, the ranges lie inside the
// data section, do not overlap and cover it without gaps, and no name
// appears twice. Writing is deterministic (sorted header keys, data in the
// caller's order, header padded with spaces to a multiple of 8 bytes), and
// WriteFile replaces the target atomically.
package safetensors
