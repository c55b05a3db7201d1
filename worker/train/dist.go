package train

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/dist"
)

// Rank is the place of a trainer in a job of DP data-parallel replicas,
// each split into SP sequence-parallel ranks: World = DP·SP ranks, laid out
// with the sequence-parallel rank fastest, Rank = DPRank·SP + SPRank (the
// layout of collective.Communicator.Grid). Comm is the world communicator,
// of size World, in which this process has rank Rank. GridRank fills a
// Rank from a communicator.
type Rank struct {
	World, Rank int
	DP, DPRank  int
	SP, SPRank  int
	Comm        *collective.Communicator
}

// GridRank returns the Rank of comm's caller in a dp×sp grid.
func GridRank(comm *collective.Communicator, dp, sp int) Rank {
	r := Rank{World: comm.Size(), Rank: comm.Rank(), DP: dp, SP: sp, Comm: comm}
	if sp > 0 {
		r.DPRank, r.SPRank = r.Rank/sp, r.Rank%sp
	}
	return r
}

// Validate checks that the fields agree with one another and with Comm.
func (r Rank) Validate() error {
	switch {
	case r.DP < 1 || r.SP < 1:
		return fmt.Errorf("train: rank: dp %d and sp %d must be at least 1", r.DP, r.SP)
	case r.World != r.DP*r.SP:
		return fmt.Errorf("train: rank: world %d must be dp·sp = %d·%d", r.World, r.DP, r.SP)
	case r.DPRank < 0 || r.DPRank >= r.DP:
		return fmt.Errorf("train: rank: dp rank %d must be in [0, dp = %d)", r.DPRank, r.DP)
	case r.SPRank < 0 || r.SPRank >= r.SP:
		return fmt.Errorf("train: rank: sp rank %d must be in [0, sp = %d)", r.SPRank, r.SP)
	case r.Rank != r.DPRank*r.SP+r.SPRank:
		return fmt.Errorf("train: rank: rank %d must be dp rank·sp + sp rank = %d", r.Rank, r.DPRank*r.SP+r.SPRank)
	case r.Comm == nil && r.World != 1:
		return errors.New("train: rank: a world of more than one rank needs a communicator")
	case r.Comm != nil && (r.Comm.Size() != r.World || r.Comm.Rank() != r.Rank):
		return fmt.Errorf("train: rank: the communicator has rank %d of %d, the rank says %d of %d", r.Comm.Rank(), r.Comm.Size(), r.Rank, r.World)
	}
	return nil
}

// DistOptions tune a distributed trainer. The zero value is the default.
type DistOptions struct {
	// BucketBytes is the size of a gradient all-reduce bucket in bytes;
	// zero means DefaultBucketBytes.
	BucketBytes int
	// NoOverlap starts the gradient all-reduce only after the backward pass
	// of the step's last micro-batch, instead of bucket by bucket while it
	// runs. Results are identical either way; it exists for measurements.
	//
	// The overlap learns the progress of the backward pass from the
	// sequence-parallel boundary (a dist.Boundary that moves nothing when
	// sp = 1): a host backend that runs the layers one after the other, as
	// model/ref does, makes its first boundary call of layer ℓ's backward
	// only after it finished the gradients of every layer above ℓ, the
	// final norm and an untied LM head, so the buckets at or past layer
	// ℓ+1's offset can start. The embedding (and a tied head) is final
	// when the pass returns. Only the last micro-batch of a step overlaps,
	// since the earlier ones do not finish any gradient. A
	// model.DeviceBackend never overlaps: its gradients reach the host
	// mirror after the pass.
	NoOverlap bool
	// OrderedLoss makes the reported loss the sum of the per-position
	// losses in the order of a single process, so that with dp = 1 and the
	// sequential sequence-parallel mode on chunk-aligned shards the loss is
	// bitwise that of one process. It keeps every micro-batch's logits
	// (Batch·L/sp·vocab float64 values) and all-gathers per-position
	// losses over the sp group: for verification, not for production.
	// The per-position losses are recomputed from the logits the way
	// model/ref computes them (dist.PositionLosses).
	OrderedLoss bool
	// CheckpointPoll bounds how long rank 0 waits for its checkpoint in
	// flight before telling the other ranks, which meanwhile wait in a
	// collective operation; it must stay well below the communicator's
	// Timeout. Zero means 5s.
	CheckpointPoll time.Duration
}

