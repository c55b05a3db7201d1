// Package train owns the training loop of one rank: reading its
// micro-batches (from a token dataset or the built-in MQAR task), forward
// and backward on a model.Backend, gradient accumulation with the loss
// normalised by the step's count of target tokens, clipping, AdamW with the
// learning-rate schedule, progress reporting, checkpoints and resume. The
// loop is the same for the CPU and the CUDA backends; with a
// model.DeviceBackend the gradient norm and the optimizer run where the
// state lives, the host mirrors move only around checkpoints and
// resumption, and the next step's micro-batches are read while the device
// runs the current step (Options.NoPrefetch).
//
// The same loop runs one rank of a data- and sequence-parallel job
// (NewDistributed, dist.go): the rank trains on its share of every step and
// exchanges states, gradients and parameters with the other ranks through
// worker/dist. New, the single process, does none of that and is unchanged
// by it.
package train

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/data/mqar"
)

// Sentinel errors of the package.
var (
	// ErrDiverged is returned when the loss or the gradient norm stops
	// being finite.
	ErrDiverged = errors.New("train: loss is not finite")
	// ErrNoTargets is returned for a step whose micro-batches hold no
	// counted target (every target negative): its loss would be 0/0.
	ErrNoTargets = errors.New("train: step has no counted targets")
)

// Source is where a trainer reads its steps: the contract of worker/data's
// Loader, which the MQAR task's Loader follows too. Next returns this
// rank's micro-batches of the step at the cursor and advances the cursor
// by the global batch; the cursor is the global sample position of the next
// step, saved in checkpoints and restored with Seek on resumption.
type Source interface {
	Next(ctx context.Context) ([]data.Batch, error)
	Cursor() uint64
	Seek(cursor uint64)
}

var (
	_ Source = (*data.Loader)(nil)
	_ Source = (*mqar.Loader)(nil)
)

// Input is a trainer's data: the source of its steps and the vocabulary
// that the source's tokens come from.
type Input struct {
	Source Source
	// Vocab is the size of the source's vocabulary: every token lies in
	// [0, Vocab). It must not exceed the model's vocab_size.
	Vocab int
	// What names the data in errors ("the dataset", "the MQAR task").
	What string
}

// NewInput returns the input of spec's data for a single process (data
// parallel rank 0 of 1): for data.path a loader of ds, the opened dataset;
// for data.mqar a loader of the task's training stream (ds is not used and
// may be nil).
func NewInput(spec *jobspec.Spec, ds *data.Dataset) (Input, error) {
	return newInput(spec, ds, 0, 1)
}

// NewRankInput is NewInput for data-parallel rank dpRank of the spec's
// parallel.dp: the source yields the rank's share of every global batch
// (worker/data's RankPositions), whole sequences; a distributed trainer
// takes its sequence-parallel slice of them itself.
func NewRankInput(spec *jobspec.Spec, ds *data.Dataset, dpRank int) (Input, error) {
	dp := spec.Parallel.DP
	if dp < 1 || dpRank < 0 || dpRank >= dp {
		return Input{}, fmt.Errorf("train: parallel.dp: data-parallel rank %d of %d; it must be in [0, dp)", dpRank, dp)
	}
	return newInput(spec, ds, dpRank, dp)
}

func newInput(spec *jobspec.Spec, ds *data.Dataset, dpRank, dpSize int) (Input, error) {
	lc := data.LoaderConfig{
		SeqLen: spec.Data.SeqLen, MicroBatch: spec.Batch.MicroBatch, GlobalBatch: spec.Batch.GlobalBatch,
		DPRank: dpRank, DPSize: dpSize, Seed: spec.Seed,
	}
	if spec.Data.MQAR != nil {
		task, err := mqar.ConfigFromSpec(spec)
		if err != nil {
			return Input{}, fmt.Errorf("train: data.mqar: %w", err)
		}
		gen, err := mqar.New(task)
		if err != nil {
			return Input{}, fmt.Errorf("train: data.mqar: %w", err)
		}
		l, err := mqar.NewLoader(gen, lc)
		if err != nil {
			return Input{}, fmt.Errorf("train: data.mqar: %w", err)
		}
		return Input{Source: l, Vocab: gen.Vocab(), What: "the MQAR task"}, nil
	}
	if ds == nil {
		return Input{}, errors.New("train: data.path: no dataset given for a spec that reads one")
	}
	l, err := data.NewLoader(ds, lc)
	if err != nil {
		return Input{}, err
	}
	return Input{Source: l, Vocab: int(ds.Vocab()), What: "the dataset"}, nil
}

