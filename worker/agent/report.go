package agent

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/client"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// maxMessageBytes is the coordinator's limit on a failure message.
const maxMessageBytes = 4096

// reporter sends one rank's reports to the coordinator. Progress goes out
// in the background, newest first (a report not yet sent is replaced by a
// newer one), so that an election at the coordinator never holds up a
// step; commits, the end of the job and failures wait for their answer.
type reporter struct {
	cl      *client.Client
	job     string
	gen     uint64
	rank    int
	worker  string
	timeout time.Duration
	log     *slog.Logger
	// stop cancels the rank's context when the coordinator says stop.
	stop    context.CancelCauseFunc
	onEvent func(Progress)

	mu      sync.Mutex
	pending *Progress
	last    Progress
	wake    chan struct{}
}

func newReporter(cl *client.Client, job string, gen uint64, rank int, worker string, timeout time.Duration,
	log *slog.Logger, stop context.CancelCauseFunc, onEvent func(Progress)) *reporter {
	return &reporter{cl: cl, job: job, gen: gen, rank: rank, worker: worker, timeout: timeout, log: log,
		stop: stop, onEvent: onEvent, wake: make(chan struct{}, 1)}
}

// progress queues p and wakes the sender.
func (r *reporter) progress(p Progress) {
	r.mu.Lock()
	r.pending = &p
	r.last = p
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
	if r.onEvent != nil {
		r.onEvent(p)
	}
}

// lastProgress returns the newest progress queued.
func (r *reporter) lastProgress() Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}

func (r *reporter) request(p Progress, done bool) *pb.ReportProgressRequest {
	return &pb.ReportProgressRequest{JobId: r.job, Generation: r.gen, Rank: int32(r.rank), Step: int64(p.Step),
		Loss: p.Loss, TokensPerSec: p.TokensPerSec, GradNorm: p.GradNorm, Lr: p.LR, Done: done}
}

// loop sends queued progress until ctx ends. A failed send is logged once
// per run of failures and dropped: the next step's report supersedes it.
func (r *reporter) loop(ctx context.Context) {
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		}
		r.mu.Lock()
		p := r.pending
		r.pending = nil
		r.mu.Unlock()
		if p == nil {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, r.timeout)
		stop, err := r.cl.ReportProgress(sctx, r.request(*p, false))
		cancel()
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			if !failing {
				r.log.Warn("progress report failed; training goes on and the next step's report is tried", "step", p.Step, "err", err)
			}
			failing = true
		case stop:
			r.log.Info("the coordinator says stop: the generation is stale or the job ended", "step", p.Step)
			r.stop(ErrStale)
			return
		default:
			if failing {
				r.log.Info("progress reports reach the coordinator again", "step", p.Step)
			}
			failing = false
		}
	}
}

// commit reports a written checkpoint and waits until the coordinator
// committed it, or the generation turned out stale (ErrStale), or the
// report timeout passed.
func (r *reporter) commit(ctx context.Context, step int, location string) error {
	cctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	err := r.cl.ReportCheckpoint(cctx, &pb.ReportCheckpointRequest{JobId: r.job, Generation: r.gen, Step: int64(step), Location: location})
	if status.Code(err) == codes.Aborted {
		// A generation that ended, or a retry of a commit that went
		// through after an unknown outcome.
		return fmt.Errorf("%w: checkpoint of step %d: %v", ErrStale, step, status.Convert(err).Message())
	}
	if err != nil {
		return fmt.Errorf("agent: commit the checkpoint of step %d: %w", step, err)
	}
	r.log.Info("checkpoint committed by the coordinator", "step", step, "location", location)
	return nil
}

// finish reports that rank 0 completed the job's last step. It retries
// until the coordinator answers or ctx ends (the assignment withdrawn, the
// worker stopping): the job is not done until it is told.
func (r *reporter) finish(ctx context.Context, res Result) error {
	p := r.lastProgress()
	p.Step, p.Loss = res.Step, res.Loss
	_, err := r.cl.ReportProgress(ctx, r.request(p, true))
	if err != nil {
		return fmt.Errorf("agent: report the end of job %s at step %d: %w", r.job, res.Step, err)
	}
	return nil
}

// failure reports that the rank failed, which ends the generation (or the
// job, when fatal). A generation that already ended answers stale: the
// error then wraps ErrStale, and the rank's end was a consequence of that
// (a peer stopped), not a failure of its own. It retries until the
// coordinator answers or ctx ends (the assignment withdrawn, the worker
// stopping).
func (r *reporter) failure(ctx context.Context, cause error, fatal bool) error {
	msg := cause.Error()
	if len(msg) > maxMessageBytes {
		msg = msg[:maxMessageBytes-3] + "..."
	}
	err := r.cl.ReportFailure(ctx, &pb.ReportFailureRequest{JobId: r.job, Generation: r.gen, Rank: int32(r.rank),
		WorkerId: r.worker, Message: msg, Fatal: fatal})
	switch status.Code(err) {
	case codes.OK:
		return nil
	case codes.Aborted, codes.NotFound:
		return fmt.Errorf("%w: %s", ErrStale, status.Convert(err).Message())
	}
	return fmt.Errorf("agent: report the failure of rank %d of %s generation %d: %w", r.rank, r.job, r.gen, err)
}
