package model

import (
	"context"
	"fmt"
)

// Batch is one micro-batch of token sequences, row-major (Batch × SeqLen).
// Targets are pre-shifted by the data loader: Targets[b,t] is the token that
// position t must predict; a negative target is not counted in the loss.
type Batch struct {
	Batch, SeqLen int
	Inputs        []int32
	Targets       []int32
}

// Validate checks the shapes and that every token lies in [0, vocab).
func (b *Batch) Validate(vocab int) error {
	if b.Batch <= 0 || b.SeqLen <= 0 {
		return fmt.Errorf("model: batch shape %d×%d must be positive", b.Batch, b.SeqLen)
	}
	n := b.Batch * b.SeqLen
	if len(b.Inputs) != n {
		return fmt.Errorf("model: batch inputs has %d tokens, want %d×%d = %d", len(b.Inputs), b.Batch, b.SeqLen, n)
	}
	if b.Targets != nil && len(b.Targets) != n {
		return fmt.Errorf("model: batch targets has %d tokens, want %d", len(b.Targets), n)
	}
	for i, v := range b.Inputs {
		if v < 0 || int(v) >= vocab {
			return fmt.Errorf("model: batch inputs[%d] = %d is outside the vocabulary [0, %d)", i, v, vocab)
		}
	}
	for i, v := range b.Targets {
		if int(v) >= vocab {
			return fmt.Errorf("model: batch targets[%d] = %d is outside the vocabulary [0, %d)", i, v, vocab)
		}
	}
	return nil
}

// Counted returns the number of counted (non-negative) targets.
func (b *Batch) Counted() int {
	n := 0
	for _, v := range b.Targets {
		if v >= 0 {
			n++
		}
	}
	return n
}

// StepOptions controls one forward(-backward) pass.
type StepOptions struct {
	// Count is M, the number of counted targets the loss is averaged over.
	// With data or sequence parallelism it is the global count over all
	// ranks of the step; zero means this batch's own count.
	Count int
	// KeepLogits keeps the logits (Batch × SeqLen × V) in the result.
	KeepLogits bool
	// KeepHidden keeps the residual stream after every layer and the output
	// of the final norm in the result.
	KeepHidden bool
	// Boundary passes SSM states and conv halos to and from the neighbouring
	// sequence shards (sequence parallelism); nil means an unsplit sequence.
	Boundary Boundary
}

// StepResult is what a pass returns. Loss is LossSum/Count.
type StepResult struct {
	LossSum float64 // Σ of −log p(target) over this batch's counted positions
	Count   int     // M used for the gradient scale
	Loss    float64 // LossSum / Count
	// Logits (Batch×SeqLen×V) and Hidden (n_layer+1 tensors of Batch×SeqLen×D)
	// in float64, only when asked for.
	Logits []float64
	Hidden [][]float64
}

// Boundary connects a sequence shard to its neighbours (MAMBA2_SPEC.md §5).
// Per layer, the forward pass receives the incoming SSM state
// (Batch×H×P×N) and conv halo (Batch×(W−1)×C_d) from the previous shard and
// sends its own to the next; the backward pass receives the gradients of
// its final state and of the halo it sent from the next shard and sends the
// gradients of its initial state and received halo to the previous one.
// Values travel as float64 or float32 slices of the backend's precision,
// boxed in a []float64 for the interface; a nil slice means zeros (the
// first shard, or the last shard's backward).
type Boundary interface {
	RecvForward(ctx context.Context, layer int) (state, halo []float64, err error)
	SendForward(ctx context.Context, layer int, state, halo []float64) error
	RecvBackward(ctx context.Context, layer int) (dState, dHalo []float64, err error)
	SendBackward(ctx context.Context, layer int, dState, dHalo []float64) error
}

// Backend runs the model's passes on one device. The CPU reference
// (model/ref) and the CUDA backend implement it, so the training loop, data
// and sequence parallelism and checkpointing are the same code on both.
// Parameters and gradients are flat buffers in the order of Layout.
type Backend[T Float] interface {
	Name() string
	Config() Config
	Layout() *Layout
	// Params and Grads are the flat buffers. A device backend returns host
	// mirrors and keeps them coherent at the calls below.
	Params() []T
	Grads() []T
	ZeroGrads()
	// ForwardBackward runs one micro-batch and adds its gradients (scaled by
	// 1/Count) into Grads.
	ForwardBackward(ctx context.Context, b *Batch, o StepOptions) (StepResult, error)
	// Forward runs one micro-batch without gradients (evaluation).
	Forward(ctx context.Context, b *Batch, o StepOptions) (StepResult, error)
}
