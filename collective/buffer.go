package collective

import (
	"fmt"
	"unsafe"
)

// DType is the element type of a Buffer.
type DType uint8

// Element types. BFloat16 values are stored as the upper 16 bits of the
// float32 with the same sign, exponent and leading mantissa bits.
const (
	Float32  DType = 1
	Float64  DType = 2
	BFloat16 DType = 3
	// uint8Type carries the tokens of a barrier; it is not reducible.
	uint8Type DType = 4
	// BFloat16Rounded is bfloat16 whose partial sums travel as bfloat16,
	// rounded at every hop of a reduction (BFloat16Rounded buffers).
	BFloat16Rounded DType = 5
)

// Size returns the size of one element in bytes.
func (d DType) Size() int {
	switch d {
	case Float32:
		return 4
	case Float64:
		return 8
	case BFloat16, BFloat16Rounded:
		return 2
	case uint8Type:
		return 1
	}
	return 0
}

// String returns the name of the type.
func (d DType) String() string {
	switch d {
	case Float32:
		return "float32"
	case Float64:
		return "float64"
	case BFloat16:
		return "bfloat16"
	case BFloat16Rounded:
		return "bfloat16 (rounded per hop)"
	case uint8Type:
		return "uint8"
	}
	return fmt.Sprintf("DType(%d)", uint8(d))
}

// Buffer is a typed view of the caller's memory that operations read and
// write in place. Build one with Float32s, Float64s or BFloat16s; the zero
// Buffer is empty and has no type.
type Buffer struct {
	dtype DType
	f32   []float32
	f64   []float64
	u16   []uint16
	u8    []byte
}

// Float32s views s as a float32 buffer.
func Float32s(s []float32) Buffer { return Buffer{dtype: Float32, f32: s} }

// Float64s views s as a float64 buffer.
func Float64s(s []float64) Buffer { return Buffer{dtype: Float64, f64: s} }

// BFloat16s views s, bfloat16 bit patterns, as a bfloat16 buffer. Sums are
// accumulated in float32 and rounded to nearest even once.
func BFloat16s(s []uint16) Buffer { return Buffer{dtype: BFloat16, u16: s} }

// BFloat16sRounded views s, bfloat16 bit patterns, as a bfloat16 buffer
// whose reductions send bfloat16 partial sums, each rounded to nearest even
// where a rank adds its own values: half the bytes of BFloat16s' float32
// partial sums, for one rounding per rank instead of one in all. Gathers
// and broadcasts move the same bytes as BFloat16s.
func BFloat16sRounded(s []uint16) Buffer { return Buffer{dtype: BFloat16Rounded, u16: s} }

func uint8s(s []byte) Buffer { return Buffer{dtype: uint8Type, u8: s} }

// DType returns the element type.
func (b Buffer) DType() DType { return b.dtype }

// Len returns the number of elements.
func (b Buffer) Len() int {
	switch b.dtype {
	case Float32:
		return len(b.f32)
	case Float64:
		return len(b.f64)
	case BFloat16, BFloat16Rounded:
		return len(b.u16)
	case uint8Type:
		return len(b.u8)
	}
	return 0
}

// bytes returns the memory of elements [lo, hi) as bytes, without copying.
func (b Buffer) bytes(lo, hi int) []byte {
	if lo == hi {
		return nil
	}
	switch b.dtype {
	case Float32:
		s := b.f32[lo:hi]
		return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), 4*len(s))
	case Float64:
		s := b.f64[lo:hi]
		return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), 8*len(s))
	case BFloat16, BFloat16Rounded:
		s := b.u16[lo:hi]
		return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), 2*len(s))
	case uint8Type:
		return b.u8[lo:hi]
	}
	return nil
}

func (b Buffer) validate(op string) error {
	switch b.dtype {
	case Float32, Float64, BFloat16, BFloat16Rounded:
		return nil
	}
	return invalidf("%s: buffer has no element type (build it with Float32s, Float64s, BFloat16s or BFloat16sRounded)", op)
}

func f32Bytes(s []float32) []byte {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), 4*len(s))
}
