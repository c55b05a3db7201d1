package collective

import (
	"context"
	"fmt"
	"sync"
)

// memWindow is the number of chunks a sender may queue ahead of its receiver
// on an in-memory stream, the analogue of a flow-control window.
const memWindow = 4

// MemNetwork connects the ranks of one process through memory; it is the
// transport of the unit tests. Chunks are handed over without copying, so the
// race detector checks that no operation touches memory a peer is still
// reading. Kill and Stall inject the failures of real networks.
type MemNetwork struct {
	size int
	eps  []*memEndpoint

	mu      sync.Mutex
	pipes   map[StreamKey]*memPipe
	started int
	ready   chan struct{} // closed when every endpoint has started
}

// NewMemNetwork returns a network of size ranks.
func NewMemNetwork(size int) *MemNetwork {
	n := &MemNetwork{size: size, pipes: make(map[StreamKey]*memPipe), ready: make(chan struct{})}
	for r := range size {
		n.eps = append(n.eps, &memEndpoint{net: n, rank: r, done: make(chan struct{}), stall: make(chan struct{}), wake: make(chan struct{}, 1)})
	}
	return n
}

// Transport returns the endpoint of rank r.
func (n *MemNetwork) Transport(r int) Transport { return n.eps[r] }

// Kill makes rank r vanish without a goodbye, as a killed process does: its
// streams break and every peer learns that the connection was lost.
func (n *MemNetwork) Kill(r int) { n.eps[r].shutdown(false) }

// Stall freezes rank r, as a stopped process: it sends and receives nothing
// more (no chunks, no heartbeats) while its connections stay open.
func (n *MemNetwork) Stall(r int) {
	ep := n.eps[r]
	ep.mu.Lock()
	defer ep.mu.Unlock()
	if !ep.stalled {
		ep.stalled = true
		close(ep.stall)
	}
}

// Addr returns the name of rank r in errors: "mem:<r>".
func (n *MemNetwork) Addr(r int) string { return fmt.Sprintf("mem:%d", r) }

type memEndpoint struct {
	net  *MemNetwork
	rank int
	done chan struct{} // closed by Close or Kill

	mu      sync.Mutex
	handler Handler
	started bool
	closed  bool
	killed  bool
	stalled bool
	stall   chan struct{} // closed by Stall
	events  []func(Handler)
	wake    chan struct{}
	loop    sync.WaitGroup
}

type memMsg struct {
	seq     uint32
	payload []byte
}

// memPipe is one stream. Whichever end arrives first creates it.
type memPipe struct {
	key    StreamKey
	opened chan struct{} // closed when the sender has opened it
	hdr    StreamHeader  // the sender's header, set before opened is closed
	msgs   chan memMsg   // closed by the sender's Finish
	acked  chan struct{} // closed by the receiver's Finish
	broken chan struct{} // closed when either end fails
	once   sync.Once
	err    error
	ends   int // ends that have not closed yet
}

func (p *memPipe) fail(err error) {
	p.once.Do(func() {
		p.err = err
		close(p.broken)
	})
}

func (ep *memEndpoint) Rank() int         { return ep.rank }
func (ep *memEndpoint) Size() int         { return ep.net.size }
func (ep *memEndpoint) Addr(r int) string { return ep.net.Addr(r) }

func (ep *memEndpoint) Start(ctx context.Context, generation uint64, h Handler) error {
	n := ep.net
	ep.mu.Lock()
	if ep.started || ep.closed {
		ep.mu.Unlock()
		return fmt.Errorf("%w: in-memory transport of rank %d started twice or closed", ErrInvalid, ep.rank)
	}
	ep.started = true
	ep.handler = h
	ep.loop.Add(1)
	go ep.deliver()
	ep.mu.Unlock()

	n.mu.Lock()
	n.started++
	if n.started == n.size {
		close(n.ready)
	}
	n.mu.Unlock()
	select {
	case <-n.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("collective: waiting for the other ranks to start: %w", ctx.Err())
	case <-ep.done:
		return ErrClosed
	}
}

// deliver runs the handler calls of this endpoint in order, off the callers'
// goroutines.
func (ep *memEndpoint) deliver() {
	defer ep.loop.Done()
	for {
		ep.mu.Lock()
		evs := ep.events
		ep.events = nil
		h := ep.handler
		ep.mu.Unlock()
		for _, ev := range evs {
			ev(h)
		}
		select {
		case <-ep.wake:
		case <-ep.done:
			return
		}
	}
}

