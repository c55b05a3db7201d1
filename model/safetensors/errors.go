package safetensors

import (
	"errors"
	"fmt"
)

// Sentinel errors; every error the package returns wraps one of them.
var (
	// ErrTruncated: the file is shorter than its header says.
	ErrTruncated = errors.New("safetensors: truncated file")
	// ErrHeader: the header is not the JSON object the format requires.
	ErrHeader = errors.New("safetensors: malformed header")
	// ErrDType: a dtype that the format does not define.
	ErrDType = errors.New("safetensors: unknown dtype")
	// ErrShape: a negative dimension, or a shape whose byte size does not
	// match the tensor's byte range or data.
	ErrShape = errors.New("safetensors: bad shape")
	// ErrOffsets: byte ranges out of range, overlapping, or leaving gaps.
	ErrOffsets = errors.New("safetensors: bad data offsets")
	// ErrDuplicate: a tensor name that appears twice.
	ErrDuplicate = errors.New("safetensors: duplicate tensor name")
	// ErrName: an empty or reserved tensor name.
	ErrName = errors.New("safetensors: bad tensor name")
	// ErrConversion: an element conversion the dtypes do not allow.
	ErrConversion = errors.New("safetensors: unsupported conversion")
)

// Error names the tensor (empty for file-level problems) and the rule it
// breaks; Err is one of the sentinel errors.
type Error struct {
	Tensor string
	Rule   string
	Err    error
}

// Error formats the sentinel, the tensor (if any) and the rule.
func (e *Error) Error() string {
	if e.Tensor == "" {
		return fmt.Sprintf("%v: %s", e.Err, e.Rule)
	}
	return fmt.Sprintf("%v: tensor %q: %s", e.Err, e.Tensor, e.Rule)
}

// Unwrap returns the sentinel error.
func (e *Error) Unwrap() error { return e.Err }

func errf(sentinel error, tensor, format string, args ...any) error {
	return &Error{Tensor: tensor, Rule: fmt.Sprintf(format, args...), Err: sentinel}
}
