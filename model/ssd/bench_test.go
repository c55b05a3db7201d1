package ssd

import (
	"fmt"
	"testing"
)

// benchDT is the mean of dt_raw in the benchmarks: dt ≈ 0.02, inside the
// range the model initialises dt to, so that few decay factors are flushed.
var benchDT = -4.0

// benchShapes are the problem sizes of the benchmarks; the first is the
// reference shape (Bt=2, L=512, H=8, P=32, N=64, G=1, Q=64), the last has
// the head shape of the published models (P=64, N=128, Q=256).
var benchShapes = []struct {
	d Dims
	q int
}{
	{Dims{Batch: 2, L: 512, H: 8, P: 32, N: 64, G: 1}, 64},
	{Dims{Batch: 2, L: 512, H: 8, P: 32, N: 64, G: 1}, 128},
	{Dims{Batch: 1, L: 1024, H: 8, P: 64, N: 128, G: 1}, 256},
}

func benchName(d Dims, q int) string {
	return fmt.Sprintf("Bt%d_L%d_H%d_P%d_N%d_G%d_Q%d", d.Batch, d.L, d.H, d.P, d.N, d.G, q)
}

// BenchmarkForward times the float32 forward scans. SetBytes counts the
// bytes of X and Y; tokens/s counts batch·length positions.
func BenchmarkForward(b *testing.B) {
	for _, s := range benchShapes {
		o := Options{Chunk: s.q}
		p := newProblem(1, s.d, o, true, benchDT)
		in := inputsF32(&p.in)
		out := newOutputs[float32](s.d, o)
		for _, impl := range []string{"chunked", "recurrent"} {
			if impl == "recurrent" && s.q != benchShapes[0].q && s.d == benchShapes[0].d {
				continue // Q does not affect the recurrence
			}
			b.Run(impl+"/"+benchName(s.d, s.q), func(b *testing.B) {
				var ws Workspace[float32]
				b.SetBytes(int64(2 * 4 * len(in.X)))
				for b.Loop() {
					var err error
					if impl == "chunked" {
						err = ws.Forward(s.d, o, in, out)
					} else {
						err = ForwardRecurrent(s.d, o, in, out)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N*s.d.Batch*s.d.L)/b.Elapsed().Seconds(), "tokens/s")
			})
		}
	}
}

// BenchmarkForwardBackward times one float32 forward plus one backward (the
// work of one layer in a training step).
func BenchmarkForwardBackward(b *testing.B) {
	for _, s := range benchShapes {
		o := Options{Chunk: s.q}
		p := newProblem(1, s.d, o, true, benchDT)
		in := inputsF32(&p.in)
		dY, dF := toF32(p.dY), toF32(p.dFinal)
		out := newOutputs[float32](s.d, o)
		g := newGrads[float32](s.d, o)
		for _, impl := range []string{"chunked", "recurrent"} {
			if impl == "recurrent" && s.q != benchShapes[0].q && s.d == benchShapes[0].d {
				continue
			}
			b.Run(impl+"/"+benchName(s.d, s.q), func(b *testing.B) {
				var ws Workspace[float32]
				b.SetBytes(int64(2 * 4 * len(in.X)))
				for b.Loop() {
					var err error
					if impl == "chunked" {
						if err = ws.Forward(s.d, o, in, out); err == nil {
							err = ws.Backward(s.d, o, in, dY, dF, g)
						}
					} else {
						if err = ForwardRecurrent(s.d, o, in, out); err == nil {
							err = BackwardRecurrent(s.d, o, in, dY, dF, g)
						}
					}
					if err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N*s.d.Batch*s.d.L)/b.Elapsed().Seconds(), "tokens/s")
			})
		}
	}
}
