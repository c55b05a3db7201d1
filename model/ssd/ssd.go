// Package ssd owns the selective state-space scan of Mamba-2 (the SSD layer of
// MAMBA2_SPEC.md §2.3–§2.4): the discretisation of dt, the scan itself, its
// backward pass, and the per-sequence quantities that sequence parallelism
// exchanges (final state, total log-decay; §5.3).
//
// Two implementations are provided and tested against each other:
//
//   - Forward / Backward: the chunked SSD algorithm of §3 and §4.6, the
//     production path on the CPU. It is built from the matrix products of
//     §3.2 (CB, chunk states, state passing, off-diagonal output) and is
//     parallel over batch, heads and chunks.
//   - ForwardRecurrent / BackwardRecurrent: the token-by-token recurrence of
//     §2.4 and the reverse recurrence of §4.4, kept simple as the reference.
//
// All functions are generic over model.Float. They never allocate the
// caller's outputs: every output slice is supplied by the caller with the
// exact length implied by Dims, and a wrong length is reported as an error
// naming the slice. Results are bit-for-bit reproducible for a given input,
// whatever the value of GOMAXPROCS: work is split over goroutines only where
// each item writes disjoint memory, and every reduction runs in a fixed order.
//
// Scalar quantities (dt, the cumulative log-decays, parameter-gradient sums)
// are computed in float64 whatever T is. Decay factors exp(x) are only
// evaluated for x <= 0, and those below about 2^-101 (float32) or 2^-966
// (float64) are taken to be zero so that no subnormal numbers arise (see
// flushBelow).
//
// AddInitialState and InitialStateBackward compute, on their own, the terms
// that an initial state adds to a scan and their gradients: the correction
// that a shard of the parallel prefix over sequence shards (§5.3) applies
// after scanning from a zero state.
//
// The package does not gate the output (no z), does not know about
// convolutions or projections, and performs no I/O.
package ssd

import (
	"errors"
	"fmt"
	"math"

	"github.com/m2train/m2train/model"
)

// Sentinel errors; every error returned by this package wraps one of them.
var (
	// ErrDims reports dimensions that break a rule of Dims.
	ErrDims = errors.New("ssd: invalid dimensions")
	// ErrOptions reports an Options field out of range.
	ErrOptions = errors.New("ssd: invalid options")
	// ErrLength reports a slice whose length does not match Dims.
	ErrLength = errors.New("ssd: wrong slice length")
)

// Dims are the sizes of one scan, in the letters of the SSD paper.
//
// Head h reads B and C of group h/(H/G): the H/G heads of a group are
// contiguous.
type Dims struct {
	Batch int // Bt, sequences in the batch
	L     int // sequence (or shard) length
	H     int // heads
	P     int // head dimension
	N     int // state dimension (d_state)
	G     int // B/C groups; H must be a multiple of G
}

// Validate checks that every size is positive and that G divides H.
func (d Dims) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"Batch", d.Batch}, {"L", d.L}, {"H", d.H}, {"P", d.P}, {"N", d.N}, {"G", d.G}} {
		if f.v <= 0 {
			return fmt.Errorf("%w: %s must be positive, got %d", ErrDims, f.name, f.v)
		}
	}
	if d.H%d.G != 0 {
		return fmt.Errorf("%w: H = %d must be a multiple of G = %d", ErrDims, d.H, d.G)
	}
	return nil
}

// Options are the settings of a scan that are not sizes.
type Options struct {
	// Chunk is Q, the chunk length of the chunked algorithm; it must be
	// positive for Forward and Backward and is ignored by the recurrent
	// functions. It changes only the rounding, never the mathematics.
	Chunk int
	// DTLimit clamps dt after the softplus to [lo, hi]; the gradient is zero
	// where the clamp is active. {0, +Inf} is the no-op default, and so is
	// the zero value {0, 0} (a clamp to exactly zero would be meaningless).
	// Otherwise 0 <= lo <= hi is required.
	DTLimit [2]float64
	// DHasHdim selects a D skip parameter with H·P entries (one per
	// channel) instead of H (one per head).
	DHasHdim bool
}

// dtLimit returns the effective clamp interval.
func (o Options) dtLimit() (lo, hi float64) {
	if o.DTLimit == [2]float64{} {
		return 0, math.Inf(1)
	}
	return o.DTLimit[0], o.DTLimit[1]
}

func (o Options) validate(chunked bool) error {
	if chunked && o.Chunk <= 0 {
		return fmt.Errorf("%w: Chunk must be positive, got %d", ErrOptions, o.Chunk)
	}
	lo, hi := o.dtLimit()
	if math.IsNaN(lo) || math.IsNaN(hi) || lo < 0 || lo > hi {
		return fmt.Errorf("%w: DTLimit must satisfy 0 <= lo <= hi, got [%g, %g]", ErrOptions, lo, hi)
	}
	return nil
}

