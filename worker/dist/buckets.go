package dist

import (
	"context"
	"fmt"
	"strings"
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
// starts what is left and waits for all of it. A Reducer is used from one
// goroutine.
type Reducer[T model.Float] struct {
	comm     *collective.Communicator
	grads    []T
	buckets  []Range
	ctx      context.Context
	next     int
	handles  []*collective.Handle
	wait     time.Duration
	overlapN int
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

// Buckets returns the plan, in the order the buckets are started.
func (r *Reducer[T]) Buckets() []Range { return r.buckets }

// Begin starts a step whose all-reduces run under ctx.
func (r *Reducer[T]) Begin(ctx context.Context) {
	r.ctx = ctx
	r.next = 0
	r.handles = r.handles[:0]
	r.wait = 0
	r.overlapN = 0
}

// Ready starts the all-reduce of every bucket not yet started that lies at
// or past offset. Calls before Begin or after Finish are ignored.
func (r *Reducer[T]) Ready(offset int) {
	if r.ctx == nil {
		return
	}
	for r.next < len(r.buckets) && r.buckets[r.next].Lo >= offset {
		b := r.buckets[r.next]
		r.handles = append(r.handles, r.comm.AllReduceAsync(r.ctx, bufferOf(r.grads[b.Lo:b.Hi])))
		r.next++
		r.overlapN++
	}
}

// Finish starts the buckets not yet started and waits until every
// all-reduce of the step has finished, returning the first error.
func (r *Reducer[T]) Finish(ctx context.Context) error {
	if r.ctx == nil {
		return fmt.Errorf("dist: Reducer.Finish without Begin")
	}
	early := r.overlapN
	r.Ready(0)
	r.overlapN = early
	start := time.Now()
	var first error
	for i, h := range r.handles {
		if err := h.Wait(ctx); err != nil && first == nil {
			b := r.buckets[i]
			first = fmt.Errorf("dist: all-reduce of gradient bucket %d [%d, %d): %w", i, b.Lo, b.Hi, err)
		}
	}
	r.wait = time.Since(start)
	r.ctx = nil
	return first
}

// Stats returns, for the last finished step, how many buckets were started
// during the backward pass (before Finish) and how long Finish waited.
func (r *Reducer[T]) Stats() (overlapped, total int, wait time.Duration) {
	return r.overlapN, len(r.buckets), r.wait
}
