package ssd

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
)

// initCases are the problems the initial-state tests run on: chunk lengths
// dividing L, not dividing it and longer than it, shared and per-head
// groups, small and moderate dt.
func initCases() []problem {
	var ps []problem
	seed := uint64(300)
	for _, G := range []int{1, 2} {
		for _, Q := range []int{1, 3, 4, 16} {
			d := Dims{Batch: 2, L: 11, H: 4, P: 3, N: 5, G: G}
			mean := 0.0
			if Q%2 == 1 {
				mean = -3
			}
			ps = append(ps, newProblem(seed, d, Options{Chunk: Q}, true, mean))
			seed++
		}
	}
	return ps
}

// subtract returns a − b.
func subtract(a, b []float64) []float64 {
	out := make([]float64, len(a))
	for i := range a {
		out[i] = a[i] - b[i]
	}
	return out
}

// TestAddInitialStateMatchesScan checks the identity AddInitialState is
// for: a scan from a zero state plus the correction equals the scan started
// from the state, in output and final state, for the recurrent reference and
// the chunked scan.
func TestAddInitialStateMatchesScan(t *testing.T) {
	for _, p := range initCases() {
		for _, chunked := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v_chunked%v", p, chunked), func(t *testing.T) {
				want := mustForward(t, false, p.d, p.o, &p.in)
				h := p.in.InitState
				zin := p.in
				zin.InitState = nil
				got := mustForward(t, chunked, p.d, p.o, &zin)
				if err := AddInitialState(p.d, p.o, &zin, h, got.Y, got.FinalState); err != nil {
					t.Fatal(err)
				}
				assertClose(t, "y", got.Y, want.Y, 1e-13)
				assertClose(t, "final_state", got.FinalState, want.FinalState, 1e-13)

				// float32 follows float64 to its own rounding.
				zin32 := inputsF32(&zin)
				got32 := mustForward(t, chunked, p.d, p.o, zin32)
				if err := AddInitialState(p.d, p.o, zin32, toF32(h), got32.Y, got32.FinalState); err != nil {
					t.Fatal(err)
				}
				assertClose(t, "float32 y", got32.Y, want.Y, 1e-5)
				assertClose(t, "float32 final_state", got32.FinalState, want.FinalState, 1e-5)
			})
		}
	}
}

// TestInitialStateBackwardMatchesScan checks the gradients against the
// reverse recurrence: the backward of a scan from h minus the backward of
// the same scan from zero is exactly what h contributes (the scan is linear
// in h), and the initial-state gradient is the scan's own.
func TestInitialStateBackwardMatchesScan(t *testing.T) {
	for _, p := range initCases() {
		for _, withFinal := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v_dFinal%v", p, withFinal), func(t *testing.T) {
				dFinal := p.dFinal
				if !withFinal {
					dFinal = nil
				}
				full := mustBackward(t, false, p.d, p.o, &p.in, p.dY, dFinal)
				h := p.in.InitState
				zin := p.in
				zin.InitState = nil
				zero := mustBackward(t, false, p.d, p.o, &zin, p.dY, dFinal)
				g := newInitGrads(p.d, p.o)
				if err := InitialStateBackward(p.d, p.o, &zin, h, p.dY, dFinal, g); err != nil {
					t.Fatal(err)
				}
				assertClose(t, "initial_state", g.InitState, full.InitState, 1e-13)
				// Differences of two gradients: measure against the scale of
				// the gradient itself, not of the (possibly small) difference.
				for _, f := range []struct {
					name            string
					got, full, zero []float64
				}{{"C", g.C, full.C, zero.C}, {"dt_raw", g.DTRaw, full.DTRaw, zero.DTRaw},
					{"dt_bias", g.DTBias, full.DTBias, zero.DTBias}, {"A_log", g.ALog, full.ALog, zero.ALog}} {
					scale := relErr(f.full, make([]float64, len(f.full))) // max |full|
					assertCloseFloor(t, f.name, f.got, subtract(f.full, f.zero), 1e-12, scale)
				}
			})
		}
	}
}

func newInitGrads(d Dims, o Options) *InitialStateGrads[float64] {
	_, dt, bc, _, st, _ := d.sizes(o)
	return &InitialStateGrads[float64]{InitState: make([]float64, st), C: make([]float64, bc),
		DTRaw: make([]float64, dt), DTBias: make([]float64, d.H), ALog: make([]float64, d.H)}
}

