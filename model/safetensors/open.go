package safetensors

import (
	"fmt"
	"sync"
)

// MappedFile is a safetensors file whose tensor data lives in a read-only
// memory mapping of the file (or in memory, on platforms without mmap). The
// tensors' Data slices are valid only until Close.
type MappedFile struct {
	*File
	once  sync.Once
	unmap func() error
	err   error
}

// Open maps the safetensors file at path and validates it. It is the path
// for multi-GiB checkpoints: pages are read on demand and never copied to
// the Go heap. Call Close when done with every tensor's Data. The file must
// not be truncated or rewritten in place while mapped (WriteFile replaces
// files by rename, which is safe).
func Open(path string) (*MappedFile, error) {
	data, unmap, err := mapFile(path)
	if err != nil {
		return nil, err
	}
	f, err := Read(data)
	if err != nil {
		_ = unmap()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &MappedFile{File: f, unmap: unmap}, nil
}

// Close releases the mapping; the tensors' Data must not be used after it.
// Further calls return the first call's result.
func (m *MappedFile) Close() error {
	m.once.Do(func() {
		m.err = m.unmap()
		for i := range m.Tensors {
			m.Tensors[i].Data = nil
		}
	})
	return m.err
}
