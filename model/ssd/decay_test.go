package ssd

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// TestSegDecays compares the running-product decay factors with decay
// itself on chunks whose cumulative log-decays stay small, cross the
// float32 cut, and cross the float64 cut: every factor must agree to a few
// roundings per step, and exactly those that decay flushes must be zero.
func TestSegDecays(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 22))
	for _, tc := range []struct {
		name    string
		q       int
		maxStep float64 // each step's log-decay is uniform in [-maxStep, 0]
		cut     float64
	}{
		{"gentle_f32", 64, 0.05, flushBelow[float32]()},
		{"crosses_f32_cut", 256, 1.5, flushBelow[float32]()},
		{"crosses_f64_cut", 256, 8, flushBelow[float64]()},
		{"zero_steps", 16, 0, flushBelow[float64]()},
	} {
		t.Run(fmt.Sprintf("%s_q%d", tc.name, tc.q), func(t *testing.T) {
			cs := make([]float64, tc.q)
			var run float64
			for j := range cs {
				run -= tc.maxStep * r.Float64()
				cs[j] = run
			}
			steps, e := make([]float64, tc.q), make([]float64, tc.q)
			stepDecays(cs, steps)
			flushed := 0
			for i := 0; i < tc.q; i++ {
				segDecays(cs, steps, i, tc.cut, e)
				for j := 0; j <= i; j++ {
					want := decay(cs[i]-cs[j], tc.cut)
					if want == 0 {
						flushed++
						if e[j] != 0 {
							t.Fatalf("e[%d][%d] = %v, want the flushed 0", i, j, e[j])
						}
						continue
					}
					if rel := math.Abs(e[j]-want) / want; rel > float64(4*(i-j)+1)*0x1p-52 {
						t.Fatalf("e[%d][%d] = %v, want %v (relative error %.3g)", i, j, e[j], want, rel)
					}
				}
			}
			if tc.maxStep > 1 && flushed == 0 {
				t.Fatal("no factor crossed the cut; the case tests nothing")
			}
		})
	}
}
