// Package gpu is the CUDA backend of the Mamba-2 language model: the whole
// training step (forward, backward, gradient norm and AdamW) on one GPU,
// through the kernels of libm2kernels.so (package kernels for the loader,
// device memory and the SSD scan, package kernels/ops for the other layer
// operations and the cuBLASLt products). Model implements model.Backend for
// float32 and model.DeviceBackend.
//
// The pass mirrors the CPU reference (model/ref) operation by operation:
// embedding; per layer a residual add + RMSNorm, in_proj (+ bias), the causal
// conv1d + SiLU with the halo of the previous sequence shard, the chunked SSD
// scan with its initial and final state, the gated RMSNorm and out_proj
// (+ bias); the final norm; and the LM head (tied or not) fused with the
// cross-entropy per block of positions, over the positions with a counted
// target only when some are not (Options.DenseHead). The backward runs the same steps in
// reverse, and a model.Boundary receives and sends the SSM states and conv
// halos of sequence parallelism (and their gradients) per layer, as []float64
// on the host.
//
// Precision: with F32 every activation is f32 and every product true fp32,
// for testing against the CPU reference tightly. With BF16 (the default)
// activations and the inputs of the products are bf16 with fp32
// accumulation; the parameters (fp32 master weights, of which the product
// weights get a bf16 copy refreshed after each update), gradients, optimizer
// moments, the residual stream, norm statistics, dt and the SSM states stay
// fp32 (docs/MAMBA2_SPEC.md §8).
//
// Parameters, gradients and each optimizer moment are one flat fp32 device
// buffer each, with the offsets of model.Layout, so that an all-reduce and a
// checkpoint see one contiguous buffer; Params and Grads return host mirrors
// whose coherence model.DeviceBackend describes. Activations for one
// (batch, length) shape are allocated at its first pass and reused until
// the shape changes; Close frees everything.
//
// All work is queued on the CUDA legacy default stream, so that the
// library's synchronous copies are ordered with the kernels without further
// synchronisation. The package uses no cgo: without the library or a GPU,
// Open and New fail with an error wrapping ErrUnavailable, and the caller
// falls back to the CPU backend.
package gpu