// DefaultBucketBytes is the default gradient bucket size.
const DefaultBucketBytes = 8 << 20

// parallel is the state of one rank of a distributed trainer.
type parallel[T model.Float] struct {
	rank                  Rank
	world, dpComm, spComm *collective.Communicator
	bd                    *dist.Boundary[T]
	red                   *dist.Reducer[T] // nil under ZeRO-1
	zero                  *dist.ZeRO[T]    // nil unless ZeRO-1
	layerEnds             []int
	overlap, ordered      bool
	// solo is a world of one rank without ZeRO-1: its gradients need no
	// reduction, so they stay where they are (on a device, on the device).
	solo bool
	// stream copies gradient ranges of a device backend to the host while
	// its backward pass runs, when the overlap is on; copied is the lowest
	// offset queued in the current step, streamErr its first failure.
	stream       model.GradStreamer
	copied       int
	streamErr    error
	poll         time.Duration
	fullM, fullV []T // rank 0 under ZeRO-1: the gathered moments of a checkpoint
	last         CommStats
	// waitRounds counts the rounds ranks spent waiting for rank 0's
	// checkpoint in flight, for tests.
	waitRounds atomic.Int64
}

// NewDistributed builds the trainer of one rank of a dp×sp job: the same
// training loop as New, run on every rank with the same spec. spec's
// parallel.dp and parallel.sp must match rank; its sp_mode picks the
// sequence-parallel mode and zero1 shards the optimizer. ds (nil for a
// data.mqar spec) is read through NewRankInput. The ranks start from rank
// 0's parameters, which it broadcasts (for a model.DeviceBackend, from the
// host mirror Params(), as New uploads it); every rank must pass the same
// kind of Options: a Store on all ranks or on none.
//
// Per step, each rank reads its data-parallel share of the global batch
// and takes its sequence-parallel slice of every sequence; the ranks agree
// on the global count of counted targets, which normalises the loss; the
// backward pass hands the SSM state gradients between sequence shards
// while the gradient all-reduce over all dp·sp ranks runs bucket by bucket;
// then every rank applies the same clipping and AdamW update (under ZeRO-1,
// to its own range of the parameters, followed by an all-gather).
//
// Rank 0 writes the checkpoints (all ranks hold the same parameters; under
// ZeRO-1 the optimizer moments are first gathered to it, so a checkpoint is
// the same files as a single process writes and resumes with any dp and
// sp). Every rank loads at Resume. Checkpoint and Resume are collective:
// every rank calls them at the same step, as Run does.
//
// A world of one rank without a communicator is a single process: the
// trainer is New's.
func NewDistributed[T model.Float](spec *jobspec.Spec, backend model.Backend[T], ds *data.Dataset, rank Rank, opts Options) (*Trainer[T], error) {
	if err := rank.Validate(); err != nil {
		return nil, err
	}
	in, err := NewRankInput(spec, ds, rank.DPRank)
	if err != nil {
		return nil, err
	}
	return NewDistributedWithInput(spec, backend, in, rank, opts)
}

