package dist

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type tlog struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *tlog) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(p))
	}
	return len(p), nil
}

// memComms returns n communicators over one in-memory network, closed when
// the test ends.
func memComms(t *testing.T, n int) []*collective.Communicator {
	t.Helper()
	w := &tlog{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	cfg := collective.DefaultConfig()
	cfg.ChunkSize = 4096
	cfg.Timeout = 2 * time.Minute
	cfg.Logger = slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
	net := collective.NewMemNetwork(n)
	comms := make([]*collective.Communicator, n)
	errs := make([]error, n)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	for r := range n {
		wg.Go(func() { comms[r], errs[r] = collective.New(ctx, cfg, net.Transport(r)) })
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
			t.Fatalf("rank %d: %v", r, err)
		}
	}
	return comms
}

// onAll runs fn for every rank at once and fails t with the first error.
func onAll(t *testing.T, n int, fn func(r int) error) {
	t.Helper()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r := range n {
		wg.Go(func() { errs[r] = fn(r) })
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
}

func tinyConfig() model.Config {
	c := model.DefaultConfig(16, 2, 32)
	c.DState, c.HeadDim, c.NHeads, c.NGroups, c.ChunkSize = 8, 4, 8, 2, 4
	c.PadVocabMultiple = 16
	return c
}

// noisyModel is a reference model initialised from seed with every
// parameter perturbed, so that no gradient is trivially zero.
func noisyModel[T model.Float](t *testing.T, cfg model.Config, seed uint64) *ref.Model[T] {
	t.Helper()
	m, err := ref.New[T](cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.Init(cfg, m.Layout(), m.Params(), seed); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 99))
	for i := range m.Params() {
		m.Params()[i] += T(rng.NormFloat64() * 0.05)
	}
	return m
}

func randomBatch(cfg model.Config, bt, l int, seed uint64) *model.Batch {
	rng := rand.New(rand.NewPCG(seed, 7))
	b := &model.Batch{Batch: bt, SeqLen: l, Inputs: make([]int32, bt*l), Targets: make([]int32, bt*l)}
	for i := range b.Inputs {
		b.Inputs[i] = int32(rng.IntN(cfg.VocabSize))
		b.Targets[i] = int32(rng.IntN(cfg.VocabSize))
	}
	b.Targets[3] = -1 // an ignored position
	return b
}

// slice returns positions [lo, hi) of every row of b.
func slice(b *model.Batch, lo, hi int) *model.Batch {
	s := &model.Batch{Batch: b.Batch, SeqLen: hi - lo}
	for r := range b.Batch {
		s.Inputs = append(s.Inputs, b.Inputs[r*b.SeqLen+lo:r*b.SeqLen+hi]...)
		s.Targets = append(s.Targets, b.Targets[r*b.SeqLen+lo:r*b.SeqLen+hi]...)
	}
	return s
}

// rowsOf returns positions [lo, hi) of every row of x, a Batch×L×w tensor.
func rowsOf(x []float64, rows, l, w, lo, hi int) []float64 {
	var out []float64
	for r := range rows {
		out = append(out, x[(r*l+lo)*w:(r*l+hi)*w]...)
	}
	return out
}

// shardRun is the outcome of one sequence-parallel pass on every shard.
type shardRun[T model.Float] struct {
	res    []model.StepResult
	models []*ref.Model[T]
	hooks  [][]int
}

// runShards runs one ForwardBackward of b split into K equal shards, shard
// k on its own model over a Boundary of mode, and records the layers the
// boundary reported to its hook.
func runShards[T model.Float](t *testing.T, cfg model.Config, b *model.Batch, K int, mode model.SPMode) *shardRun[T] {
	t.Helper()
	comms := memComms(t, K)
	out := &shardRun[T]{res: make([]model.StepResult, K), hooks: make([][]int, K)}
	for range K {
		out.models = append(out.models, noisyModel[T](t, cfg, 15))
	}
	lk := b.SeqLen / K
	ctx := context.Background()
	onAll(t, K, func(k int) error {
		bd, err := NewBoundary[T](comms[k], cfg, mode)
		if err != nil {
			return err
		}
		bd.Begin(b.Batch, func(layer int) { out.hooks[k] = append(out.hooks[k], layer) })
		r, err := out.models[k].ForwardBackward(ctx, slice(b, k*lk, (k+1)*lk),
			model.StepOptions{Count: b.Counted(), Boundary: bd, KeepHidden: true, KeepLogits: true})
		if err != nil {
			return err
		}
		out.res[k] = r
		return bd.Flush(ctx)
	})
	return out
}

func bitsEqual(a, b []float64) (int, bool) {
	for i := range a {
		if math.Float64bits(a[i]) != math.Float64bits(b[i]) {
			return i, false
		}
	}
	return 0, len(a) == len(b)
}

func maxRel[T model.Float](got, want []T) float64 {
	var scale, worst float64
	for _, v := range want {
		scale = max(scale, math.Abs(float64(v)))
	}
	for i := range got {
		worst = max(worst, math.Abs(float64(got[i])-float64(want[i]))/scale)
	}
	return worst
}

