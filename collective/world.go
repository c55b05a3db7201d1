package collective

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// world is the state shared by a communicator and its sub-groups: the
// transport, liveness of the peers and the agreement on a failure.
type world struct {
	cfg  Config
	t    Transport
	log  *slog.Logger
	rank int
	size int

	// ctx ends when the world fails or closes; its cause is a *worldFailure
	// or ErrClosed.
	ctx    context.Context
	cancel context.CancelCauseFunc

	lastHeard []atomic.Int64 // unix nanos of the last message from each peer
	peerGone  []atomic.Bool  // the peer said goodbye

	mu       sync.Mutex
	failure  *worldFailure
	reports  []Report
	settling *time.Timer

	ops     sync.WaitGroup // running operations of every communicator
	stopHB  chan struct{}
	hbDone  sync.WaitGroup
	closeMu sync.Mutex
	closed  bool

	sent, recv atomic.Int64
	scratch    sync.Pool // *[]float32
}

// worldFailure is the agreed culprit of a failed world.
type worldFailure struct {
	Report
	addr string
}

func (f *worldFailure) Error() string {
	return fmt.Sprintf("rank %d (%s): %v: %s", f.Culprit, f.addr, f.Reason.sentinel(), f.Detail)
}

func newWorld(cfg Config, t Transport) *world {
	w := &world{cfg: cfg, t: t, rank: t.Rank(), size: t.Size(), stopHB: make(chan struct{})}
	w.log = cfg.logger().With("rank", w.rank, "generation", cfg.Generation)
	w.ctx, w.cancel = context.WithCancelCause(context.Background())
	w.lastHeard = make([]atomic.Int64, w.size)
	w.peerGone = make([]atomic.Bool, w.size)
	return w
}

// start begins heartbeats and liveness checks.
func (w *world) start() {
	now := time.Now().UnixNano()
	for i := range w.lastHeard {
		w.lastHeard[i].Store(now)
	}
	if w.size == 1 {
		return
	}
	w.hbDone.Add(1)
	go w.heartbeats()
}

func (w *world) heartbeats() {
	defer w.hbDone.Done()
	every := w.cfg.heartbeatInterval()
	tick := time.NewTicker(every / 2)
	defer tick.Stop()
	var lastSent time.Time
	for {
		select {
		case <-w.stopHB:
			return
		case now := <-tick.C:
			if now.Sub(lastSent) >= every-every/8 {
				lastSent = now
				for p := range w.size {
					if p != w.rank && !w.peerGone[p].Load() {
						_ = w.t.SendControl(p, Control{})
					}
				}
			}
			w.checkLiveness(now)
		}
	}
}

func (w *world) checkLiveness(now time.Time) {
	limit := w.cfg.suspectAfter()
	for p := range w.size {
		if p == w.rank || w.peerGone[p].Load() {
			continue
		}
		last := time.Unix(0, w.lastHeard[p].Load())
		if silent := now.Sub(last); silent > limit {
			w.suspect(Report{Culprit: p, Reason: ReasonTimeout, Since: last,
				Detail: fmt.Sprintf("no heartbeat for %v", silent.Round(time.Millisecond))}, true)
		}
	}
}

// Control implements Handler.
func (w *world) Control(from int, m Control) {
	w.lastHeard[from].Store(time.Now().UnixNano())
	if m.Report == nil {
		return
	}
	r := *m.Report
	r.From = from
	if r.Culprit < 0 || r.Culprit >= w.size {
		w.log.Warn("ignoring a failure report with a bad culprit", "from", from, "culprit", r.Culprit)
		return
	}
	w.log.Debug("failure report", "from", from, "culprit", r.Culprit, "reason", r.Reason.sentinel(), "detail", r.Detail)
	if r.Reason == ReasonAborted {
		w.decide(r)
		return
	}
	w.suspect(r, false)
}

// PeerLost implements Handler.
func (w *world) PeerLost(peer int, err error) {
	if w.peerGone[peer].Load() {
		return
	}
	// Tell the others before failing: this rank will close its transport
	// once its operation returns, and a peer that has not yet seen the
	// broken connection itself must learn the real culprit first, not
	// blame this rank for leaving (control messages to a peer stay in order).
	r := Report{Culprit: peer, Reason: ReasonLost, Since: time.Now(), Detail: detail(err), From: w.rank}
	w.broadcast(r)
	w.decide(r)
}

// PeerClosed implements Handler. A peer that closes is not a failure by
// itself: only an operation that still needs it fails, through its streams.
func (w *world) PeerClosed(peer int) {
	w.peerGone[peer].Store(true)
	w.log.Debug("peer closed its communicator", "peer", peer)
}

