package kernels

import "math"

// BF16FromF32 rounds f to the nearest bfloat16 (ties to even), as CUDA's
// __float2bfloat16_rn does, and returns its bit pattern. Values beyond the
// largest finite bf16 round to ±Inf; NaN stays NaN (its sign and leading
// payload bits kept).
func BF16FromF32(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 { // NaN: truncate, keeping it a NaN
		h := uint16(u >> 16)
		if h&0x7f == 0 {
			h |= 0x40
		}
		return h
	}
	// Round to nearest even on the 16 discarded bits.
	u += 0x7fff + (u>>16)&1
	return uint16(u >> 16)
}

// F32FromBF16 returns the float32 with the value of the bfloat16 bits b
// (exact).
func F32FromBF16(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// RoundBF16 returns f rounded to the nearest bfloat16 value, as a float32.
func RoundBF16(f float32) float32 { return F32FromBF16(BF16FromF32(f)) }

// BF16FromF32Slice writes BF16FromF32(src[i]) to dst[i] over len(src)
// elements; dst must be at least as long.
func BF16FromF32Slice(dst []uint16, src []float32) {
	dst = dst[:len(src)]
	for i, v := range src {
		dst[i] = BF16FromF32(v)
	}
}

// F32FromBF16Slice writes F32FromBF16(src[i]) to dst[i] over len(src)
// elements; dst must be at least as long.
func F32FromBF16Slice(dst []float32, src []uint16) {
	dst = dst[:len(src)]
	for i, v := range src {
		dst[i] = F32FromBF16(v)
	}
}
