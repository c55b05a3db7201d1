package train

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
)

// distSpec is the tiny model of testSpec on sequences of 16 tokens (four
// chunks of 4), a global batch of 4 sequences in micro-batches of 1, so
// that a data-parallel rank of 2 accumulates two micro-batches and a
// sequence-parallel shard of 4 holds one chunk.
func distSpec(t *testing.T, dataDir string, dp, sp int, mode string, zero bool, steps int) *jobspec.Spec {
	t.Helper()
	doc := fmt.Sprintf(`
name: dist-test
model:
  config: {d_model: 16, n_layer: 2, vocab_size: 32, d_state: 8, headdim: 4, ngroups: 2, chunk_size: 4}
data: {path: %s, seq_len: 16}
batch: {micro_batch: 1, global_batch: 4}
parallel: {dp: %d, sp: %d, sp_mode: %s, zero1: %v}
optimizer: {lr: 0.01, weight_decay: 0.1, grad_clip: 1.0}
schedule: {warmup_steps: 2, total_steps: %d, min_lr: 0.001}
seed: 5
backend: cpu
`, dataDir, dp, sp, mode, zero, steps)
	spec, err := jobspec.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

// testCommConfig has a long timeout so that a loaded machine never trips it.
func testCommConfig(t *testing.T) collective.Config {
	cfg := collective.DefaultConfig()
	cfg.ChunkSize = 4096
	cfg.Timeout = 2 * time.Minute
	cfg.Logger = testLogger(t)
	return cfg
}

// memWorld returns n communicators over one in-memory network, closed when
// the test ends.
func memWorld(t *testing.T, n int) []*collective.Communicator {
	t.Helper()
	net := collective.NewMemNetwork(n)
	cfg := testCommConfig(t)
	return startWorld(t, n, func(ctx context.Context, r int) (*collective.Communicator, error) {
		return collective.New(ctx, cfg, net.Transport(r))
	})
}

func startWorld(t *testing.T, n int, build func(ctx context.Context, r int) (*collective.Communicator, error)) []*collective.Communicator {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	comms := make([]*collective.Communicator, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r := range n {
		wg.Go(func() { comms[r], errs[r] = build(ctx, r) })
	}
	wg.Wait()
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, c := range comms {
			if c != nil {
				wg.Go(func() { _ = c.Close() })
			}
		}
		wg.Wait()
	})
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: building the communicator: %v", r, err)
		}
	}
	return comms
}

// gridRun is one rank of a distributed run.
type gridRun[T model.Float] struct {
	tr     *Trainer[T]
	m      *ref.Model[T]
	losses []float64
}

