package train

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/m2train/m2train/worker/data"
)

// stepSource yields, for the step at cursor c, one micro-batch whose single
// position is c, and advances by one. failAt[c] reads at cursor c fail
// before one succeeds; every read at failAlways (when not 0) fails.
type stepSource struct {
	mu         sync.Mutex
	cursor     uint64
	failAt     map[uint64]int
	failAlways uint64
}

var errRead = errors.New("read failed")

func (s *stepSource) Next(ctx context.Context) ([]data.Batch, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if s.failAlways != 0 && s.cursor == s.failAlways {
		return nil, errRead
	}
	if s.failAt[s.cursor] > 0 {
		s.failAt[s.cursor]--
		return nil, errRead
	}
	b := data.Batch{Inputs: []int32{1}, Targets: []int32{2}, Positions: []uint64{s.cursor}, SeqLen: 1}
	s.cursor++
	return []data.Batch{b}, nil
}

func (s *stepSource) Cursor() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cursor
}

func (s *stepSource) Seek(c uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cursor = c
}

func wantStep(t *testing.T, p *prefetcher, want uint64) {
	t.Helper()
	if c := p.Cursor(); c != want {
		t.Fatalf("Cursor() before Next = %d, want %d", c, want)
	}
	b, err := p.Next(context.Background())
	if err != nil {
		t.Fatalf("Next at cursor %d: %v", want, err)
	}
	if len(b) != 1 || len(b[0].Positions) != 1 || b[0].Positions[0] != want {
		t.Fatalf("Next at cursor %d returned %+v", want, b)
	}
	if c := p.Cursor(); c != want+1 {
		t.Fatalf("Cursor() after the step at %d = %d, want %d", want, c, want+1)
	}
}

func TestPrefetcherHandsOutStepsInOrder(t *testing.T) {
	src := &stepSource{cursor: 5}
	p := newPrefetcher(src)
	for c := uint64(5); c < 9; c++ {
		wantStep(t, p, c)
	}
	// The source runs one step ahead once the read in flight is done.
	p.wait()
	if c := src.Cursor(); c != 10 {
		t.Errorf("source cursor after 4 steps from 5 and one read ahead = %d, want 10", c)
	}
	// After wait the step read ahead is read again.
	wantStep(t, p, 9)

	// Seek drops the step read ahead and moves both cursors.
	p.Seek(2)
	if c := src.Cursor(); c != 2 {
		t.Errorf("source cursor after Seek(2) = %d", c)
	}
	wantStep(t, p, 2)
	wantStep(t, p, 3)
}

func TestPrefetcherRetriesAFailedReadAhead(t *testing.T) {
	// The read ahead of step 1 fails once: Next reads it again.
	src := &stepSource{failAt: map[uint64]int{1: 1}}
	p := newPrefetcher(src)
	wantStep(t, p, 0)
	wantStep(t, p, 1)
	wantStep(t, p, 2)

	// A step that cannot be read is an error, and the cursor stays.
	src = &stepSource{failAlways: 3}
	p = newPrefetcher(src)
	for c := uint64(0); c < 3; c++ {
		wantStep(t, p, c)
	}
	if _, err := p.Next(context.Background()); !errors.Is(err, errRead) {
		t.Fatalf("Next at the failing cursor: %v, want the read error", err)
	}
	if c := p.Cursor(); c != 3 {
		t.Errorf("Cursor() after a failed Next = %d, want 3", c)
	}
	if c := src.Cursor(); c != 3 {
		t.Errorf("source cursor after a failed Next = %d, want 3", c)
	}
	p.Seek(7)
	wantStep(t, p, 7)
}

func TestPrefetcherCancelledNext(t *testing.T) {
	src := &stepSource{}
	p := newPrefetcher(src)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	// Nothing is in flight: the read itself sees the cancelled context.
	if _, err := p.Next(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Next with a cancelled context: %v", err)
	}
	if c := p.Cursor(); c != 0 {
		t.Fatalf("Cursor() after a cancelled Next = %d, want 0", c)
	}
	wantStep(t, p, 0)
	// With a read in flight a cancelled Next may return the step or the
	// context's error; either way the next call continues in order.
	b, err := p.Next(ctx)
	switch {
	case err == nil:
		if b[0].Positions[0] != 1 {
			t.Fatalf("cancelled Next returned step %d, want 1", b[0].Positions[0])
		}
		wantStep(t, p, 2)
	case errors.Is(err, context.Canceled):
		wantStep(t, p, 1)
	default:
		t.Fatalf("cancelled Next: %v", err)
	}
}
