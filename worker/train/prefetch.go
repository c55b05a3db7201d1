package train

import (
	"context"

	"github.com/m2train/m2train/worker/data"
)

// prefetcher is a Source that reads the next step's micro-batches in the
// background while the current step runs: a trainer on a device backend
// waits for the device for most of a step, and the host work of the input
// (the MQAR task generates its samples in Go) then overlaps it instead of
// adding to it.
//
// It presents the cursor of the steps it has handed out; the source below
// runs one step ahead. Next hands out the steps in order whatever the
// background read returned: a failed or cancelled read is done again,
// synchronously, with the caller's context. Seek waits for the read in
// flight and drops it. The source is used by one goroutine at a time: the
// caller's, or the background read's while one is in flight.
type prefetcher struct {
	src    Source
	cursor uint64
	// next receives the background read of the step at cursor; nil when
	// none is in flight.
	next chan fetched
}

// fetched is one background read: the batches of the step at the cursor
// it started from, or the error, and the source's cursor after it.
type fetched struct {
	batches []data.Batch
	err     error
	after   uint64
}

func newPrefetcher(src Source) *prefetcher {
	return &prefetcher{src: src, cursor: src.Cursor()}
}

// Next returns the micro-batches of the step at the cursor, advances the
// cursor and starts reading the following step in the background.
func (p *prefetcher) Next(ctx context.Context) ([]data.Batch, error) {
	var f fetched
	if p.next != nil {
		select {
		case f = <-p.next:
			p.next = nil
		case <-ctx.Done():
			// The read stays in flight; the next call or Seek collects it.
			return nil, ctx.Err()
		}
	} else {
		f.err = context.Canceled // nothing read yet
	}
	if f.err != nil {
		// Read the step again, here: the source's cursor is at the step
		// after a successful read and unchanged after a failed one.
		p.src.Seek(p.cursor)
		b, err := p.src.Next(ctx)
		if err != nil {
			p.src.Seek(p.cursor)
			return nil, err
		}
		f = fetched{batches: b, after: p.src.Cursor()}
	}
	p.cursor = f.after
	ch := make(chan fetched, 1)
	p.next = ch
	go func(src Source) {
		b, err := src.Next(ctx)
		ch <- fetched{batches: b, err: err, after: src.Cursor()}
	}(p.src)
	return f.batches, nil
}

// Cursor is the global sample position of the next step Next returns.
func (p *prefetcher) Cursor() uint64 { return p.cursor }

// Seek moves the cursor, dropping the step read ahead.
func (p *prefetcher) Seek(cursor uint64) {
	p.wait()
	p.src.Seek(cursor)
	p.cursor = cursor
}

// wait collects the background read in flight, if any, and drops it.
func (p *prefetcher) wait() {
	if p.next != nil {
		<-p.next
		p.next = nil
	}
}