// newGrid builds a trainer per rank of the spec's dp×sp grid over comms,
// each on its own reference model initialised from the spec's seed.
func newGrid[T model.Float](t *testing.T, spec *jobspec.Spec, comms []*collective.Communicator, store checkpoint.Store, adjust func(*Options)) []*gridRun[T] {
	t.Helper()
	dp, sp := spec.Parallel.DP, spec.Parallel.SP
	ds := openDataset(t, spec.Data.Path)
	runs := make([]*gridRun[T], len(comms))
	errs := make([]error, len(comms))
	var wg sync.WaitGroup
	for r, c := range comms {
		runs[r] = &gridRun[T]{m: refBackend[T](t, spec)}
		if err := LoadInit(spec, runs[r].m.Config(), runs[r].m.Layout(), runs[r].m.Params()); err != nil {
			t.Fatal(err)
		}
		opts := Options{Log: testLogger(t), Store: store,
			OnProgress: func(p Progress) { runs[r].losses = append(runs[r].losses, p.Loss) }}
		if adjust != nil {
			adjust(&opts)
		}
		wg.Go(func() {
			runs[r].tr, errs[r] = NewDistributed(spec, runs[r].m, ds, GridRank(c, dp, sp), opts)
		})
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
	return runs
}

// onRanks runs fn on every rank at once and fails the test with the first
// error.
func onRanks[T model.Float](t *testing.T, runs []*gridRun[T], fn func(r *gridRun[T]) error) {
	t.Helper()
	errs := make([]error, len(runs))
	var wg sync.WaitGroup
	for i, r := range runs {
		wg.Go(func() { errs[i] = fn(r) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", i, err)
		}
	}
}

// relDiff is ‖a−b‖₂/‖b‖₂.
func relDiff[T model.Float](a, b []T) float64 {
	var d, n float64
	for i := range a {
		x := float64(a[i]) - float64(b[i])
		d += x * x
		n += float64(b[i]) * float64(b[i])
	}
	return math.Sqrt(d / n)
}

// checkRanksAgree checks that every rank ended with the same losses and the
// same parameters in every bit, as the fixed-order reductions promise.
func checkRanksAgree[T model.Float](t *testing.T, runs []*gridRun[T]) {
	t.Helper()
	for r := 1; r < len(runs); r++ {
		for i, l := range runs[r].losses {
			if math.Float64bits(l) != math.Float64bits(runs[0].losses[i]) {
				t.Fatalf("rank %d: step %d loss %v, rank 0 has %v", r, i+1, l, runs[0].losses[i])
			}
		}
		sameBits(t, fmt.Sprintf("rank %d's parameters against rank 0's", r), runs[r].m.Params(), runs[0].m.Params())
	}
}

type gridCase struct {
	dp, sp int
	mode   string
	zero   bool
}

func (c gridCase) String() string {
	s := fmt.Sprintf("dp%d_sp%d", c.dp, c.sp)
	if c.sp > 1 {
		s += "_" + c.mode
	}
	if c.zero {
		s += "_zero1"
	}
	return s
}

// equivalenceCases is the grid of the distributed equivalence tests: every
// (dp, sp) of {(1,1), (2,1), (1,2), (2,2), (1,4)}, sp in both modes, and
// ZeRO-1 on the data-parallel layouts.
var equivalenceCases = []gridCase{
	{1, 1, jobspec.SPModeSequential, false},
	{2, 1, jobspec.SPModeSequential, false},
	{1, 2, jobspec.SPModeSequential, false},
	{1, 2, jobspec.SPModePrefix, false},
	{2, 2, jobspec.SPModeSequential, false},
	{2, 2, jobspec.SPModePrefix, false},
	{1, 4, jobspec.SPModeSequential, false},
	{1, 4, jobspec.SPModePrefix, false},
	{2, 1, jobspec.SPModeSequential, true},
	{2, 2, jobspec.SPModeSequential, true},
}

// TestDistributedEqualsSingleProcess trains 20 steps on every layout of
// equivalenceCases, in float64 and float32, and compares the losses and the
// final parameters with those of one process: relative differences within
// 1e-10 (float64) and 1e-5 (float32), and all ranks bitwise alike.
func TestDistributedEqualsSingleProcess(t *testing.T) {
	dataDir := writeDataset(t, 4000)
	t.Run("float64", func(t *testing.T) { testEquivalence[float64](t, dataDir, 1e-10) })
	t.Run("float32", func(t *testing.T) { testEquivalence[float32](t, dataDir, 1e-5) })
}

func testEquivalence[T model.Float](t *testing.T, dataDir string, tol float64) {
	const steps = 20
	ctx := context.Background()
	spec := distSpec(t, dataDir, 1, 1, jobspec.SPModeSequential, false, steps)
	single := newBackendRun[T](t, spec, refBackend[T](t, spec), openDataset(t, dataDir))
	if err := single.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if !(single.losses[steps-1] < single.losses[0]) {
		t.Fatalf("the single process's loss did not fall: %v", single.losses)
	}
	for _, c := range equivalenceCases {
		t.Run(c.String(), func(t *testing.T) {
			spec := distSpec(t, dataDir, c.dp, c.sp, c.mode, c.zero, steps)
			runs := newGrid[T](t, spec, memWorld(t, c.dp*c.sp), nil, func(o *Options) {
				o.Dist.BucketBytes = 1024 // several buckets, most overlapped
			})
			onRanks(t, runs, func(r *gridRun[T]) error { return r.tr.Run(ctx) })
			checkRanksAgree(t, runs)
			got := runs[0]
			if len(got.losses) != steps {
				t.Fatalf("%d steps, want %d", len(got.losses), steps)
			}
			worst := 0.0
			for i, l := range got.losses {
				worst = max(worst, math.Abs(l-single.losses[i])/math.Abs(single.losses[i]))
			}
			pd := relDiff(got.m.Params(), single.b.Params())
			t.Logf("losses: max relative difference %.3g; parameters: relative difference %.3g", worst, pd)
			if worst > tol {
				t.Errorf("losses differ from the single process's by %.3g (relative), above %g", worst, tol)
			}
			if pd > tol {
				t.Errorf("final parameters differ from the single process's by %.3g (relative), above %g", pd, tol)
			}
			if c.dp*c.sp > 1 && !c.zero {
				if cs := got.tr.CommStats(); cs.Buckets < 2 || cs.Overlapped == 0 {
					t.Errorf("%d of %d gradient buckets started during the backward pass; want several buckets, some overlapped", cs.Overlapped, cs.Buckets)
				}
			}
		})
	}
}

// TestSequentialFirstLossIsBitwise trains one step with the sequence split
// into 2 and 4 shards on chunk boundaries, in the sequential mode with
// OrderedLoss: the loss equals the single process's in every bit, in
// float64 and float32.
func TestSequentialFirstLossIsBitwise(t *testing.T) {
	dataDir := writeDataset(t, 4000)
	t.Run("float64", func(t *testing.T) { testFirstLossBitwise[float64](t, dataDir) })
	t.Run("float32", func(t *testing.T) { testFirstLossBitwise[float32](t, dataDir) })
}

func testFirstLossBitwise[T model.Float](t *testing.T, dataDir string) {
	ctx := context.Background()
	spec := distSpec(t, dataDir, 1, 1, jobspec.SPModeSequential, false, 3)
	single := newBackendRun[T](t, spec, refBackend[T](t, spec), openDataset(t, dataDir))
	want, err := single.tr.TrainStep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sp := range []int{2, 4} {
		t.Run(fmt.Sprint("sp", sp), func(t *testing.T) {
			spec := distSpec(t, dataDir, 1, sp, jobspec.SPModeSequential, false, 3)
			runs := newGrid[T](t, spec, memWorld(t, sp), nil, func(o *Options) { o.Dist.OrderedLoss = true })
			onRanks(t, runs, func(r *gridRun[T]) error { _, err := r.tr.TrainStep(ctx); return err })
			for k, r := range runs {
				if got := r.tr.Loss(); math.Float64bits(got) != math.Float64bits(want.Loss) {
					t.Errorf("sp rank %d: first loss %v, single process %v", k, got, want.Loss)
				}
			}
		})
	}
}

// grpcWorld returns n communicators over gRPC on loopback, closed when the
// test ends.
func grpcWorld(t *testing.T, n int) []*collective.Communicator {
	t.Helper()
	cfg := testCommConfig(t)
	lis := make([]net.Listener, n)
	addrs := make([]string, n)
	for r := range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[r], addrs[r] = l, l.Addr().String()
	}
	return startWorld(t, n, func(ctx context.Context, r int) (*collective.Communicator, error) {
		tr, err := grpcnet.Listen(cfg, r, addrs, lis[r])
		if err != nil {
			return nil, err
		}
		return collective.New(ctx, cfg, tr)
	})
}

// TestDistributedOverGRPC trains a few steps of dp = sp = 2 over gRPC on
// loopback: the losses and the parameters are those of the same run over
// the in-memory network in every bit, since every reduction sums in a fixed
// order whatever carries the bytes.
func TestDistributedOverGRPC(t *testing.T) {
	const steps = 4
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	for _, mode := range []string{jobspec.SPModeSequential, jobspec.SPModePrefix} {
		t.Run(mode, func(t *testing.T) {
			spec := distSpec(t, dataDir, 2, 2, mode, false, steps)
			small := func(o *Options) { o.Dist.BucketBytes = 4096 }
			mem := newGrid[float32](t, spec, memWorld(t, 4), nil, small)
			onRanks(t, mem, func(r *gridRun[float32]) error { return r.tr.Run(ctx) })
			rpc := newGrid[float32](t, spec, grpcWorld(t, 4), nil, small)
			onRanks(t, rpc, func(r *gridRun[float32]) error { return r.tr.Run(ctx) })
			checkRanksAgree(t, rpc)
			sameLosses(t, rpc[0].losses, mem[0].losses)
			sameBits(t, "parameters over gRPC against in memory", rpc[0].m.Params(), mem[0].m.Params())
		})
	}
}

// TestDistributedResumeIsBitwise trains dp = sp = 2 for 9 steps straight,
// and separately 6 steps, then resumes a new grid from the step-6
// checkpoint that rank 0 wrote: the losses and the final parameters are
// identical in every bit.
func TestDistributedResumeIsBitwise(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	spec := distSpec(t, dataDir, 2, 2, jobspec.SPModeSequential, false, 9)
	spec.Checkpoint = jobspec.Checkpoint{EverySteps: 3, Keep: 2}

	straight := newGrid[float64](t, spec, memWorld(t, 4), nil, nil)
	onRanks(t, straight, func(r *gridRun[float64]) error { return r.tr.Run(ctx) })

	store := checkpoint.LocalStore{Root: t.TempDir()}
	first := newGrid[float64](t, spec, memWorld(t, 4), store, nil)
	onRanks(t, first, func(r *gridRun[float64]) error { return r.tr.RunUntil(ctx, 6) })
	second := newGrid[float64](t, spec, memWorld(t, 4), store, nil)
	onRanks(t, second, func(r *gridRun[float64]) error {
		ok, err := r.tr.Resume(ctx)
		if err != nil || !ok {
			return fmt.Errorf("resume: %v, %v", ok, err)
		}
		if r.tr.Step() != 6 {
			return fmt.Errorf("resumed at step %d, want 6", r.tr.Step())
		}
		return r.tr.Run(ctx)
	})
	checkRanksAgree(t, second)
	sameLosses(t, append(first[0].losses, second[0].losses...), straight[0].losses)
	sameBits(t, "parameters after resuming", second[0].m.Params(), straight[0].m.Params())
	steps, err := checkpoint.Steps(ctx, store, "")
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(steps) != "[9 6]" {
		t.Errorf("checkpoints %v, want [9 6]", steps)
	}
}

// TestZeroResumesWithAnotherLayout trains 6 steps with ZeRO-1 over dp = 2,
// sp = 2, whose checkpoint gathers the sharded moments into the files of a
// single process, then resumes with dp = 4 (ZeRO-1 over other shards) and
// with dp = 1, sp = 1 in one process: both continue the single process's
// 9-step run to rounding, since the cursor is a global sample index.
func TestZeroResumesWithAnotherLayout(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	spec := distSpec(t, dataDir, 1, 1, jobspec.SPModeSequential, false, 9)
	single := newBackendRun[float64](t, spec, refBackend[float64](t, spec), openDataset(t, dataDir))
	if err := single.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}

	store := checkpoint.LocalStore{Root: t.TempDir()}
	zspec := distSpec(t, dataDir, 2, 2, jobspec.SPModeSequential, true, 9)
	zspec.Checkpoint = jobspec.Checkpoint{EverySteps: 6, Keep: 1}
	first := newGrid[float64](t, zspec, memWorld(t, 4), store, nil)
	onRanks(t, first, func(r *gridRun[float64]) error { return r.tr.RunUntil(ctx, 6) })

	check := func(t *testing.T, losses []float64, params []float64) {
		t.Helper()
		got := append(append([]float64(nil), first[0].losses...), losses...)
		for i, l := range got {
			if e := math.Abs(l-single.losses[i]) / single.losses[i]; e > 1e-10 {
				t.Errorf("step %d: loss %v, single process %v", i+1, l, single.losses[i])
			}
		}
		if e := relDiff(params, single.b.Params()); e > 1e-10 {
			t.Errorf("final parameters differ from the single process's by %.3g", e)
		}
	}
	t.Run("dp4_zero1", func(t *testing.T) {
		spec := distSpec(t, dataDir, 4, 1, jobspec.SPModeSequential, true, 9)
		runs := newGrid[float64](t, spec, memWorld(t, 4), copyStore(t, store), nil)
		onRanks(t, runs, func(r *gridRun[float64]) error {
			if ok, err := r.tr.Resume(ctx); err != nil || !ok {
				return fmt.Errorf("resume: %v, %v", ok, err)
			}
			return r.tr.RunUntil(ctx, 9)
		})
		checkRanksAgree(t, runs)
		check(t, runs[0].losses, runs[0].m.Params())
	})
	t.Run("single", func(t *testing.T) {
		r := newRunOn[float64](t, spec, copyStore(t, store), nil)
		if ok, err := r.tr.Resume(ctx); err != nil || !ok {
			t.Fatalf("resume: %v, %v", ok, err)
		}
		if err := r.tr.RunUntil(ctx, 9); err != nil {
			t.Fatal(err)
		}
		check(t, r.losses, r.m.Params())
	})
}

