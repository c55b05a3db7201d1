package collective

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Segment returns the elements [lo, hi) of segment i when n elements are
// split among size ranks: the first n%size segments have one element more.
// After ReduceScatter, group rank i holds the sum of segment i; before
// AllGather, it must hold segment i.
func Segment(n, size, i int) (lo, hi int) {
	q, r := n/size, n%size
	lo = i*q + min(i, r)
	hi = lo + q
	if i < r {
		hi++
	}
	return lo, hi
}

// AllReduce replaces buf, on every rank of the group, with the element-wise
// sum of the buffers of all ranks. Every rank must pass a buffer of the same
// length and type; all ranks end with bit-identical results.
func (c *Communicator) AllReduce(ctx context.Context, buf Buffer) error {
	return c.collective(ctx, OpAllReduce, buf, 0)
}

// ReduceScatter sums the buffers of all ranks and leaves segment Rank() of
// the sum (see Segment) in the same place of buf; the rest of buf is
// scratch afterwards.
func (c *Communicator) ReduceScatter(ctx context.Context, buf Buffer) error {
	return c.collective(ctx, OpReduceScatter, buf, 0)
}

// AllGather fills buf on every rank with the segments of all ranks: segment
// i (see Segment) comes from group rank i.
func (c *Communicator) AllGather(ctx context.Context, buf Buffer) error {
	return c.collective(ctx, OpAllGather, buf, 0)
}

// Broadcast copies buf of group rank root into buf of every rank.
func (c *Communicator) Broadcast(ctx context.Context, buf Buffer, root int) error {
	if root < 0 || root >= c.Size() {
		return invalidf("broadcast: root %d; ranks are 0 to %d", root, c.Size()-1)
	}
	return c.collective(ctx, OpBroadcast, buf, root)
}

// Barrier returns once every rank of the group has entered it.
func (c *Communicator) Barrier(ctx context.Context) error {
	return c.collective(ctx, OpBarrier, uint8s(make([]byte, c.Size())), 0)
}

// Handle is a pending asynchronous operation.
type Handle struct {
	done chan struct{}
	err  error
}

// Done is closed when the operation has finished.
func (h *Handle) Done() <-chan struct{} { return h.done }

// Err returns the operation's error once Done is closed, and nil before.
func (h *Handle) Err() error {
	select {
	case <-h.done:
		return h.err
	default:
		return nil
	}
}

