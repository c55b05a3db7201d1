package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/train"
)

// Trainer is a rank's training loop as TrainRunner drives it;
// *train.Trainer[float32] is one.
type Trainer interface {
	// ResumeAt loads the newest checkpoint of step maxStep or earlier that
	// verifies and reports whether there was one.
	ResumeAt(ctx context.Context, maxStep int) (bool, error)
	// Run trains until the schedule's last step, checkpointing on the way.
	Run(ctx context.Context) error
	// Step and Loss are the optimizer steps done and the last step's loss.
	Step() int
	Loss() float64
}

// NewTrainerFunc builds the trainer of rank r on backend b, whose
// parameters hold the initial model (the same on every rank); ds is the
// opened dataset (nil for an MQAR spec) and opts carries the checkpoint
// store and the hooks that report to the coordinator. It is the one place
// where the training loop plugs into the worker.
type NewTrainerFunc func(r *Rank, b model.Backend[float32], ds *data.Dataset, opts train.Options) (Trainer, error)

// SingleProcessTrainer is the NewTrainerFunc of jobs of one rank
// (dp = sp = 1): train.New.
func SingleProcessTrainer(r *Rank, b model.Backend[float32], ds *data.Dataset, opts train.Options) (Trainer, error) {
	if r.World != 1 {
		return nil, Fatal(fmt.Errorf("agent: parallel: this worker trains jobs of one rank only, the job has dp %d × sp %d", r.Spec.Parallel.DP, r.Spec.Parallel.SP))
	}
	t, err := train.New(r.Spec, b, ds, opts)
	if err != nil {
		return nil, Fatal(err)
	}
	return t, nil
}

// DistributedTrainer is the NewTrainerFunc of jobs of any dp × sp layout:
// train.NewDistributed over the rank's world communicator (for a world of
// one, the single-process trainer). Rank 0 writes the checkpoints; every
// rank resumes from the same one.
func DistributedTrainer(r *Rank, b model.Backend[float32], ds *data.Dataset, opts train.Options) (Trainer, error) {
	p := r.Spec.Parallel
	rank := train.Rank{World: r.World, Rank: r.Rank, DP: p.DP, DPRank: r.DPRank, SP: p.SP, SPRank: r.SPRank, Comm: r.Comm}
	if r.World == 1 {
		// One rank is a single process: no collective operations at all.
		rank.Comm = nil
	}
	t, err := train.NewDistributed(r.Spec, b, ds, rank, opts)
	if err != nil {
		// A spec the trainer refuses is refused on every placement; a
		// failure of the communicator is not.
		var pe *collective.PeerError
		if errors.As(err, &pe) || (r.Comm != nil && r.Comm.Err() != nil) {
			return nil, err
		}
		return nil, Fatal(err)
	}
	return t, nil
}

// TrainRunner is the Runner of a training worker: for each rank it builds
// the model on the worker's device (fresh from the spec's seed, or from
// model.init_from, local or s3://), opens the data (local, or downloaded
// from S3 and verified), opens the checkpoint store at
// checkpoint.location/JOB_ID/, resumes from the checkpoint the coordinator
// committed last, and trains, reporting every step and committing every
// checkpoint through the coordinator.
type TrainRunner struct {
	// Device is the backend the worker trains on.
	Device Device
	// CacheDir receives the inputs downloaded from S3 (required for specs
	// that read from S3).
	CacheDir string
	// S3 overrides the endpoint and credentials that s3:// locations take
	// from the environment otherwise (checkpoint.S3ConfigFromEnv).
	S3 *checkpoint.S3Config
	// NewTrainer builds each rank's trainer; nil means
	// DistributedTrainer.
	NewTrainer NewTrainerFunc
}