// copyStore returns a copy of a local store, so that a resumed run writes
// its own checkpoints.
func copyStore(t *testing.T, s checkpoint.LocalStore) checkpoint.LocalStore {
	t.Helper()
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS(s.Root)); err != nil {
		t.Fatal(err)
	}
	return checkpoint.LocalStore{Root: dir}
}

// TestCheckpointInFlightDoesNotStallPeers holds rank 0's upload of the
// step-1 checkpoint until rank 1 has gone through several rounds of
// waiting at the step-2 checkpoint: the ranks wait together in short
// broadcasts rather than in one collective operation as long as the
// upload, and every checkpoint is committed once the upload goes on.
func TestCheckpointInFlightDoesNotStallPeers(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	spec := distSpec(t, dataDir, 2, 1, jobspec.SPModeSequential, false, 3)
	spec.Checkpoint = jobspec.Checkpoint{EverySteps: 1}
	local := checkpoint.LocalStore{Root: t.TempDir()}
	gate := make(chan struct{})
	var once sync.Once
	store := hooked{Store: local, suffix: checkpoint.StepDir(1) + "/" + checkpoint.ModelObject, onPut: func() { once.Do(func() { <-gate }) }}
	runs := newGrid[float32](t, spec, memWorld(t, 2), store, func(o *Options) { o.Dist.CheckpointPoll = time.Millisecond })
	errs := make([]error, len(runs))
	var wg sync.WaitGroup
	for i, r := range runs {
		wg.Go(func() { errs[i] = r.tr.Run(ctx) })
	}
	deadline := time.Now().Add(time.Minute)
	for runs[1].tr.par.waitRounds.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond) // polling a condition, not ordering events
	}
	waited := runs[1].tr.par.waitRounds.Load()
	close(gate)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", i, err)
		}
	}
	if waited < 3 {
		t.Fatalf("rank 1 waited %d rounds for rank 0's checkpoint in flight, want at least 3", waited)
	}
	steps, err := checkpoint.Steps(ctx, local, "")
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(steps) != "[3 2 1]" {
		t.Errorf("checkpoints %v, want [3 2 1]", steps)
	}
}