// ModelConfig turns the spec's architecture into a model configuration,
// with mamba_ssm's defaults for the fields the spec leaves out.
func ModelConfig(c *jobspec.ModelConfig) model.Config {
	cfg := model.DefaultConfig(c.DModel, c.NLayer, c.VocabSize)
	set := func(dst *int, v int) {
		if v > 0 {
			*dst = v
		}
	}
	set(&cfg.DState, c.DState)
	set(&cfg.HeadDim, c.HeadDim)
	set(&cfg.Expand, c.Expand)
	set(&cfg.NGroups, c.NGroups)
	set(&cfg.DConv, c.DConv)
	set(&cfg.ChunkSize, c.ChunkSize)
	cfg.NHeads = cfg.Expand * cfg.DModel / cfg.HeadDim
	cfg.PadVocabMultiple = 16
	return cfg
}

// Progress is reported after every optimizer step.
type Progress struct {
	Step, TotalSteps int
	Loss             float64
	LR               float64
	GradNorm         float64
	Tokens           int64 // target tokens of this step
	TokensPerSec     float64
	StepTime         time.Duration
	Elapsed          time.Duration
	ETA              time.Duration
	// Comm is the part of StepTime this rank spent waiting on other ranks
	// in a distributed run: the collective operations it blocked on, the
	// gradient all-reduce that the backward pass did not hide, and the
	// sequence-parallel receives (pipeline bubbles included). Zero in a
	// single process.
	Comm time.Duration
}

// Options configure a Trainer beyond its spec.
type Options struct {
	Log *slog.Logger
	// Store and Prefix say where checkpoints go; a nil Store disables them.
	Store  checkpoint.Store
	Prefix string
	// OnProgress is called after every step.
	OnProgress func(Progress)
	// OnCheckpoint is called after a checkpoint is committed, from the
	// goroutine that saves in the background.
	OnCheckpoint func(step int)
	// OnCheckpointCommit, when set, is called with the whole commit record
	// (manifest, snapshot and upload durations) right after OnCheckpoint.
	OnCheckpointCommit func(c checkpoint.Commit)
	// OnCheckpointError is called when a checkpoint fails to save, from
	// the goroutine that saves in the background. Training goes on.
	OnCheckpointError func(step int, err error)
	// Dist tunes a distributed trainer (NewDistributed); a single-process
	// trainer ignores it.
	Dist DistOptions
	// NoPrefetch reads each step's micro-batches when the step starts. By
	// default a trainer on a model.DeviceBackend reads the next step's in
	// the background while the device runs the current one; the batches,
	// their order and the checkpointed cursor are the same either way.
	NoPrefetch bool
}

// Trainer trains one model replica on one process.
type Trainer[T model.Float] struct {
	spec    *jobspec.Spec
	backend model.Backend[T]
	// dev is backend as a DeviceBackend, or nil: the step then runs the
	// gradient norm and AdamW on the device, and the host mirrors of the
	// parameters and moments are current only when hostStale is false.
	dev       model.DeviceBackend[T]
	hostStale bool
	opt       *model.AdamW[T]
	sched     model.Schedule
	src       Source
	opts      Options
	log       *slog.Logger
	step      int
	loss      float64
	started   time.Time
	rate      float64 // smoothed tokens per second
	saver     *checkpoint.Saver[T]
	// par is the distributed state of a rank of a dp×sp grid; nil in a
	// single process.
	par *parallel[T]
}

// New builds a trainer for spec on backend, reading the input NewInput
// makes of spec and ds (ds may be nil for a data.mqar spec). The backend's
// parameters must already be initialised or loaded (for a
// model.DeviceBackend, into the host mirror Params(), which New uploads);
// Resume replaces them with a checkpoint's when one exists.
func New[T model.Float](spec *jobspec.Spec, backend model.Backend[T], ds *data.Dataset, opts Options) (*Trainer[T], error) {
	if spec.Parallel.World() != 1 {
		return nil, fmt.Errorf("train: parallel: a single-process trainer needs dp = sp = 1, got dp %d sp %d", spec.Parallel.DP, spec.Parallel.SP)
	}
	in, err := NewInput(spec, ds)
	if err != nil {
		return nil, err
	}
	return NewWithInput(spec, backend, in, opts)
}