// NewDistributedWithInput is NewDistributed reading in, which must yield
// this rank's data-parallel share of every step (as NewRankInput's does),
// whole sequences of the spec's seq_len. It is collective: every rank must
// call it at once, and when one rank fails to build its trainer, all
// return an error.
func NewDistributedWithInput[T model.Float](spec *jobspec.Spec, backend model.Backend[T], in Input, rank Rank, opts Options) (*Trainer[T], error) {
	if err := rank.Validate(); err != nil {
		return nil, err
	}
	if rank.Comm == nil {
		if p := spec.Parallel; p.DP != rank.DP || p.SP != rank.SP {
			return nil, fmt.Errorf("train: parallel: the spec asks for dp %d sp %d, the rank is in a grid of dp %d sp %d", p.DP, p.SP, rank.DP, rank.SP)
		}
		return NewWithInput(spec, backend, in, opts)
	}
	t, localErr := buildRank(spec, backend, in, rank, opts)

	// The ranks agree that every one of them built its trainer, and on
	// checkpoints, which are collective: every rank must have a store, or
	// none.
	ctx := context.Background()
	agree := []float64{0, 0}
	if localErr != nil {
		agree[0] = 1
	}
	if opts.Store != nil {
		agree[1] = 1
	}
	if err := rank.Comm.AllReduce(ctx, collective.Float64s(agree)); err != nil {
		return nil, errors.Join(localErr, fmt.Errorf("train: agreeing with the other ranks: %w", err))
	}
	switch failed, stores := int(agree[0]), int(agree[1]); {
	case localErr != nil:
		return nil, localErr
	case failed > 0:
		return nil, fmt.Errorf("train: %d of %d ranks could not build their trainer", failed, rank.World)
	case stores != 0 && stores != rank.World:
		return nil, fmt.Errorf("train: checkpoints: %d of %d ranks have a store; all or none must", stores, rank.World)
	}
	// Every rank starts from rank 0's parameters, whatever each loaded.
	if err := rank.Comm.Broadcast(ctx, bufferOf(backend.Params()), 0); err != nil {
		return nil, fmt.Errorf("train: broadcasting rank 0's initial parameters: %w", err)
	}
	if t.dev != nil {
		if err := t.dev.SyncFromHost(model.SyncParams, nil); err != nil {
			return nil, fmt.Errorf("train: %s: uploading rank 0's parameters: %w", backend.Name(), err)
		}
	}
	return t, nil
}

