package gpu

import "errors"

// Sentinel errors of the package; errors.Is finds them in what it returns.
var (
	// ErrUnavailable reports that the CUDA backend cannot run here: the
	// library is missing, was built without some kernels or from another
	// header, or no GPU is usable. The error also wraps the kernels
	// package's reason (kernels.ErrNoLibrary, kernels.ErrNoDevice,
	// kernels.ErrABI). The caller falls back to the CPU backend.
	ErrUnavailable = errors.New("gpu: CUDA backend unavailable")
	// ErrUnsupported reports a model configuration outside what the kernels
	// implement (for example a chunk longer than the SSD kernels allow).
	ErrUnsupported = errors.New("gpu: configuration not supported by the kernels")
	// ErrNoTargets is returned by ForwardBackward for a batch without
	// targets.
	ErrNoTargets = errors.New("gpu: batch has no targets")
	// ErrClosed reports the use of a Model after Close.
	ErrClosed = errors.New("gpu: model is closed")
)
