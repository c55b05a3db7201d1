package ops

import (
	"fmt"
	"unsafe"

	"github.com/m2train/m2train/kernels"
)

// kernels.Buffer knows the activation dtypes only; integer and float64
// values travel in F32 buffers of the same byte size, their bits copied
// unchanged.

// UploadInt32 allocates a device buffer of len(v) 4-byte elements and copies
// the int32 values v into it (token ids, targets).
func UploadInt32(l *kernels.Lib, v []int32) (*kernels.Buffer, error) {
	if len(v) == 0 {
		return nil, fmt.Errorf("%w: ops.UploadInt32: no values", kernels.ErrInvalidArg)
	}
	b, err := l.Alloc(kernels.F32, len(v))
	if err != nil {
		return nil, err
	}
	if err := CopyInt32(b, v); err != nil {
		b.Free()
		return nil, err
	}
	return b, nil
}

// CopyInt32 copies the int32 values v into the buffer b of len(v) 4-byte
// elements.
func CopyInt32(b *kernels.Buffer, v []int32) error {
	if len(v) == 0 {
		return nil
	}
	return b.CopyFromHostF32(unsafe.Slice((*float32)(unsafe.Pointer(&v[0])), len(v)))
}

// UploadInt64 allocates a device buffer holding the int64 values v (2·len(v)
// 4-byte elements).
func UploadInt64(l *kernels.Lib, v []int64) (*kernels.Buffer, error) {
	if len(v) == 0 {
		return nil, fmt.Errorf("%w: ops.UploadInt64: no values", kernels.ErrInvalidArg)
	}
	b, err := l.Alloc(kernels.F32, 2*len(v))
	if err != nil {
		return nil, err
	}
	if err := b.CopyFromHostF32(unsafe.Slice((*float32)(unsafe.Pointer(&v[0])), 2*len(v))); err != nil {
		b.Free()
		return nil, err
	}
	return b, nil
}

// AllocFloat64 allocates room for n float64 values on the device (2·n F32
// elements), for the double-precision outputs: the loss sum and the
// gradient norm.
func AllocFloat64(l *kernels.Lib, n int) (*kernels.Buffer, error) {
	if n < 1 {
		return nil, fmt.Errorf("%w: ops.AllocFloat64: n = %d must be positive", kernels.ErrInvalidArg, n)
	}
	return l.Alloc(kernels.F32, 2*n)
}

// ReadFloat64 copies the float64 values of a buffer made by AllocFloat64 to
// the host (it waits for the copy).
func ReadFloat64(b *kernels.Buffer) ([]float64, error) {
	if b == nil || b.DType != kernels.F32 || b.Len%2 != 0 {
		return nil, fmt.Errorf("%w: ops.ReadFloat64: want an F32 buffer of an even length from AllocFloat64", kernels.ErrInvalidArg)
	}
	out := make([]float64, b.Len/2)
	if len(out) == 0 {
		return out, nil
	}
	if err := b.CopyToHostF32(unsafe.Slice((*float32)(unsafe.Pointer(&out[0])), b.Len)); err != nil {
		return nil, err
	}
	return out, nil
}

// WriteFloat64 copies the float64 values v into a buffer made by
// AllocFloat64 (len(v) values).
func WriteFloat64(b *kernels.Buffer, v []float64) error {
	if b == nil || b.DType != kernels.F32 || b.Len != 2*len(v) {
		return fmt.Errorf("%w: ops.WriteFloat64: want an F32 buffer of 2·%d elements from AllocFloat64", kernels.ErrInvalidArg, len(v))
	}
	if len(v) == 0 {
		return nil
	}
	return b.CopyFromHostF32(unsafe.Slice((*float32)(unsafe.Pointer(&v[0])), 2*len(v)))
}
