package checkpoint

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestWriteFileAtomic writes a file, then fails to replace it twice (a
// short reader, a cancelled context): the first content stays, whole, with
// its mode, and no temporary file is left behind.
func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	ctx := context.Background()
	if n, err := WriteFileAtomic(ctx, path, 0o640, strings.NewReader("hello"), 5); err != nil || n != 5 {
		t.Fatalf("write: %d bytes, %v", n, err)
	}
	if _, err := WriteFileAtomic(ctx, path, 0o640, strings.NewReader("hi"), 5); err == nil || !strings.Contains(err.Error(), "read 2 bytes, want 5") {
		t.Errorf("a short reader: %v", err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := WriteFileAtomic(cancelled, path, 0o640, strings.NewReader("other"), -1); err == nil {
		t.Error("a cancelled context: the write succeeded")
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "hello" {
		t.Errorf("content %q (%v), want the first write's", b, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("mode %v (%v), want 0640", fi.Mode(), err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("the directory holds %d entries, want the file alone", len(entries))
	}
}
