//go:build gpu

package gpu

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
)

// markov is a first-order Markov source over the vocabulary: every token
// has four successors with probabilities 0.55, 0.25, 0.15 and 0.05 (entropy
// rate 1.11 nats, against ln V for a uniform guess), so a small model's loss
// falls fast and far within a few hundred steps.
type markov struct {
	vocab int
	succ  [][4]int32
}

func newMarkov(vocab int, seed uint64) *markov {
	rng := rand.New(rand.NewPCG(seed, 1))
	m := &markov{vocab: vocab, succ: make([][4]int32, vocab)}
	for i := range m.succ {
		for k := range m.succ[i] {
			m.succ[i][k] = int32(rng.IntN(vocab))
		}
	}
	return m
}

// batch returns step's batch: bt sequences of l tokens, each position
// predicting the next token of the chain.
func (m *markov) batch(step, bt, l int) *model.Batch {
	rng := rand.New(rand.NewPCG(uint64(step), 2))
	b := &model.Batch{Batch: bt, SeqLen: l, Inputs: make([]int32, bt*l), Targets: make([]int32, bt*l)}
	for r := 0; r < bt; r++ {
		tok := int32(rng.IntN(m.vocab))
		for t := 0; t < l; t++ {
			u := rng.Float64()
			k := 3
			switch {
			case u < 0.55:
				k = 0
			case u < 0.80:
				k = 1
			case u < 0.95:
				k = 2
			}
			next := m.succ[tok][k]
			b.Inputs[r*l+t], b.Targets[r*l+t] = tok, next
			tok = next
		}
	}
	return b
}

// smooth returns the trailing mean of x over window steps.
func smooth(x []float64, window int) []float64 {
	out := make([]float64, len(x))
	var s float64
	for i, v := range x {
		s += v
		if i >= window {
			s -= x[i-window]
		}
		out[i] = s / float64(min(i+1, window))
	}
	return out
}

// TestTrainingTracksCPU trains a small model for 200 steps on the CPU
// (model/ref in float32, ClipGrads and AdamW.Update on the host) and on the
// GPU (the DeviceBackend path: device gradient norm, ClipScale and
// OptimizerStep), from the same initialisation on the same batches, and
// checks that the GPU's loss curve tracks the CPU's.
//
// Measure: the relative difference of the two curves after a trailing mean
// over 10 steps, at every step. Tolerances:
//
//   - F32 ≤ 1e-3. Both sides compute the same function in f32 and differ
//     only in summation order (1e-6 relative per gradient); AdamW divides
//     each gradient by its running RMS, which turns those differences into
//     parameter differences of a small fraction of lr per step, and only
//     in the coordinates whose gradient is itself near zero, which barely
//     move the loss; 1e-3 leaves a wide margin for that drift over 200
//     steps while still failing on any wrong update (a step with the wrong
//     clipping, decay or bias correction moves the loss by much more).
//   - BF16 ≤ 2e-2. The bf16 forward alone moves the loss by a few 2^-9
//     (≈ 0.5%) at every step, and the rounded product operands make the
//     trajectory drift from the f32 one; the fp32 master weights and
//     moments keep that drift small. The trailing mean averages the
//     per-step rounding noise; 2e-2 (four times the per-step effect) allows
//     for the drift while catching a broken update, which stalls or
//     diverges the curve by tens of percent.
//
// The first step's loss (identical weights) is also checked at the pass
// tolerances, and both curves must fall below 0.6 of their start, so that
// the comparison is made on a curve that trains.
func TestTrainingTracksCPU(t *testing.T) {
	if testing.Short() {
		t.Skip("200 training steps on the CPU and the GPU; skipped with -test.short (the sanitizer runs)")
	}
	ctx := context.Background()
	cfg := model.DefaultConfig(64, 2, 128)
	cfg.DState, cfg.HeadDim, cfg.ChunkSize = 16, 16, 16
	cfg.NHeads = cfg.DInner() / cfg.HeadDim
	const bt, l, steps, window, clip = 4, 50, 200, 10, 1.0
	layout := model.NewLayout(cfg)
	init := make([]float32, layout.Total)
	if err := model.Init(cfg, layout, init, 21); err != nil {
		t.Fatal(err)
	}
	sched := model.Schedule{PeakLR: 3e-3, MinLR: 3e-4, WarmupSteps: 20, TotalSteps: steps}
	ac := model.DefaultAdamWConfig()
	src := newMarkov(cfg.VocabSize, 5)

	cpu, err := ref.New[float32](cfg)
	if err != nil {
		t.Fatal(err)
	}
	copy(cpu.Params(), init)
	cpuOpt, err := model.NewAdamW[float32](layout, ac)
	if err != nil {
		t.Fatal(err)
	}
	cpuLoss := make([]float64, steps)
	for s := range steps {
		cpu.ZeroGrads()
		r, err := cpu.ForwardBackward(ctx, src.batch(s, bt, l), model.StepOptions{})
		if err != nil {
			t.Fatal(err)
		}
		model.ClipGrads(cpu.Grads(), clip)
		cpuOpt.Update(cpu.Params(), cpu.Grads(), sched.LR(s))
		cpuLoss[s] = r.Loss
	}

	for _, p := range precisions {
		t.Run(p.String(), func(t *testing.T) {
			m := newGPU(t, cfg, p, init)
			opt, err := model.NewAdamW[float32](m.Layout(), ac)
			if err != nil {
				t.Fatal(err)
			}
			loss := make([]float64, steps)
			for s := range steps {
				m.ZeroGrads()
				r, err := m.ForwardBackward(ctx, src.batch(s, bt, l), model.StepOptions{})
				if err != nil {
					t.Fatal(err)
				}
				norm, err := m.GradNorm()
				if err != nil {
					t.Fatal(err)
				}
				if math.IsNaN(norm) || math.IsInf(norm, 0) {
					t.Fatalf("step %d: gradient norm %v", s, norm)
				}
				if err := m.OptimizerStep(opt, sched.LR(s), model.ClipScale(norm, clip)); err != nil {
					t.Fatal(err)
				}
				loss[s] = r.Loss
			}
			compareLoss(t, "train/first-step-loss", p, loss[0], cpuLoss[0], tolFor(p).loss)
			sg, sc := smooth(loss, window), smooth(cpuLoss, window)
			var worst, raw float64
			worstAt := 0
			for s := range steps {
				if d := math.Abs(sg[s]-sc[s]) / sc[s]; d > worst || math.IsNaN(d) {
					worst, worstAt = d, s
				}
				raw = math.Max(raw, math.Abs(loss[s]-cpuLoss[s])/cpuLoss[s])
			}
			tol := 1e-3
			if p == BF16 {
				tol = 2e-2
			}
			fmt.Printf("train %s: loss %.4f -> %.4f (cpu %.4f -> %.4f); worst smoothed difference at step %d; largest raw %.3g\n",
				p, sg[window-1], sg[steps-1], sc[window-1], sc[steps-1], worstAt, raw)
			report(t, "train/loss-curve", p, "smoothed_rel", worst, tol, math.IsNaN(worst))
			for _, c := range []struct {
				name  string
				curve []float64
			}{{"gpu", sg}, {"cpu", sc}} {
				if !(c.curve[steps-1] < 0.6*c.curve[window-1]) {
					t.Errorf("%s loss went from %.4f to %.4f: the model does not train, so the comparison proves little",
						c.name, c.curve[window-1], c.curve[steps-1])
				}
			}
		})
	}
}
