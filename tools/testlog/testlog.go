// Package testlog sends the logs of the code under test to the test's own
// log (t.Log) and drops them once the test has finished: a goroutine that
// is still shutting down must not write to a finished test, which panics.
package testlog

import (
	"io"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
)

// Writer returns an io.Writer that logs each write with t.Log, prefixed
// and without surrounding white space, until t's cleanup runs; later
// writes are accepted and dropped.
func Writer(t testing.TB, prefix string) io.Writer {
	w := &writer{t: t, prefix: prefix}
	w.on.Store(true)
	t.Cleanup(func() { w.on.Store(false) })
	return w
}

// New returns a text logger of records at level and above that writes to
// Writer(t, "").
func New(t testing.TB, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(Writer(t, ""), &slog.HandlerOptions{Level: level}))
}

type writer struct {
	t      testing.TB
	prefix string
	on     atomic.Bool
}

func (w *writer) Write(p []byte) (int, error) {
	if w.on.Load() {
		w.t.Log(w.prefix + strings.TrimSpace(string(p)))
	}
	return len(p), nil
}
