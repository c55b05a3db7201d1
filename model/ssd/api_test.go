package ssd

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
)

// TestFloat32ChunkedMatchesFloat64 runs the chunked scan in float32 and
// compares it with the float64 recurrence on the same (float32-rounded)
// inputs.
func TestFloat32ChunkedMatchesFloat64(t *testing.T) {
	d := Dims{Batch: 2, L: 70, H: 4, P: 8, N: 16, G: 2}
	for _, Q := range []int{16, 32} {
		t.Run(fmt.Sprintf("Q%d", Q), func(t *testing.T) {
			o := Options{Chunk: Q}
			p := newProblem(81, d, o, true, -1)
			in32 := inputsF32(&p.in)
			// The float64 reference reads the same rounded values.
			in64 := Inputs[float64]{}
			for _, pr := range []struct {
				dst *[]float64
				src []float32
			}{{&in64.X, in32.X}, {&in64.DTRaw, in32.DTRaw}, {&in64.DTBias, in32.DTBias}, {&in64.ALog, in32.ALog},
				{&in64.B, in32.B}, {&in64.C, in32.C}, {&in64.D, in32.D}, {&in64.InitState, in32.InitState}} {
				*pr.dst = make([]float64, len(pr.src))
				for i, v := range pr.src {
					(*pr.dst)[i] = float64(v)
				}
			}
			dY32, dF32 := toF32(p.dY), toF32(p.dFinal)
			dY64, dF64 := make([]float64, len(dY32)), make([]float64, len(dF32))
			for i, v := range dY32 {
				dY64[i] = float64(v)
			}
			for i, v := range dF32 {
				dF64[i] = float64(v)
			}
			want := mustForward(t, false, d, o, &in64)
			got := mustForward(t, true, d, o, in32)
			wf := outFields(want)
			for i, f := range outFields(got) {
				assertClose(t, f.name, f.s, wf[i].s, 1e-5)
			}
			wg := mustBackward(t, false, d, o, &in64, dY64, dF64)
			gg := mustBackward(t, true, d, o, in32, dY32, dF32)
			wgf := gradFields(wg)
			for i, f := range gradFields(gg) {
				assertClose(t, "grad "+f.name, f.s, wgf[i].s, 1e-5)
			}
		})
	}
}

