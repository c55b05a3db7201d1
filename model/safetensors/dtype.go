package safetensors

// DType is a safetensors element type, spelled as in the header.
type DType string

// The dtypes of the safetensors format.
const (
	F64    DType = "F64"
	F32    DType = "F32"
	F16    DType = "F16"
	BF16   DType = "BF16"
	F8E4M3 DType = "F8_E4M3"
	F8E5M2 DType = "F8_E5M2"
	I64    DType = "I64"
	I32    DType = "I32"
	I16    DType = "I16"
	I8     DType = "I8"
	U64    DType = "U64"
	U32    DType = "U32"
	U16    DType = "U16"
	U8     DType = "U8"
	BOOL   DType = "BOOL"
)

// Size is the width of one element in bytes, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case F64, I64, U64:
		return 8
	case F32, I32, U32:
		return 4
	case F16, BF16, I16, U16:
		return 2
	case F8E4M3, F8E5M2, I8, U8, BOOL:
		return 1
	}
	return 0
}

// Valid reports whether d is a dtype of the format.
func (d DType) Valid() bool { return d.Size() != 0 }

// IsFloat reports whether d is one of the floating-point dtypes that
// Float64s and Float32s decode (F64, F32, F16, BF16).
func (d DType) IsFloat() bool {
	switch d {
	case F64, F32, F16, BF16:
		return true
	}
	return false
}

// IsInt reports whether d is an integer or boolean dtype that Int64s decodes.
func (d DType) IsInt() bool {
	switch d {
	case I64, I32, I16, I8, U64, U32, U16, U8, BOOL:
		return true
	}
	return false
}
