package collective_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/m2train/m2train/collective"
)

// failureConfig detects failures in a second; the assertions allow slack on
// top for a loaded machine.
func failureConfig(t *testing.T) collective.Config {
	cfg := testConfig(t)
	cfg.Timeout = time.Second
	return cfg
}

const slack = 3 * time.Second

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// checkPeerError asserts that err is a *PeerError naming rank with addr and
// wrapping sentinel.
func checkPeerError(t *testing.T, who int, err error, rank int, addr string, sentinel error) {
	t.Helper()
	var pe *collective.PeerError
	if !errors.As(err, &pe) {
		t.Errorf("rank %d: error %v (%T), want a *PeerError", who, err, err)
		return
	}
	if pe.Rank != rank || pe.Addr != addr || !errors.Is(err, sentinel) {
		t.Errorf("rank %d: %v; want rank %d at %s with %v", who, err, rank, addr, sentinel)
	}
}

func bigBuffers(n, length int) [][]float32 {
	bufs := make([][]float32, n)
	for r := range bufs {
		bufs[r] = make([]float32, length)
		for i := range bufs[r] {
			bufs[r][i] = float32(r + i%7)
		}
	}
	return bufs
}

// TestMemFailures injects each kind of failure into a 4-rank all-reduce of
// the in-memory transport and checks that every other rank fails in time,
// naming the culprit.
func TestMemFailures(t *testing.T) {
	const n, victim, length = 4, 2, 1 << 20
	cases := []struct {
		name     string
		sentinel error
		// inject runs on the test goroutine once ranks other than the
		// victim are inside the all-reduce; before is run before it starts.
		before, inject func(net *collective.MemNetwork)
		victimJoins    bool
	}{
		{name: "killed", sentinel: collective.ErrPeerLost,
			inject: func(net *collective.MemNetwork) { net.Kill(victim) }},
		{name: "stalled", sentinel: collective.ErrPeerTimeout, victimJoins: true,
			before: func(net *collective.MemNetwork) { net.Stall(victim) }},
		{name: "silent", sentinel: collective.ErrPeerTimeout},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			var victimDone sync.WaitGroup
			t.Cleanup(victimDone.Wait)
			cfg := failureConfig(t)
			net := collective.NewMemNetwork(n)
			comms := startAll(t, n, func(ctx context.Context, r int) (*collective.Communicator, error) {
				return collective.New(ctx, cfg, net.Transport(r))
			})
			bufs := bigBuffers(n, length)
			ctx := opCtx(t)
			if tc.before != nil {
				tc.before(net)
			}
			if tc.victimJoins {
				victimDone.Go(func() { _ = comms[victim].AllReduce(ctx, collective.Float32s(bufs[victim])) })
			}
			start := time.Now()
			errs := make([]error, n)
			took := make([]time.Duration, n)
			var wg sync.WaitGroup
			for r := range n {
				if r == victim {
					continue
				}
				wg.Go(func() {
					errs[r] = comms[r].AllReduce(ctx, collective.Float32s(bufs[r]))
					took[r] = time.Since(start)
				})
			}
			if tc.inject != nil {
				waitFor(t, "progress of the other ranks", func() bool { return comms[(victim+2)%n].Stats().BytesReceived > 0 })
				start = time.Now()
				tc.inject(net)
			}
			wg.Wait()
			for r := range n {
				if r == victim {
					continue
				}
				checkPeerError(t, r, errs[r], victim, net.Addr(victim), tc.sentinel)
				if limit := cfg.Timeout + slack; took[r] > limit {
					t.Errorf("rank %d failed after %v, want within %v", r, took[r], limit)
				}
				// The failure is sticky: later operations fail at once.
				if err := comms[r].Barrier(ctx); !errors.Is(err, tc.sentinel) {
					t.Errorf("rank %d: Barrier after the failure: %v, want %v", r, err, tc.sentinel)
				}
				if err := comms[r].Err(); !errors.Is(err, tc.sentinel) {
					t.Errorf("rank %d: Err() = %v", r, err)
				}
			}
		})
	}
}

