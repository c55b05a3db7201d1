package checkpoint

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/m2train/m2train/model"
)

// SaveError is the failure of one asynchronous save.
type SaveError struct {
	Step int
	Err  error
}

func (e *SaveError) Error() string {
	return fmt.Sprintf("checkpoint: save of step %d failed: %v", e.Step, e.Err)
}

func (e *SaveError) Unwrap() error { return e.Err }

// Commit describes a committed checkpoint.
type Commit struct {
	Step     int
	Manifest *Manifest
	// Snapshot is how long the copy of the state took on the caller's
	// goroutine; Upload how long encoding, upload and commit took in the
	// background.
	Snapshot, Upload time.Duration
}

// SaverOptions configure a Saver.
type SaverOptions struct {
	// Keep is the number of committed checkpoints retention keeps under
	// the prefix; 0 keeps all.
	Keep int
	// Log receives a line per commit, failure and retention problem.
	Log *slog.Logger
	// OnCommit is called, from the saving goroutine, after a checkpoint
	// is committed and before retention runs.
	OnCommit func(Commit)
	// OnError is called, from the saving goroutine, when a save fails.
	OnError func(*SaveError)
}

// Saver writes checkpoints in the background so that training continues
// while they upload. Save copies the state (the only time the caller
// waits, besides a save still in flight) and returns; at most one save is
// in flight: a Save called while one is still in flight waits for it to
// finish first, so that every requested checkpoint is written and memory
// holds one snapshot. A failed save is reported to OnError at once, and
// returned by the next Save, Wait or Close; it never stops the Saver, and
// it never leaves a committed checkpoint behind.
//
// The methods of a Saver are not safe for concurrent use; the snapshot
// buffers are reused from one save to the next.
type Saver[T model.Float] struct {
	store  Store
	prefix string
	opts   SaverOptions
	log    *slog.Logger

	snap     *State[T]
	done     chan struct{} // closed when the save in flight ends; nil if none
	mu       sync.Mutex
	err      error // failure of the last save, not yet returned
	inflight int   // step of the save in flight
}

// NewSaver returns a Saver that writes checkpoints under prefix in store.
func NewSaver[T model.Float](store Store, prefix string, opts SaverOptions) *Saver[T] {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Saver[T]{store: store, prefix: prefix, opts: opts, log: log}
}

// Save waits for the save in flight, if any, copies s and starts writing
// the copy under ctx; it returns the copy's duration. The error is that
// of an earlier save that failed and was not yet returned, or ctx's if it
// ended while waiting, in which case nothing new was started.
func (sv *Saver[T]) Save(ctx context.Context, s *State[T]) (time.Duration, error) {
	prev := sv.Wait(ctx)
	if sv.done != nil {
		return 0, ctx.Err()
	}
	start := time.Now()
	sv.copyState(s)
	took := time.Since(start)
	sv.inflight = s.Trainer.Step
	done := make(chan struct{})
	sv.done = done
	go sv.write(ctx, took, done)
	return took, prev
}

// copyState copies s into the snapshot, reusing its buffers.
func (sv *Saver[T]) copyState(s *State[T]) {
	if sv.snap == nil || len(sv.snap.Params) != len(s.Params) || len(sv.snap.M) != len(s.M) || len(sv.snap.V) != len(s.V) {
		sv.snap = &State[T]{Params: make([]T, len(s.Params)), M: make([]T, len(s.M)), V: make([]T, len(s.V))}
	}
	sv.snap.Config, sv.snap.Layout = s.Config, s.Layout
	copy(sv.snap.Params, s.Params)
	copy(sv.snap.M, s.M)
	copy(sv.snap.V, s.V)
	sv.snap.Trainer = s.Trainer
	sv.snap.Trainer.Spec = append([]byte(nil), s.Trainer.Spec...)
}

func (sv *Saver[T]) write(ctx context.Context, snapshot time.Duration, done chan struct{}) {
	defer close(done)
	step := sv.snap.Trainer.Step
	start := time.Now()
	man, err := Save(ctx, sv.store, sv.prefix, sv.snap)
	if err != nil {
		serr := &SaveError{Step: step, Err: err}
		sv.mu.Lock()
		sv.err = serr
		sv.mu.Unlock()
		sv.log.Error("checkpoint save failed; training goes on and the next checkpoint is tried as usual", "step", step, "store", sv.store.String(), "err", err)
		if sv.opts.OnError != nil {
			sv.opts.OnError(serr)
		}
		return
	}
	upload := time.Since(start)
	size := man.Size()
	sv.log.Info("checkpoint committed", "step", step, "store", sv.store.String(), "dir", JoinKey(sv.prefix, StepDir(step)),
		"bytes", size, "snapshot", snapshot, "upload", upload, "MiB/s", float64(size)/(1<<20)/max(upload.Seconds(), 1e-9))
	if sv.opts.OnCommit != nil {
		sv.opts.OnCommit(Commit{Step: step, Manifest: man, Snapshot: snapshot, Upload: upload})
	}
	if err := Prune(ctx, sv.store, sv.prefix, sv.opts.Keep); err != nil {
		sv.log.Warn("checkpoint retention failed; older checkpoints stay until the next commit", "store", sv.store.String(), "err", err)
	}
}

// InFlight returns the step of the save in flight, if one is.
func (sv *Saver[T]) InFlight() (step int, ok bool) {
	if sv.done == nil {
		return 0, false
	}
	select {
	case <-sv.done:
		return 0, false
	default:
		return sv.inflight, true
	}
}

// Wait waits until no save is in flight and returns the failure of the
// last save if it was not yet returned. When ctx ends first, the save goes
// on and Wait returns ctx's error.
func (sv *Saver[T]) Wait(ctx context.Context) error {
	if sv.done != nil {
		select {
		case <-sv.done:
			sv.done = nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	sv.mu.Lock()
	defer sv.mu.Unlock()
	err := sv.err
	sv.err = nil
	return err
}

// Close waits for the save in flight and returns the failure not yet
// returned, if any.
func (sv *Saver[T]) Close() error { return sv.Wait(context.Background()) }