// buildRank is the part of NewDistributedWithInput that involves no other
// rank.
func buildRank[T model.Float](spec *jobspec.Spec, backend model.Backend[T], in Input, rank Rank, opts Options) (*Trainer[T], error) {
	p := spec.Parallel
	if p.DP != rank.DP || p.SP != rank.SP {
		return nil, fmt.Errorf("train: parallel: the spec asks for dp %d sp %d, the rank is in a grid of dp %d sp %d", p.DP, p.SP, rank.DP, rank.SP)
	}
	cfg := backend.Config()
	if L := spec.Data.SeqLen; L%rank.SP != 0 || L/rank.SP < cfg.DConv-1 {
		return nil, fmt.Errorf("train: data.seq_len: %d must be a multiple of sp = %d with slices of at least d_conv−1 = %d positions", L, rank.SP, cfg.DConv-1)
	}
	mode := model.SPSequential
	switch p.SPMode {
	case jobspec.SPModeSequential, "":
	case jobspec.SPModePrefix:
		mode = model.SPPrefix
	default:
		return nil, fmt.Errorf("train: parallel.sp_mode: %q is not %q or %q", p.SPMode, jobspec.SPModeSequential, jobspec.SPModePrefix)
	}
	_, isDev := backend.(model.DeviceBackend[T])
	if p.Zero1 && isDev {
		return nil, fmt.Errorf("train: parallel.zero1: the %s backend keeps the optimizer on the device, which has no sharded update; ZeRO-1 needs a host backend", backend.Name())
	}
	t, err := newTrainer(spec, backend, in, opts, !p.Zero1)
	if err != nil {
		return nil, err
	}
	par := &parallel[T]{rank: rank, world: rank.Comm, ordered: opts.Dist.OrderedLoss, poll: opts.Dist.CheckpointPoll}
	if par.poll <= 0 {
		par.poll = 5 * time.Second
	}
	// Grid sends nothing; every rank calls it here, in the same order.
	if par.dpComm, par.spComm, err = rank.Comm.Grid(rank.DP, rank.SP); err != nil {
		return nil, fmt.Errorf("train: splitting the world into dp and sp groups: %w", err)
	}
	var spComm *collective.Communicator
	if rank.SP > 1 {
		spComm = par.spComm
	}
	if par.bd, err = dist.NewBoundary[T](spComm, cfg, mode); err != nil {
		return nil, err
	}
	if p.Zero1 {
		if par.zero, err = dist.NewZeRO[T](rank.Comm, backend.Layout(), adamWConfig(spec)); err != nil {
			return nil, err
		}
		t.opt = par.zero.Optimizer()
	} else if rank.World == 1 {
		par.solo = true
	} else {
		var z T
		bytes := opts.Dist.BucketBytes
		if bytes <= 0 {
			bytes = DefaultBucketBytes
		}
		elems := max(1, bytes/sizeOf(z))
		if par.red, err = dist.NewReducer(rank.Comm, backend.Grads(), elems); err != nil {
			return nil, err
		}
		par.red.SetBF16(p.AllReduceDType == jobspec.AllReduceBF16)
		// A device backend overlaps when it can copy gradient ranges to the
		// host while its backward pass runs on.
		streamer, canStream := backend.(model.GradStreamer)
		par.overlap = !opts.Dist.NoOverlap && (!isDev || canStream)
		if isDev && par.overlap {
			par.stream = streamer
		}
	}
	if par.layerEnds, err = dist.LayerEnds(backend.Layout(), cfg.NLayer); err != nil {
		return nil, err
	}
	if rank.Rank != 0 {
		t.saver = nil // rank 0 writes; the others only read at Resume
	}
	t.par = par
	t.log = t.log.With("rank", rank.Rank, "dp_rank", rank.DPRank, "sp_rank", rank.SPRank)
	return t, nil
}

// bufferOf views s as a collective buffer of its element type.
func bufferOf[T model.Float](s []T) collective.Buffer {
	if v, ok := any(s).([]float64); ok {
		return collective.Float64s(v)
	}
	return collective.Float32s(any(s).([]float32))
}

func sizeOf(v any) int {
	if _, ok := v.(float64); ok {
		return 8
	}
	return 4
}

// Rank returns the trainer's place in its grid; a single process is rank 0
// of a 1×1 grid without a communicator.
func (t *Trainer[T]) Rank() Rank {
	if t.par == nil {
		return Rank{World: 1, DP: 1, SP: 1}
	}
	return t.par.rank
}