// TestNewDistributedRules checks the constructor's agreements: the grid
// must match the spec, ZeRO-1 needs a host backend, a store must be on all
// ranks or none, and every rank starts from rank 0's parameters.
func TestNewDistributedRules(t *testing.T) {
	dataDir := writeDataset(t, 4000)
	ds := openDataset(t, dataDir)
	spec := distSpec(t, dataDir, 2, 1, jobspec.SPModeSequential, false, 3)

	comms := memWorld(t, 1)
	if _, err := NewDistributed(spec, refBackend[float32](t, spec), ds, GridRank(comms[0], 1, 1), Options{}); err == nil || !strings.Contains(err.Error(), "dp 2") {
		t.Errorf("a 1×1 rank for a dp 2 spec: %v", err)
	}
	if err := (Rank{World: 2, Rank: 1, DP: 2, DPRank: 0, SP: 1, SPRank: 0}).Validate(); err == nil {
		t.Error("a rank whose index disagrees with its dp rank was accepted")
	}
	zspec := distSpec(t, dataDir, 1, 1, jobspec.SPModeSequential, true, 3)
	dev := newEmulatedDevice[float32](t, refBackend[float32](t, zspec).Config(), false)
	if _, err := NewDistributed(zspec, model.Backend[float32](dev), ds, GridRank(comms[0], 1, 1), Options{}); err == nil || !strings.Contains(err.Error(), "zero1") {
		t.Errorf("ZeRO-1 on a device backend: %v", err)
	}

	// A store on rank 0 only.
	comms = memWorld(t, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for r := range 2 {
		wg.Go(func() {
			var opts Options
			if r == 0 {
				opts.Store = checkpoint.LocalStore{Root: t.TempDir()}
			}
			_, errs[r] = NewDistributed(spec, refBackend[float32](t, spec), ds, GridRank(comms[r], 2, 1), opts)
		})
	}
	wg.Wait()
	for r, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "1 of 2 ranks have a store") {
			t.Errorf("rank %d with a store on rank 0 only: %v", r, err)
		}
	}

	// Rank 1 loads other parameters; it trains from rank 0's.
	comms = memWorld(t, 2)
	models := []*ref.Model[float32]{refBackend[float32](t, spec), refBackend[float32](t, spec)}
	for i := range models[0].Params() {
		models[0].Params()[i] = float32(i)
	}
	for r := range 2 {
		wg.Go(func() { _, errs[r] = NewDistributed(spec, models[r], ds, GridRank(comms[r], 2, 1), Options{}) })
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
	sameBits(t, "rank 1's parameters after construction", models[1].Params(), models[0].Params())
}

