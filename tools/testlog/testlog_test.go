package testlog

import (
	"log/slog"
	"strings"
	"testing"
)

// recorder is a testing.TB that keeps what is logged and runs cleanups on
// demand.
type recorder struct {
	testing.TB
	lines    []string
	cleanups []func()
}

func (r *recorder) Log(args ...any) {
	for _, a := range args {
		r.lines = append(r.lines, a.(string))
	}
}

func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }

func (r *recorder) finish() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
}

func TestWriterStopsAtCleanup(t *testing.T) {
	r := &recorder{TB: t}
	w := Writer(r, "w0: ")
	if n, err := w.Write([]byte("  first line\n")); err != nil || n != 13 {
		t.Fatalf("Write = %d, %v; want 13, nil", n, err)
	}
	r.finish()
	if n, err := w.Write([]byte("after the end\n")); err != nil || n != 14 {
		t.Fatalf("Write after cleanup = %d, %v; want 14, nil", n, err)
	}
	if len(r.lines) != 1 || r.lines[0] != "w0: first line" {
		t.Fatalf("logged %q, want only %q", r.lines, "w0: first line")
	}
}

func TestNewFiltersByLevel(t *testing.T) {
	r := &recorder{TB: t}
	log := New(r, slog.LevelWarn)
	log.Info("quiet")
	log.Warn("loud", "k", 1)
	if len(r.lines) != 1 || !strings.Contains(r.lines[0], "msg=loud k=1") || strings.HasSuffix(r.lines[0], "\n") {
		t.Fatalf("logged %q, want one trimmed warning", r.lines)
	}
}