// NewWithInput is New reading in. A backend that implements
// model.DeviceBackend is switched to explicit synchronisation, and its
// parameters and (zero) optimizer moments are uploaded from the host.
func NewWithInput[T model.Float](spec *jobspec.Spec, backend model.Backend[T], in Input, opts Options) (*Trainer[T], error) {
	if spec.Parallel.World() != 1 {
		return nil, fmt.Errorf("train: parallel: a single-process trainer needs dp = sp = 1, got dp %d sp %d", spec.Parallel.DP, spec.Parallel.SP)
	}
	return newTrainer(spec, backend, in, opts, true)
}

// newTrainer builds the trainer of one process or rank; fullOpt says
// whether it keeps the optimizer moments of every parameter (all but a
// ZeRO-1 rank do).
func newTrainer[T model.Float](spec *jobspec.Spec, backend model.Backend[T], in Input, opts Options, fullOpt bool) (*Trainer[T], error) {
	if in.Source == nil {
		return nil, errors.New("train: data: the input has no source")
	}
	cfg := backend.Config()
	if in.Vocab > cfg.VocabSize {
		what := in.What
		if what == "" {
			what = "the data"
		}
		return nil, fmt.Errorf("train: data: the vocabulary of %s, %d, exceeds the model's vocab_size %d", what, in.Vocab, cfg.VocabSize)
	}
	var opt *model.AdamW[T]
	if fullOpt {
		var err error
		if opt, err = model.NewAdamW[T](backend.Layout(), adamWConfig(spec)); err != nil {
			return nil, err
		}
	}
	sched := model.Schedule{PeakLR: spec.Optimizer.LR, MinLR: spec.Schedule.MinLR, WarmupSteps: spec.Schedule.WarmupSteps, TotalSteps: spec.Schedule.TotalSteps}
	if err := sched.Validate(); err != nil {
		return nil, err
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Trainer[T]{spec: spec, backend: backend, opt: opt, sched: sched, src: in.Source, opts: opts, log: log}
	if dev, ok := backend.(model.DeviceBackend[T]); ok {
		t.dev = dev
		if dev.AutoSync() {
			if err := dev.SetAutoSync(false); err != nil {
				return nil, fmt.Errorf("train: %s: switching to explicit synchronisation: %w", backend.Name(), err)
			}
		}
		if err := dev.SyncFromHost(model.SyncParams|model.SyncMoments, opt); err != nil {
			return nil, fmt.Errorf("train: %s: uploading the parameters: %w", backend.Name(), err)
		}
		log.Info("training on a device", "backend", backend.Name(), "device", dev.Device())
		if !opts.NoPrefetch {
			t.src = newPrefetcher(t.src)
		}
	}
	if opts.Store != nil {
		t.saver = checkpoint.NewSaver[T](opts.Store, opts.Prefix, checkpoint.SaverOptions{
			Keep: spec.Checkpoint.Keep,
			Log:  log,
			OnCommit: func(c checkpoint.Commit) {
				if opts.OnCheckpoint != nil {
					opts.OnCheckpoint(c.Step)
				}
				if opts.OnCheckpointCommit != nil {
					opts.OnCheckpointCommit(c)
				}
			},
			OnError: func(e *checkpoint.SaveError) {
				if opts.OnCheckpointError != nil {
					opts.OnCheckpointError(e.Step, e.Err)
				}
			},
		})
	}
	return t, nil
}

// adamWConfig returns the optimizer hyperparameters of spec.
func adamWConfig(spec *jobspec.Spec) model.AdamWConfig {
	return model.AdamWConfig{Beta1: spec.Optimizer.Betas[0], Beta2: spec.Optimizer.Betas[1], Eps: spec.Optimizer.Eps, WeightDecay: spec.Optimizer.WeightDecay}
}

// Step returns the number of optimizer steps done.
func (t *Trainer[T]) Step() int { return t.step }

// Loss returns the loss of the last step.
func (t *Trainer[T]) Loss() float64 { return t.loss }

// Resume loads the newest checkpoint that verifies, if any, and reports
// whether it did. It first clears what an earlier run that died while
// saving left behind (incomplete uploads, uncommitted steps older than the
// newest committed one). A checkpoint that fails verification is logged
// and the previous one is tried.
func (t *Trainer[T]) Resume(ctx context.Context) (bool, error) {
	return t.ResumeAt(ctx, -1)
}

// ResumeAt is Resume among the checkpoints of step maxStep or earlier
// (maxStep < 0: any). A rank of a restarted job generation resumes with it
// from the checkpoint its coordinator committed: a newer one in the store
// was written but never committed, and other ranks must not disagree.
func (t *Trainer[T]) ResumeAt(ctx context.Context, maxStep int) (bool, error) {
	if t.par != nil {
		return t.distResume(ctx, maxStep)
	}
	if t.opts.Store == nil {
		return false, nil
	}
	if err := checkpoint.Cleanup(ctx, t.opts.Store, t.opts.Prefix, t.log); err != nil {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		t.log.Warn("could not clear the leftovers of an earlier run; resuming anyway", "store", t.opts.Store.String(), "err", err)
	}
	s, err := checkpoint.LoadLatestAtMost[T](ctx, t.opts.Store, t.opts.Prefix, maxStep, t.log)
	if errors.Is(err, checkpoint.ErrNone) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := t.sameModel(s); err != nil {
		return false, err
	}
	if err := t.restore(s); err != nil {
		return false, err
	}
	return true, nil
}

// sameModel checks that a loaded checkpoint holds the trainer's model.
func (t *Trainer[T]) sameModel(s *checkpoint.State[T]) error {
	if s.Layout.Total != t.backend.Layout().Total || s.Config.NLayer != t.backend.Config().NLayer {
		return fmt.Errorf("train: checkpoint at step %d has a different model (%d parameters) than the spec (%d)", s.Trainer.Step, s.Layout.Total, t.backend.Layout().Total)
	}
	return nil
}

// restore continues from a loaded checkpoint: its parameters, optimizer
// moments (into the rank's ZeRO-1 shard on a grid that shards them), step,
// loss and data cursor, uploaded to the device when there is one.
func (t *Trainer[T]) restore(s *checkpoint.State[T]) error {
	copy(t.backend.Params(), s.Params)
	if t.par != nil && t.par.zero != nil {
		if err := t.par.zero.SetMoments(s.M, s.V, s.Trainer.OptimizerStep); err != nil {
			return err
		}
	} else {
		copy(t.opt.M, s.M)
		copy(t.opt.V, s.V)
		t.opt.Step = s.Trainer.OptimizerStep
	}
	t.step = s.Trainer.Step
	t.loss = s.Trainer.Loss
	t.src.Seek(s.Trainer.Cursor)
	if t.dev != nil {
		if err := t.dev.SyncFromHost(model.SyncParams|model.SyncMoments, t.opt); err != nil {
			return fmt.Errorf("train: uploading the checkpoint of step %d: %w", t.step, err)
		}
		t.hostStale = false
	}
	t.log.Info("resumed from checkpoint", "step", t.step, "cursor", s.Trainer.Cursor)
	return nil
}

// Run trains until the schedule's total steps, checkpointing on the way.
func (t *Trainer[T]) Run(ctx context.Context) error {
	return t.RunUntil(ctx, t.spec.Schedule.TotalSteps)
}

// RunUntil trains until step stop (at most the schedule's total steps),
// checkpointing every checkpoint.every_steps steps and at the last step.
// Checkpoints upload in the background while training goes on; one that
// fails is logged and reported to OnCheckpointError, and training
// continues. Before returning, RunUntil waits for the last checkpoint and
// returns its failure, if it failed: the trained state is then not on
// storage (Checkpoint may be called again). When it returns without an
// error, the host mirrors of a device backend hold the trained parameters
// and optimizer moments.
func (t *Trainer[T]) RunUntil(ctx context.Context, stop int) error {
	if err := t.runUntil(ctx, stop); err != nil {
		t.Close()
		return err
	}
	if err := t.syncHost(); err != nil {
		t.Close()
		return err
	}
	return t.Close()
}

// syncHost copies a device backend's parameters and moments into their
// host mirrors if a step changed them since the last copy.
func (t *Trainer[T]) syncHost() error {
	if t.dev == nil || !t.hostStale {
		return nil
	}
	if err := t.dev.SyncToHost(model.SyncParams|model.SyncMoments, t.opt); err != nil {
		return fmt.Errorf("train: downloading the state of step %d: %w", t.step, err)
	}
	t.hostStale = false
	return nil
}

func (t *Trainer[T]) runUntil(ctx context.Context, stop int) error {
	t.started = time.Now()
	startStep := t.step
	total := t.spec.Schedule.TotalSteps
	stop = min(stop, total)
	for t.step < stop {
		p, err := t.TrainStep(ctx)
		if err != nil {
			return err
		}
		elapsed := time.Since(t.started)
		p.Elapsed = elapsed
		if done := t.step - startStep; done > 0 {
			p.ETA = time.Duration(float64(elapsed) / float64(done) * float64(stop-t.step))
		}
		if t.opts.OnProgress != nil {
			t.opts.OnProgress(p)
		}
		every := t.spec.Checkpoint.EverySteps
		if t.opts.Store != nil && (t.step == total || (every > 0 && t.step%every == 0)) {
			if err := t.Checkpoint(ctx); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				// Already logged and reported by the saver; training goes on.
				continue
			}
		}
	}
	return nil
}