// post queues an event for this endpoint's handler unless it is closed or
// stalled (a stopped process handles nothing).
func (ep *memEndpoint) post(ev func(Handler)) {
	ep.mu.Lock()
	if ep.closed || ep.stalled || !ep.started {
		ep.mu.Unlock()
		return
	}
	ep.events = append(ep.events, ev)
	ep.mu.Unlock()
	select {
	case ep.wake <- struct{}{}:
	default:
	}
}

func (ep *memEndpoint) isStalled() bool {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return ep.stalled
}

func (ep *memEndpoint) SendControl(peer int, m Control) error {
	if peer < 0 || peer >= ep.net.size || peer == ep.rank {
		return invalidf("control message to rank %d", peer)
	}
	select {
	case <-ep.done:
		return ErrClosed
	default:
	}
	if ep.isStalled() {
		return nil
	}
	from := ep.rank
	ep.net.eps[peer].post(func(h Handler) { h.Control(from, m) })
	return nil
}

// pipe returns the stream for key, creating it if needed, and counts one more
// end on it.
func (n *MemNetwork) pipe(key StreamKey) (*memPipe, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, r := range []int{key.Src, key.Dst} {
		select {
		case <-n.eps[r].done:
			if n.eps[r].wasKilled() {
				return nil, fmt.Errorf("%w: rank %d is gone", ErrPeerLost, r)
			}
			return nil, fmt.Errorf("%w: rank %d closed its transport", ErrPeerClosed, r)
		default:
		}
	}
	p, ok := n.pipes[key]
	if !ok {
		p = &memPipe{key: key, opened: make(chan struct{}), msgs: make(chan memMsg, memWindow),
			acked: make(chan struct{}), broken: make(chan struct{})}
		n.pipes[key] = p
	}
	p.ends++
	return p, nil
}

// release drops one end of p; the pipe leaves the table when both are gone.
func (n *MemNetwork) release(p *memPipe) {
	n.mu.Lock()
	defer n.mu.Unlock()
	p.ends--
	if p.ends == 0 && n.pipes[p.key] == p {
		delete(n.pipes, p.key)
	}
}

func (ep *memEndpoint) checkOpen(h StreamHeader, self int) error {
	if h.Src < 0 || h.Src >= ep.net.size || h.Dst < 0 || h.Dst >= ep.net.size || h.Src == h.Dst {
		return invalidf("stream from rank %d to rank %d", h.Src, h.Dst)
	}
	if self != ep.rank {
		return invalidf("stream end of rank %d opened on rank %d", self, ep.rank)
	}
	select {
	case <-ep.done:
		return ErrClosed
	default:
		return nil
	}
}

func (ep *memEndpoint) OpenSend(ctx context.Context, h StreamHeader) (SendStream, error) {
	if err := ep.checkOpen(h, h.Src); err != nil {
		return nil, err
	}
	p, err := ep.net.pipe(h.Key())
	if err != nil {
		return nil, err
	}
	select {
	case <-p.opened:
		ep.net.release(p)
		return nil, invalidf("stream %+v opened twice", h.Key())
	default:
	}
	p.hdr = h
	close(p.opened)
	return &memSend{ep: ep, peer: ep.net.eps[h.Dst], p: p, ctx: ctx}, nil
}

func (ep *memEndpoint) OpenRecv(ctx context.Context, h StreamHeader) (RecvStream, error) {
	if err := ep.checkOpen(h, h.Dst); err != nil {
		return nil, err
	}
	p, err := ep.net.pipe(h.Key())
	if err != nil {
		return nil, err
	}
	s := &memRecv{ep: ep, peer: ep.net.eps[h.Src], p: p, ctx: ctx}
	select {
	case <-p.opened:
		return s, nil
	case <-p.broken:
		s.Close()
		return nil, p.err
	case <-ctx.Done():
		s.Close()
		return nil, ctx.Err()
	case <-ep.done:
		s.Close()
		return nil, ErrClosed
	}
}

type memSend struct {
	ep, peer *memEndpoint
	p        *memPipe
	ctx      context.Context
	finished bool
	closed   bool
}

