package safetensors

import (
	"encoding/binary"
	"math"
	"unsafe"
)

// Floating is the element type of the generic float conversions.
type Floating interface {
	~float32 | ~float64
}

// Tensor is one named tensor. Data holds the elements row-major as raw
// little-endian bytes of DType; a tensor returned by Read aliases the bytes
// Read was given.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// NumElements is the product of the shape (1 for a scalar of shape []).
func (t *Tensor) NumElements() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// check verifies that the data length matches the dtype and shape.
func (t *Tensor) check() error {
	size := t.DType.Size()
	if size == 0 {
		return errf(ErrDType, t.Name, "dtype %q is not a safetensors dtype", string(t.DType))
	}
	n, err := numElements(t.Name, t.Shape, math.MaxInt/size)
	if err != nil {
		return err
	}
	if n*size != len(t.Data) {
		return errf(ErrShape, t.Name, "shape %v of %s needs %d bytes, data has %d", t.Shape, t.DType, n*size, len(t.Data))
	}
	return nil
}

// numElements multiplies a shape, rejecting negative dimensions and
// products above limit.
func numElements(name string, shape []int, limit int) (int, error) {
	n := 1
	zero := false
	for i, d := range shape {
		if d < 0 {
			return 0, errf(ErrShape, name, "dimension %d is negative (%d)", i, d)
		}
		if d == 0 {
			zero = true
		}
	}
	if zero {
		return 0, nil
	}
	for _, d := range shape {
		if n > limit/d {
			return 0, errf(ErrShape, name, "shape %v has more than %d elements", shape, limit)
		}
		n *= d
	}
	return n, nil
}

// Float64s decodes a floating-point tensor (F64, F32, F16, BF16); every
// conversion is an exact widening. Integer dtypes are an error.
func (t *Tensor) Float64s() ([]float64, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	out := make([]float64, t.NumElements())
	if err := DecodeFloats(t, out); err != nil {
		return nil, err
	}
	return out, nil
}

// Float32s decodes a floating-point tensor: F32, F16 and BF16 exactly, F64
// rounded to nearest even. Integer dtypes are an error.
func (t *Tensor) Float32s() ([]float32, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	out := make([]float32, t.NumElements())
	if err := DecodeFloats(t, out); err != nil {
		return nil, err
	}
	return out, nil
}

// DecodeFloats decodes a floating-point tensor into dst, which must have
// exactly NumElements elements. Widening conversions are exact; F64 into a
// float32 element type rounds to nearest even.
func DecodeFloats[T Floating](t *Tensor, dst []T) error {
	if err := t.check(); err != nil {
		return err
	}
	if !t.DType.IsFloat() {
		return errf(ErrConversion, t.Name, "dtype %s is not a floating-point type", t.DType)
	}
	if len(dst) != t.NumElements() {
		return errf(ErrShape, t.Name, "destination has %d elements, tensor has %d", len(dst), t.NumElements())
	}
	decodeFloats(t.DType, t.Data, dst)
	return nil
}

// decodeFloats converts len(dst) elements of a float dtype from src.
func decodeFloats[T Floating](d DType, src []byte, dst []T) {
	le := binary.LittleEndian
	switch d {
	case F64:
		for i := range dst {
			dst[i] = T(math.Float64frombits(le.Uint64(src[8*i:])))
		}
	case F32:
		for i := range dst {
			dst[i] = T(math.Float32frombits(le.Uint32(src[4*i:])))
		}
	case F16:
		for i := range dst {
			dst[i] = T(Float32FromF16(le.Uint16(src[2*i:])))
		}
	case BF16:
		for i := range dst {
			dst[i] = T(Float32FromBF16(le.Uint16(src[2*i:])))
		}
	}
}

