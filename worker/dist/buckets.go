package dist

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/model"
)

// Range is the half-open range [Lo, Hi) of a flat buffer.
type Range struct{ Lo, Hi int }

// Len returns Hi − Lo.
func (r Range) Len() int { return r.Hi - r.Lo }

// PlanBuckets cuts a flat gradient buffer of total elements into buckets of
// size elements, from the end of the buffer: bucket 0 is the last size
// elements, bucket 1 the size before them, and so on, the first elements
// of the buffer forming the last (possibly shorter) bucket. Because the
// layout puts the layers in increasing order and the backward pass
// finishes them in decreasing order, this is the order in which buckets
// become final.
func PlanBuckets(total, size int) ([]Range, error) {
	if total < 0 || size <= 0 {
		return nil, fmt.Errorf("dist: buckets of %d elements over %d: the bucket size must be positive", size, total)
	}
	var out []Range
	for hi := total; hi > 0; hi -= size {
		out = append(out, Range{Lo: max(0, hi-size), Hi: hi})
	}
	return out, nil
}

// LayerEnds returns, for each layer ℓ of layout, the flat offset at which
// the tensors above layer ℓ begin: every gradient at an offset at or past
// ends[ℓ] belongs to a later layer or to the final norm and LM head. With
// the order of model.NewLayout that is the offset of layer ℓ+1 (of the
// final norm for the last layer).
func LayerEnds(l *model.Layout, layers int) ([]int, error) {
	ends := make([]int, layers)
	for i := range layers {
		p := model.LayerPrefix(i)
		end := -1
		for _, t := range l.Tensors {
			if strings.HasPrefix(t.Name, p) {
				end = max(end, t.Offset+t.Size)
			}
		}
		if end < 0 {
			return nil, fmt.Errorf("dist: the layout has no tensor of layer %d", i)
		}
		ends[i] = end
	}
	for i := 1; i < layers; i++ {
		if ends[i] <= ends[i-1] {
			return nil, fmt.Errorf("dist: the layout does not hold layer %d after layer %d", i, i-1)
		}
	}
	return ends, nil
}

// Reducer all-reduces a flat gradient buffer over a communicator in
// buckets, each started asynchronously as soon as the gradients it covers
// are final, so that the reduction of the upper layers overlaps the
// backward pass of the lower ones. Buckets are started in the fixed order
// of PlanBuckets on every rank, which is the order of the collective
// operations, and each all-reduce sums in a fixed order: every rank ends
// with identical bits.
//
// Use per step: Begin; Ready(offset) whenever every gradient at or past
// offset is final (any number of times, offsets decreasing); Finish, which
// starts what is left and waits for all of it. Where the gradients reach
// the buffer later than the call (a device copying them to host memory),
// ReadyAfter(offset, wait) names a function that returns once they are
// there: a goroutine of the Reducer waits for each such function in turn
// and starts the buckets after it, still in the fixed order. A Reducer is
// used from one goroutine.
type Reducer[T model.Float] struct {
	comm     *collective.Communicator
	grads    []T
	buckets  []Range
	ctx      context.Context
	next     int
	handles  []*collective.Handle // by bucket; nil until started
	wait     time.Duration
	overlapN int

	// wire, when not nil, holds the gradients rounded to bfloat16 for a
	// transport of half the bytes (SetBF16); the all-reduces run on it and
	// Finish widens the sums back into grads.
	wire []uint16

	// The feeder of ReadyAfter: it receives runs of buckets in order,
	// waits for each run's data and starts its buckets.
	feed    chan feedRun
	fed     chan struct{}
	feedErr error // written by the feeder, read after fed is closed
}

// feedRun is the run of buckets [from, to) whose data is in place once
// wait (if not nil) has returned.
type feedRun struct {
	from, to int
	wait     func() error
}

// NewReducer returns a reducer of grads over comm with buckets of
// bucketElems elements.
func NewReducer[T model.Float](comm *collective.Communicator, grads []T, bucketElems int) (*Reducer[T], error) {
	if comm == nil {
		return nil, fmt.Errorf("dist: reducer without a communicator")
	}
	b, err := PlanBuckets(len(grads), bucketElems)
	if err != nil {
		return nil, err
	}
	return &Reducer[T]{comm: comm, grads: grads, buckets: b}, nil
}

// SetBF16 switches the transport of the gradients to bfloat16 (on) or back
// to their own type: each bucket is rounded to bfloat16 when it starts,
// all-reduced with bfloat16 partial sums rounded at every rank
// (collective.BFloat16sRounded), and widened back into the gradients when
// it ends. That moves half the bytes of float32 gradients for a relative
// error of about 2⁻⁹ per rank in the sums. Call it between steps.
func (r *Reducer[T]) SetBF16(on bool) {
	switch {
	case on && r.wire == nil:
		r.wire = make([]uint16, len(r.grads))
	case !on:
		r.wire = nil
	}
}

// Buckets returns the plan, in the order the buckets are started.
func (r *Reducer[T]) Buckets() []Range { return r.buckets }

