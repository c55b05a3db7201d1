package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// LocalStore keeps checkpoints in a directory of the local filesystem.
// Object names are slash-separated paths below Root.
type LocalStore struct {
	Root string
}

// String names the store for logs.
func (s LocalStore) String() string { return "file://" + s.Root }

func (s LocalStore) path(name string) (string, error) {
	clean := filepath.Clean(filepath.FromSlash(name))
	if filepath.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("checkpoint: object name %q escapes the store root", name)
	}
	return filepath.Join(s.Root, clean), nil
}

// Put copies r to a temporary file, syncs it and renames it into place,
// so a reader sees the whole object or none of it.
func (s LocalStore) Put(ctx context.Context, name string, r io.Reader, size int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := s.path(name)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if _, err := WriteFileAtomic(ctx, p, 0o644, r, size); err != nil {
		return fmt.Errorf("checkpoint: put %s: %w", name, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// ctxReader stops a copy once its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// Open opens an object for reading; a missing one is ErrNotFound.
func (s LocalStore) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, err := s.path(name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	return f, err
}

// OpenRanges opens an object for reads at offsets (pread on one file
// descriptor); a missing one is ErrNotFound. The object is the file that
// was opened: a rename over it afterwards is not seen.
func (s LocalStore) OpenRanges(ctx context.Context, name string) (RangeReader, error) {
	r, err := s.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	f := r.(*os.File)
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &fileRanges{f: f, name: name, size: info.Size()}, nil
}

// fileRanges reads ranges of an open file with ReadAt.
type fileRanges struct {
	f    *os.File
	name string
	size int64
}

func (r *fileRanges) Size() int64 { return r.size }

func (r *fileRanges) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	if err := checkRange(r.name, r.size, off, n); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return io.NopCloser(&exactReader{r: ctxReader{ctx, io.NewSectionReader(r.f, off, n)}, left: n}), nil
}

func (r *fileRanges) Close() error { return r.f.Close() }

// exactReader turns an end before left bytes into io.ErrUnexpectedEOF:
// a file cut short after it was opened.
type exactReader struct {
	r    io.Reader
	left int64
}

func (e *exactReader) Read(p []byte) (int, error) {
	if e.left == 0 {
		return 0, io.EOF
	}
	n, err := e.r.Read(p[:min(int64(len(p)), e.left)])
	e.left -= int64(n)
	if err == io.EOF && e.left > 0 {
		err = io.ErrUnexpectedEOF
	} else if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

// List returns the object names that start with prefix, sorted; temporary
// files of unfinished writes are not objects.
func (s LocalStore) List(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(s.Root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.IsDir() || strings.HasPrefix(d.Name(), ".tmp-") {
			return nil
		}
		rel, err := filepath.Rel(s.Root, p)
		if err != nil {
			return err
		}
		if name := filepath.ToSlash(rel); strings.HasPrefix(name, prefix) {
			out = append(out, name)
		}
		return nil
	})
	sort.Strings(out)
	return out, err
}

// Delete removes an object (a missing one is not an error) and the
// directories it leaves empty.
func (s LocalStore) Delete(ctx context.Context, name string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for dir := filepath.Dir(p); dir != filepath.Clean(s.Root) && strings.HasPrefix(dir, filepath.Clean(s.Root)); dir = filepath.Dir(dir) {
		if os.Remove(dir) != nil {
			break
		}
	}
	return nil
}