// Int64s decodes an integer or BOOL tensor. U64 values above the int64 range
// and BOOL bytes other than 0 and 1 are an error; float dtypes are an error.
func (t *Tensor) Int64s() ([]int64, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	if !t.DType.IsInt() {
		return nil, errf(ErrConversion, t.Name, "dtype %s is not an integer type", t.DType)
	}
	le := binary.LittleEndian
	n := t.NumElements()
	out := make([]int64, n)
	src := t.Data
	for i := range out {
		switch t.DType {
		case I64:
			out[i] = int64(le.Uint64(src[8*i:]))
		case U64:
			u := le.Uint64(src[8*i:])
			if u > math.MaxInt64 {
				return nil, errf(ErrConversion, t.Name, "element %d = %d exceeds the int64 range", i, u)
			}
			out[i] = int64(u)
		case I32:
			out[i] = int64(int32(le.Uint32(src[4*i:])))
		case U32:
			out[i] = int64(le.Uint32(src[4*i:]))
		case I16:
			out[i] = int64(int16(le.Uint16(src[2*i:])))
		case U16:
			out[i] = int64(le.Uint16(src[2*i:]))
		case I8:
			out[i] = int64(int8(src[i]))
		case U8:
			out[i] = int64(src[i])
		case BOOL:
			if src[i] > 1 {
				return nil, errf(ErrConversion, t.Name, "element %d = %d is not a BOOL (0 or 1)", i, src[i])
			}
			out[i] = int64(src[i])
		}
	}
	return out, nil
}

// FromFloat64s encodes vals as a tensor of a floating-point dtype, rounding
// to nearest even (directly from float64, with no intermediate float32).
func FromFloat64s(name string, shape []int, vals []float64, dtype DType) (Tensor, error) {
	return FromFloats(name, shape, vals, dtype)
}

// FromFloat32s encodes vals as a tensor of a floating-point dtype: F64
// exactly, F16 and BF16 rounded to nearest even.
func FromFloat32s(name string, shape []int, vals []float32, dtype DType) (Tensor, error) {
	return FromFloats(name, shape, vals, dtype)
}

// FromFloats encodes vals (float32 or float64 elements) as a tensor of a
// floating-point dtype, rounding to nearest even where the dtype is narrower.
// The number of values must match the shape.
func FromFloats[T Floating](name string, shape []int, vals []T, dtype DType) (Tensor, error) {
	if !dtype.IsFloat() {
		if !dtype.Valid() {
			return Tensor{}, errf(ErrDType, name, "dtype %q is not a safetensors dtype", string(dtype))
		}
		return Tensor{}, errf(ErrConversion, name, "cannot encode floats as %s", dtype)
	}
	n, err := numElements(name, shape, math.MaxInt/8)
	if err != nil {
		return Tensor{}, err
	}
	if n != len(vals) {
		return Tensor{}, errf(ErrShape, name, "shape %v holds %d elements, got %d values", shape, n, len(vals))
	}
	data, err := AppendFloats(make([]byte, 0, n*dtype.Size()), vals, dtype)
	if err != nil {
		return Tensor{}, err
	}
	return Tensor{Name: name, DType: dtype, Shape: append([]int(nil), shape...), Data: data}, nil
}

// AppendFloats appends the encoding of vals in a floating-point dtype to
// dst; it is the streaming form of FromFloats.
func AppendFloats[T Floating](dst []byte, vals []T, dtype DType) ([]byte, error) {
	var zero T
	narrow := unsafe.Sizeof(zero) == 4 // T's values are float32 values
	le := binary.LittleEndian
	switch dtype {
	case F64:
		for _, v := range vals {
			dst = le.AppendUint64(dst, math.Float64bits(float64(v)))
		}
	case F32:
		for _, v := range vals {
			dst = le.AppendUint32(dst, math.Float32bits(float32(v)))
		}
	case F16:
		for _, v := range vals {
			var h uint16
			if narrow {
				h = F16FromFloat32(float32(v))
			} else {
				h = F16FromFloat64(float64(v))
			}
			dst = le.AppendUint16(dst, h)
		}
	case BF16:
		for _, v := range vals {
			var h uint16
			if narrow {
				h = BF16FromFloat32(float32(v))
			} else {
				h = BF16FromFloat64(float64(v))
			}
			dst = le.AppendUint16(dst, h)
		}
	default:
		return dst, errf(ErrConversion, "", "cannot encode floats as %q", string(dtype))
	}
	return dst, nil
}

// FromInt64s encodes vals as an I64 tensor. The caller keeps len(vals)
// equal to the product of shape; Write checks it.
func FromInt64s(name string, shape []int, vals []int64) Tensor {
	data := make([]byte, 0, 8*len(vals))
	for _, v := range vals {
		data = binary.LittleEndian.AppendUint64(data, uint64(v))
	}
	return Tensor{Name: name, DType: I64, Shape: append([]int(nil), shape...), Data: data}
}
