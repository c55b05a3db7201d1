package ssd

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/m2train/m2train/model"
)

// problem is one random scan with its upstream gradients.
type problem struct {
	d      Dims
	o      Options
	in     Inputs[float64]
	dY     []float64
	dFinal []float64
}

func (p problem) String() string {
	return fmt.Sprintf("Bt%d_L%d_H%d_P%d_N%d_G%d_Q%d_init%v_hdim%v", p.d.Batch, p.d.L, p.d.H, p.d.P, p.d.N, p.d.G,
		p.o.Chunk, p.in.InitState != nil, p.o.DHasHdim)
}

func normals(r *rand.Rand, n int, mean, std float64) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = mean + std*r.NormFloat64()
	}
	return s
}

// newProblem draws inputs as §7 prescribes: A_log ∈ log U(1,16), x, B, C
// ~ N(0,1), dt_raw ~ N(dtMean, 1), plus upstream gradients.
func newProblem(seed uint64, d Dims, o Options, withInit bool, dtMean float64) problem {
	r := rand.New(rand.NewPCG(seed, 0x55d))
	x, dt, bc, dd, st, _ := d.sizes(o)
	p := problem{d: d, o: o}
	p.in.X = normals(r, x, 0, 1)
	p.in.DTRaw = normals(r, dt, dtMean, 1)
	p.in.DTBias = normals(r, d.H, 0, 0.5)
	p.in.ALog = make([]float64, d.H)
	for h := range p.in.ALog {
		p.in.ALog[h] = math.Log(1 + 15*r.Float64())
	}
	p.in.B = normals(r, bc, 0, 1)
	p.in.C = normals(r, bc, 0, 1)
	p.in.D = normals(r, dd, 0, 1)
	if withInit {
		p.in.InitState = normals(r, st, 0, 1)
	}
	p.dY = normals(r, x, 0, 1)
	p.dFinal = normals(r, st, 0, 1)
	return p
}

func newOutputs[T model.Float](d Dims, o Options) *Outputs[T] {
	x, _, _, _, st, bh := d.sizes(o)
	return &Outputs[T]{Y: make([]T, x), FinalState: make([]T, st), LogDecay: make([]T, bh)}
}

func newGrads[T model.Float](d Dims, o Options) *Grads[T] {
	x, dt, bc, dd, st, _ := d.sizes(o)
	return &Grads[T]{
		X: make([]T, x), DTRaw: make([]T, dt), B: make([]T, bc), C: make([]T, bc),
		DTBias: make([]T, d.H), ALog: make([]T, d.H), D: make([]T, dd), InitState: make([]T, st),
	}
}

// gradFields lists the gradients under their input names.
func gradFields[T model.Float](g *Grads[T]) []namedSlice[T] {
	return []namedSlice[T]{
		{"x", g.X}, {"dt_raw", g.DTRaw}, {"dt_bias", g.DTBias}, {"A_log", g.ALog},
		{"B", g.B}, {"C", g.C}, {"D", g.D}, {"initial_state", g.InitState},
	}
}

func outFields[T model.Float](o *Outputs[T]) []namedSlice[T] {
	return []namedSlice[T]{{"y", o.Y}, {"final_state", o.FinalState}, {"log_decay", o.LogDecay}}
}

type namedSlice[T model.Float] struct {
	name string
	s    []T
}

// relErr is max |got − want| divided by max |want| (or by 1 if want is
// all zeros).
func relErr[A, B model.Float](got []A, want []B) float64 {
	return relErrFloor(got, want, 0)
}

// relErrFloor is relErr with the scale raised to at least floor.
func relErrFloor[A, B model.Float](got []A, want []B, floor float64) float64 {
	if len(got) != len(want) {
		return math.Inf(1)
	}
	var diff, scale float64
	for i := range got {
		diff = max(diff, math.Abs(float64(got[i])-float64(want[i])))
		scale = max(scale, math.Abs(float64(want[i])))
	}
	if math.IsNaN(diff) {
		return math.Inf(1)
	}
	if scale == 0 {
		scale = 1
	}
	return diff / max(scale, floor)
}

func assertCloseFloor[A, B model.Float](t *testing.T, what string, got []A, want []B, tol, floor float64) {
	t.Helper()
	if e := relErrFloor(got, want, floor); !(e <= tol) {
		t.Errorf("%s: relative error %.3g > %.3g (scale floor %g)", what, e, tol, floor)
	}
}

func assertClose[A, B model.Float](t *testing.T, what string, got []A, want []B, tol float64) {
	t.Helper()
	if e := relErr(got, want); !(e <= tol) {
		t.Errorf("%s: relative error %.3g > %.3g", what, e, tol)
	}
}

func toF32(s []float64) []float32 {
	if s == nil {
		return nil
	}
	out := make([]float32, len(s))
	for i, v := range s {
		out[i] = float32(v)
	}
	return out
}

func inputsF32(in *Inputs[float64]) *Inputs[float32] {
	return &Inputs[float32]{
		X: toF32(in.X), DTRaw: toF32(in.DTRaw), DTBias: toF32(in.DTBias), ALog: toF32(in.ALog),
		B: toF32(in.B), C: toF32(in.C), D: toF32(in.D), InitState: toF32(in.InitState),
	}
}

func mustForward[T model.Float](t testing.TB, chunked bool, d Dims, o Options, in *Inputs[T]) *Outputs[T] {
	t.Helper()
	out := newOutputs[T](d, o)
	var err error
	if chunked {
		err = Forward(d, o, in, out)
	} else {
		err = ForwardRecurrent(d, o, in, out)
	}
	if err != nil {
		t.Fatalf("forward (chunked=%v): %v", chunked, err)
	}
	return out
}

func mustBackward[T model.Float](t testing.TB, chunked bool, d Dims, o Options, in *Inputs[T], dY, dFinal []T) *Grads[T] {
	t.Helper()
	g := newGrads[T](d, o)
	var err error
	if chunked {
		err = Backward(d, o, in, dY, dFinal, g)
	} else {
		err = BackwardRecurrent(d, o, in, dY, dFinal, g)
	}
	if err != nil {
		t.Fatalf("backward (chunked=%v): %v", chunked, err)
	}
	return g
}

// grid is the set of problems the chunked/recurrent equivalence runs on:
// every Q of §7 item 1, with and without an initial state, G ∈ {1, 2, H},
// and both D layouts.
func grid() []problem {
	var ps []problem
	seed := uint64(1)
	for _, G := range []int{1, 2, 4} {
		for _, Q := range []int{1, 2, 3, 4, 5, 7, 12, 16} { // L = 12: divisors 1,2,3,4,12; non-divisors 5,7; Q > L: 16
			for _, init := range []bool{false, true} {
				hdim := (Q+G)%2 == 0
				d := Dims{Batch: 2, L: 12, H: 4, P: 3, N: 5, G: G}
				o := Options{Chunk: Q, DHasHdim: hdim}
				mean := 0.0
				if seed%2 == 0 {
					mean = -4
				}
				ps = append(ps, newProblem(seed, d, o, init, mean))
				seed++
			}
		}
	}
	return ps
}
