package ssd

import (
	"fmt"
	"slices"
	"testing"

	"github.com/m2train/m2train/model/safetensors"
)

const oraclePath = "../testdata/oracle/ssd-small/ssd.safetensors"

// oracle is the ssd-small reference of model/testdata/oracle: inputs,
// upstream gradients, outputs and every input gradient, all float64.
type oracle struct {
	d      Dims
	in     Inputs[float64]
	dY     []float64
	dFinal []float64
	out    Outputs[float64]
	grads  Grads[float64]
}

func loadOracle(t *testing.T) *oracle {
	t.Helper()
	f, err := safetensors.ReadFile(oraclePath)
	if err != nil {
		t.Fatalf("read oracle: %v", err)
	}
	// batch 2, length 37, 4 heads, head dim 8, 2 groups, state 16.
	d := Dims{Batch: 2, L: 37, H: 4, P: 8, N: 16, G: 2}
	get := func(name string, shape ...int) []float64 {
		tn, ok := f.Get(name)
		if !ok {
			t.Fatalf("oracle has no tensor %q", name)
		}
		if !slices.Equal(tn.Shape, shape) {
			t.Fatalf("oracle tensor %q has shape %v, want %v", name, tn.Shape, shape)
		}
		v, err := tn.Float64s()
		if err != nil {
			t.Fatalf("oracle tensor %q: %v", name, err)
		}
		return v
	}
	bt, l, h, p, n, g := d.Batch, d.L, d.H, d.P, d.N, d.G
	o := &oracle{d: d}
	o.in = Inputs[float64]{
		X: get("x", bt, l, h, p), DTRaw: get("dt_raw", bt, l, h), DTBias: get("dt_bias", h), ALog: get("A_log", h),
		B: get("B", bt, l, g, n), C: get("C", bt, l, g, n), D: get("D", h), InitState: get("initial_state", bt, h, p, n),
	}
	o.dY = get("grad_y", bt, l, h, p)
	o.dFinal = get("grad_final_state", bt, h, p, n)
	o.out = Outputs[float64]{Y: get("y", bt, l, h, p), FinalState: get("final_state", bt, h, p, n)}
	o.grads = Grads[float64]{
		X: get("grad.x", bt, l, h, p), DTRaw: get("grad.dt_raw", bt, l, h), DTBias: get("grad.dt_bias", h),
		ALog: get("grad.A_log", h), B: get("grad.B", bt, l, g, n), C: get("grad.C", bt, l, g, n),
		D: get("grad.D", h), InitState: get("grad.initial_state", bt, h, p, n),
	}
	return o
}

// TestOracle matches the reference numbers of ssd-small: float64 to 1e-9
// and float32 to 1e-4, each relative to the largest magnitude of the
// tensor, for the recurrence and for the chunked scan at several Q.
func TestOracle(t *testing.T) {
	or := loadOracle(t)
	d := or.d
	for _, tc := range []struct {
		chunked bool
		q       int
	}{{false, 0}, {true, 1}, {true, 4}, {true, 8}, {true, 16}, {true, 37}, {true, 64}} {
		name := "recurrent"
		if tc.chunked {
			name = fmt.Sprintf("chunked_Q%d", tc.q)
		}
		o := Options{Chunk: tc.q}
		t.Run(name+"/float64", func(t *testing.T) {
			out := mustForward(t, tc.chunked, d, o, &or.in)
			assertClose(t, "y", out.Y, or.out.Y, 1e-9)
			assertClose(t, "final_state", out.FinalState, or.out.FinalState, 1e-9)
			g := mustBackward(t, tc.chunked, d, o, &or.in, or.dY, or.dFinal)
			want := gradFields(&or.grads)
			for i, f := range gradFields(g) {
				assertClose(t, "grad."+f.name, f.s, want[i].s, 1e-9)
			}
		})
		t.Run(name+"/float32", func(t *testing.T) {
			in := inputsF32(&or.in)
			out := mustForward(t, tc.chunked, d, o, in)
			assertClose(t, "y", out.Y, or.out.Y, 1e-4)
			assertClose(t, "final_state", out.FinalState, or.out.FinalState, 1e-4)
			g := mustBackward(t, tc.chunked, d, o, in, toF32(or.dY), toF32(or.dFinal))
			want := gradFields(&or.grads)
			for i, f := range gradFields(g) {
				assertClose(t, "grad."+f.name, f.s, want[i].s, 1e-4)
			}
		})
	}
}
