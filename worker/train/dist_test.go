package train

import (
	"context"
	"fmt"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/m2train/m2train/collective"
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
				if _, over, total := got.tr.CommStats(); total < 2 || over == 0 {
					t.Errorf("%d of %d gradient buckets started during the backward pass; want several buckets, some overlapped", over, total)
				}
			}
		})
	}
}