// TestDistributedDevicePath trains dp = sp = 2 on emulated devices, whose
// gradients reach the host only through SyncToHost: the all-reduce runs on
// the host mirrors between the syncs, and the clipping and update on the
// devices. The parameters equal those of the same grid on plain reference
// models in every bit.
func TestDistributedDevicePath(t *testing.T) {
	const steps = 5
	devs := make([]*emulatedDevice[float64], 4)
	want, _ := trainDeviceGrid(t, steps, func(r int, cfg model.Config) model.Backend[float64] {
		devs[r] = newEmulatedDevice[float64](t, cfg, true)
		return devs[r]
	})
	for r, d := range devs {
		if d.optimizerSteps != steps {
			t.Errorf("rank %d: %d optimizer steps on the device, want %d", r, d.optimizerSteps, steps)
		}
		sameBits(t, fmt.Sprintf("rank %d's parameters on a device", r), d.Params(), want)
	}
}

// trainDeviceGrid trains dp 2 × sp 2 for steps steps twice, on the
// reference backend and on the backends that dev returns for each rank
// (for the model config cfg, in automatic mode: the trainer switches them to
// explicit synchronisation), with gradient buckets of 1 KiB, and returns
// the reference run's final parameters and each rank's communication
// statistics of its last step. Rank 0's backend gets the initial
// parameters; the others receive them from it.
func trainDeviceGrid(t *testing.T, steps int, dev func(rank int, cfg model.Config) model.Backend[float64]) ([]float64, []CommStats) {
	t.Helper()
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	spec := distSpec(t, dataDir, 2, 2, jobspec.SPModeSequential, false, steps)
	small := func(o *Options) { o.Dist.BucketBytes = 1024 }
	plain := newGrid[float64](t, spec, memWorld(t, 4), nil, small)
	onRanks(t, plain, func(r *gridRun[float64]) error { return r.tr.Run(ctx) })

	comms := memWorld(t, 4)
	ds := openDataset(t, dataDir)
	cfg := refBackend[float64](t, spec).Config()
	trs := make([]*Trainer[float64], 4)
	errs := make([]error, 4)
	var wg sync.WaitGroup
	for r := range 4 {
		b := dev(r, cfg)
		if r == 0 {
			if err := LoadInit(spec, b.Config(), b.Layout(), b.Params()); err != nil {
				t.Fatal(err)
			}
		}
		wg.Go(func() {
			opts := Options{Log: testLogger(t)}
			small(&opts)
			if trs[r], errs[r] = NewDistributed(spec, b, ds, GridRank(comms[r], 2, 2), opts); errs[r] == nil {
				errs[r] = trs[r].Run(ctx)
			}
		})
	}
	wg.Wait()
	stats := make([]CommStats, 4)
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
		stats[r] = trs[r].CommStats()
	}
	return plain[0].m.Params(), stats
}

