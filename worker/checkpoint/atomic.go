package checkpoint

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// WriteFileAtomic copies r to path through a temporary file in path's
// directory (named .tmp-BASE-*, which LocalStore's listings skip), synced
// and renamed into place, so that a reader of path sees the whole file or
// none of it. The file gets mode perm; ctx stops the copy. With size >= 0,
// r must hold exactly size bytes, else path is left as it was and the
// error says how many it held. It returns the number of bytes copied. The
// directory must exist; syncing it, for the rename to survive a crash, is
// the caller's choice.
func WriteFileAtomic(ctx context.Context, path string, perm os.FileMode, r io.Reader, size int64) (int64, error) {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return 0, err
	}
	tmp := f.Name()
	var n int64
	err = f.Chmod(perm)
	if err == nil {
		n, err = io.CopyBuffer(f, ctxReader{ctx, r}, make([]byte, 1<<20))
		if err == nil && size >= 0 && n != size {
			err = fmt.Errorf("read %d bytes, want %d", n, size)
		}
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return n, err
	}
	return n, nil
}