// TestInitialStateBackwardFiniteDifferences checks every gradient of the
// correction against central differences of ⟨dY, Δy⟩ + ⟨dFinal, Δfinal⟩,
// including dt above the softplus threshold and a clamped dt.
func TestInitialStateBackwardFiniteDifferences(t *testing.T) {
	d := Dims{Batch: 2, L: 7, H: 4, P: 2, N: 3, G: 2}
	cases := []struct {
		name  string
		o     Options
		mean  float64
		bigDT bool
	}{
		{name: "default", o: Options{Chunk: 3}},
		{name: "small_dt", o: Options{Chunk: 4}, mean: -4},
		{name: "softplus_threshold", o: Options{Chunk: 2}, mean: -1, bigDT: true},
		{name: "dt_limit", o: Options{Chunk: 5, DTLimit: [2]float64{0.4, 0.9}}},
	}
	const eps = 1e-6
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newProblem(uint64(400+i), d, tc.o, true, tc.mean)
			if tc.bigDT {
				for k := 0; k < len(p.in.DTRaw); k += 5 {
					p.in.DTRaw[k] = 21 + float64(k%3)
				}
			}
			h := p.in.InitState
			p.in.InitState = nil
			x, _, _, _, st, _ := d.sizes(tc.o)
			objective := func() float64 {
				y, fin := make([]float64, x), make([]float64, st)
				if err := AddInitialState(d, tc.o, &p.in, h, y, fin); err != nil {
					t.Fatal(err)
				}
				var s float64
				for k, v := range y {
					s += p.dY[k] * v
				}
				for k, v := range fin {
					s += p.dFinal[k] * v
				}
				return s
			}
			g := newInitGrads(d, tc.o)
			if err := InitialStateBackward(d, tc.o, &p.in, h, p.dY, p.dFinal, g); err != nil {
				t.Fatal(err)
			}
			for _, f := range []struct {
				name     string
				in, grad []float64
			}{{"initial_state", h, g.InitState}, {"C", p.in.C, g.C}, {"dt_raw", p.in.DTRaw, g.DTRaw},
				{"dt_bias", p.in.DTBias, g.DTBias}, {"A_log", p.in.ALog, g.ALog}} {
				fd := make([]float64, len(f.in))
				for k := range f.in {
					orig := f.in[k]
					f.in[k] = orig + eps
					up := objective()
					f.in[k] = orig - eps
					down := objective()
					f.in[k] = orig
					fd[k] = (up - down) / (2 * eps)
				}
				if relErr(fd, make([]float64, len(fd))) == 0 {
					t.Errorf("%s: finite differences are all zero: the check would prove nothing", f.name)
				}
				assertCloseFloor(t, f.name, f.grad, fd, 1e-7, 0.1)
			}
		})
	}
}

// TestInitialStateBackwardSubsets checks that gradients left nil are not
// needed by the others, that a nil hIn is zero, and that the dt gradients
// come all together.
func TestInitialStateBackwardSubsets(t *testing.T) {
	p := newProblem(500, Dims{Batch: 2, L: 9, H: 4, P: 3, N: 2, G: 2}, Options{Chunk: 4}, true, -1)
	h := p.in.InitState
	p.in.InitState = nil
	all := newInitGrads(p.d, p.o)
	if err := InitialStateBackward(p.d, p.o, &p.in, h, p.dY, p.dFinal, all); err != nil {
		t.Fatal(err)
	}
	var ws Workspace[float64]
	dtGrads := func(g *InitialStateGrads[float64]) []float64 {
		return append(append(append([]float64(nil), g.DTRaw...), g.DTBias...), g.ALog...)
	}
	for _, pick := range []string{"InitState", "C", "dt"} {
		g := newInitGrads(p.d, p.o)
		switch pick {
		case "InitState":
			g.C, g.DTRaw, g.DTBias, g.ALog = nil, nil, nil, nil
		case "C":
			g.InitState, g.DTRaw, g.DTBias, g.ALog = nil, nil, nil, nil
		case "dt":
			g.InitState, g.C = nil, nil
		}
		if err := ws.InitialStateBackward(p.d, p.o, &p.in, h, p.dY, p.dFinal, g); err != nil {
			t.Fatal(err)
		}
		got, want := g.InitState, all.InitState
		switch pick {
		case "C":
			got, want = g.C, all.C
		case "dt":
			got, want = dtGrads(g), dtGrads(all)
		}
		if !bitEqual(got, want) {
			t.Errorf("%s alone differs from %s computed with the others", pick, pick)
		}
	}

	// A nil hIn: the state gradient is unchanged, the others are zero, and
	// the forward adds nothing.
	g := newInitGrads(p.d, p.o)
	for i := range g.C {
		g.C[i] = 1 // must be overwritten
	}
	if err := ws.InitialStateBackward(p.d, p.o, &p.in, nil, p.dY, p.dFinal, g); err != nil {
		t.Fatal(err)
	}
	if !bitEqual(g.InitState, all.InitState) {
		t.Error("nil hIn changed the initial-state gradient")
	}
	for _, f := range [][]float64{g.C, g.DTRaw, g.DTBias, g.ALog} {
		for _, v := range f {
			if v != 0 {
				t.Fatalf("nil hIn left a nonzero gradient %g", v)
			}
		}
	}
	y := append([]float64(nil), p.dY...)
	if err := ws.AddInitialState(p.d, p.o, &p.in, nil, y, nil); err != nil {
		t.Fatal(err)
	}
	if !bitEqual(y, p.dY) {
		t.Error("a nil hIn changed y")
	}

	half := newInitGrads(p.d, p.o)
	half.ALog = nil
	if err := ws.InitialStateBackward(p.d, p.o, &p.in, h, p.dY, nil, half); !errors.Is(err, ErrLength) {
		t.Errorf("DTRaw and DTBias without ALog: got %v, want ErrLength", err)
	}
}

