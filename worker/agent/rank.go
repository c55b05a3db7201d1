package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/coordinator/jobspec"
)

// Runner trains one rank of one generation of a job. The agent calls Run
// once per rank and generation, with the communicators already built, and
// cancels ctx when the rank must stop (new generation, cancelled job,
// shutdown); Run then returns promptly.
type Runner interface {
	// Run trains r until the job's last step and returns the step and
	// loss reached. A nil error means the job's training is complete on
	// this rank. Errors that a restart cannot cure are wrapped with Fatal.
	Run(ctx context.Context, r *Rank) (Result, error)
}

// RunnerFunc adapts a function to Runner.
type RunnerFunc func(ctx context.Context, r *Rank) (Result, error)

// Run implements Runner.
func (f RunnerFunc) Run(ctx context.Context, r *Rank) (Result, error) { return f(ctx, r) }

// Result is where a rank's training ended.
type Result struct {
	Step int
	Loss float64
}

// Checkpoint is a checkpoint the coordinator committed.
type Checkpoint struct {
	Step     int64
	Location string
}

// Progress is one optimizer step's report.
type Progress struct {
	Step         int
	Loss         float64
	TokensPerSec float64
	GradNorm     float64
	LR           float64
	// StepTime is the step's wall time, and CommWait the part of it the
	// rank spent blocked on other ranks (zero in a world of one). They
	// feed the worker's metrics; the coordinator is not told.
	StepTime, CommWait time.Duration
}

// Rank is one rank of one generation of a job, as the agent hands it to a
// Runner: the assignment, the validated spec, the communicators and the
// reports to the coordinator.
type Rank struct {
	// JobID and Generation identify the placement; Rank, DPRank and
	// SPRank place this rank in the dp × sp grid of World ranks (rank =
	// dp_rank·sp + sp_rank).
	JobID      string
	Generation uint64
	Rank       int
	DPRank     int
	SPRank     int
	World      int
	// Slot is the worker's slot (GPU index) the rank runs on.
	Slot int
	// Spec is the job's validated spec with its defaults filled in.
	Spec *jobspec.Spec
	// ResumeFrom is the checkpoint the coordinator committed last, from
	// which this generation resumes; nil starts from the initial model.
	ResumeFrom *Checkpoint
	// Comm is the world communicator of the generation (gradients); DP
	// and SP are its data- and sequence-parallel sub-groups (Grid). They
	// are closed by the agent after Run returns.
	Comm, DP, SP *collective.Communicator
	// Log carries the job, generation and rank.
	Log *slog.Logger

	rep *reporter
	// onCheckpoint passes a checkpoint event to the agent's OnRankEvent;
	// nil when the rank has no agent (tests).
	onCheckpoint func(kind RankEventKind, c CheckpointInfo, err error)
}

// ReportProgress reports an optimizer step to the coordinator without
// waiting: reports are sent in the background, and a newer one replaces
// one not yet sent. When the coordinator answers that the generation is
// stale or the job ended, the rank's context is cancelled.
func (r *Rank) ReportProgress(p Progress) {
	if r.rep != nil {
		r.rep.progress(p)
	}
}

// CommitCheckpoint asks the coordinator to commit the checkpoint of step,
// whose manifest is written at location, and waits for the answer. A
// generation that ended meanwhile makes the commit stale: that is reported
// as ErrStale, and the next generation resumes from an earlier checkpoint.
func (r *Rank) CommitCheckpoint(ctx context.Context, step int, location string) error {
	if r.rep == nil {
		return errors.New("agent: the rank has no coordinator to commit to")
	}
	return r.rep.commit(ctx, step, location)
}

// checkpointSaved reports a checkpoint committed to the store as a
// RankCheckpoint event; commitErr says why the coordinator did not commit
// it, or is nil.
func (r *Rank) checkpointSaved(c CheckpointInfo, commitErr error) {
	if r.onCheckpoint != nil {
		r.onCheckpoint(RankCheckpoint, c, commitErr)
	}
}

// checkpointFailed reports a checkpoint that could not be saved as a
// RankCheckpointFailed event.
func (r *Rank) checkpointFailed(step int, err error) {
	if r.onCheckpoint != nil {
		r.onCheckpoint(RankCheckpointFailed, CheckpointInfo{Step: step}, err)
	}
}