// TrainStep runs one optimizer step: every micro-batch of the step forward
// and backward with the loss averaged over the step's target tokens, then
// clipping and the AdamW update. On a model.DeviceBackend the clipping
// coefficient and the update are applied on the device (GradNorm,
// OptimizerStep), with the same result as ClipGrads and AdamW.Update on the
// host.
func (t *Trainer[T]) TrainStep(ctx context.Context) (Progress, error) {
	start := time.Now()
	cursor := t.src.Cursor()
	batches, err := t.src.Next(ctx)
	if err != nil {
		return Progress{}, err
	}
	if t.par != nil {
		return t.distStep(ctx, start, cursor, batches)
	}
	mbs := make([]*model.Batch, len(batches))
	count := 0
	for i, b := range batches {
		mbs[i] = &model.Batch{Batch: b.Rows(), SeqLen: b.SeqLen, Inputs: b.Inputs, Targets: b.Targets}
		count += mbs[i].Counted()
	}
	if count == 0 {
		return Progress{}, fmt.Errorf("%w: step %d (cursor %d) has %d micro-batches and not one target >= 0", ErrNoTargets, t.step, cursor, len(mbs))
	}
	if t.dev != nil {
		return t.deviceStep(ctx, start, mbs, count)
	}
	t.backend.ZeroGrads()
	var lossSum float64
	for _, mb := range mbs {
		r, err := t.backend.ForwardBackward(ctx, mb, model.StepOptions{Count: count})
		if err != nil {
			return Progress{}, err
		}
		lossSum += r.LossSum
	}
	loss := lossSum / float64(count)
	norm := model.ClipGrads(t.backend.Grads(), t.spec.Optimizer.GradClip)
	if math.IsNaN(loss) || math.IsInf(loss, 0) || math.IsNaN(norm) || math.IsInf(norm, 0) {
		return Progress{}, fmt.Errorf("%w at step %d: loss %v, gradient norm %v", ErrDiverged, t.step, loss, norm)
	}
	lr := t.sched.LR(t.step)
	t.opt.Update(t.backend.Params(), t.backend.Grads(), lr)
	return t.finishStep(start, loss, lr, norm, count), nil
}