// Wait waits until the operation finishes and returns its error, or returns
// ctx's error first if ctx ends; the operation itself is governed by the
// context it was started with.
func (h *Handle) Wait(ctx context.Context) error {
	select {
	case <-h.done:
		return h.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// AllReduceAsync starts AllReduce and returns at once, so that the caller can
// compute while the bytes move (for example reduce one gradient bucket while
// the backward pass fills the next). It takes its place in the order of
// collective operations when it is called. buf must not be touched until the
// handle is done.
func (c *Communicator) AllReduceAsync(ctx context.Context, buf Buffer) *Handle {
	h := &Handle{done: make(chan struct{})}
	o, p, err := c.prepare(ctx, OpAllReduce, buf, 0)
	if err != nil || o == nil {
		h.err = err
		close(h.done)
		return h
	}
	go func() {
		h.err = o.end(o.run(p))
		close(h.done)
	}()
	return h
}

// Send sends buf to group rank peer, which must call Recv with a buffer of
// the same length and type. It returns once peer has received all of it.
// Messages between two ranks are matched in the order they are sent.
func (c *Communicator) Send(ctx context.Context, peer int, buf Buffer) error {
	return c.p2p(ctx, OpSend, peer, buf, true)
}

// Recv receives into buf the next message that group rank peer sends.
func (c *Communicator) Recv(ctx context.Context, peer int, buf Buffer) error {
	return c.p2p(ctx, OpSend, peer, buf, false)
}

func (c *Communicator) collective(ctx context.Context, kind OpKind, buf Buffer, root int) error {
	o, p, err := c.prepare(ctx, kind, buf, root)
	if err != nil || o == nil {
		return err
	}
	return o.end(o.run(p))
}

func (c *Communicator) p2p(ctx context.Context, kind OpKind, peer int, buf Buffer, send bool) error {
	name := "recv"
	if send {
		name = "send"
	}
	if err := buf.validate(name); err != nil {
		return err
	}
	if peer < 0 || peer >= c.Size() || peer == c.rank {
		return invalidf("%s: peer %d; it must be another rank of the group (0 to %d)", name, peer, c.Size()-1)
	}
	p := c.newPlan(kind, buf, 0)
	p.segs = []int{0, buf.Len()}
	if send {
		p.next = peer
		p.steps = []step{{send: 0, recv: -1}}
	} else {
		p.prev = peer
		p.steps = []step{{send: -1, recv: 0, mode: modeCopy}}
	}
	p.setLanes()
	o, err := c.begin(ctx, kind, p, func() uint64 {
		seqs := c.recvSeq
		if send {
			seqs = c.sendSeq
		}
		id := seqs[peer]
		seqs[peer]++
		return p2pBit | id
	})
	if err != nil || o == nil {
		return err
	}
	o.name = name
	return o.end(o.run(p))
}

// prepare validates the arguments, plans the operation and begins it. A nil
// op with a nil error means there is nothing to move.
func (c *Communicator) prepare(ctx context.Context, kind OpKind, buf Buffer, root int) (*opRun, *plan, error) {
	if kind != OpBarrier {
		if err := buf.validate(kind.String()); err != nil {
			return nil, nil, err
		}
	}
	p := c.newPlan(kind, buf, root)
	p.schedule()
	o, err := c.begin(ctx, kind, p, func() uint64 {
		id := c.nextOp
		c.nextOp++
		return id
	})
	return o, p, err
}

// opRun is one running operation.
type opRun struct {
	c      *Communicator
	kind   OpKind
	name   string
	user   context.Context
	ctx    context.Context // ends with user, with the communicator, or on a failure
	cancel context.CancelCauseFunc
	stop   func() bool
}

// begin takes the next operation id and starts the operation's context. It
// returns a nil op when the plan moves nothing.
func (c *Communicator) begin(ctx context.Context, kind OpKind, p *plan, nextID func() uint64) (*opRun, error) {
	w := c.w
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, fmt.Errorf("collective: %s: %w", kind, ErrClosed)
	}
	if c.ctx.Err() != nil {
		c.mu.Unlock()
		return nil, w.opError(kind.String(), context.Cause(c.ctx))
	}
	p.hdr.OpID = nextID()
	c.mu.Unlock()

	if err := ctx.Err(); err != nil {
		if p.lanes > 0 {
			// The peers expect this operation; let them fail now rather
			// than time out.
			w.abortSelf(kind, context.Cause(ctx))
		}
		return nil, context.Cause(ctx)
	}
	if p.lanes == 0 {
		return nil, nil
	}
	if !w.beginOp() {
		return nil, fmt.Errorf("collective: %s: %w", kind, ErrClosed)
	}
	o := &opRun{c: c, kind: kind, name: kind.String(), user: ctx}
	o.ctx, o.cancel = context.WithCancelCause(ctx)
	o.stop = context.AfterFunc(c.ctx, func() { o.cancel(context.Cause(c.ctx)) })
	return o, nil
}

// end releases the operation and turns its failure into the error the
// caller sees.
func (o *opRun) end(err error) error {
	defer o.c.w.ops.Done()
	defer o.cancel(nil)
	defer o.stop()
	if err == nil {
		return nil
	}
	cause := context.Cause(o.ctx)
	if o.user.Err() != nil && errors.Is(cause, context.Cause(o.user)) && o.c.ctx.Err() == nil {
		o.c.w.abortSelf(o.kind, cause)
		return cause
	}
	return o.c.w.opError(o.name, cause)
}

// errStopped is returned by the goroutines of an operation whose context
// ended; end replaces it with the context's cause.
var errStopped = errors.New("collective: operation stopped")

// fail reports that a stream with group rank peer failed with err, unless
// the operation is already over, and returns err.
func (o *opRun) fail(peer int, err error) error {
	if o.ctx.Err() != nil {
		return errStopped
	}
	reason := ReasonLost
	switch {
	case errors.Is(err, ErrMismatch):
		reason = ReasonMismatch
	case errors.Is(err, ErrPeerClosed):
		reason = ReasonClosed
	case errors.Is(err, ErrClosed):
		// This rank's own transport closed under the operation.
		o.c.w.cancel(ErrClosed)
		return err
	}
	wr := o.c.members[peer]
	o.c.w.suspect(Report{Culprit: wr, Reason: reason, Since: time.Now(),
		Detail: fmt.Sprintf("%s: stream with rank %d: %s", o.name, wr, detail(err))}, true)
	return err
}

// watch suspects a peer when one blocking call on its stream takes longer
// than Config.suspectAfter.
type watch struct {
	o     *opRun
	peer  int // group rank
	dir   string
	timer *time.Timer
	since time.Time
	mu    sync.Mutex
}

func (o *opRun) watch(peer int, dir string) *watch {
	wt := &watch{o: o, peer: peer, dir: dir}
	wt.timer = time.AfterFunc(time.Hour, wt.fire)
	wt.timer.Stop()
	return wt
}

func (wt *watch) arm() {
	wt.mu.Lock()
	wt.since = time.Now()
	wt.mu.Unlock()
	wt.timer.Reset(wt.o.c.w.cfg.suspectAfter())
}

func (wt *watch) disarm() { wt.timer.Stop() }

func (wt *watch) fire() {
	o := wt.o
	if o.ctx.Err() != nil {
		return
	}
	wt.mu.Lock()
	since := wt.since
	wt.mu.Unlock()
	wr := o.c.members[wt.peer]
	o.c.w.suspect(Report{Culprit: wr, Reason: ReasonTimeout, Since: since,
		Detail: fmt.Sprintf("%s: no progress %s rank %d for %v", o.name, wt.dir, wr, time.Since(since).Round(time.Millisecond))}, true)
}

func (w *world) beginOp() bool {
	w.closeMu.Lock()
	defer w.closeMu.Unlock()
	if w.closed {
		return false
	}
	w.ops.Add(1)
	return true
}