// wait blocks on ch, failing when the stream breaks, the context ends or the
// local endpoint closes. A stalled local endpoint waits until it is closed.
func wait[T any](ctx context.Context, ep *memEndpoint, p *memPipe, ch <-chan T) (T, bool, error) {
	var zero T
	select {
	case <-ep.stall:
		select {
		case <-ep.done:
			return zero, false, ErrClosed
		case <-ctx.Done():
			return zero, false, ctx.Err()
		}
	default:
	}
	select {
	case v, ok := <-ch:
		return v, ok, nil
	case <-p.broken:
		return zero, false, p.err
	case <-ctx.Done():
		return zero, false, ctx.Err()
	case <-ep.done:
		return zero, false, ErrClosed
	}
}

func (s *memSend) Send(seq uint32, payload []byte) error {
	select {
	case <-s.ep.stall:
		_, _, err := wait[struct{}](s.ctx, s.ep, s.p, nil)
		return err
	default:
	}
	select {
	case s.p.msgs <- memMsg{seq: seq, payload: payload}:
		return nil
	case <-s.p.broken:
		return s.p.err
	case <-s.ctx.Done():
		return s.ctx.Err()
	case <-s.ep.done:
		return ErrClosed
	}
}

func (s *memSend) Finish() error {
	if !s.finished {
		s.finished = true
		close(s.p.msgs)
	}
	_, _, err := wait(s.ctx, s.ep, s.p, s.p.acked)
	return err
}

func (s *memSend) Close() { closePipe(&s.closed, s.ep, s.p) }

type memRecv struct {
	ep, peer *memEndpoint
	p        *memPipe
	ctx      context.Context
	closed   bool
}

func (s *memRecv) Header() StreamHeader { return s.p.hdr }

func (s *memRecv) Recv(fn func([]byte)) (uint32, int, error) {
	m, ok, err := wait(s.ctx, s.ep, s.p, s.p.msgs)
	if err != nil {
		return 0, 0, err
	}
	if !ok {
		return 0, 0, fmt.Errorf("%w: rank %d ended the stream early", ErrMismatch, s.p.key.Src)
	}
	if len(m.payload) > 0 {
		fn(m.payload)
	}
	return m.seq, len(m.payload), nil
}

func (s *memRecv) Finish() error {
	m, ok, err := wait(s.ctx, s.ep, s.p, s.p.msgs)
	if err != nil {
		return err
	}
	if ok {
		return fmt.Errorf("%w: rank %d sent chunk %d past the end of the stream", ErrMismatch, s.p.key.Src, m.seq)
	}
	close(s.p.acked)
	return nil
}

func (s *memRecv) Close() { closePipe(&s.closed, s.ep, s.p) }

// closePipe ends one side of a stream once: a stream closed before the
// receiver acknowledged it is abandoned, which fails the other side.
func closePipe(closed *bool, ep *memEndpoint, p *memPipe) {
	if *closed {
		return
	}
	*closed = true
	select {
	case <-p.acked:
	default:
		p.fail(fmt.Errorf("%w: rank %d abandoned the stream", ErrPeerAborted, ep.rank))
	}
	ep.net.release(p)
}

func (ep *memEndpoint) wasKilled() bool {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return ep.killed
}

func (ep *memEndpoint) Close() error {
	ep.shutdown(true)
	return nil
}

// shutdown closes the endpoint; graceful says goodbye first, otherwise the
// peers see a lost connection.
func (ep *memEndpoint) shutdown(graceful bool) {
	ep.mu.Lock()
	if ep.closed {
		ep.mu.Unlock()
		return
	}
	ep.closed = true
	ep.killed = !graceful
	started := ep.started
	ep.mu.Unlock()
	close(ep.done)
	ep.loop.Wait()

	n := ep.net
	var err error
	if graceful {
		err = fmt.Errorf("%w: rank %d closed its transport", ErrPeerClosed, ep.rank)
	} else {
		err = fmt.Errorf("%w: connection to rank %d broke", ErrPeerLost, ep.rank)
	}
	n.mu.Lock()
	for k, p := range n.pipes {
		if k.Src == ep.rank || k.Dst == ep.rank {
			p.fail(err)
		}
	}
	n.mu.Unlock()
	if !started {
		return
	}
	r := ep.rank
	for _, peer := range n.eps {
		if peer == ep {
			continue
		}
		if graceful {
			peer.post(func(h Handler) { h.PeerClosed(r) })
		} else {
			peer.post(func(h Handler) { h.PeerLost(r, err) })
		}
	}
}

var _ Transport = (*memEndpoint)(nil)