// distStep is TrainStep on a rank of a grid, after reading the rank's
// share of the step.
func (t *Trainer[T]) distStep(ctx context.Context, start time.Time, cursor uint64, batches []data.Batch) (Progress, error) {
	p := t.par
	var comm time.Duration
	mbs := make([]*model.Batch, len(batches))
	local := 0
	for i, b := range batches {
		if p.rank.SP > 1 {
			var err error
			if b, err = b.SPSlice(p.rank.SP, p.rank.SPRank); err != nil {
				return Progress{}, fmt.Errorf("train: step %d: %w", t.step, err)
			}
		}
		mbs[i] = &model.Batch{Batch: b.Rows(), SeqLen: b.SeqLen, Inputs: b.Inputs, Targets: b.Targets}
		local += mbs[i].Counted()
	}
	// The loss is the mean over the global count of counted targets.
	cnt := []float64{float64(local)}
	c0 := time.Now()
	if err := p.world.AllReduce(ctx, collective.Float64s(cnt)); err != nil {
		return Progress{}, fmt.Errorf("train: step %d: summing the target count: %w", t.step, err)
	}
	comm += time.Since(c0)
	count := int(cnt[0])
	if count == 0 {
		return Progress{}, fmt.Errorf("%w: step %d (cursor %d) has not one target >= 0 on any of the %d ranks", ErrNoTargets, t.step, cursor, p.rank.World)
	}

	t.backend.ZeroGrads()
	if p.red != nil {
		p.red.Begin(ctx)
	}
	p.copied, p.streamErr = len(t.backend.Grads()), nil
	p.bd.ResetWait()
	var lossSum float64
	for i, mb := range mbs {
		var hook func(layer int)
		if i == len(mbs)-1 && p.overlap {
			if p.stream != nil {
				hook = func(layer int) { p.streamReady(p.layerEnds[layer]) }
			} else {
				hook = func(layer int) { p.red.Ready(p.layerEnds[layer]) }
			}
		}
		o := model.StepOptions{Count: count, KeepLogits: p.ordered}
		if p.rank.SP > 1 || (hook != nil && mb.SeqLen >= t.backend.Config().DConv-1) {
			p.bd.Begin(mb.Batch, hook)
			o.Boundary = p.bd
		}
		r, err := t.backend.ForwardBackward(ctx, mb, o)
		if err != nil {
			return Progress{}, fmt.Errorf("train: step %d, micro-batch %d: %w", t.step, i, err)
		}
		if o.Boundary != nil {
			if err := p.bd.Flush(ctx); err != nil {
				return Progress{}, fmt.Errorf("train: step %d, micro-batch %d: %w", t.step, i, err)
			}
		}
		if p.ordered {
			s, err := dist.OrderedLossSum(ctx, p.spComm, mb.Batch, dist.PositionLosses(r.Logits, mb.Targets, t.backend.Config().VocabSize))
			if err != nil {
				return Progress{}, fmt.Errorf("train: step %d, micro-batch %d: %w", t.step, i, err)
			}
			lossSum += s
		} else {
			lossSum += r.LossSum
		}
	}
	comm += p.bd.WaitTime()

	c0 = time.Now()
	var rest func() error // the copy of the gradients not yet streamed
	switch {
	case p.stream != nil:
		if p.streamErr == nil {
			rest, p.streamErr = p.stream.GradsToHostAsync(0, p.copied)
		}
		if serr := p.streamErr; serr != nil {
			// The reducer starts nothing more and returns this.
			rest = func() error { return serr }
		}
	case t.dev != nil && !p.solo:
		if err := t.dev.SyncToHost(model.SyncGrads, nil); err != nil {
			return Progress{}, err
		}
	}
	var err error
	g0 := time.Now()
	switch {
	case p.zero != nil:
		err = p.zero.ReduceScatter(ctx, t.backend.Grads())
	case p.red != nil:
		err = p.red.FinishAfter(ctx, rest)
		p.last.Overlapped, p.last.Buckets, _ = p.red.Stats()
	}
	gradWait := time.Since(g0)
	if err != nil {
		return Progress{}, fmt.Errorf("train: step %d: %w", t.step, err)
	}
	// Each sp rank holds its shard's part of the loss, unless the ordered
	// sum already combined the shards.
	ls := []float64{lossSum}
	lossComm := p.world
	if p.ordered {
		lossComm = p.dpComm
	}
	if err := lossComm.AllReduce(ctx, collective.Float64s(ls)); err != nil {
		return Progress{}, fmt.Errorf("train: step %d: summing the loss: %w", t.step, err)
	}
	loss := ls[0] / float64(count)
	comm += time.Since(c0)

	lr := t.sched.LR(t.step)
	var norm float64
	switch {
	case t.dev != nil:
		if !p.solo {
			if err := t.dev.SyncFromHost(model.SyncGrads, nil); err != nil {
				return Progress{}, err
			}
		}
		if norm, err = t.dev.GradNorm(); err != nil {
			return Progress{}, err
		}
		if err := diverged(t.step, loss, norm); err != nil {
			return Progress{}, err
		}
		t.hostStale = true
		if err := t.dev.OptimizerStep(t.opt, lr, model.ClipScale(norm, t.spec.Optimizer.GradClip)); err != nil {
			return Progress{}, err
		}
	case p.zero != nil:
		c0 = time.Now()
		if norm, err = p.zero.GradNorm(ctx, t.backend.Grads()); err != nil {
			return Progress{}, fmt.Errorf("train: step %d: %w", t.step, err)
		}
		comm += time.Since(c0)
		if err := diverged(t.step, loss, norm); err != nil {
			return Progress{}, err
		}
		if err := p.zero.UpdateShard(t.backend.Params(), t.backend.Grads(), lr, model.ClipScale(norm, t.spec.Optimizer.GradClip)); err != nil {
			return Progress{}, fmt.Errorf("train: step %d: %w", t.step, err)
		}
		c0 = time.Now()
		if err := p.zero.GatherParams(ctx, t.backend.Params()); err != nil {
			return Progress{}, fmt.Errorf("train: step %d: %w", t.step, err)
		}
		comm += time.Since(c0)
	default:
		norm = model.ClipGrads(t.backend.Grads(), t.spec.Optimizer.GradClip)
		if err := diverged(t.step, loss, norm); err != nil {
			return Progress{}, err
		}
		t.opt.Update(t.backend.Params(), t.backend.Grads(), lr)
	}
	p.last.Comm, p.last.GradWait = comm, gradWait
	pr := t.finishStep(start, loss, lr, norm, count)
	pr.Comm = comm
	return pr, nil
}

