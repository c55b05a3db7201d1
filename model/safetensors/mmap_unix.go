//go:build linux || darwin || freebsd || netbsd || openbsd

package safetensors

import (
	"fmt"
	"math"
	"os"
	"syscall"
)

// mapFile maps the whole file read-only; small files are read instead.
func mapFile(path string) (data []byte, unmap func() error, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("safetensors: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("safetensors: %w", err)
	}
	size := st.Size()
	if size < 4096 || !st.Mode().IsRegular() {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, fmt.Errorf("safetensors: %w", err)
		}
		return data, func() error { return nil }, nil
	}
	if size > math.MaxInt {
		return nil, nil, fmt.Errorf("safetensors: %s: %d bytes cannot be mapped on this platform", path, size)
	}
	data, err = syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("safetensors: mmap %s: %w", path, err)
	}
	return data, func() error { return syscall.Munmap(data) }, nil
}
