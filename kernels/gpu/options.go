package gpu

import (
	"fmt"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/kernels/ops"
	"github.com/m2train/m2train/model"
)

// Precision selects the dtype of the activations and of the inputs of the
// matrix products.
type Precision int

const (
	// BF16 keeps activations and product inputs in bf16 with fp32
	// accumulation; parameters, gradients, moments, the residual stream,
	// norm statistics, dt and SSM states stay fp32. The zero value: the
	// precision to train in.
	BF16 Precision = iota
	// F32 keeps every activation in f32 and computes the products in true
	// fp32 (no TF32): the precision to test against the CPU reference.
	F32
)

func (p Precision) String() string {
	switch p {
	case BF16:
		return "bf16"
	case F32:
		return "f32"
	}
	return fmt.Sprintf("Precision(%d)", int(p))
}

// dtype is the kernels' activation dtype of p.
func (p Precision) dtype() kernels.DType {
	if p == F32 {
		return kernels.F32
	}
	return kernels.BF16
}

// DefaultHeadBlock is the number of positions whose logits the LM head
// materialises at a time when Options.HeadBlock is zero. Larger than the CPU
// reference's 128 so that the head's products fill the GPU; the results do
// not depend on it beyond the order of the loss sum.
const DefaultHeadBlock = 1024

// Options configure a Model. The zero value is valid: bf16, automatic
// synchronisation of the host mirrors, DefaultHeadBlock.
type Options struct {
	Precision Precision
	// ExplicitSync starts the model with automatic synchronisation off
	// (see model.DeviceBackend): the host mirrors then move only through
	// SyncToHost and SyncFromHost. A training loop that uses the
	// DeviceBackend methods sets it.
	ExplicitSync bool
	// HeadBlock is the number of positions whose logits exist at a time
	// (memory: HeadBlock × vocab activations); 0 means DefaultHeadBlock.
	HeadBlock int
	// DenseHead runs the LM head and the cross-entropy over every
	// position. Without it a pass whose targets leave some positions
	// uncounted (negative) and that keeps no logits runs them over the
	// counted positions alone, gathered into consecutive rows: the
	// uncounted ones have no loss and no gradient, so only the order of
	// the sums changes. The MQAR task counts a quarter of the positions.
	// For comparisons and tests.
	DenseHead bool
	// RecomputeSSD makes the backward pass of each layer recompute the
	// scan's forward intermediates (the chunk states, C·Bᵀ, dt and the
	// decay cumsums) instead of keeping them from the forward pass. Kept,
	// they take 4·(Batch·H·(2·L' + (L'/Q + 1)·P·N) + Batch·G·L'·Q) bytes per
	// layer (L' the length rounded up to the chunk Q): 1.8 GB over the 24
	// layers of the 130M model at 8 × 2048. Recomputing saves that memory
	// and costs about a tenth of the scan's backward time (on an H200 at
	// that shape, a 4% slower training step).
	RecomputeSSD bool
}

// Validate names the first field that breaks a rule.
func (o Options) Validate() error {
	if o.Precision != BF16 && o.Precision != F32 {
		return fmt.Errorf("gpu: options: Precision must be BF16 or F32, got %d", int(o.Precision))
	}
	if o.HeadBlock < 0 {
		return fmt.Errorf("gpu: options: HeadBlock must be >= 0 (0 means %d), got %d", DefaultHeadBlock, o.HeadBlock)
	}
	return nil
}

func (o Options) headBlock() int {
	if o.HeadBlock == 0 {
		return DefaultHeadBlock
	}
	return o.HeadBlock
}

// CheckConfig validates cfg and checks that the kernels implement it; the
// error names the field and the limit, and wraps ErrUnsupported for a valid
// configuration beyond the kernels' limits.
func CheckConfig(cfg model.Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	for _, f := range []struct {
		name     string
		v, limit int
	}{
		{"chunk_size", cfg.ChunkSize, kernels.SSDMaxChunk},
		{"headdim", cfg.HeadDim, kernels.SSDMaxHeadDim},
		{"d_state", cfg.DState, kernels.SSDMaxDState},
		{"d_conv", cfg.DConv, ops.MaxConvWidth},
	} {
		if f.v > f.limit {
			return fmt.Errorf("%w: config %s: must be at most %d for the CUDA kernels, got %d", ErrUnsupported, f.name, f.limit, f.v)
		}
	}
	return nil
}