// suspect records a report and, the first time, starts the settling period
// at the end of which the culprit is picked. Reports of this rank are
// broadcast to every peer.
func (w *world) suspect(r Report, broadcast bool) {
	if broadcast {
		r.From = w.rank
	}
	if r.Reason == ReasonLost && w.peerGone[r.Culprit].Load() {
		r.Reason = ReasonClosed
	}
	w.mu.Lock()
	if w.failure != nil || w.ctx.Err() != nil {
		w.mu.Unlock()
		return
	}
	if r.Reason == ReasonClosed && len(w.reports) == 0 {
		// A peer that left cannot take part any more, and nobody blamed
		// anyone before: no need to wait for other verdicts.
		w.mu.Unlock()
		if broadcast {
			w.broadcast(r)
		}
		w.decide(r)
		return
	}
	w.reports = append(w.reports, r)
	if w.settling == nil {
		w.settling = time.AfterFunc(w.cfg.settle(), w.settle)
	}
	w.mu.Unlock()
	if broadcast {
		w.broadcast(r)
	}
}

func (w *world) broadcast(r Report) {
	for p := range w.size {
		if p != w.rank && !w.peerGone[p].Load() {
			_ = w.t.SendControl(p, Control{Report: &r})
		}
	}
}

// settle picks the culprit, so that every rank that saw the same reports
// blames the same rank. A rank that itself reported someone is waiting on
// that someone, not the cause: when a silent rank stalls a ring, its
// successor stops making progress too and gets blamed by the next rank. So
// the culprit is chosen among the ranks that were blamed but reported
// nobody (the head of the wait-for chain), and only when every blamed rank
// also reported (a cycle) among all reports; within that set, the report
// whose culprit went silent first wins, the lowest rank on a tie.
func (w *world) settle() {
	w.mu.Lock()
	if w.failure != nil || len(w.reports) == 0 {
		w.mu.Unlock()
		return
	}
	reporters := make(map[int]bool, len(w.reports))
	for _, r := range w.reports {
		reporters[r.From] = true
	}
	var best *Report
	for _, headsOnly := range []bool{true, false} {
		for i := range w.reports {
			r := &w.reports[i]
			if headsOnly && reporters[r.Culprit] {
				continue
			}
			if best == nil || r.Since.Before(best.Since) || (r.Since.Equal(best.Since) && r.Culprit < best.Culprit) {
				best = r
			}
		}
		if best != nil {
			break
		}
	}
	choice := *best
	w.mu.Unlock()
	w.decide(choice)
}

// decide fails the world with r's culprit, once.
func (w *world) decide(r Report) {
	w.mu.Lock()
	if w.failure != nil || w.ctx.Err() != nil {
		w.mu.Unlock()
		return
	}
	f := &worldFailure{Report: r, addr: w.t.Addr(r.Culprit)}
	w.failure = f
	if w.settling != nil {
		w.settling.Stop()
	}
	w.mu.Unlock()
	w.log.Error("communicator failed", "culprit", r.Culprit, "addr", f.addr, "reason", r.Reason.sentinel(), "detail", r.Detail)
	w.cancel(f)
}

// abortSelf fails the world because this rank abandoned an operation, and
// tells every peer so that they fail at once.
func (w *world) abortSelf(op OpKind, cause error) {
	r := Report{Culprit: w.rank, Reason: ReasonAborted, Since: time.Now(),
		Detail: fmt.Sprintf("%s abandoned: %v", op, cause)}
	w.mu.Lock()
	done := w.failure != nil || w.ctx.Err() != nil
	w.mu.Unlock()
	if done {
		return
	}
	w.broadcast(r)
	w.decide(r)
}

// opError turns the cause of a world or communicator ending into the error
// of operation op.
func (w *world) opError(op string, cause error) error {
	var f *worldFailure
	if errors.As(cause, &f) {
		return &PeerError{Rank: f.Culprit, Addr: f.addr, Op: op,
			Err: fmt.Errorf("%w: %s", f.Reason.sentinel(), f.Detail)}
	}
	if errors.Is(cause, ErrClosed) {
		return fmt.Errorf("collective: %s: %w", op, ErrClosed)
	}
	return cause
}

// detail is the message of err without the leading sentinels, which the
// PeerError adds back.
func detail(err error) string {
	msg := err.Error()
	for _, s := range []error{ErrPeerLost, ErrPeerClosed, ErrPeerAborted, ErrPeerTimeout, ErrMismatch, ErrStaleGeneration} {
		for strings.HasPrefix(msg, s.Error()+": ") {
			msg = strings.TrimPrefix(msg, s.Error()+": ")
		}
	}
	return msg
}

func (w *world) close() error {
	w.closeMu.Lock()
	defer w.closeMu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	w.cancel(ErrClosed)
	w.mu.Lock()
	if w.settling != nil {
		w.settling.Stop()
	}
	w.mu.Unlock()
	close(w.stopHB)
	w.hbDone.Wait()
	w.ops.Wait()
	return w.t.Close()
}

func (w *world) getScratch(n int) *[]float32 {
	if p, ok := w.scratch.Get().(*[]float32); ok && cap(*p) >= n {
		*p = (*p)[:n]
		return p
	}
	s := make([]float32, n)
	return &s
}

func (w *world) putScratch(p *[]float32) { w.scratch.Put(p) }