// deviceStep is TrainStep's work on a DeviceBackend: the gradients, their
// norm, the clipping and the update stay on the device.
func (t *Trainer[T]) deviceStep(ctx context.Context, start time.Time, mbs []*model.Batch, count int) (Progress, error) {
	t.dev.ZeroGrads()
	var lossSum float64
	for _, mb := range mbs {
		r, err := t.dev.ForwardBackward(ctx, mb, model.StepOptions{Count: count})
		if err != nil {
			return Progress{}, err
		}
		lossSum += r.LossSum
	}
	loss := lossSum / float64(count)
	norm, err := t.dev.GradNorm()
	if err != nil {
		return Progress{}, err
	}
	if math.IsNaN(loss) || math.IsInf(loss, 0) || math.IsNaN(norm) || math.IsInf(norm, 0) {
		return Progress{}, fmt.Errorf("%w at step %d: loss %v, gradient norm %v", ErrDiverged, t.step, loss, norm)
	}
	lr := t.sched.LR(t.step)
	// From here the device holds the newer parameters and moments.
	t.hostStale = true
	if err := t.dev.OptimizerStep(t.opt, lr, model.ClipScale(norm, t.spec.Optimizer.GradClip)); err != nil {
		return Progress{}, err
	}
	return t.finishStep(start, loss, lr, norm, count), nil
}

