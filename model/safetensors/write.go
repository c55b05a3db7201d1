package safetensors

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// StreamTensor describes a tensor whose bytes are produced while writing,
// so that a multi-GiB checkpoint never needs a second copy in memory.
// WriteData must write exactly the product of Shape times DType.Size bytes.
type StreamTensor struct {
	Name      string
	DType     DType
	Shape     []int
	WriteData func(w io.Writer) error
}

// Write writes tensors and metadata in the safetensors format. The output is
// deterministic: header keys sorted, data in the order given, the header
// padded with spaces to a multiple of 8 bytes. Empty metadata is omitted.
func Write(w io.Writer, tensors []Tensor, metadata map[string]string) error {
	st := make([]StreamTensor, len(tensors))
	for i := range tensors {
		t := &tensors[i]
		if err := t.check(); err != nil {
			return err
		}
		st[i] = StreamTensor{Name: t.Name, DType: t.DType, Shape: t.Shape, WriteData: func(w io.Writer) error {
			_, err := w.Write(t.Data)
			return err
		}}
	}
	return WriteStream(w, st, metadata)
}

// WriteStream is Write for tensors whose data is produced on the fly.
func WriteStream(w io.Writer, tensors []StreamTensor, metadata map[string]string) error {
	header, sizes, err := buildHeader(tensors, metadata)
	if err != nil {
		return err
	}
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(header)))
	if _, err := w.Write(lenBuf[:]); err != nil {
		return fmt.Errorf("safetensors: write header: %w", err)
	}
	if _, err := w.Write(header); err != nil {
		return fmt.Errorf("safetensors: write header: %w", err)
	}
	for i, t := range tensors {
		cw := &countingWriter{w: w}
		if err := t.WriteData(cw); err != nil {
			return fmt.Errorf("safetensors: write tensor %q: %w", t.Name, err)
		}
		if cw.n != sizes[i] {
			return errf(ErrShape, t.Name, "wrote %d bytes of data, shape %v of %s needs %d", cw.n, t.Shape, t.DType, sizes[i])
		}
	}
	return nil
}

type countingWriter struct {
	w io.Writer
	n int
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += n
	return n, err
}

// buildHeader validates the tensors and renders the padded JSON header; it
// returns the data size of each tensor.
func buildHeader(tensors []StreamTensor, metadata map[string]string) ([]byte, []int, error) {
	type item struct {
		key  string
		json []byte
	}
	items := make([]item, 0, len(tensors)+1)
	sizes := make([]int, len(tensors))
	seen := make(map[string]bool, len(tensors))
	offset := 0
	for i, t := range tensors {
		switch {
		case t.Name == "":
			return nil, nil, errf(ErrName, "", "tensor %d has an empty name", i)
		case t.Name == metadataKey:
			return nil, nil, errf(ErrName, t.Name, "name is reserved for the metadata")
		case seen[t.Name]:
			return nil, nil, errf(ErrDuplicate, t.Name, "name given more than once")
		case t.WriteData == nil:
			return nil, nil, errf(ErrShape, t.Name, "no data")
		}
		seen[t.Name] = true
		size := t.DType.Size()
		if size == 0 {
			return nil, nil, errf(ErrDType, t.Name, "dtype %q is not a safetensors dtype", string(t.DType))
		}
		n, err := numElements(t.Name, t.Shape, (math.MaxInt-offset)/size)
		if err != nil {
			return nil, nil, err
		}
		sizes[i] = n * size
		var b strings.Builder
		b.WriteString(`{"dtype":"`)
		b.WriteString(string(t.DType))
		b.WriteString(`","shape":[`)
		for j, d := range t.Shape {
			if j > 0 {
				b.WriteByte(',')
			}
			b.WriteString(strconv.Itoa(d))
		}
		fmt.Fprintf(&b, `],"data_offsets":[%d,%d]}`, offset, offset+sizes[i])
		offset += sizes[i]
		items = append(items, item{t.Name, []byte(b.String())})
	}
	if len(metadata) > 0 {
		keys := make([]string, 0, len(metadata))
		for k := range metadata {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var b strings.Builder
		b.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				b.WriteByte(',')
			}
			b.Write(jsonString(k))
			b.WriteByte(':')
			b.Write(jsonString(metadata[k]))
		}
		b.WriteByte('}')
		items = append(items, item{metadataKey, []byte(b.String())})
	}
	sort.Slice(items, func(i, j int) bool { return items[i].key < items[j].key })
	var h []byte
	h = append(h, '{')
	for i, it := range items {
		if i > 0 {
			h = append(h, ',')
		}
		h = append(h, jsonString(it.key)...)
		h = append(h, ':')
		h = append(h, it.json...)
	}
	h = append(h, '}')
	for len(h)%8 != 0 {
		h = append(h, ' ')
	}
	return h, sizes, nil
}

// jsonString quotes s as JSON without HTML escaping, so names round-trip
// byte for byte.
func jsonString(s string) []byte {
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return []byte(strings.TrimSuffix(b.String(), "\n"))
}

// WriteFile writes a safetensors file atomically: to a temporary file in the
// same directory, synced, renamed over path, and the directory synced.
func WriteFile(path string, tensors []Tensor, metadata map[string]string) error {
	return AtomicWrite(path, func(w io.Writer) error { return Write(w, tensors, metadata) })
}

// WriteStreamFile is WriteFile for tensors whose data is produced on the fly.
func WriteStreamFile(path string, tensors []StreamTensor, metadata map[string]string) error {
	return AtomicWrite(path, func(w io.Writer) error { return WriteStream(w, tensors, metadata) })
}

// AtomicWrite creates or replaces path with what write produces, so that a
// reader sees either the old file or the complete new one: the bytes go to a
// temporary file in the same directory, which is synced, given mode 0644,
// renamed over path, and the directory is synced. On error the temporary
// file is removed and path is untouched.
func AtomicWrite(path string, write func(w io.Writer) error) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	bw := bufio.NewWriterSize(tmp, 1<<20)
	if err := write(bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("safetensors: write %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("safetensors: sync %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("safetensors: close %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	return syncDir(dir)
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("safetensors: sync directory %s: %w", dir, err)
	}
	return nil
}