// streamingDevice is an emulated device that streams gradient ranges to the
// host as the GPU backend does (model.GradStreamer): the range is read from
// the device when the copy is queued, so a range that is not final yet
// carries wrong values, and it reaches the host mirror only when the wait
// is called, so a trainer that reads the mirror too early sees stale ones.
type streamingDevice struct {
	*emulatedDevice[float64]
	mu      sync.Mutex
	queued  int // copies queued
	waited  int // waits called
	covered int // gradients copied
}

func (s *streamingDevice) GradsToHostAsync(lo, hi int) (func() error, error) {
	if s.auto {
		return nil, errors.New("streaming device: automatic mode")
	}
	snap := append([]float64(nil), s.dev.Grads()[lo:hi]...)
	s.mu.Lock()
	s.queued++
	s.covered += hi - lo
	s.mu.Unlock()
	return func() error {
		copy(s.hostGrads[lo:hi], snap)
		s.mu.Lock()
		s.waited++
		s.mu.Unlock()
		return nil
	}, nil
}

// TestDistributedDeviceStreamsGradients trains dp 2 × sp 2 on devices that
// stream their gradients to the host during the last backward pass and
// checks that the parameters equal the host path's bit for bit, that the
// copies covered every gradient once per step and that each was waited for.
func TestDistributedDeviceStreamsGradients(t *testing.T) {
	const steps = 4
	devs := make([]*streamingDevice, 4)
	want, stats := trainDeviceGrid(t, steps, func(r int, cfg model.Config) model.Backend[float64] {
		devs[r] = &streamingDevice{emulatedDevice: newEmulatedDevice[float64](t, cfg, true)}
		return devs[r]
	})
	total := devs[0].Layout().Total
	for r, d := range devs {
		sameBits(t, fmt.Sprintf("rank %d's parameters after streamed gradients", r), d.Params(), want)
		if d.covered != steps*total || d.waited != d.queued {
			t.Errorf("rank %d: %d copies covering %d gradients, %d waited for; want %d steps × %d gradients, every copy waited for",
				r, d.queued, d.covered, d.waited, steps, total)
		}
		if d.queued < 2*steps {
			t.Errorf("rank %d: %d copies in %d steps: the gradients were not streamed during the backward pass", r, d.queued, steps)
		}
		if stats[r].Overlapped == 0 {
			t.Errorf("rank %d: no gradient bucket started during the backward pass (%d buckets)", r, stats[r].Buckets)
		}
	}
}