// Run implements Runner.
func (tr *TrainRunner) Run(ctx context.Context, r *Rank) (Result, error) {
	spec := r.Spec
	log := r.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := fetcher{cacheDir: tr.CacheDir, s3: tr.S3, log: log}

	// The model is built from a local copy of an s3:// init_from; the spec
	// that checkpoints record keeps the location as written.
	local := *spec
	if isS3(spec.Model.InitFrom) {
		dir, err := f.model(ctx, spec.Model.InitFrom)
		if err != nil {
			return Result{}, err
		}
		local.Model.InitFrom = dir
	}
	cfg, err := train.ConfigFromSpec(&local)
	if err != nil {
		return Result{}, Fatal(err)
	}
	b, release, err := tr.Device.open(spec.Precision, cfg)
	if err != nil {
		return Result{}, err
	}
	defer release()
	if err := train.LoadInit(&local, cfg, b.Layout(), b.Params()); err != nil {
		return Result{}, Fatal(err)
	}

	var ds *data.Dataset
	if spec.Data.MQAR == nil {
		if isS3(spec.Data.Path) {
			ds, err = f.dataset(ctx, spec.Data.Path)
		} else {
			ds, err = data.Open(spec.Data.Path)
		}
		if err != nil {
			return Result{}, fmt.Errorf("agent: data.path: %w", err)
		}
		defer ds.Close()
	}

	opts := train.Options{
		Log: log,
		OnProgress: func(p train.Progress) {
			r.ReportProgress(Progress{Step: p.Step, Loss: p.Loss, TokensPerSec: p.TokensPerSec, GradNorm: p.GradNorm, LR: p.LR,
				StepTime: p.StepTime, CommWait: p.Comm})
		},
		OnCheckpointError: func(step int, err error) {
			log.Warn("checkpoint failed; training goes on", "step", step, "err", err)
			r.checkpointFailed(step, err)
		},
	}
	if loc := spec.Checkpoint.Location; loc != "" {
		store, prefix, err := checkpoint.OpenStore(ctx, loc, checkpoint.OpenOptions{S3: tr.S3, Log: log})
		if err != nil {
			return Result{}, fmt.Errorf("agent: checkpoint.location: %w", err)
		}
		defer closeStore(store)
		// A job's checkpoints live under its ID, so that a job never
		// resumes from another one's.
		opts.Store, opts.Prefix = store, checkpoint.JoinKey(prefix, r.JobID)
		opts.OnCheckpointCommit = func(c checkpoint.Commit) {
			at := locationJoin(loc, r.JobID, checkpoint.StepDir(c.Step))
			err := r.CommitCheckpoint(ctx, c.Step, at)
			if err != nil {
				log.Warn("checkpoint written but not committed", "step", c.Step, "err", err)
			}
			r.checkpointSaved(CheckpointInfo{Step: c.Step, Snapshot: c.Snapshot, Upload: c.Upload}, err)
		}
	}
	newTrainer := tr.NewTrainer
	if newTrainer == nil {
		newTrainer = DistributedTrainer
	}
	t, err := newTrainer(r, b, ds, opts)
	if err != nil {
		return Result{}, err
	}
	if ck := r.ResumeFrom; ck != nil {
		ok, err := t.ResumeAt(ctx, int(ck.Step))
		if err != nil {
			return Result{}, err
		}
		if !ok {
			return Result{}, Fatal(fmt.Errorf("agent: the committed checkpoint of step %d (%s) is not in the store, nor any other that verifies", ck.Step, ck.Location))
		}
		if int64(t.Step()) < ck.Step {
			log.Warn("resumed from an earlier checkpoint than the committed one, which did not verify", "step", t.Step(), "committed", ck.Step)
		}
		log.Info("resumed", "step", t.Step(), "committed", ck.Step)
	}
	err = t.Run(ctx)
	res := Result{Step: t.Step(), Loss: t.Loss()}
	if errors.Is(err, train.ErrDiverged) || errors.Is(err, train.ErrNoTargets) {
		err = Fatal(err)
	}
	return res, err
}
