package safetensors

import (
	"math"
	"math/rand/v2"
	"testing"
)

func TestBF16FromFloat32Edges(t *testing.T) {
	f := math.Float32frombits
	cases := []struct {
		name string
		in   float32
		want uint16
	}{
		{"zero", 0, 0x0000},
		{"negative zero", float32(math.Copysign(0, -1)), 0x8000},
		{"one", 1, 0x3f80},
		{"minus two", -2, 0xc000},
		{"+inf", float32(math.Inf(1)), 0x7f80},
		{"-inf", float32(math.Inf(-1)), 0xff80},
		{"max bf16", f(0x7f7f0000), 0x7f7f},
		{"max float32 overflows", math.MaxFloat32, 0x7f80},
		{"just below overflow tie", f(0x7f7f7fff), 0x7f7f},
		{"overflow tie to even", f(0x7f7f8000), 0x7f80},
		{"tie rounds down to even", f(0x3f808000), 0x3f80},
		{"tie rounds up to even", f(0x3f818000), 0x3f82},
		{"above tie", f(0x3f808001), 0x3f81},
		{"below tie", f(0x3f807fff), 0x3f80},
		{"smallest subnormal f32", f(0x00000001), 0x0000},
		{"subnormal kept", f(0x00010000), 0x0001},
		{"subnormal tie to even", f(0x00018000), 0x0002},
		{"subnormal rounds to normal", f(0x007fc000), 0x0080},
		{"negative tie", f(0xbf808000), 0xbf80},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := BF16FromFloat32(c.in); got != c.want {
				t.Fatalf("BF16FromFloat32(%#08x) = %#04x, want %#04x", math.Float32bits(c.in), got, c.want)
			}
		})
	}
	for _, nan := range []uint32{0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fffffff} {
		h := BF16FromFloat32(f(nan))
		if !math.IsNaN(float64(Float32FromBF16(h))) || (h>>15) != uint16(nan>>31) {
			t.Errorf("NaN %#08x became %#04x", nan, h)
		}
	}
}

func TestF16FromFloat32Edges(t *testing.T) {
	f := math.Float32frombits
	cases := []struct {
		name string
		in   float32
		want uint16
	}{
		{"zero", 0, 0x0000},
		{"negative zero", float32(math.Copysign(0, -1)), 0x8000},
		{"one", 1, 0x3c00},
		{"minus two", -2, 0xc000},
		{"+inf", float32(math.Inf(1)), 0x7c00},
		{"-inf", float32(math.Inf(-1)), 0xfc00},
		{"max", 65504, 0x7bff},
		{"below overflow tie", 65519.996, 0x7bff},
		{"overflow tie to even", 65520, 0x7c00},
		{"huge", 1e10, 0x7c00},
		{"max float32", -math.MaxFloat32, 0xfc00},
		{"min normal", float32(math.Ldexp(1, -14)), 0x0400},
		{"max subnormal", float32(math.Ldexp(1023, -24)), 0x03ff},
		{"min subnormal", float32(math.Ldexp(1, -24)), 0x0001},
		{"half min subnormal ties to zero", float32(math.Ldexp(1, -25)), 0x0000},
		{"above half min subnormal", float32(math.Ldexp(1.0000001, -25)), 0x0001},
		{"1.5 min subnormal ties to 2", float32(math.Ldexp(3, -25)), 0x0002},
		{"2.5 min subnormal ties to 2", float32(math.Ldexp(5, -25)), 0x0002},
		{"below half min subnormal", float32(math.Ldexp(1, -26)), 0x0000},
		{"subnormal rounds up to normal", float32(math.Ldexp(2047, -25)), 0x0400},
		{"float32 subnormal", f(0x00000001), 0x0000},
		{"tie rounds down to even", 1 + 1.0/2048, 0x3c00},
		{"tie rounds up to even", 1 + 3.0/2048, 0x3c02},
		{"above tie", f(0x3f801001), 0x3c01},
		{"below tie", f(0x3f800fff), 0x3c00},
		{"negative subnormal", -float32(math.Ldexp(3, -24)), 0x8003},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := F16FromFloat32(c.in); got != c.want {
				t.Fatalf("F16FromFloat32(%g) = %#04x, want %#04x", c.in, got, c.want)
			}
			if got := F16FromFloat64(float64(c.in)); got != c.want {
				t.Fatalf("F16FromFloat64(%g) = %#04x, want %#04x", c.in, got, c.want)
			}
		})
	}
	for _, nan := range []uint32{0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fffffff} {
		h := F16FromFloat32(f(nan))
		if !math.IsNaN(float64(Float32FromF16(h))) || (h>>15) != uint16(nan>>31) {
			t.Errorf("NaN %#08x became %#04x", nan, h)
		}
	}
}

func TestHalfWideningExhaustive(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		u := uint16(h)
		for _, c := range []struct {
			name   string
			widen  func(uint16) float32
			narrow func(float32) uint16
			expM   uint16
		}{
			{"f16", Float32FromF16, F16FromFloat32, 0x7c00},
			{"bf16", Float32FromBF16, BF16FromFloat32, 0x7f80},
		} {
			v := c.widen(u)
			isNaN := u&c.expM == c.expM && u&^(c.expM|0x8000) != 0
			if isNaN {
				if !math.IsNaN(float64(v)) {
					t.Fatalf("%s %#04x: NaN widened to %g", c.name, u, v)
				}
				continue
			}
			if back := c.narrow(v); back != u {
				t.Fatalf("%s %#04x -> %g -> %#04x", c.name, u, v, back)
			}
		}
	}
	// Spot values of the widening.
	if v := Float32FromF16(0x0001); float64(v) != math.Ldexp(1, -24) {
		t.Fatalf("min f16 subnormal = %g", v)
	}
	if v := Float32FromF16(0x7bff); v != 65504 {
		t.Fatalf("max f16 = %g", v)
	}
	if v := Float32FromBF16(0x0001); float64(v) != math.Ldexp(1, -133) {
		t.Fatalf("min bf16 subnormal = %g", v)
	}
}

