package kernels

import (
	"errors"
	"math"
	"strings"
	"testing"
	"unsafe"
)

func validShape() SSDShape {
	return SSDShape{Batch: 2, L: 100, H: 4, P: 16, N: 8, G: 2, Chunk: 32, DType: BF16}
}

func TestSSDShapeValidate(t *testing.T) {
	if err := validShape().Validate(); err != nil {
		t.Fatalf("valid shape rejected: %v", err)
	}
	for _, tc := range []struct {
		field string
		edit  func(*SSDShape)
	}{
		{"Batch", func(s *SSDShape) { s.Batch = 0 }},
		{"L", func(s *SSDShape) { s.L = -1 }},
		{"G", func(s *SSDShape) { s.G = 3 }},
		{"Chunk", func(s *SSDShape) { s.Chunk = SSDMaxChunk + 1 }},
		{"P", func(s *SSDShape) { s.P = SSDMaxHeadDim + 1 }},
		{"N", func(s *SSDShape) { s.N = SSDMaxDState + 1 }},
		{"DType", func(s *SSDShape) { s.DType = 7 }},
		{"DTLimit", func(s *SSDShape) { s.DTLimit = [2]float64{0.5, 0.1} }},
		{"DTLimit", func(s *SSDShape) { s.DTLimit = [2]float64{math.NaN(), 1} }},
		{"XStride", func(s *SSDShape) { s.XStride = s.H*s.P - 1 }},
		{"BStride", func(s *SSDShape) { s.BStride = 1 }},
	} {
		s := validShape()
		tc.edit(&s)
		err := s.Validate()
		if !errors.Is(err, ErrInvalidArg) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: got %v, want ErrInvalidArg naming the field", tc.field, err)
		}
	}
	s := validShape()
	s.DTLimit = [2]float64{0.001, math.Inf(1)}
	if err := s.Validate(); err != nil {
		t.Errorf("DTLimit with an infinite upper bound rejected: %v", err)
	}
}

func TestSSDShapeElements(t *testing.T) {
	s := validShape()
	x, dt, b, c, y, d, st := s.Elements()
	rows := s.Batch * s.L
	if x != rows*s.H*s.P || dt != rows*s.H || b != rows*s.G*s.N || c != b || y != x || d != s.H || st != s.Batch*s.H*s.P*s.N {
		t.Fatalf("dense Elements = %d %d %d %d %d %d %d", x, dt, b, c, y, d, st)
	}
	// x, B and C as column ranges of one (Bt·L, H·P + 2·G·N) buffer.
	w := s.H*s.P + 2*s.G*s.N
	s.XStride, s.BStride, s.CStride, s.DHasHdim = w, w, w, true
	x, _, b, _, _, d, _ = s.Elements()
	if x != (rows-1)*w+s.H*s.P || b != (rows-1)*w+s.G*s.N || d != s.H*s.P {
		t.Fatalf("strided Elements: x=%d b=%d d=%d", x, b, d)
	}
}

// The Go mirror of m2k_ssd_shape must have the C layout: 16 fields of 8
// bytes, no padding.
func TestCShapeLayout(t *testing.T) {
	var c cSSDShape
	if n := sizeofShape(c); n != 16*8 {
		t.Fatalf("cSSDShape is %d bytes, want %d", n, 16*8)
	}
}

func sizeofShape(c cSSDShape) uintptr { return unsafe.Sizeof(c) }
