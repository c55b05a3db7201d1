package kernels

import (
	"math"
	"testing"
)

// Every bf16 bit pattern converts to float32 and back to itself.
func TestBF16RoundTrip(t *testing.T) {
	for b := 0; b < 1<<16; b++ {
		h := uint16(b)
		if got := BF16FromF32(F32FromBF16(h)); got != h {
			t.Fatalf("bf16 %#04x -> %g -> %#04x", h, F32FromBF16(h), got)
		}
	}
}

func TestBF16Rounding(t *testing.T) {
	one := float32(1)
	ulp := float32(math.Ldexp(1, -7)) // spacing of bf16 values in [1, 2)
	for _, tc := range []struct {
		name string
		in   float32
		want float32
	}{
		{"exact", 1.5, 1.5},
		{"below half ulp", one + ulp*0.49, one},
		{"above half ulp", one + ulp*0.51, one + ulp},
		{"tie to even (down)", one + ulp/2, one},
		{"tie to even (up)", one + ulp*1.5, one + 2*ulp},
		{"negative", -(one + ulp*0.51), -(one + ulp)},
		{"overflow", math.MaxFloat32, float32(math.Inf(1))},
		{"largest finite stays", F32FromBF16(0x7f7f), F32FromBF16(0x7f7f)},
		{"negative zero", float32(math.Copysign(0, -1)), float32(math.Copysign(0, -1))},
		{"subnormal", math.Float32frombits(0x00010000), math.Float32frombits(0x00010000)},
	} {
		got := RoundBF16(tc.in)
		if math.Float32bits(got) != math.Float32bits(tc.want) {
			t.Errorf("%s: RoundBF16(%g) = %g, want %g", tc.name, tc.in, got, tc.want)
		}
	}
	// A NaN whose payload lies only in the discarded bits stays a NaN.
	if v := RoundBF16(math.Float32frombits(0x7f800001)); !math.IsNaN(float64(v)) {
		t.Errorf("NaN with a low payload rounded to %g", v)
	}
}

func TestBF16Slices(t *testing.T) {
	src := []float32{0, 1, -2.5, 3.14159, 1e-3}
	h := make([]uint16, len(src))
	BF16FromF32Slice(h, src)
	back := make([]float32, len(src))
	F32FromBF16Slice(back, h)
	for i, v := range src {
		if back[i] != RoundBF16(v) {
			t.Errorf("element %d: %g -> %g, want %g", i, v, back[i], RoundBF16(v))
		}
		if d := math.Abs(float64(back[i] - v)); d > math.Abs(float64(v))*math.Ldexp(1, -8) {
			t.Errorf("element %d: %g -> %g, error above 2^-8 relative", i, v, back[i])
		}
	}
}