// FatalError marks a failure that restarting the job cannot cure (a spec
// the worker cannot run, a diverged loss); the coordinator fails the job
// instead of placing it again.
type FatalError struct{ Err error }

func (e *FatalError) Error() string { return e.Err.Error() }

// Unwrap returns the wrapped error.
func (e *FatalError) Unwrap() error { return e.Err }

// Fatal wraps err as a FatalError; nil stays nil.
func Fatal(err error) error {
	if err == nil {
		return nil
	}
	return &FatalError{Err: err}
}

// IsFatal reports whether err is or wraps a FatalError.
func IsFatal(err error) bool {
	var f *FatalError
	return errors.As(err, &f)
}

// Sentinel causes with which the agent stops a rank; none of them is a
// failure of the rank.
var (
	// ErrWithdrawn: the coordinator no longer lists the rank (a new
	// generation, a cancelled or finished job).
	ErrWithdrawn = errors.New("agent: assignment withdrawn by the coordinator")
	// ErrStale: a report was answered with stop (stale generation or
	// ended job), or a commit came too late for its generation.
	ErrStale = errors.New("agent: the generation is stale or the job ended")
	// ErrShutdown: the worker is shutting down.
	ErrShutdown = errors.New("agent: worker shutting down")
	// ErrLeaseLost: the worker's etcd lease expired; the coordinator has
	// marked it lost and will place the job again.
	ErrLeaseLost = errors.New("agent: worker lease lost")
)

// ErrNotRegistered is wrapped by Agent.Ready's answer while the worker is
// not registered with the coordinator.
var ErrNotRegistered = errors.New("agent: not registered with the coordinator")

// RankEventKind is a step in a rank's life.
type RankEventKind int

// Rank events. A rank's life is RankStarted, RankConnected, the steps
// (RankProgress) with its checkpoints among them, and RankEnded; the kinds
// are numbered in the order they were added.
const (
	// RankStarted: the agent took the assignment.
	RankStarted RankEventKind = iota + 1
	// RankConnected: the rendezvous is complete and the communicator
	// connected.
	RankConnected
	// RankProgress: an optimizer step was reported.
	RankProgress
	// RankEnded: Run returned (Err says how).
	RankEnded
	// RankCheckpoint: the rank wrote a checkpoint and committed it to the
	// store (Checkpoint describes it), then asked the coordinator to
	// commit it (Err is nil when it did, else why not). Only the rank
	// that writes checkpoints (rank 0) has them.
	RankCheckpoint
	// RankCheckpointFailed: saving a checkpoint failed (Err says why);
	// training goes on.
	RankCheckpointFailed
)

func (k RankEventKind) String() string {
	switch k {
	case RankStarted:
		return "started"
	case RankConnected:
		return "connected"
	case RankProgress:
		return "progress"
	case RankEnded:
		return "ended"
	case RankCheckpoint:
		return "checkpoint"
	case RankCheckpointFailed:
		return "checkpoint failed"
	}
	return fmt.Sprintf("RankEventKind(%d)", int(k))
}

// RankEvent describes a change in a rank's life.
type RankEvent struct {
	Kind       RankEventKind
	JobID      string
	Generation uint64
	Rank       int
	World      int
	// Progress is the step reported (RankProgress) or the last step
	// reached (RankEnded).
	Progress Progress
	// Collective is what the rank's communicator of this generation has
	// moved so far, counted since RankConnected (RankProgress, RankEnded;
	// zero before the communicator connected).
	Collective collective.Stats
	// Checkpoint describes the checkpoint of a RankCheckpoint or
	// RankCheckpointFailed event.
	Checkpoint CheckpointInfo
	// Err is why the rank ended (RankEnded): nil when it finished the
	// job, one of the agent's stop causes (ErrWithdrawn, ...) when the
	// agent stopped it, else its failure. For RankCheckpoint it is why the
	// coordinator did not commit the checkpoint, for RankCheckpointFailed
	// why the save failed.
	Err error
}

// CheckpointInfo describes a checkpoint a rank saved or failed to save.
type CheckpointInfo struct {
	// Step is the optimizer step the checkpoint holds.
	Step int
	// Snapshot is how long training paused while the state was copied;
	// Upload how long encoding, writing and committing it to the store
	// took in the background (RankCheckpoint only).
	Snapshot, Upload time.Duration
}
