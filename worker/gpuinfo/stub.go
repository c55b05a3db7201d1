//go:build !cgo || !linux

package gpuinfo

import "fmt"

// Discover always reports ErrUnavailable in a build without cgo or for an
// operating system other than Linux: NVML is reached through cgo.
func Discover() (*Report, error) {
	return nil, fmt.Errorf("%w: built without cgo or not for Linux, so NVML is not linked", ErrUnavailable)
}
