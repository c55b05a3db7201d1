package kernels

import (
	"errors"
	"fmt"
)

// Sentinel errors; every error returned by this package wraps one of them.
var (
	// ErrNoLibrary reports that libm2kernels.so could not be found or loaded.
	ErrNoLibrary = errors.New("kernels: library not available")
	// ErrNoDevice reports that the library loaded but no usable CUDA device
	// (or driver) was found.
	ErrNoDevice = errors.New("kernels: no CUDA device")
	// ErrABI reports a library built from a different m2kernels.h (ABI
	// version or missing symbol).
	ErrABI = errors.New("kernels: library ABI mismatch")
	// ErrInvalidArg reports an argument that breaks a documented rule,
	// found in Go before the call or by the library (M2K_ERR_INVALID_ARG).
	ErrInvalidArg = errors.New("kernels: invalid argument")
	// ErrUnsupported reports a shape outside what the kernels implement
	// (M2K_ERR_UNSUPPORTED).
	ErrUnsupported = errors.New("kernels: unsupported shape")
	// ErrWorkspace reports a workspace smaller than the call needs
	// (M2K_ERR_WORKSPACE).
	ErrWorkspace = errors.New("kernels: workspace too small")
	// ErrCUDA is wrapped by every Error carrying a CUDA or cuBLAS status.
	ErrCUDA = errors.New("kernels: CUDA error")
	// ErrOutOfMemory is wrapped, besides ErrCUDA, by an Error that reports
	// an allocation the device could not satisfy (CUDA's out of memory,
	// cuBLAS's allocation failure).
	ErrOutOfMemory = errors.New("kernels: out of device memory")
	// ErrClosed reports use of a freed Buffer.
	ErrClosed = errors.New("kernels: buffer already freed")
)

// Status codes of m2kernels.h that are not CUDA or cuBLAS statuses.
const (
	statusCublasBase  = 1000
	statusCUDAOOM     = 2                    // cudaErrorMemoryAllocation
	statusCublasOOM   = statusCublasBase + 3 // CUBLAS_STATUS_ALLOC_FAILED
	statusInvalidArg  = 2001
	statusUnsupported = 2002
	statusWorkspace   = 2003
)

// Error is a non-zero status returned by a library function.
type Error struct {
	Op     string // the C function, e.g. "m2k_ssd_fwd"
	Code   int    // the status code of m2kernels.h
	Msg    string // m2k_error_string(Code)
	Detail string // m2k_last_error_detail() for the library's own codes, else ""
}

func (e *Error) Error() string {
	s := fmt.Sprintf("kernels: %s: %s (status %d)", e.Op, e.Msg, e.Code)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

// Unwrap maps the status to the package's sentinels, so that errors.Is
// works on a returned *Error.
func (e *Error) Unwrap() []error {
	switch e.Code {
	case statusInvalidArg:
		return []error{ErrInvalidArg}
	case statusUnsupported:
		return []error{ErrUnsupported}
	case statusWorkspace:
		return []error{ErrWorkspace}
	case statusCUDAOOM, statusCublasOOM:
		return []error{ErrOutOfMemory, ErrCUDA}
	}
	return []error{ErrCUDA}
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidArg, fmt.Sprintf(format, args...))
}
