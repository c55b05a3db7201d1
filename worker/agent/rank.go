package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

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

// RankEventKind is a step in a rank's life.
type RankEventKind int

// Rank events in the order they happen.
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
	// Err is why the rank ended: nil when it finished the job, one of
	// the agent's stop causes (ErrWithdrawn, ...) when the agent stopped
	// it, else its failure.
	Err error
}