// finishStep counts a step that was applied and returns its progress.
func (t *Trainer[T]) finishStep(start time.Time, loss, lr, norm float64, count int) Progress {
	t.step++
	t.loss = loss
	dt := time.Since(start)
	rate := float64(count) / dt.Seconds()
	if t.rate == 0 {
		t.rate = rate
	} else {
		t.rate = 0.8*t.rate + 0.2*rate
	}
	return Progress{Step: t.step, TotalSteps: t.spec.Schedule.TotalSteps, Loss: loss, LR: lr, GradNorm: norm,
		Tokens: int64(count), TokensPerSec: t.rate, StepTime: dt}
}

// Checkpoint starts saving the current state in the background: it waits
// for the save in flight, if any, copies the parameters, moments and
// trainer state, and returns while the copy uploads. Retention runs after
// the commit. The error is that of an earlier save that failed (already
// logged and reported to OnCheckpointError), or ctx's. A device backend's
// parameters and moments are first copied to their host mirrors.
func (t *Trainer[T]) Checkpoint(ctx context.Context) error {
	if t.par != nil {
		return t.distCheckpoint(ctx)
	}
	if t.saver == nil {
		return errors.New("train: checkpoint: no store configured")
	}
	if err := t.syncHost(); err != nil {
		return err
	}
	return t.save(ctx, t.opt.M, t.opt.V, t.opt.Step)
}

// save starts saving the parameters, the moments m and v and the trainer
// state in the background; see Checkpoint.
func (t *Trainer[T]) save(ctx context.Context, m, v []T, optStep int64) error {
	specJSON, err := json.Marshal(t.spec)
	if err != nil {
		return err
	}
	var z T
	prec := "float32"
	if _, ok := any(z).(float64); ok {
		prec = "float64"
	}
	s := &checkpoint.State[T]{
		Config: t.backend.Config(), Layout: t.backend.Layout(),
		Params: t.backend.Params(), M: m, V: v,
		Trainer: checkpoint.TrainerState{Step: t.step, Cursor: t.src.Cursor(), Seed: t.spec.Seed,
			OptimizerStep: optStep, Loss: t.loss, Precision: prec, Spec: specJSON},
	}
	took, err := t.saver.Save(ctx, s)
	t.log.Debug("checkpoint snapshot taken; uploading in the background", "step", t.step, "snapshot", took)
	return err
}

// CheckpointInFlight returns the step of the checkpoint uploading in the
// background, if one is.
func (t *Trainer[T]) CheckpointInFlight() (step int, ok bool) {
	if t.saver == nil {
		return 0, false
	}
	return t.saver.InFlight()
}

// Close waits for the checkpoint in flight, if any, and returns the
// failure of a save not reported yet. A read of the next step's batches in
// flight is waited for and dropped; a later step reads them again.
func (t *Trainer[T]) Close() error {
	if p, ok := t.src.(*prefetcher); ok {
		p.wait()
	}
	if t.saver == nil {
		return nil
	}
	return t.saver.Close()
}

// LoadInit fills params from the spec's init_from Hugging Face checkpoint
// directory, or initialises them from the seed.
func LoadInit[T model.Float](spec *jobspec.Spec, cfg model.Config, layout *model.Layout, params []T) error {
	if spec.Model.InitFrom != "" {
		p, err := hf.LoadParams[T](spec.Model.InitFrom, cfg, layout)
		if err != nil {
			return err
		}
		copy(params, p)
		return nil
	}
	return model.Init(cfg, layout, params, spec.Seed)
}

// ConfigFromSpec returns the model configuration of spec: the spec's own
// architecture, or the config.json of its init_from checkpoint.
func ConfigFromSpec(spec *jobspec.Spec) (model.Config, error) {
	if spec.Model.InitFrom != "" {
		cfg, _, err := hf.ReadConfigFile(spec.Model.InitFrom + "/config.json")
		return cfg, err
	}
	cfg := ModelConfig(spec.Model.Config)
	return cfg, cfg.Validate()
}
