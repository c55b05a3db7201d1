package ssd

import (
	"math"
	"runtime"
	"testing"
)

func TestChunkedForwardMatchesRecurrent(t *testing.T) {
	for _, p := range grid() {
		t.Run(p.String(), func(t *testing.T) {
			want := mustForward(t, false, p.d, p.o, &p.in)
			got := mustForward(t, true, p.d, p.o, &p.in)
			wf := outFields(want)
			for i, f := range outFields(got) {
				assertClose(t, f.name, f.s, wf[i].s, 1e-12)
			}
		})
	}
}

func TestChunkedBackwardMatchesRecurrent(t *testing.T) {
	for _, p := range grid() {
		t.Run(p.String(), func(t *testing.T) {
			want := mustBackward(t, false, p.d, p.o, &p.in, p.dY, p.dFinal)
			got := mustBackward(t, true, p.d, p.o, &p.in, p.dY, p.dFinal)
			wf := gradFields(want)
			for i, f := range gradFields(got) {
				assertClose(t, f.name, f.s, wf[i].s, 1e-11)
			}
		})
	}
}

// TestNilDFinalIsZero checks that a nil dFinal means a zero gradient on the
// final state, for both backward implementations.
func TestNilDFinalIsZero(t *testing.T) {
	p := newProblem(7, Dims{Batch: 1, L: 9, H: 2, P: 2, N: 3, G: 1}, Options{Chunk: 4}, true, 0)
	zero := make([]float64, len(p.dFinal))
	for _, chunked := range []bool{false, true} {
		a := mustBackward(t, chunked, p.d, p.o, &p.in, p.dY, nil)
		b := mustBackward(t, chunked, p.d, p.o, &p.in, p.dY, zero)
		bf := gradFields(b)
		for i, f := range gradFields(a) {
			assertClose(t, f.name, f.s, bf[i].s, 0)
		}
	}
}

// TestDeterministicAcrossWorkers checks that results do not depend on
// GOMAXPROCS: every output and gradient is bit-for-bit identical.
func TestDeterministicAcrossWorkers(t *testing.T) {
	p := newProblem(11, Dims{Batch: 3, L: 41, H: 6, P: 4, N: 8, G: 3}, Options{Chunk: 8}, true, 0)
	prev := runtime.GOMAXPROCS(0)
	defer runtime.GOMAXPROCS(prev)
	type result struct {
		out *Outputs[float64]
		g   *Grads[float64]
	}
	run := func(procs int) result {
		runtime.GOMAXPROCS(procs)
		var r result
		r.out = mustForward(t, true, p.d, p.o, &p.in)
		r.g = mustBackward(t, true, p.d, p.o, &p.in, p.dY, p.dFinal)
		return r
	}
	ref := run(1)
	for _, procs := range []int{2, 3, 8} {
		t.Run("procs"+string(rune('0'+procs)), func(t *testing.T) {
			r := run(procs)
			rf := outFields(ref.out)
			for i, f := range outFields(r.out) {
				if !bitEqual(f.s, rf[i].s) {
					t.Errorf("%s differs from GOMAXPROCS=1", f.name)
				}
			}
			rg := gradFields(ref.g)
			for i, f := range gradFields(r.g) {
				if !bitEqual(f.s, rg[i].s) {
					t.Errorf("grad %s differs from GOMAXPROCS=1", f.name)
				}
			}
		})
	}
}

func bitEqual(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float64bits(a[i]) != math.Float64bits(b[i]) {
			return false
		}
	}
	return true
}

// TestWorkspaceReuse checks that a Workspace used for problems of different
// sizes, in either order, gives the results of a fresh one.
func TestWorkspaceReuse(t *testing.T) {
	small := newProblem(21, Dims{Batch: 1, L: 7, H: 2, P: 2, N: 3, G: 1}, Options{Chunk: 3}, true, 0)
	big := newProblem(22, Dims{Batch: 2, L: 30, H: 4, P: 3, N: 4, G: 2}, Options{Chunk: 8, DHasHdim: true}, false, -4)
	var ws Workspace[float64]
	for _, p := range []problem{small, big, small, big} {
		out := newOutputs[float64](p.d, p.o)
		if err := ws.Forward(p.d, p.o, &p.in, out); err != nil {
			t.Fatal(err)
		}
		g := newGrads[float64](p.d, p.o)
		if err := ws.Backward(p.d, p.o, &p.in, p.dY, p.dFinal, g); err != nil {
			t.Fatal(err)
		}
		wantOut := mustForward(t, true, p.d, p.o, &p.in)
		wantG := mustBackward(t, true, p.d, p.o, &p.in, p.dY, p.dFinal)
		wf := outFields(wantOut)
		for i, f := range outFields(out) {
			assertClose(t, p.String()+" "+f.name, f.s, wf[i].s, 0)
		}
		wg := gradFields(wantG)
		for i, f := range gradFields(g) {
			assertClose(t, p.String()+" grad "+f.name, f.s, wg[i].s, 0)
		}
	}
}