// TestHalfRoundingExhaustive checks every pair of adjacent finite positive
// 16-bit values: the midpoint ties to the even one, and points just off the
// midpoint go to the nearer value.
func TestHalfRoundingExhaustive(t *testing.T) {
	for _, c := range []struct {
		name   string
		widen  func(uint16) float32
		narrow func(float32) uint16
		wide64 func(float64) uint16
		maxFin uint16
	}{
		{"f16", Float32FromF16, F16FromFloat32, F16FromFloat64, 0x7bff},
		{"bf16", Float32FromBF16, BF16FromFloat32, BF16FromFloat64, 0x7f7f},
	} {
		t.Run(c.name, func(t *testing.T) {
			for lo := uint16(0); lo < c.maxFin; lo++ {
				hi := lo + 1
				a, b := float64(c.widen(lo)), float64(c.widen(hi))
				mid := (a + b) / 2 // exact in float64, and in float32 too
				even := lo
				if lo&1 == 1 {
					even = hi
				}
				below := math.Nextafter(mid, a)
				above := math.Nextafter(mid, b)
				checks := []struct {
					v    float64
					want uint16
				}{{mid, even}, {below, lo}, {above, hi}}
				for _, k := range checks {
					for _, sign := range []float64{1, -1} {
						want := k.want
						if sign < 0 {
							want |= 0x8000
						}
						if got := c.wide64(sign * k.v); got != want {
							t.Fatalf("from float64 %g: got %#04x want %#04x", sign*k.v, got, want)
						}
					}
				}
				if got := c.narrow(float32(mid)); got != even {
					t.Fatalf("from float32 midpoint %g of %#04x,%#04x: got %#04x want %#04x", mid, lo, hi, got, even)
				}
				f32below := math.Nextafter32(float32(mid), float32(a))
				f32above := math.Nextafter32(float32(mid), float32(b))
				if got := c.narrow(f32below); got != lo {
					t.Fatalf("from float32 %g: got %#04x want %#04x", f32below, got, lo)
				}
				if got := c.narrow(f32above); got != hi {
					t.Fatalf("from float32 %g: got %#04x want %#04x", f32above, got, hi)
				}
			}
		})
	}
}

// TestGenericRoundingMatchesHardware validates the float64 rounding routine
// (which BF16FromFloat64 and F16FromFloat64 share) against the hardware
// float64→float32 conversion, and the float32 converters against it.
func TestGenericRoundingMatchesHardware(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	special := []float64{0, 1, -1, math.MaxFloat32, math.SmallestNonzeroFloat32, math.Ldexp(1, -150),
		math.Ldexp(1.5, -150), math.Ldexp(1, -149) * 1.5, math.Ldexp(1, 128), math.Ldexp(0xffffff, 104),
		math.Ldexp(0x1ffffff, 103), math.Inf(1), math.Inf(-1), 1e-320, math.MaxFloat64}
	for i := 0; i < 200000; i++ {
		var v float64
		switch {
		case i < len(special):
			v = special[i]
		case i%2 == 0:
			v = math.Float64frombits(rng.Uint64())
		default: // concentrate near the float32 range
			v = math.Ldexp(rng.Float64()*2-1, rng.IntN(300)-160)
		}
		if math.IsNaN(v) {
			continue
		}
		if got, want := roundFloat64(v, 8, 23), uint64(math.Float32bits(float32(v))); got != want {
			t.Fatalf("roundFloat64(%g) = %#x, float32 conversion gives %#x", v, got, want)
		}
		f := math.Float32frombits(rng.Uint32())
		if math.IsNaN(float64(f)) {
			continue
		}
		if a, b := F16FromFloat32(f), F16FromFloat64(float64(f)); a != b {
			t.Fatalf("F16 of %g: float32 path %#04x, float64 path %#04x", f, a, b)
		}
		if a, b := BF16FromFloat32(f), BF16FromFloat64(float64(f)); a != b {
			t.Fatalf("BF16 of %g: float32 path %#04x, float64 path %#04x", f, a, b)
		}
	}
}

// TestNoDoubleRounding: rounding float64 through float32 to bf16 can land on
// a tie that the original value was not on; the direct conversion must not.
func TestNoDoubleRounding(t *testing.T) {
	v := 1 + math.Ldexp(1, -8) + math.Ldexp(1, -30) // just above the bf16 midpoint of 1 and 1+2^-7
	if got := BF16FromFloat32(float32(v)); got != 0x3f80 {
		t.Fatalf("premise: through float32 gives %#04x", got)
	}
	if got := BF16FromFloat64(v); got != 0x3f81 {
		t.Fatalf("BF16FromFloat64 = %#04x, want 0x3f81", got)
	}
	w := 1 + math.Ldexp(1, -11) + math.Ldexp(1, -40) // just above the f16 midpoint of 1 and 1+2^-10
	if got := F16FromFloat64(w); got != 0x3c01 {
		t.Fatalf("F16FromFloat64 = %#04x, want 0x3c01", got)
	}
	tn, err := FromFloat64s("x", []int{1}, []float64{v}, BF16)
	if err != nil || tn.Data[0] != 0x81 || tn.Data[1] != 0x3f {
		t.Fatalf("FromFloat64s BF16: %x %v", tn.Data, err)
	}
}
