package linalg

import (
	"math"
	"math/rand/v2"
	"testing"
)

func TestAxpy(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	for _, n := range []int{0, 1, 3, 4, 5, 17, 64} {
		for _, alpha := range []float64{0, 1, -2.5} {
			x, y := randSlice(rng, n), randSlice(rng, n)
			// The compiler may fuse the multiply and add (it does for
			// GOAMD64=v3), so either rounding is right.
			want, fused := make([]float64, n), make([]float64, n)
			for i := range want {
				want[i] = y[i] + float64(alpha*x[i])
				fused[i] = math.FMA(alpha, x[i], y[i])
			}
			Axpy(alpha, x, y)
			for i := range y {
				if y[i] != want[i] && y[i] != fused[i] {
					t.Errorf("n=%d alpha=%v: y[%d] = %v, want %v or, fused, %v", n, alpha, i, y[i], want[i], fused[i])
				}
			}
		}
	}
}

func TestDot(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for _, n := range []int{0, 1, 3, 4, 5, 17, 64, 1001} {
		x, y := randSlice(rng, n), randSlice(rng, n)
		var want, mag float64
		for i := range x {
			want += x[i] * y[i]
			mag += math.Abs(x[i] * y[i])
		}
		x32, y32 := convert[float32](x), convert[float32](y)
		var want32 float64
		for i := range x32 {
			want32 += float64(x32[i]) * float64(y32[i])
		}
		if got := Dot(x, y); math.Abs(got-want) > float64(n+1)*0x1p-52*mag {
			t.Errorf("float64 n=%d: Dot = %v, want %v", n, got, want)
		}
		if got := Dot(x32, y32); math.Abs(float64(got)-want32) > float64(n+1)*0x1p-23*mag+1e-30 {
			t.Errorf("float32 n=%d: Dot = %v, want %v", n, got, want32)
		}
	}
}

func TestDotFixedOrder(t *testing.T) {
	// Values chosen so that a different association gives a different
	// result: the documented order adds the four lanes pairwise before the
	// tail.
	x := []float32{1e8, 1, -1e8, 1, 1}
	y := []float32{1, 1, 1, 1, 1}
	// lanes: s0=1e8, s1=1, s2=-1e8, s3=1; (1e8+1)+(-1e8+1) = 1e8 + -1e8 = 0
	// in float32 (1e8+1 rounds to 1e8); then the tail adds 1.
	if got := Dot(x, y); got != 1 {
		t.Fatalf("Dot = %v, want 1 from the documented summation order", got)
	}
}

func TestVecPanics(t *testing.T) {
	tests := []struct {
		name string
		call func()
	}{
		{"Axpy", func() { Axpy(1, []float64{1, 2}, []float64{1}) }},
		{"Dot", func() { Dot([]float32{1}, []float32{1, 2}) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic on length mismatch")
				}
			}()
			tc.call()
		})
	}
}