// TestBF16AllReduce trains dp 2 × sp 2 with the gradient all-reduce in
// bf16 (parallel.allreduce_dtype) and in float32, on the float32 CPU
// backend: the ranks agree bit for bit, the loss curve stays within 1% of
// float32's at every step although the parameters differ (the bf16 path
// ran), and the ranks send about half the bytes.
func TestBF16AllReduce(t *testing.T) {
	const steps = 20
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	run := func(dtype string) ([]*gridRun[float32], int64) {
		spec := distSpec(t, dataDir, 2, 2, jobspec.SPModeSequential, false, steps)
		spec.Parallel.AllReduceDType = dtype
		if err := spec.Validate(); err != nil {
			t.Fatal(err)
		}
		comms := memWorld(t, 4)
		runs := newGrid[float32](t, spec, comms, nil, func(o *Options) { o.Dist.BucketBytes = 1024 })
		before := comms[0].Stats().BytesSent
		onRanks(t, runs, func(r *gridRun[float32]) error { return r.tr.Run(ctx) })
		checkRanksAgree(t, runs)
		return runs, comms[0].Stats().BytesSent - before
	}
	f32, sent32 := run(jobspec.AllReduceFloat32)
	bf16, sent16 := run(jobspec.AllReduceBF16)
	worst := 0.0
	for i, l := range bf16[0].losses {
		worst = max(worst, math.Abs(l-f32[0].losses[i])/f32[0].losses[i])
	}
	pd := relDiff(bf16[0].m.Params(), f32[0].m.Params())
	t.Logf("bf16 all-reduce: losses within %.3g (relative) of float32's, parameters %.3g apart; rank 0 sent %d bytes against %d", worst, pd, sent16, sent32)
	if len(bf16[0].losses) != steps || worst > 0.01 {
		t.Errorf("%d steps, losses up to %.3g (relative) from float32's; want %d steps within 0.01", len(bf16[0].losses), worst, steps)
	}
	if pd == 0 {
		t.Error("the parameters equal float32's to the bit: the bf16 all-reduce did not run")
	}
	// The gradients dominate what a rank sends; the states, halos and
	// scalars stay as they were.
	if r := float64(sent16) / float64(sent32); r > 0.65 || r < 0.4 {
		t.Errorf("rank 0 sent %d bytes with bf16, %d with float32 (ratio %.2f); want about half", sent16, sent32, r)
	}
}

