package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/kernels/gpu"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/tools/internal/benchio"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/train"
)

// spec is the job spec of one layout; the data path is never opened (the
// ranks read a synthetic source).
func (o options) spec(l layout) (*jobspec.Spec, error) {
	backend, prec := jobspec.BackendCPU, jobspec.PrecisionFloat32
	if o.backend == backendCUDA {
		backend = jobspec.BackendCUDA
	}
	if o.precision == precBF16 {
		prec = jobspec.PrecisionBF16
	}
	doc := fmt.Sprintf(`
name: distbench
model:
  config: {d_model: %d, n_layer: %d, vocab_size: %d, d_state: %d, headdim: %d, chunk_size: %d}
data: {path: /synthetic, seq_len: %d}
batch: {micro_batch: %d, global_batch: %d}
parallel: {dp: %d, sp: %d, sp_mode: %s, zero1: %v, allreduce_dtype: %s}
optimizer: {lr: 0.001, weight_decay: 0.1, grad_clip: 1.0}
schedule: {warmup_steps: 1, total_steps: 1000}
seed: 1
backend: %s
precision: %s
`, o.dModel, o.layers, o.vocab, o.dState, o.headDim, o.chunk, o.seqLen, o.micro, o.global, l.dp, l.sp, o.mode, o.zero, o.allreduce, backend, prec)
	return jobspec.Parse([]byte(doc))
}

// synthetic is a train.Source of pseudo-random tokens: the sequence at
// global sample position g is a function of g alone, so that every layout
// trains on the same data.
type synthetic struct {
	cfg    data.LoaderConfig
	vocab  int
	cursor uint64
}

func (s *synthetic) Next(ctx context.Context) ([]data.Batch, error) {
	pos, err := data.RankPositions(s.cursor, s.cfg.GlobalBatch, s.cfg.DPRank, s.cfg.DPSize)
	if err != nil {
		return nil, err
	}
	s.cursor += uint64(s.cfg.GlobalBatch)
	L := s.cfg.SeqLen
	var out []data.Batch
	for m := 0; m < len(pos); m += s.cfg.MicroBatch {
		p := pos[m : m+s.cfg.MicroBatch]
		b := data.Batch{Inputs: make([]int32, len(p)*L), Targets: make([]int32, len(p)*L), Positions: p, SeqLen: L}
		for r, g := range p {
			rng := rand.New(rand.NewPCG(g, 17))
			prev := int32(rng.IntN(s.vocab))
			for t := range L {
				next := int32(rng.IntN(s.vocab))
				b.Inputs[r*L+t], b.Targets[r*L+t] = prev, next
				prev = next
			}
		}
		out = append(out, b)
	}
	return out, nil
}

func (s *synthetic) Cursor() uint64     { return s.cursor }
func (s *synthetic) Seek(cursor uint64) { s.cursor = cursor }

// result is one rank's measurement, printed by a child as one line of
// JSON; a rank that fails prints its error instead.
type result struct {
	Rank       int     `json:"rank"`
	StepSec    float64 `json:"step_s"`     // mean over the timed steps
	CommSec    float64 `json:"comm_s"`     // mean time waiting on other ranks
	GradSec    float64 `json:"grad_s"`     // mean wait for the gradient reduction after the backward
	CPUSec     float64 `json:"cpu_s"`      // user+system time per step, this process
	Tokens     int64   `json:"tokens"`     // counted targets per step, all ranks
	BytesSent  float64 `json:"bytes_sent"` // per step, this rank
	Overlapped int     `json:"overlapped"` // buckets started during the backward
	Buckets    int     `json:"buckets"`
	Loss       float64 `json:"loss"`       // the last step's
	LossFirst  float64 `json:"loss_first"` // the first step's, warm-up included
	// DeviceUsed is the GPU's total − free memory, the largest of the
	// samples taken after each step; DeviceOpen the same right after the
	// library opened (the CUDA context). CUDA backend only.
	DeviceUsed int64  `json:"device_used,omitempty"`
	DeviceOpen int64  `json:"device_open,omitempty"`
	Device     string `json:"device,omitempty"`
	Error      string `json:"error,omitempty"`
	OOM        bool   `json:"oom,omitempty"` // Error is a CUDA out-of-memory error
}

// newBackend returns the model of cfg on the flags' backend, the kernel
// library with -backend cuda (nil otherwise), and the model's release.
func (o options) newBackend(cfg model.Config) (model.Backend[float32], *kernels.Lib, func(), error) {
	if o.backend == backendCPU {
		m, err := ref.New[float32](cfg)
		return m, nil, func() {}, err
	}
	lib, err := openLib(o.lib)
	if err != nil {
		return nil, nil, nil, err
	}
	prec := gpu.BF16
	if o.precision == precF32 {
		prec = gpu.F32
	}
	g, err := gpu.New(lib, cfg, gpu.Options{Precision: prec, ExplicitSync: true})
	if err != nil {
		return nil, nil, nil, err
	}
	return g, lib, func() { _ = g.Close() }, nil
}