// Begin starts a step whose all-reduces run under ctx.
func (r *Reducer[T]) Begin(ctx context.Context) {
	r.ctx = ctx
	r.next = 0
	if cap(r.handles) < len(r.buckets) {
		r.handles = make([]*collective.Handle, len(r.buckets))
	}
	r.handles = r.handles[:len(r.buckets)]
	clear(r.handles)
	r.wait = 0
	r.overlapN = 0
	r.feed, r.fed, r.feedErr = nil, nil, nil
}

// claim reserves every bucket not yet started that lies at or past offset
// and returns the run [from, to) of them.
func (r *Reducer[T]) claim(offset int) (from, to int) {
	from = r.next
	for r.next < len(r.buckets) && r.buckets[r.next].Lo >= offset {
		r.next++
	}
	return from, r.next
}

// start starts the all-reduces of buckets [from, to).
func (r *Reducer[T]) start(from, to int) {
	for i := from; i < to; i++ {
		b := r.buckets[i]
		if r.wire == nil {
			r.handles[i] = r.comm.AllReduceAsync(r.ctx, bufferOf(r.grads[b.Lo:b.Hi]))
			continue
		}
		w := r.wire[b.Lo:b.Hi]
		for j, g := range r.grads[b.Lo:b.Hi] {
			w[j] = collective.Float32ToBFloat16(float32(g))
		}
		r.handles[i] = r.comm.AllReduceAsync(r.ctx, collective.BFloat16sRounded(w))
	}
}

// widen writes the bfloat16 sums of bucket i back into the gradients.
func (r *Reducer[T]) widen(i int) {
	b := r.buckets[i]
	g := r.grads[b.Lo:b.Hi]
	for j, w := range r.wire[b.Lo:b.Hi] {
		g[j] = T(collective.BFloat16ToFloat32(w))
	}
}

// Ready starts the all-reduce of every bucket not yet started that lies at
// or past offset. Calls before Begin or after Finish are ignored.
func (r *Reducer[T]) Ready(offset int) {
	r.ReadyAfter(offset, nil)
}

// ReadyAfter is Ready for gradients that are final at or past offset but
// reach the buffer only when wait returns. It returns at once; wait is
// called exactly once, from another goroutine, after the waits of earlier
// calls, and the buckets start after it returns. A nil wait is Ready. Calls
// before Begin or after Finish are ignored (and wait is not called).
func (r *Reducer[T]) ReadyAfter(offset int, wait func() error) {
	if r.ctx == nil {
		return
	}
	from, to := r.claim(offset)
	r.overlapN += to - from
	if wait == nil && r.feed == nil {
		r.start(from, to)
		return
	}
	if r.feed == nil {
		// At most one run per bucket plus Finish's.
		r.feed = make(chan feedRun, len(r.buckets)+2)
		r.fed = make(chan struct{})
		go r.feeder(r.feed, r.fed)
	}
	r.feed <- feedRun{from: from, to: to, wait: wait}
}

// feeder starts the runs of ReadyAfter in order, each after its wait. After
// a failed wait it starts nothing more but still calls the waits that
// follow, whose resources they may release.
func (r *Reducer[T]) feeder(feed <-chan feedRun, fed chan<- struct{}) {
	defer close(fed)
	for run := range feed {
		if run.wait != nil {
			if err := run.wait(); err != nil && r.feedErr == nil {
				r.feedErr = fmt.Errorf("dist: waiting for the gradients of buckets %d to %d: %w", run.from, run.to-1, err)
			}
		}
		if r.feedErr == nil {
			r.start(run.from, run.to)
		}
	}
}

// Finish starts the buckets not yet started and waits until every
// all-reduce of the step has finished, returning the first error.
func (r *Reducer[T]) Finish(ctx context.Context) error {
	return r.FinishAfter(ctx, nil)
}

// FinishAfter is Finish for gradients of the buckets not yet started that
// reach the buffer only when wait returns (see ReadyAfter).
func (r *Reducer[T]) FinishAfter(ctx context.Context, wait func() error) error {
	if r.ctx == nil {
		return fmt.Errorf("dist: Reducer.Finish without Begin")
	}
	early := r.overlapN
	r.ReadyAfter(0, wait)
	r.overlapN = early
	start := time.Now()
	var first error
	if r.feed != nil {
		close(r.feed)
		<-r.fed
		first = r.feedErr
	}
	errs := make([]error, len(r.handles))
	var wg sync.WaitGroup
	for i, h := range r.handles {
		if h == nil {
			continue
		}
		if r.wire == nil {
			errs[i] = h.Wait(ctx)
			continue
		}
		// Each bucket is widened as soon as its sum is there, in parallel.
		wg.Go(func() {
			if errs[i] = h.Wait(ctx); errs[i] == nil {
				r.widen(i)
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil && first == nil {
			b := r.buckets[i]
			first = fmt.Errorf("dist: all-reduce of gradient bucket %d [%d, %d): %w", i, b.Lo, b.Hi, err)
		}
	}
	r.wait = time.Since(start)
	r.ctx = nil
	r.feed, r.fed = nil, nil
	return first
}

// Stats returns, for the last finished step, how many buckets were started
// during the backward pass (before Finish) and how long Finish waited.
func (r *Reducer[T]) Stats() (overlapped, total int, wait time.Duration) {
	return r.overlapN, len(r.buckets), r.wait
}
