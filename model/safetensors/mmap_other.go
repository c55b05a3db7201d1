//go:build !(linux || darwin || freebsd || netbsd || openbsd)

package safetensors

import (
	"fmt"
	"os"
)

// mapFile reads the whole file where memory mapping is not available.
func mapFile(path string) (data []byte, unmap func() error, err error) {
	data, err = os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("safetensors: %w", err)
	}
	return data, func() error { return nil }, nil
}