// TestInitialStateBadInput checks that wrong lengths are reported, naming
// the slice.
func TestInitialStateBadInput(t *testing.T) {
	p := newProblem(501, Dims{Batch: 1, L: 5, H: 2, P: 2, N: 2, G: 1}, Options{Chunk: 2}, true, 0)
	h := p.in.InitState
	x, _, _, _, st, _ := p.d.sizes(p.o)
	short := func(s []float64) []float64 { return s[:len(s)-1] }
	for name, run := range map[string]func() error{
		"hIn": func() error { return AddInitialState(p.d, p.o, &p.in, short(h), make([]float64, x), nil) },
		"y":   func() error { return AddInitialState(p.d, p.o, &p.in, h, make([]float64, x-1), nil) },
		"final": func() error {
			return AddInitialState(p.d, p.o, &p.in, h, make([]float64, x), make([]float64, st+1))
		},
		"Inputs.C": func() error {
			in := p.in
			in.C = short(in.C)
			return AddInitialState(p.d, p.o, &in, h, make([]float64, x), nil)
		},
		"dY": func() error {
			return InitialStateBackward(p.d, p.o, &p.in, h, short(p.dY), nil, newInitGrads(p.d, p.o))
		},
		"InitialStateGrads.C": func() error {
			g := newInitGrads(p.d, p.o)
			g.C = short(g.C)
			return InitialStateBackward(p.d, p.o, &p.in, h, p.dY, nil, g)
		},
	} {
		err := run()
		if !errors.Is(err, ErrLength) {
			t.Errorf("%s: got %v, want ErrLength", name, err)
			continue
		}
		if want := name + " has"; !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q does not name the slice", name, err)
		}
	}
	if err := AddInitialState(p.d, Options{}, &p.in, h, make([]float64, x), nil); !errors.Is(err, ErrOptions) {
		t.Errorf("zero Chunk: got %v, want ErrOptions", err)
	}
}

// TestInitialStateStrongDecay checks that decays flushed to zero (§ flushBelow)
// leave finite results equal to the recurrence's.
func TestInitialStateStrongDecay(t *testing.T) {
	d := Dims{Batch: 1, L: 40, H: 2, P: 2, N: 2, G: 1}
	o := Options{Chunk: 8}
	p := newProblem(502, d, o, true, 4) // dt ≈ 4, A up to −16: Λ far below the cut
	for h := range p.in.ALog {
		p.in.ALog[h] = math.Log(16)
	}
	want := mustForward(t, false, d, o, &p.in)
	h := p.in.InitState
	p.in.InitState = nil
	got := mustForward(t, true, d, o, &p.in)
	if err := AddInitialState(d, o, &p.in, h, got.Y, got.FinalState); err != nil {
		t.Fatal(err)
	}
	assertClose(t, "y", got.Y, want.Y, 1e-13)
	assertClose(t, "final_state", got.FinalState, want.FinalState, 1e-13)
	g := newInitGrads(d, o)
	if err := InitialStateBackward(d, o, &p.in, h, p.dY, p.dFinal, g); err != nil {
		t.Fatal(err)
	}
	for _, s := range [][]float64{g.InitState, g.C, g.DTRaw, g.DTBias, g.ALog} {
		for _, v := range s {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				t.Fatalf("non-finite gradient %g", v)
			}
		}
	}
}
