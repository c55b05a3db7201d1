package collective_test

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/m2train/m2train/collective"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// leakCheck fails t if goroutines outlive it; call it first so that its
// cleanup runs after every other.
func leakCheck(t *testing.T) {
	t.Helper()
	t.Cleanup(func() { goleak.VerifyNone(t) })
}

// tlogWriter routes a logger to t.Log.
type tlogWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(p))
	}
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	w := &tlogWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// testConfig uses small chunks and three lanes so that short buffers still
// exercise pipelining, and a long timeout so that a loaded machine never
// trips it.
func testConfig(t *testing.T) collective.Config {
	cfg := collective.DefaultConfig()
	cfg.ChunkSize = 4096
	cfg.StreamsPerPeer = 3
	cfg.Timeout = 30 * time.Second
	cfg.Logger = testLogger(t)
	return cfg
}

// starter builds a world of n communicators over one kind of transport and
// closes them when the test ends.
type starter func(t *testing.T, n int, cfg collective.Config) []*collective.Communicator

type transportCase struct {
	name  string
	start starter
}

var transports = []transportCase{
	{"mem", startMem},
	{"grpc", startGRPC},
}

func startMem(t *testing.T, n int, cfg collective.Config) []*collective.Communicator {
	t.Helper()
	net := collective.NewMemNetwork(n)
	return startAll(t, n, func(ctx context.Context, r int) (*collective.Communicator, error) {
		return collective.New(ctx, cfg, net.Transport(r))
	})
}

func startAll(t *testing.T, n int, build func(ctx context.Context, r int) (*collective.Communicator, error)) []*collective.Communicator {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	comms := make([]*collective.Communicator, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r := range n {
		wg.Go(func() { comms[r], errs[r] = build(ctx, r) })
	}
	wg.Wait()
	t.Cleanup(func() { closeAll(t, comms) })
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: New: %v", r, err)
		}
	}
	return comms
}

func closeAll(t *testing.T, comms []*collective.Communicator) {
	var wg sync.WaitGroup
	for r, c := range comms {
		if c == nil {
			continue
		}
		wg.Go(func() {
			if err := c.Close(); err != nil {
				t.Errorf("rank %d: Close: %v", r, err)
			}
		})
	}
	wg.Wait()
}

// onAll runs fn on every rank at once and returns the errors by rank.
func onAll(comms []*collective.Communicator, fn func(r int, c *collective.Communicator) error) []error {
	errs := make([]error, len(comms))
	var wg sync.WaitGroup
	for r, c := range comms {
		wg.Go(func() { errs[r] = fn(r, c) })
	}
	wg.Wait()
	return errs
}

func mustAll(t *testing.T, what string, errs []error) {
	t.Helper()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("%s: rank %d: %v", what, r, err)
		}
	}
}

func opCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func errorf(format string, args ...any) error { return fmt.Errorf(format, args...) }