// TestSequentialShardsAreBitwise splits sequences of 16 positions into 2
// and 4 shards on chunk boundaries (Q = 4) and runs the sequential
// pipeline over an in-memory network: every layer's activations, the
// logits and the loss summed in the unsplit order (OrderedLossSum) equal
// those of the unsplit pass in every bit, in float64 and float32; the
// gradients summed over the shards agree to rounding.
func TestSequentialShardsAreBitwise(t *testing.T) {
	t.Run("float64", func(t *testing.T) { testShardsBitwise[float64](t, 1e-12) })
	t.Run("float32", func(t *testing.T) { testShardsBitwise[float32](t, 1e-5) })
}

func testShardsBitwise[T model.Float](t *testing.T, gradTol float64) {
	cfg := tinyConfig()
	const bt, l = 2, 16
	b := randomBatch(cfg, bt, l, 8)
	whole := noisyModel[T](t, cfg, 15)
	want, err := whole.ForwardBackward(context.Background(), b, model.StepOptions{KeepHidden: true, KeepLogits: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, K := range []int{2, 4} {
		t.Run(fmt.Sprint("K", K), func(t *testing.T) {
			got := runShards[T](t, cfg, b, K, model.SPSequential)
			lk := l / K
			for k, r := range got.res {
				if len(r.Hidden) != cfg.NLayer+1 || len(r.Logits) != bt*lk*cfg.VocabSize {
					t.Fatalf("shard %d kept %d activations and %d logits", k, len(r.Hidden), len(r.Logits))
				}
				for i, h := range r.Hidden {
					if at, ok := bitsEqual(h, rowsOf(want.Hidden[i], bt, l, cfg.DModel, k*lk, (k+1)*lk)); !ok {
						t.Fatalf("shard %d: activations after layer %d differ from the unsplit pass at %d", k, i+1, at)
					}
				}
				if at, ok := bitsEqual(r.Logits, rowsOf(want.Logits, bt, l, cfg.VocabSize, k*lk, (k+1)*lk)); !ok {
					t.Fatalf("shard %d: logits differ from the unsplit pass at %d", k, at)
				}
			}
			comms := memComms(t, K)
			sums := make([]float64, K)
			onAll(t, K, func(k int) error {
				var err error
				sums[k], err = OrderedLossSum(context.Background(), comms[k], bt, PositionLosses(got.res[k].Logits, slice(b, k*lk, (k+1)*lk).Targets, cfg.VocabSize))
				return err
			})
			for k, s := range sums {
				if math.Float64bits(s) != math.Float64bits(want.LossSum) {
					t.Errorf("shard %d: ordered loss sum %v, unsplit %v", k, s, want.LossSum)
				}
			}
			sum := make([]T, len(whole.Grads()))
			for _, m := range got.models {
				for i, g := range m.Grads() {
					sum[i] += g
				}
			}
			if e := maxRel(sum, whole.Grads()); e > gradTol {
				t.Errorf("gradients summed over the shards differ from the unsplit ones by %.3g (relative to the largest), above %g", e, gradTol)
			}
			for k, h := range got.hooks {
				if fmt.Sprint(h) != "[1 0]" {
					t.Errorf("shard %d: the backward reported layers %v, want [1 0]", k, h)
				}
			}
		})
	}
}

// TestPrefixShardsMatchUnsplit runs the parallel prefix on 2 and 4 shards:
// the activations, the loss and the gradients agree with the unsplit pass
// to rounding.
func TestPrefixShardsMatchUnsplit(t *testing.T) {
	cfg := tinyConfig()
	const bt, l = 2, 16
	b := randomBatch(cfg, bt, l, 8)
	whole := noisyModel[float64](t, cfg, 15)
	want, err := whole.ForwardBackward(context.Background(), b, model.StepOptions{KeepHidden: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, K := range []int{2, 4} {
		t.Run(fmt.Sprint("K", K), func(t *testing.T) {
			got := runShards[float64](t, cfg, b, K, model.SPPrefix)
			lk := l / K
			var loss float64
			for k, r := range got.res {
				loss += r.LossSum
				for i, h := range r.Hidden {
					if e := maxRel(h, rowsOf(want.Hidden[i], bt, l, cfg.DModel, k*lk, (k+1)*lk)); e > 1e-13 {
						t.Errorf("shard %d: activations after layer %d differ by %.3g", k, i+1, e)
					}
				}
			}
			if e := math.Abs(loss-want.LossSum) / want.LossSum; e > 1e-13 {
				t.Errorf("loss sum %v, unsplit %v (relative %.3g)", loss, want.LossSum, e)
			}
			sum := make([]float64, len(whole.Grads()))
			for _, m := range got.models {
				for i, g := range m.Grads() {
					sum[i] += g
				}
			}
			if e := maxRel(sum, whole.Grads()); e > 1e-12 {
				t.Errorf("gradients summed over the shards differ from the unsplit ones by %.3g", e)
			}
		})
	}
}