// streamReady queues the copy of the device gradients at or past offset
// that are not yet on their way to the host, and hands the reducer the wait
// for them. After a failure it queues nothing more; the step then fails.
func (p *parallel[T]) streamReady(offset int) {
	if offset >= p.copied || p.streamErr != nil {
		return
	}
	w, err := p.stream.GradsToHostAsync(offset, p.copied)
	if err != nil {
		p.streamErr = err
		return
	}
	p.copied = offset
	p.red.ReadyAfter(offset, w)
}

// diverged returns ErrDiverged when the loss or the norm is not finite.
func diverged(step int, loss, norm float64) error {
	if math.IsNaN(loss) || math.IsInf(loss, 0) || math.IsNaN(norm) || math.IsInf(norm, 0) {
		return fmt.Errorf("%w at step %d: loss %v, gradient norm %v", ErrDiverged, step, loss, norm)
	}
	return nil
}

// CommStats describes the communication of a distributed trainer's last
// step.
type CommStats struct {
	// Comm is the time the rank waited on other ranks (Progress.Comm).
	Comm time.Duration
	// GradWait is the part of Comm spent after the backward pass waiting
	// for the gradient reduction (the all-reduce the backward did not hide,
	// or ZeRO-1's reduce-scatter).
	GradWait time.Duration
	// Overlapped of Buckets gradient buckets started during the backward
	// pass; zero under ZeRO-1.
	Overlapped, Buckets int
}

// CommStats returns the communication statistics of the last step; zero in
// a single process.
func (t *Trainer[T]) CommStats() CommStats {
	if t.par == nil {
		return CommStats{}
	}
	return t.par.last
}