// TestCancel: a rank whose caller cancels an operation in its middle gets
// the context's error, and every other rank fails at once naming it, without
// waiting for the timeout.
func TestCancel(t *testing.T) {
	for _, tc := range transports {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			const n = 3
			cfg := testConfig(t) // a long timeout: only the abort can end it
			comms := tc.start(t, n, cfg)
			bufs := bigBuffers(n, 1<<16)
			ctx := opCtx(t)
			cctx, cancel := context.WithCancel(ctx)
			errs := make([]error, n)
			var wg sync.WaitGroup
			// Rank 2 has not joined yet, so the all-reduce of ranks 0 and 1
			// cannot finish before the cancellation.
			wg.Go(func() { errs[0] = comms[0].AllReduce(cctx, collective.Float32s(bufs[0])) })
			wg.Go(func() { errs[1] = comms[1].AllReduce(ctx, collective.Float32s(bufs[1])) })
			waitFor(t, "rank 1 to receive from rank 0", func() bool { return comms[1].Stats().BytesReceived > 0 })
			cancel()
			wg.Wait()
			if !errors.Is(errs[0], context.Canceled) {
				t.Errorf("rank 0: %v, want context.Canceled", errs[0])
			}
			checkPeerError(t, 1, errs[1], 0, comms[1].Addr(0), collective.ErrPeerAborted)
			waitFor(t, "rank 2 to learn of the abort", func() bool { return comms[2].Err() != nil })
			errs[2] = comms[2].AllReduce(ctx, collective.Float32s(bufs[2]))
			checkPeerError(t, 2, errs[2], 0, comms[2].Addr(0), collective.ErrPeerAborted)
		})
	}
}

// TestMismatch: ranks that disagree on the length fail instead of mixing
// data.
func TestMismatch(t *testing.T) {
	for _, tc := range transports {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			cfg := testConfig(t)
			cfg.Timeout = 2 * time.Second
			comms := tc.start(t, 3, cfg)
			ctx := opCtx(t)
			errs := onAll(comms, func(r int, c *collective.Communicator) error {
				length := 1000
				if r == 1 {
					length = 1001
				}
				return c.AllReduce(ctx, collective.Float32s(make([]float32, length)))
			})
			for r, err := range errs {
				if !errors.Is(err, collective.ErrMismatch) {
					t.Errorf("rank %d: %v, want ErrMismatch", r, err)
				}
			}
		})
	}
}

// TestClosed: operations on a closed communicator, or a closed sub-group,
// fail with ErrClosed; the world keeps working after a sub-group closes.
func TestClosed(t *testing.T) {
	leakCheck(t)
	comms := startMem(t, 2, testConfig(t))
	ctx := opCtx(t)
	subs := make([]*collective.Communicator, 2)
	mustAll(t, "Split", onAll(comms, func(r int, c *collective.Communicator) (err error) {
		subs[r], err = c.Split([][]int{{0, 1}})
		return err
	}))
	if err := subs[0].Close(); err != nil {
		t.Fatal(err)
	}
	if err := subs[0].Barrier(ctx); !errors.Is(err, collective.ErrClosed) {
		t.Errorf("Barrier on a closed sub-group: %v", err)
	}
	mustAll(t, "Barrier", onAll(comms, func(_ int, c *collective.Communicator) error { return c.Barrier(ctx) }))
	if err := comms[0].Close(); err != nil {
		t.Fatal(err)
	}
	if err := comms[0].AllReduce(ctx, collective.Float32s(make([]float32, 10))); !errors.Is(err, collective.ErrClosed) {
		t.Errorf("AllReduce on a closed communicator: %v", err)
	}
	if err := subs[1].Barrier(ctx); err == nil {
		t.Errorf("Barrier with a closed peer succeeded")
	}
}

func TestInvalidArguments(t *testing.T) {
	leakCheck(t)
	comms := startMem(t, 2, testConfig(t))
	ctx := opCtx(t)
	c := comms[0]
	cases := []struct {
		name string
		err  error
	}{
		{"untyped buffer", c.AllReduce(ctx, collective.Buffer{})},
		{"send to self", c.Send(ctx, 0, collective.Float32s(make([]float32, 1)))},
		{"recv from nobody", c.Recv(ctx, 5, collective.Float32s(make([]float32, 1)))},
		{"broadcast root", c.Broadcast(ctx, collective.Float32s(make([]float32, 1)), 2)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if !errors.Is(tc.err, collective.ErrInvalid) {
				t.Errorf("%v, want ErrInvalid", tc.err)
			}
		})
	}
	if _, _, err := c.Grid(3, 1); !errors.Is(err, collective.ErrInvalid) {
		t.Errorf("Grid(3,1) on 2 ranks: %v", err)
	}
	if _, err := c.Split([][]int{{1}}); !errors.Is(err, collective.ErrInvalid) {
		t.Errorf("Split without the caller: %v", err)
	}
}
