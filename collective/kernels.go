package collective

import (
	"encoding/binary"
	"math"
)

// BFloat16ToFloat32 widens a bfloat16 bit pattern to float32 exactly.
func BFloat16ToFloat32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// Float32ToBFloat16 rounds f to the nearest bfloat16, ties to even; NaNs stay
// NaNs (quiet).
func Float32ToBFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

// The kernels below combine a received chunk (little-endian bytes, possibly a
// piece of it) with local elements. The received value is always the left
// operand: it is the partial sum of the ranks before this one in the chain.

// addF32 sets dst[i] = src[i] + dst[i]; src holds len(dst) float32 values.
func addF32(dst []float32, src []byte) {
	src = src[:4*len(dst)]
	for i := range dst {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:])) + dst[i]
	}
}

// addF64 sets dst[i] = src[i] + dst[i]; src holds len(dst) float64 values.
func addF64(dst []float64, src []byte) {
	src = src[:8*len(dst)]
	for i := range dst {
		dst[i] = math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:])) + dst[i]
	}
}

// addBF16 sets dst[i] = bf16(src[i] + dst[i]), the sum taken in float32;
// src holds len(dst) bfloat16 values.
func addBF16(dst []uint16, src []byte) {
	src = src[:2*len(dst)]
	for i := range dst {
		dst[i] = Float32ToBFloat16(BFloat16ToFloat32(binary.LittleEndian.Uint16(src[2*i:])) + BFloat16ToFloat32(dst[i]))
	}
}

// accBF16 sets out[i] = src[i] + float32(local[i]); src holds float32 values.
func accBF16(out []float32, src []byte, local []uint16) {
	src = src[:4*len(out)]
	local = local[:len(out)]
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:])) + BFloat16ToFloat32(local[i])
	}
}

// finishBF16 sets dst[i] = bf16(src[i] + float32(dst[i])); src holds float32
// values.
func finishBF16(dst []uint16, src []byte) {
	src = src[:4*len(dst)]
	for i := range dst {
		dst[i] = Float32ToBFloat16(math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:])) + BFloat16ToFloat32(dst[i]))
	}
}

// widenBF16 sets out[i] = float32(in[i]).
func widenBF16(out []float32, in []uint16) {
	in = in[:len(out)]
	for i := range out {
		out[i] = BFloat16ToFloat32(in[i])
	}
}