// distCheckpoint is Checkpoint on a rank of a grid.
func (t *Trainer[T]) distCheckpoint(ctx context.Context) error {
	p := t.par
	if t.opts.Store == nil {
		return errors.New("train: checkpoint: no store configured")
	}
	if err := t.syncHost(); err != nil {
		return err
	}
	m, v := []T(nil), []T(nil)
	if t.opt != nil {
		m, v = t.opt.M, t.opt.V
	}
	if p.zero != nil {
		if p.rank.Rank == 0 && p.fullM == nil {
			n := t.backend.Layout().Total
			p.fullM, p.fullV = make([]T, n), make([]T, n)
		}
		if err := p.zero.GatherMoments(ctx, 0, p.fullM, p.fullV); err != nil {
			return fmt.Errorf("train: checkpoint of step %d: %w", t.step, err)
		}
		m, v = p.fullM, p.fullV
	}
	// Rank 0 may still be uploading the previous checkpoint. The others
	// wait with it, in rounds of a broadcast, so that no collective
	// operation waits longer than a round (CheckpointPoll).
	var prev error
	for {
		busy := []float64{0}
		if p.rank.Rank == 0 && t.saver != nil {
			wctx, cancel := context.WithTimeout(ctx, p.poll)
			err := t.saver.Wait(wctx)
			cancel()
			_, inFlight := t.saver.InFlight()
			switch {
			case inFlight || (err != nil && wctx.Err() != nil):
				busy[0] = 1
			case err != nil:
				prev = err // an earlier save failed; already logged and reported
			}
		}
		if err := p.world.Broadcast(ctx, collective.Float64s(busy), 0); err != nil {
			return fmt.Errorf("train: checkpoint of step %d: waiting for the previous one: %w", t.step, err)
		}
		if busy[0] == 0 {
			break
		}
		p.waitRounds.Add(1)
	}
	if p.rank.Rank != 0 || t.saver == nil {
		return nil
	}
	if err := t.save(ctx, m, v, t.opt.Step); err != nil {
		return err
	}
	return prev
}

// distResume is Resume on a rank of a grid: rank 0 clears the leftovers of
// an earlier run, every rank loads the newest checkpoint that verifies, and
// the ranks check that they loaded the same one.
func (t *Trainer[T]) distResume(ctx context.Context, maxStep int) (bool, error) {
	p := t.par
	if t.opts.Store == nil {
		return false, nil
	}
	if p.rank.Rank == 0 {
		if err := checkpoint.Cleanup(ctx, t.opts.Store, t.opts.Prefix, t.log); err != nil {
			if ctx.Err() != nil {
				return false, ctx.Err()
			}
			t.log.Warn("could not clear the leftovers of an earlier run; resuming anyway", "store", t.opts.Store.String(), "err", err)
		}
	}
	if err := p.world.Barrier(ctx); err != nil {
		return false, fmt.Errorf("train: resume: %w", err)
	}
	s, loadErr := checkpoint.LoadLatestAtMost[T](ctx, t.opts.Store, t.opts.Prefix, maxStep, t.log)
	// Every rank says what it found, failures included, so that none waits
	// for a rank that gave up.
	const found, none, failed = 0, 1, 2
	mine := []float64{failed, 0, 0}
	switch {
	case loadErr == nil:
		if err := t.sameModel(s); err != nil {
			loadErr = err
		} else {
			mine = []float64{found, float64(s.Trainer.Step), float64(s.Trainer.Cursor)}
		}
	case errors.Is(loadErr, checkpoint.ErrNone):
		mine = []float64{none, 0, 0}
	}
	all := make([]float64, 3*p.rank.World)
	copy(all[3*p.rank.Rank:], mine)
	if err := p.world.AllGather(ctx, collective.Float64s(all)); err != nil {
		return false, fmt.Errorf("train: resume: comparing the ranks' checkpoints: %w", err)
	}
	if mine[0] == failed {
		return false, loadErr
	}
	for r := range p.rank.World {
		theirs := all[3*r : 3*r+3]
		if theirs[0] == failed {
			return false, fmt.Errorf("train: resume: rank %d could not load the checkpoint", r)
		}
		if theirs[0] != mine[0] || theirs[1] != mine[1] || theirs[2] != mine[2] {
			return false, fmt.Errorf("train: resume: rank %d found a different checkpoint (step %v) than rank %d (step %v)", r, theirs[1], p.rank.Rank, mine[1])
		}
	}
	if mine[0] == none {
		return false, nil
	}
	if err := t.restore(s); err != nil {
		return false, err
	}
	return true, nil
}