// TestBadInput checks that every entry point rejects each wrong slice length
// with an error that wraps ErrLength and names the slice, and rejects bad
// dimensions and options.
func TestBadInput(t *testing.T) {
	d := Dims{Batch: 2, L: 5, H: 4, P: 2, N: 3, G: 2}
	o := Options{Chunk: 2, DHasHdim: true}
	base := newProblem(91, d, o, true, 0)

	type call func(d Dims, o Options, in *Inputs[float64], out *Outputs[float64], dY, dFinal []float64, g *Grads[float64]) error
	fwd := map[string]call{
		"Forward": func(d Dims, o Options, in *Inputs[float64], out *Outputs[float64], _, _ []float64, _ *Grads[float64]) error {
			return Forward(d, o, in, out)
		},
		"ForwardRecurrent": func(d Dims, o Options, in *Inputs[float64], out *Outputs[float64], _, _ []float64, _ *Grads[float64]) error {
			return ForwardRecurrent(d, o, in, out)
		},
		"Workspace.Forward": func(d Dims, o Options, in *Inputs[float64], out *Outputs[float64], _, _ []float64, _ *Grads[float64]) error {
			var ws Workspace[float64]
			return ws.Forward(d, o, in, out)
		},
	}
	bwd := map[string]call{
		"Backward": func(d Dims, o Options, in *Inputs[float64], _ *Outputs[float64], dY, dFinal []float64, g *Grads[float64]) error {
			return Backward(d, o, in, dY, dFinal, g)
		},
		"BackwardRecurrent": func(d Dims, o Options, in *Inputs[float64], _ *Outputs[float64], dY, dFinal []float64, g *Grads[float64]) error {
			return BackwardRecurrent(d, o, in, dY, dFinal, g)
		},
		"Workspace.Backward": func(d Dims, o Options, in *Inputs[float64], _ *Outputs[float64], dY, dFinal []float64, g *Grads[float64]) error {
			var ws Workspace[float64]
			return ws.Backward(d, o, in, dY, dFinal, g)
		},
	}
	type args struct {
		in     Inputs[float64]
		out    *Outputs[float64]
		dY     []float64
		dFinal []float64
		g      *Grads[float64]
	}
	fresh := func() *args {
		a := &args{in: base.in, out: newOutputs[float64](d, o), dY: base.dY, dFinal: base.dFinal, g: newGrads[float64](d, o)}
		return a
	}
	shorten := func(s *[]float64) { *s = (*s)[:len(*s)-1] }
	inputCases := map[string]func(a *args){
		"Inputs.X": func(a *args) { shorten(&a.in.X) }, "Inputs.DTRaw": func(a *args) { shorten(&a.in.DTRaw) },
		"Inputs.DTBias": func(a *args) { shorten(&a.in.DTBias) }, "Inputs.ALog": func(a *args) { shorten(&a.in.ALog) },
		"Inputs.B": func(a *args) { shorten(&a.in.B) }, "Inputs.C": func(a *args) { shorten(&a.in.C) },
		"Inputs.D": func(a *args) { a.in.D = a.in.D[:d.H] }, "Inputs.InitState": func(a *args) { shorten(&a.in.InitState) },
	}
	fwdCases := map[string]func(a *args){
		"Outputs.Y": func(a *args) { shorten(&a.out.Y) }, "Outputs.FinalState": func(a *args) { shorten(&a.out.FinalState) },
		"Outputs.LogDecay": func(a *args) { a.out.LogDecay = nil },
	}
	bwdCases := map[string]func(a *args){
		"dY": func(a *args) { shorten(&a.dY) }, "dFinal": func(a *args) { shorten(&a.dFinal) },
		"Grads.X": func(a *args) { shorten(&a.g.X) }, "Grads.DTRaw": func(a *args) { shorten(&a.g.DTRaw) },
		"Grads.B": func(a *args) { shorten(&a.g.B) }, "Grads.C": func(a *args) { a.g.C = nil },
		"Grads.DTBias": func(a *args) { shorten(&a.g.DTBias) }, "Grads.ALog": func(a *args) { shorten(&a.g.ALog) },
		"Grads.D": func(a *args) { shorten(&a.g.D) }, "Grads.InitState": func(a *args) { shorten(&a.g.InitState) },
	}
	for _, group := range []struct {
		calls map[string]call
		cases []map[string]func(*args)
	}{{fwd, []map[string]func(*args){inputCases, fwdCases}}, {bwd, []map[string]func(*args){inputCases, bwdCases}}} {
		for cname, c := range group.calls {
			a := fresh()
			if err := c(d, o, &a.in, a.out, a.dY, a.dFinal, a.g); err != nil {
				t.Fatalf("%s with valid input: %v", cname, err)
			}
			for _, cases := range group.cases {
				for field, breakIt := range cases {
					t.Run(cname+"/"+field, func(t *testing.T) {
						a := fresh()
						breakIt(a)
						err := c(d, o, &a.in, a.out, a.dY, a.dFinal, a.g)
						if !errors.Is(err, ErrLength) || !strings.Contains(err.Error(), field+" has") {
							t.Fatalf("got %v, want ErrLength naming %s", err, field)
						}
					})
				}
			}
			for _, bad := range []struct {
				name string
				d    Dims
				o    Options
				want error
			}{
				{"zero_L", Dims{Batch: 2, L: 0, H: 4, P: 2, N: 3, G: 2}, o, ErrDims},
				{"G_not_dividing_H", Dims{Batch: 2, L: 5, H: 4, P: 2, N: 3, G: 3}, o, ErrDims},
				{"dt_limit_inverted", d, Options{Chunk: 2, DHasHdim: true, DTLimit: [2]float64{0.5, 0.1}}, ErrOptions},
				{"dt_limit_nan", d, Options{Chunk: 2, DHasHdim: true, DTLimit: [2]float64{math.NaN(), 1}}, ErrOptions},
			} {
				t.Run(cname+"/"+bad.name, func(t *testing.T) {
					a := fresh()
					if err := c(bad.d, bad.o, &a.in, a.out, a.dY, a.dFinal, a.g); !errors.Is(err, bad.want) {
						t.Fatalf("got %v, want %v", err, bad.want)
					}
				})
			}
			if !strings.Contains(cname, "Recurrent") {
				t.Run(cname+"/zero_chunk", func(t *testing.T) {
					a := fresh()
					err := c(d, Options{DHasHdim: true}, &a.in, a.out, a.dY, a.dFinal, a.g)
					if !errors.Is(err, ErrOptions) || !strings.Contains(err.Error(), "Chunk") {
						t.Fatalf("got %v, want ErrOptions naming Chunk", err)
					}
				})
			}
		}
	}
}