// Inputs are the tensors a scan reads. Layouts are row-major with the last
// index fastest.
type Inputs[T model.Float] struct {
	X         []T // (Bt, L, H, P)
	DTRaw     []T // (Bt, L, H): dt before the bias and the softplus
	DTBias    []T // (H)
	ALog      []T // (H): A = -exp(A_log)
	B         []T // (Bt, L, G, N)
	C         []T // (Bt, L, G, N)
	D         []T // (H), or (H·P) with Options.DHasHdim
	InitState []T // (Bt, H, P, N): state before position 0; nil means zeros
}

// Outputs are the tensors a forward scan writes; the caller allocates them.
type Outputs[T model.Float] struct {
	Y          []T // (Bt, L, H, P): SSM output plus D·x, not gated
	FinalState []T // (Bt, H, P, N): state after position L-1
	// LogDecay is Λ = Σ_t dt_t·A per (Bt, H): the log of the factor by
	// which the whole sequence decays an incoming state (§5.3).
	LogDecay []T
}

// Grads are the gradients a backward scan writes; the caller allocates
// every slice. Backward overwrites every element: parameter gradients are
// summed over batch and time inside one call, and a caller that accumulates
// over calls (layers, micro-batches, shards) adds them itself.
type Grads[T model.Float] struct {
	X, DTRaw, B, C  []T // shapes as in Inputs
	DTBias, ALog, D []T // (H), (H), and (H) or (H·P)
	InitState       []T // (Bt, H, P, N): gradient of the initial state (zero or not)
}

func (d Dims) sizes(o Options) (x, dt, bc, dd, st, bh int) {
	x = d.Batch * d.L * d.H * d.P
	dt = d.Batch * d.L * d.H
	bc = d.Batch * d.L * d.G * d.N
	dd = d.H
	if o.DHasHdim {
		dd = d.H * d.P
	}
	st = d.Batch * d.H * d.P * d.N
	bh = d.Batch * d.H
	return
}

func checkLen[T any](name string, s []T, want int, rule string) error {
	if len(s) != want {
		return fmt.Errorf("%w: %s has %d elements, want %s = %d", ErrLength, name, len(s), rule, want)
	}
	return nil
}

func checkInputs[T model.Float](d Dims, o Options, in *Inputs[T], chunked bool) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if err := o.validate(chunked); err != nil {
		return err
	}
	if in == nil {
		return fmt.Errorf("%w: Inputs is nil", ErrLength)
	}
	x, dt, bc, dd, st, _ := d.sizes(o)
	dRule := "H"
	if o.DHasHdim {
		dRule = "H·P"
	}
	checks := []error{
		checkLen("Inputs.X", in.X, x, "Bt·L·H·P"),
		checkLen("Inputs.DTRaw", in.DTRaw, dt, "Bt·L·H"),
		checkLen("Inputs.DTBias", in.DTBias, d.H, "H"),
		checkLen("Inputs.ALog", in.ALog, d.H, "H"),
		checkLen("Inputs.B", in.B, bc, "Bt·L·G·N"),
		checkLen("Inputs.C", in.C, bc, "Bt·L·G·N"),
		checkLen("Inputs.D", in.D, dd, dRule),
	}
	if in.InitState != nil {
		checks = append(checks, checkLen("Inputs.InitState", in.InitState, st, "Bt·H·P·N"))
	}
	return firstErr(checks)
}

func checkOutputs[T model.Float](d Dims, o Options, out *Outputs[T]) error {
	if out == nil {
		return fmt.Errorf("%w: Outputs is nil", ErrLength)
	}
	x, _, _, _, st, bh := d.sizes(o)
	return firstErr([]error{
		checkLen("Outputs.Y", out.Y, x, "Bt·L·H·P"),
		checkLen("Outputs.FinalState", out.FinalState, st, "Bt·H·P·N"),
		checkLen("Outputs.LogDecay", out.LogDecay, bh, "Bt·H"),
	})
}

func checkBackward[T model.Float](d Dims, o Options, dY, dFinal []T, g *Grads[T]) error {
	x, dt, bc, dd, st, _ := d.sizes(o)
	if g == nil {
		return fmt.Errorf("%w: Grads is nil", ErrLength)
	}
	dRule := "H"
	if o.DHasHdim {
		dRule = "H·P"
	}
	checks := []error{checkLen("dY", dY, x, "Bt·L·H·P")}
	if dFinal != nil {
		checks = append(checks, checkLen("dFinal", dFinal, st, "Bt·H·P·N"))
	}
	checks = append(checks,
		checkLen("Grads.X", g.X, x, "Bt·L·H·P"),
		checkLen("Grads.DTRaw", g.DTRaw, dt, "Bt·L·H"),
		checkLen("Grads.B", g.B, bc, "Bt·L·G·N"),
		checkLen("Grads.C", g.C, bc, "Bt·L·G·N"),
		checkLen("Grads.DTBias", g.DTBias, d.H, "H"),
		checkLen("Grads.ALog", g.ALog, d.H, "H"),
		checkLen("Grads.D", g.D, dd, dRule),
		checkLen("Grads.InitState", g.InitState, st, "Bt·H·P·N"),
	)
	return firstErr(checks)
}

func firstErr(errs []error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}
