package safetensors

import "math"

// BF16FromFloat32 rounds f to bfloat16 (1 sign, 8 exponent, 7 mantissa bits)
// to nearest, ties to even. Values beyond the largest bfloat16 become ±Inf;
// NaN stays NaN with its sign and the top of its payload, made quiet.
func BF16FromFloat32(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN
		return uint16(b>>16) | 0x0040
	}
	// Adding 0x7fff plus the lowest kept bit rounds half to even; a carry
	// out of the mantissa bumps the exponent, up to Inf, as it should.
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// Float32FromBF16 widens a bfloat16 to float32; every value is exact.
func Float32FromBF16(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F16FromFloat32 rounds f to IEEE binary16 (1 sign, 5 exponent, 10 mantissa
// bits) to nearest, ties to even, producing subnormals below 2^-14 and ±Inf
// beyond 65504 (from 65520 up). NaN stays NaN with its sign, made quiet.
func F16FromFloat32(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant != 0 {
			return sign | 0x7e00 | uint16(mant>>13)
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15 // biased binary16 exponent
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e >= 1 {
		q := uint32(e)<<10 | mant>>13
		return sign | uint16(roundShifted(q, mant&0x1fff, 13))
	}
	// Subnormal (or zero) result: the value is m·2^(exp-150) with the
	// implicit bit; in units of 2^-24 that is m >> (126-exp).
	if exp == 0 {
		return sign // float32 subnormals are far below 2^-25
	}
	m := mant | 0x800000
	shift := uint(126 - exp)
	if shift > 24 {
		return sign
	}
	return sign | uint16(roundShifted(m>>shift, m&(1<<shift-1), shift))
}

// roundShifted rounds q (the kept bits) by the dropped remainder rem of
// width shift bits, to nearest with ties to even.
func roundShifted(q, rem uint32, shift uint) uint32 {
	half := uint32(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return q
}

// Float32FromF16 widens a binary16 value to float32; every value is exact.
func Float32FromF16(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
	case mant == 0:
		return math.Float32frombits(sign)
	}
	v := float32(mant) * (1.0 / (1 << 24)) // exact: mant < 2^10, power-of-two scale
	if sign != 0 {
		v = -v
	}
	return v
}

// BF16FromFloat64 rounds v directly to bfloat16 (one rounding, so no
// double-rounding error through float32), ties to even.
func BF16FromFloat64(v float64) uint16 { return uint16(roundFloat64(v, 8, 7)) }

// F16FromFloat64 rounds v directly to binary16, ties to even.
func F16FromFloat64(v float64) uint16 { return uint16(roundFloat64(v, 5, 10)) }

// roundFloat64 rounds v to a binary format with expBits exponent bits and
// mantBits stored mantissa bits (IEEE layout: sign, exponent, mantissa) to
// nearest, ties to even, with subnormals, ±Inf on overflow and quiet NaNs.
func roundFloat64(v float64, expBits, mantBits uint) uint64 {
	b := math.Float64bits(v)
	sign := (b >> 63) << (expBits + mantBits)
	exp := int(b>>52) & 0x7ff
	mant := b & (1<<52 - 1)
	maxExp := 1<<expBits - 1
	infBits := uint64(maxExp) << mantBits
	drop := 52 - mantBits
	if exp == 0x7ff {
		if mant != 0 {
			return sign | infBits | 1<<(mantBits-1) | mant>>drop
		}
		return sign | infBits
	}
	if exp == 0 {
		return sign // float64 subnormals are below every target's range
	}
	bias := 1<<(expBits-1) - 1
	e := exp - 1023 + bias
	if e >= maxExp {
		return sign | infBits
	}
	if e >= 1 {
		q := uint64(e)<<mantBits | mant>>drop
		return sign | round64(q, mant&(1<<drop-1), drop)
	}
	m := mant | 1<<52
	shift := drop + uint(1-e)
	if shift > 53 { // below half the smallest subnormal
		return sign
	}
	return sign | round64(m>>shift, m&(1<<shift-1), shift)
}

func round64(q, rem uint64, shift uint) uint64 {
	half := uint64(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return q
}