// usedBytes is the memory in use on the library's GPU, total − free.
func usedBytes(lib *kernels.Lib) (int64, error) {
	free, total, err := lib.MemInfo()
	return total - free, err
}

// runChild is one rank: it trains -warmup and then -steps steps of its
// layout and prints its result as JSON. A failure after the ranks have
// met is printed as a result too, before the rank leaves the ring, so
// that the parent learns the cause even when it stops the other ranks.
func runChild(o options, rank int) (err error) {
	runtime.GOMAXPROCS(o.procs)
	l := layout{dp: o.dp, sp: o.sp, noOverlap: o.noOverlap == 1}
	spec, err := o.spec(l)
	if err != nil {
		return err
	}
	addrs := strings.Split(o.addrs, ",")
	lis, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		return err
	}
	cc := collective.DefaultConfig()
	cc.Timeout = 5 * time.Minute
	tr, err := grpcnet.Listen(cc, rank, addrs, lis)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	comm, err := collective.New(ctx, cc, tr)
	if err != nil {
		return err
	}
	defer comm.Close()
	defer func() {
		if err != nil {
			_ = json.NewEncoder(os.Stdout).Encode(result{Rank: rank, Error: err.Error(), OOM: isOOM(err)})
		}
	}()
	cfg, err := train.ConfigFromSpec(spec)
	if err != nil {
		return err
	}
	m, lib, release, err := o.newBackend(cfg)
	if err != nil {
		return err
	}
	defer release()
	res := result{Rank: rank}
	sample := func() error { return nil }
	if lib != nil {
		if res.DeviceOpen, err = usedBytes(lib); err != nil {
			return err
		}
		res.DeviceUsed = res.DeviceOpen
		res.Device = lib.Device().Name
		sample = func() error {
			u, err := usedBytes(lib)
			res.DeviceUsed = max(res.DeviceUsed, u)
			return err
		}
	}
	if err := train.LoadInit(spec, cfg, m.Layout(), m.Params()); err != nil {
		return err
	}
	r := train.GridRank(comm, l.dp, l.sp)
	src := &synthetic{vocab: o.vocab, cfg: data.LoaderConfig{SeqLen: o.seqLen, MicroBatch: o.micro, GlobalBatch: o.global, DPRank: r.DPRank, DPSize: l.dp}}
	opts := train.Options{Dist: train.DistOptions{BucketBytes: o.bucketMiB << 20, NoOverlap: l.noOverlap}}
	t, err := train.NewDistributedWithInput(spec, m, train.Input{Source: src, Vocab: o.vocab, What: "synthetic tokens"}, r, opts)
	if err != nil {
		return err
	}
	for i := range o.warmup {
		p, err := t.TrainStep(ctx)
		if err != nil {
			return fmt.Errorf("warm-up step %d: %w", i+1, err)
		}
		if i == 0 {
			res.LossFirst = p.Loss
		}
		if err := sample(); err != nil {
			return err
		}
	}
	sent0 := comm.Stats().BytesSent
	if o.profile != "" {
		stop, err := benchio.StartCPUProfile(fmt.Sprintf("%s.%dx%d.%d", o.profile, l.dp, l.sp, rank))
		if err != nil {
			return err
		}
		defer stop()
	}
	cpu0 := cpuTime()
	for i := range o.steps {
		p, err := t.TrainStep(ctx)
		if err != nil {
			return fmt.Errorf("step %d: %w", o.warmup+i+1, err)
		}
		if i == 0 && o.warmup == 0 {
			res.LossFirst = p.Loss
		}
		if err := sample(); err != nil {
			return err
		}
		res.StepSec += p.StepTime.Seconds() / float64(o.steps)
		res.CommSec += p.Comm.Seconds() / float64(o.steps)
		res.GradSec += t.CommStats().GradWait.Seconds() / float64(o.steps)
		res.Tokens, res.Loss = p.Tokens, p.Loss
	}
	res.CPUSec = (cpuTime() - cpu0) / float64(o.steps)
	res.BytesSent = float64(comm.Stats().BytesSent-sent0) / float64(o.steps)
	cs := t.CommStats()
	res.Overlapped, res.Buckets = cs.Overlapped, cs.Buckets
	if err := t.Close(); err != nil {
		return err
	}
	// Leave together, so that no rank's goodbye fails a peer still working.
	if err := comm.Barrier(ctx); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// cpuTime returns the user and system time of this process in seconds.
func cpuTime() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}
