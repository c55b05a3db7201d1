package ref

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/m2train/m2train/model"
)

// tinyConfig is the model of MAMBA2_SPEC.md §7 item 11.
func tinyConfig() model.Config {
	c := model.DefaultConfig(16, 2, 32)
	c.DState, c.HeadDim, c.NHeads, c.NGroups, c.ChunkSize = 8, 4, 8, 2, 4
	c.PadVocabMultiple = 16
	return c
}

// noisyModel returns a model initialised from seed with every parameter
// perturbed, so that no gradient is trivially zero or symmetric.
func noisyModel[T model.Float](t testing.TB, cfg model.Config, seed uint64) *Model[T] {
	t.Helper()
	m, err := New[T](cfg)
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

func TestModelGradientsFiniteDifferences(t *testing.T) {
	variants := map[string]func(*model.Config){
		"published":        func(*model.Config) {},
		"untied-bias":      func(c *model.Config) { c.TieEmbeddings = false; c.Bias = true },
		"D-per-channel":    func(c *model.Config) { c.DHasHdim = true },
		"norm-before-gate": func(c *model.Config) { c.NormBeforeGate = true },
		"no-gated-norm":    func(c *model.Config) { c.GatedNorm = false; c.ConvBias = false },
		"dt-limit":         func(c *model.Config) { c.DTLimit = [2]float64{0.002, 0.05} },
		"norm-over-all-E":  func(c *model.Config) { c.GatedNormGroups = 1 },
	}
	for name, mod := range variants {
		t.Run(name, func(t *testing.T) {
			cfg := tinyConfig()
			mod(&cfg)
			m := noisyModel[float64](t, cfg, 11)
			b := randomBatch(cfg, 2, 10, 3)
			ctx := context.Background()
			if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err != nil {
				t.Fatal(err)
			}
			grads := append([]float64(nil), m.Grads()...)
			loss := func() float64 {
				r, err := m.Forward(ctx, b, model.StepOptions{})
				if err != nil {
					t.Fatal(err)
				}
				return r.Loss
			}
			rng := rand.New(rand.NewPCG(5, 5))
			p := m.Params()
			for _, tn := range m.Layout().Tensors {
				// Up to 12 entries per tensor keep the test fast and still
				// touch every parameter tensor.
				idx := make([]int, 0, 12)
				for i := 0; i < min(12, tn.Size); i++ {
					idx = append(idx, tn.Offset+rng.IntN(tn.Size))
				}
				var maxErr, scale float64
				const eps = 1e-5
				// Rounding of the loss itself bounds what central differences
				// can resolve: about ε_mach·|loss|/eps.
				floor := 10 * 0x1p-52 * math.Abs(loss()) / eps
				for _, i := range idx {
					old := p[i]
					p[i] = old + eps
					lp := loss()
					p[i] = old - eps
					lm := loss()
					p[i] = old
					fd := (lp - lm) / (2 * eps)
					maxErr = math.Max(maxErr, math.Abs(fd-grads[i]))
					scale = math.Max(scale, math.Abs(fd))
				}
				if scale == 0 {
					t.Errorf("%s: finite differences are all zero: the test would prove nothing", tn.Name)
					continue
				}
				if maxErr > 1e-6*scale+floor {
					t.Errorf("%s: gradient differs from central finite differences: max abs err %.3g (scale %.3g)", tn.Name, maxErr, scale)
				}
			}
		})
	}
}

func TestChunkedEqualsRecurrentModel(t *testing.T) {
	cfg := tinyConfig()
	ctx := context.Background()
	b := randomBatch(cfg, 2, 11, 4)
	var losses []float64
	var grads [][]float64
	for _, rec := range []bool{false, true} {
		m := noisyModel[float64](t, cfg, 12)
		m.Recurrent = rec
		r, err := m.ForwardBackward(ctx, b, model.StepOptions{})
		if err != nil {
			t.Fatal(err)
		}
		losses = append(losses, r.Loss)
		grads = append(grads, append([]float64(nil), m.Grads()...))
	}
	if math.Abs(losses[0]-losses[1]) > 1e-13*math.Abs(losses[1]) {
		t.Errorf("chunked loss %v != recurrent loss %v", losses[0], losses[1])
	}
	if e := maxRelErr(grads[0], grads[1]); e > 1e-11 {
		t.Errorf("chunked gradients differ from recurrent: %g", e)
	}
}

func TestDeterministicAcrossThreadCounts(t *testing.T) {
	cfg := tinyConfig()
	cfg.DModel, cfg.NHeads = 32, 16 // wide enough for the parallel paths
	b := randomBatch(cfg, 3, 24, 5)
	var ref []float32
	var refLoss float64
	for _, procs := range []int{1, 2, 4} {
		prev := runtime.GOMAXPROCS(procs)
		m := noisyModel[float32](t, cfg, 13)
		r, err := m.ForwardBackward(context.Background(), b, model.StepOptions{})
		runtime.GOMAXPROCS(prev)
		if err != nil {
			t.Fatal(err)
		}
		if ref == nil {
			ref, refLoss = append([]float32(nil), m.Grads()...), r.Loss
			continue
		}
		if r.Loss != refLoss {
			t.Errorf("GOMAXPROCS=%d: loss %v != %v", procs, r.Loss, refLoss)
		}
		for i, v := range m.Grads() {
			if math.Float32bits(v) != math.Float32bits(ref[i]) {
				t.Fatalf("GOMAXPROCS=%d: gradient %d differs in its bits: %v vs %v", procs, i, v, ref[i])
			}
		}
	}
}

func TestLossDecreasesUnderSGD(t *testing.T) {
	cfg := tinyConfig()
	m := noisyModel[float64](t, cfg, 14)
	b := randomBatch(cfg, 2, 10, 6)
	ctx := context.Background()
	var first, last float64
	for step := 0; step < 30; step++ {
		m.ZeroGrads()
		r, err := m.ForwardBackward(ctx, b, model.StepOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if step == 0 {
			first = r.Loss
		}
		last = r.Loss
		for i, g := range m.Grads() {
			m.Params()[i] -= 0.5 * g
		}
	}
	if !(last < 0.8*first) {
		t.Errorf("loss went from %.4f to %.4f under SGD; expected a clear decrease", first, last)
	}
}

// pipe is an in-memory sequence-parallel boundary between shard k and k+1
// of a two-stage pipeline run in two goroutines.
type pipe struct {
	fwdIn, fwdOut, bwdIn, bwdOut chan [2][]float64
}

func (p *pipe) RecvForward(ctx context.Context, l int) ([]float64, []float64, error) {
	if p.fwdIn == nil {
		return nil, nil, nil
	}
	v := <-p.fwdIn
	return v[0], v[1], nil
}

func (p *pipe) SendForward(ctx context.Context, l int, s, h []float64) error {
	if p.fwdOut != nil {
		p.fwdOut <- [2][]float64{s, h}
	}
	return nil
}

func (p *pipe) RecvBackward(ctx context.Context, l int) ([]float64, []float64, error) {
	if p.bwdIn == nil {
		return nil, nil, nil
	}
	v := <-p.bwdIn
	return v[0], v[1], nil
}

func (p *pipe) SendBackward(ctx context.Context, l int, s, h []float64) error {
	if p.bwdOut != nil {
		p.bwdOut <- [2][]float64{s, h}
	}
	return nil
}

func TestSequenceSplitEqualsUnsplit(t *testing.T) {
	cfg := tinyConfig()
	const bt, l = 2, 16
	ctx := context.Background()
	for _, cut := range []int{8, 5} { // on and off a chunk boundary (Q = 4)
		t.Run(fmt.Sprint("cut", cut), func(t *testing.T) {
			full := randomBatch(cfg, bt, l, 8)
			whole := noisyModel[float64](t, cfg, 15)
			rw, err := whole.ForwardBackward(ctx, full, model.StepOptions{})
			if err != nil {
				t.Fatal(err)
			}
			shard := func(lo, hi int) *model.Batch {
				s := &model.Batch{Batch: bt, SeqLen: hi - lo}
				for b := 0; b < bt; b++ {
					s.Inputs = append(s.Inputs, full.Inputs[b*l+lo:b*l+hi]...)
					s.Targets = append(s.Targets, full.Targets[b*l+lo:b*l+hi]...)
				}
				return s
			}
			fwd, bwd := make(chan [2][]float64, 1), make(chan [2][]float64, 1)
			p0 := &pipe{fwdOut: fwd, bwdIn: bwd}
			p1 := &pipe{fwdIn: fwd, bwdOut: bwd}
			m0, m1 := noisyModel[float64](t, cfg, 15), noisyModel[float64](t, cfg, 15)
			count := full.Counted()
			errc := make(chan error, 1)
			var r1 model.StepResult
			go func() {
				var err error
				r1, err = m1.ForwardBackward(ctx, shard(cut, l), model.StepOptions{Count: count, Boundary: p1})
				errc <- err
			}()
			r0, err := m0.ForwardBackward(ctx, shard(0, cut), model.StepOptions{Count: count, Boundary: p0})
			if err != nil {
				t.Fatal(err)
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if got := (r0.LossSum + r1.LossSum) / float64(count); math.Abs(got-rw.Loss) > 1e-13 {
				t.Errorf("split loss %v != unsplit %v", got, rw.Loss)
			}
			sum := make([]float64, len(whole.Grads()))
			for i := range sum {
				sum[i] = m0.Grads()[i] + m1.Grads()[i]
			}
			if e := maxRelErr(sum, whole.Grads()); e > 1e-12 {
				t.Errorf("summed shard gradients differ from unsplit: %g", e)
			}
		})
	}
}

func TestRejectsBadBatches(t *testing.T) {
	cfg := tinyConfig()
	m, err := New[float32](cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for name, b := range map[string]*model.Batch{
		"token out of vocabulary": {Batch: 1, SeqLen: 2, Inputs: []int32{1, 32}, Targets: []int32{1, 1}},
		"wrong length":            {Batch: 2, SeqLen: 2, Inputs: []int32{1, 2, 3}, Targets: []int32{1, 1, 1}},
		"no targets":              {Batch: 1, SeqLen: 2, Inputs: []int32{1, 2}},
	} {
		if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
