package model

import (
	"context"
	"fmt"
	"math"
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
	// A PrefixBoundary whose Mode is SPPrefix selects the parallel-prefix
	// mode; any other Boundary runs the sequential pipeline.
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
// first shard, or the last shard's backward). This is the sequential
// pipeline of §5.2; PrefixBoundary adds the parallel prefix of §5.3.
type Boundary interface {
	RecvForward(ctx context.Context, layer int) (state, halo []float64, err error)
	SendForward(ctx context.Context, layer int, state, halo []float64) error
	RecvBackward(ctx context.Context, layer int) (dState, dHalo []float64, err error)
	SendBackward(ctx context.Context, layer int, dState, dHalo []float64) error
}

// SPMode is how the shards of a sequence-parallel group pass the SSM state
// (MAMBA2_SPEC.md §5). Both modes compute the same function; they differ in
// rounding only.
type SPMode int

const (
	// SPSequential is the pipeline of §5.2: shard k waits for the final
	// state of shard k−1 (RecvForward) before it scans, and for the
	// gradient of its own final state from shard k+1 (RecvBackward) before
	// it runs the scan's backward. Every Boundary supports it.
	SPSequential SPMode = iota
	// SPPrefix is the parallel prefix of §5.3: every shard scans from a zero
	// state at once, the group combines the per-shard (final state,
	// log-decay) pairs, and every shard corrects its output with the state
	// it should have started from. It needs a PrefixBoundary.
	SPPrefix
)

// String names the mode as configuration and errors spell it.
func (m SPMode) String() string {
	switch m {
	case SPSequential:
		return "sequential"
	case SPPrefix:
		return "parallel-prefix"
	}
	return fmt.Sprintf("SPMode(%d)", int(m))
}

// ModeOf returns the mode a backend runs with boundary b: the boundary's
// Mode when it implements PrefixBoundary, otherwise SPSequential (also for
// a nil boundary, an unsplit sequence).
func ModeOf(b Boundary) SPMode {
	if pb, ok := b.(PrefixBoundary); ok {
		return pb.Mode()
	}
	return SPSequential
}

// PrefixBoundary is a Boundary that can also run the parallel-prefix mode
// of sequence parallelism (MAMBA2_SPEC.md §5.3). A backend asks Mode once
// per pass; with SPSequential it uses the embedded Boundary exactly as a
// plain one, with SPPrefix it makes, per layer ℓ, the calls below. The
// group has K shards of the same Bt sequences; this is shard k. H, P, N
// are the model's heads, head dim and state dim; shapes are row-major.
//
// Forward pass, layers in increasing order:
//
//  1. SendForward(ℓ, nil, halo), then RecvForward(ℓ) → (state, halo of
//     shard k−1). Only conv halos travel this way, as in §5.1; the backend
//     sends a nil state and requires the received one to be nil (or all
//     zeros). Sending first lets every shard exchange halos at once.
//  2. The backend scans its shard from a zero state, obtaining its local
//     final state S_k (Bt,H,P,N) and its total log-decay Λ_k (Bt,H):
//     Λ_k[b,h] = Σ_t dt[b,t,h]·A[h] ≤ 0 over the shard's positions.
//  3. hIn, err := PrefixForward(ℓ, S_k, Λ_k). The boundary returns
//     h_in[k], the state entering shard k (the forward scan below).
//  4. The backend adds the contribution of h_in[k] to its shard's output.
//
// Backward pass, layers in decreasing order:
//
//  1. The backend computes U_k (Bt,H,P,N), the gradient of the loss with
//     respect to h_in[k] through this shard's own outputs only (§4.4's
//     dh_init with a zero final-state gradient).
//  2. dFinal, err := PrefixBackward(ℓ, Λ_k, U_k). The boundary returns
//     g[k] (the backward scan below): the gradient of the loss with
//     respect to shard k's true final state exp(Λ_k)·h_in[k] + S_k, which
//     is h_in[k+1].
//  3. The backend runs its scan's backward from the initial state h_in[k]
//     with final-state gradient g[k]; this yields every gradient of the
//     shard, those through the decay of h_in[k] included, so no log-decay
//     gradient crosses shards.
//  4. SendBackward(ℓ, nil, dHalo), then RecvBackward(ℓ) → (dState, dHalo
//     of shard k+1), with a nil state gradient both ways as in step 1.
//
// The two scans are exclusive scans of the affine maps h ↦ exp(Λ_j)·h + S_j
// (and their transposes), exp(Λ_j[b,h]) scaling the whole P×N state of
// sequence b, head h:
//
//	forward:  h_in[0] = 0,    h_in[j+1] = exp(Λ_j)·h_in[j] + S_j   for j = 0, 1, …, K−2
//	backward: g[K−1] = 0,     g[j−1]    = exp(Λ_j)·g[j] + U_j      for j = K−1, K−2, …, 1
//
// that is, h_in[k] = Σ_{j<k} exp(Σ_{j<i<k} Λ_i)·S_j and
// g[k] = Σ_{m>k} exp(Σ_{k<i<m} Λ_i)·U_m. U_0 is never used. An
// implementation that all-gathers the pairs can compute both with
// PrefixState and PrefixGrad.
//
// PrefixForward and PrefixBackward are collective over the group: every
// shard calls each once per layer and pass, in the same order, with slices
// of the same lengths (Bt·H·P·N and Bt·H). Λ_k passed to PrefixBackward is
// the one passed to PrefixForward for the same layer and step, so an
// implementation may use either. Values are float64 slices holding values
// of the backend's precision; the boundary evaluates exp and the sums in
// float64, in any order (the result is exact up to rounding), and the
// backend rounds what it receives to its precision. A nil result means
// zeros (h_in[0] of shard 0, g[K−1] of shard K−1). The backend does not touch
// a slice it passed after the call returns, so the boundary may keep it;
// the boundary must not change a slice it returned.
type PrefixBoundary interface {
	Boundary
	// Mode selects the mode of this group; all its shards must agree.
	Mode() SPMode
	// PrefixForward returns h_in[k] (Bt·H·P·N values, or nil for zeros)
	// from this shard's zero-state final state (Bt·H·P·N) and log-decay
	// (Bt·H) and those of the shards before it.
	PrefixForward(ctx context.Context, layer int, final, logDecay []float64) (hIn []float64, err error)
	// PrefixBackward returns g[k], the gradient of this shard's true final
	// state (Bt·H·P·N values, or nil for zeros), from the log-decays and the
	// initial-state gradients dHin (Bt·H·P·N) of the shards after it.
	PrefixBackward(ctx context.Context, layer int, logDecay, dHin []float64) (dFinal []float64, err error)
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

// BoundaryFloat64s copies x into a new float64 slice, the element type in
// which a Boundary passes states and halos; nil stays nil.
func BoundaryFloat64s[T Float](x []T) []float64 {
	if x == nil {
		return nil
	}
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}

// PrefixState folds the pairs (states[j], logDecays[j]) of consecutive
// shards in order, h = exp(Λ_j)·h + S_j from h = 0, and returns h: given the
// pairs of shards 0..k−1 it is h_in[k] of PrefixBoundary's forward scan. It
// returns nil (zeros) for no pairs. Every states[j] holds Bt·H·P·N values
// and every logDecays[j] the Bt·H values of the same (b,h) order; the sums
// and exponentials are evaluated in float64 in shard order.
func PrefixState(states, logDecays [][]float64) ([]float64, error) {
	return foldShards(states, logDecays, false, "states")
}

// PrefixGrad folds the pairs (dHins[m], logDecays[m]) of consecutive shards
// in reverse order, g = exp(Λ_m)·g + U_m from g = 0, and returns g: given the
// pairs of shards k+1..K−1 it is g[k] of PrefixBoundary's backward scan. It
// returns nil (zeros) for no pairs. Shapes are those of PrefixState.
func PrefixGrad(dHins, logDecays [][]float64) ([]float64, error) {
	return foldShards(dHins, logDecays, true, "dHins")
}

func foldShards(vals, logDecays [][]float64, reverse bool, what string) ([]float64, error) {
	if len(vals) != len(logDecays) {
		return nil, fmt.Errorf("model: %d %s for %d log-decays: want one of each per shard", len(vals), what, len(logDecays))
	}
	if len(vals) == 0 {
		return nil, nil
	}
	n, bh := len(vals[0]), len(logDecays[0])
	if bh == 0 || n%bh != 0 {
		return nil, fmt.Errorf("model: %s[0] has %d values, want a positive multiple of the %d log-decays (Bt·H·P·N and Bt·H)", what, n, bh)
	}
	for j := range vals {
		if len(vals[j]) != n || len(logDecays[j]) != bh {
			return nil, fmt.Errorf("model: shard %d has %d %s values and %d log-decays, want %d and %d like shard 0", j, len(vals[j]), what, len(logDecays[j]), n, bh)
		}
	}
	pn := n / bh
	h := make([]float64, n)
	for i := range vals {
		j := i
		if reverse {
			j = len(vals) - 1 - i
		}
		for r, lam := range logDecays[j] {
			e := math.Exp(lam)
			hr, sr := h[r*pn:(r+1)*pn], vals[j][r*pn:(r+1)*pn]
			for p := range hr {
				hr[p] = e*hr[p] + sr[p]
			}
		}
	}
	return h, nil
}
