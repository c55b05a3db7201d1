//go:build !cgo || !linux

package gpuinfo

import "fmt"

// errNotLinked is why a build without cgo, or for an operating system
// other than Linux, has no GPU information: NVML is reached through cgo.
var errNotLinked = fmt.Errorf("%w: built without cgo or not for Linux, so NVML is not linked", ErrUnavailable)

// Discover always reports ErrUnavailable in this build.
func Discover() (*Report, error) { return nil, errNotLinked }

// Open always reports ErrUnavailable in this build.
func Open() (*Sampler, error) { return nil, errNotLinked }

// Sample reports ErrUnavailable (ErrClosed after Close): Open makes no
// Sampler in this build.
func (s *Sampler) Sample() (*Report, error) {
	if s.closed {
		return nil, ErrClosed
	}
	return nil, errNotLinked
}

// Close marks the sampler closed; there is nothing to release.
func (s *Sampler) Close() error {
	s.closed = true
	return nil
}