// TestDistributedSoloDevice trains a world of one rank (a communicator of
// size 1, as a one-GPU layout of a benchmark has) on an emulated device:
// the gradients never leave the device (no SyncToHost of the gradients),
// and the parameters equal those of the same rank without a communicator,
// bit for bit.
func TestDistributedSoloDevice(t *testing.T) {
	const steps = 4
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	spec := distSpec(t, dataDir, 1, 1, jobspec.SPModeSequential, false, steps)
	ds := openDataset(t, dataDir)
	train := func(comm *collective.Communicator) *streamingDevice {
		d := &streamingDevice{emulatedDevice: newEmulatedDevice[float64](t, refBackend[float64](t, spec).Config(), true)}
		if err := LoadInit(spec, d.Config(), d.Layout(), d.Params()); err != nil {
			t.Fatal(err)
		}
		rank := Rank{World: 1, DP: 1, SP: 1}
		if comm != nil {
			rank = GridRank(comm, 1, 1)
		}
		tr, err := NewDistributed(spec, model.Backend[float64](d), ds, rank, Options{Log: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		if err := tr.Run(ctx); err != nil {
			t.Fatal(err)
		}
		return d
	}
	alone := train(nil)
	solo := train(memWorld(t, 1)[0])
	if err := solo.SyncToHost(model.SyncParams, nil); err != nil {
		t.Fatal(err)
	}
	if err := alone.SyncToHost(model.SyncParams, nil); err != nil {
		t.Fatal(err)
	}
	sameBits(t, "parameters of a world of one", solo.Params(), alone.Params())
	if solo.queued != 0 || solo.toHost != alone.toHost {
		t.Errorf("a world of one copied gradients to the host: %d streamed copies, %d SyncToHost calls against %d without a communicator",
			solo.queued, solo.toHost, alone.toHost)
	}
}
