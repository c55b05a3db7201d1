//go:build gpu

package gpu

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"testing"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/model/safetensors"
)

// cpuPass runs the float64 CPU reference on params (float32 values) and
// returns its result and gradients.
func cpuPass(t *testing.T, cfg model.Config, params []float32, b *model.Batch, o model.StepOptions) (model.StepResult, []float64) {
	t.Helper()
	m, err := ref.New[float64](cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range params {
		m.Params()[i] = float64(v)
	}
	r, err := m.ForwardBackward(context.Background(), b, o)
	if err != nil {
		t.Fatal(err)
	}
	return r, m.Grads()
}

// oracleBatch returns the oracle's input ids with the causal-LM targets of
// model/testdata/oracle/README.md.
func oracleBatch(t *testing.T, exp *safetensors.File) *model.Batch {
	t.Helper()
	ids, ok := exp.Get("input_ids")
	if !ok {
		t.Fatal("expected.safetensors has no input_ids")
	}
	vals, err := ids.Int64s()
	if err != nil {
		t.Fatal(err)
	}
	bt, l := ids.Shape[0], ids.Shape[1]
	b := &model.Batch{Batch: bt, SeqLen: l, Inputs: make([]int32, bt*l), Targets: make([]int32, bt*l)}
	for i, v := range vals {
		b.Inputs[i] = int32(v)
		b.Targets[i] = -1
		if i%l != l-1 {
			b.Targets[i] = int32(vals[i+1])
		}
	}
	return b
}

func TestOracle(t *testing.T) {
	dir := findUp(t, filepath.Join("model", "testdata", "oracle", "tiny-mamba2"))
	cfg, _, err := hf.ReadConfigFile(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	params, err := hf.LoadParams[float32](dir, cfg, model.NewLayout(cfg))
	if err != nil {
		t.Fatal(err)
	}
	exp, err := safetensors.ReadFile(filepath.Join(dir, "expected.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	b := oracleBatch(t, exp)
	keep := model.StepOptions{KeepLogits: true, KeepHidden: true}
	want, wantGrads := cpuPass(t, cfg, params, b, keep)
	for _, p := range precisions {
		t.Run(p.String(), func(t *testing.T) {
			m := newGPU(t, cfg, p, params)
			got, err := m.ForwardBackward(context.Background(), b, keep)
			if err != nil {
				t.Fatal(err)
			}
			comparePass(t, "oracle", p, m.Layout(), got, want, gradsOf(t, m), wantGrads)
			if p != F32 {
				return
			}
			// The oracle's own numbers (transformers in float64), at the
			// tolerance its README sets for an fp32 path.
			for _, name := range []string{"logits", "loss"} {
				tn, ok := exp.Get(name)
				if !ok {
					t.Fatalf("expected.safetensors has no %s", name)
				}
				w, err := tn.Float64s()
				if err != nil {
					t.Fatal(err)
				}
				g := got.Logits
				if name == "loss" {
					g = []float64{got.Loss}
				}
				compareTensor(t, "oracle-file/"+name, p, g, w, 1e-4, 0, false)
			}
		})
	}
}

// configVariants are the model configurations the kernels must all get
// right: the options of model.Config that change the pass.
func configVariants() map[string]func(*model.Config) {
	return map[string]func(*model.Config){
		"published":        func(*model.Config) {},
		"one-group":        func(c *model.Config) { c.NGroups = 1 },
		"untied-bias":      func(c *model.Config) { c.TieEmbeddings = false; c.Bias = true },
		"D-per-channel":    func(c *model.Config) { c.DHasHdim = true },
		"norm-before-gate": func(c *model.Config) { c.NormBeforeGate = true },
		"no-gated-norm":    func(c *model.Config) { c.GatedNorm = false; c.ConvBias = false },
		"dt-limit":         func(c *model.Config) { c.DTLimit = [2]float64{0.002, 0.05} },
		"norm-over-all-E":  func(c *model.Config) { c.GatedNormGroups = 1 },
		"conv-width-2":     func(c *model.Config) { c.DConv = 2 },
	}
}

func TestConfigs(t *testing.T) {
	ctx := context.Background()
	keep := model.StepOptions{KeepLogits: true, KeepHidden: true}
	for name, mod := range configVariants() {
		cfg := smallConfig() // G = 2 groups, chunk 4
		mod(&cfg)
		params := noisyParams(t, cfg, 11)
		b := randomBatch(cfg, 2, 10, 3) // L = 10: not a multiple of the chunk
		want, wantGrads := cpuPass(t, cfg, params, b, keep)
		for _, p := range precisions {
			t.Run(name+"/"+p.String(), func(t *testing.T) {
				m := newGPU(t, cfg, p, params)
				got, err := m.ForwardBackward(ctx, b, keep)
				if err != nil {
					t.Fatal(err)
				}
				comparePass(t, "config-"+name, p, m.Layout(), got, want, gradsOf(t, m), wantGrads)
				// The evaluation pass computes the training pass's loss
				// with the same kernels, bit for bit (without kept
				// logits both run the LM head over the counted
				// positions alone).
				tr, err := m.ForwardBackward(ctx, b, model.StepOptions{})
				if err != nil {
					t.Fatal(err)
				}
				ev, err := m.Forward(ctx, b, model.StepOptions{})
				if err != nil {
					t.Fatal(err)
				}
				report(t, "config-"+name+"/forward-only-loss", p, "abs", math.Abs(ev.LossSum-tr.LossSum), 0, false)
			})
		}
	}
	// Longer sequences over several chunks, three rows, Q = 8.
	cfg := smallConfig()
	cfg.ChunkSize = 8
	params := noisyParams(t, cfg, 12)
	b := randomBatch(cfg, 3, 37, 4)
	want, wantGrads := cpuPass(t, cfg, params, b, keep)
	for _, p := range precisions {
		t.Run("long/"+p.String(), func(t *testing.T) {
			m := newGPU(t, cfg, p, params)
			got, err := m.ForwardBackward(ctx, b, keep)
			if err != nil {
				t.Fatal(err)
			}
			comparePass(t, "config-long", p, m.Layout(), got, want, gradsOf(t, m), wantGrads)
		})
	}
}

// TestMicroBatchesAndHeadBlocks accumulates two micro-batches of another
// shape into one gradient (the workspace is reallocated between them), with
// a head block smaller than the batch, and compares with the CPU reference
// doing the same.
func TestMicroBatchesAndHeadBlocks(t *testing.T) {
	cfg := smallConfig()
	params := noisyParams(t, cfg, 13)
	b1, b2 := randomBatch(cfg, 2, 10, 5), randomBatch(cfg, 1, 13, 6)
	count := b1.Counted() + b2.Counted()
	wantSum, wantGrads := refStep(t, cfg, params, count, b1, b2)
	for _, p := range precisions {
		t.Run(p.String(), func(t *testing.T) {
			m := newGPUWith(t, cfg, Options{Precision: p, ExplicitSync: true, HeadBlock: 7}, params)
			sum := accumulate(t, m, count, b1, b2)
			tol := tolFor(p)
			compareLoss(t, "microbatches/loss", p, sum/float64(count), wantSum/float64(count), tol.loss)
			g := widen(gradsOf(t, m))
			e := measure(g, wantGrads)
			if p == F32 {
				report(t, "microbatches/grad.all", p, "max_rel", e.maxRel, tol.grad, e.nonFinite)
			} else {
				report(t, "microbatches/grad.all", p, "rel_l2", e.relL2, tol.gradAll, e.nonFinite)
			}
		})
	}
}

// TestRecomputeSSD checks that keeping the scan's forward workspace per
// layer for the backward (the default) and recomputing it
// (Options.RecomputeSSD) give the same loss and gradients bit for bit, over
// micro-batches of two shapes (so the kept workspaces are reallocated
// between them).
func TestRecomputeSSD(t *testing.T) {
	cfg := smallConfig()
	params := noisyParams(t, cfg, 17)
	b1, b2 := randomBatch(cfg, 2, 10, 21), randomBatch(cfg, 1, 13, 22)
	count := b1.Counted() + b2.Counted()
	for _, p := range precisions {
		t.Run(p.String(), func(t *testing.T) {
			run := func(recompute bool) (float64, []float32) {
				m := newGPUWith(t, cfg, Options{Precision: p, ExplicitSync: true, RecomputeSSD: recompute}, params)
				return accumulate(t, m, count, b1, b2), gradsOf(t, m)
			}
			keptSum, kept := run(false)
			recSum, rec := run(true)
			if math.Float64bits(keptSum) != math.Float64bits(recSum) {
				t.Fatalf("loss sum: kept %v, recomputed %v", keptSum, recSum)
			}
			for i := range kept {
				if math.Float32bits(kept[i]) != math.Float32bits(rec[i]) {
					t.Fatalf("gradient %d: kept %v, recomputed %v", i, kept[i], rec[i])
				}
			}
		})
	}
}

// TestPackedHead runs the LM head over the counted positions alone (the
// default when some targets are negative and no logits are kept) and over
// every position (Options.DenseHead), with a head block smaller than the
// counted positions, on a micro-batch where a quarter of the positions
// count (as in the MQAR task) and one where none does, accumulated into one
// gradient; both are compared with the CPU reference and with each other.
func TestPackedHead(t *testing.T) {
	cfg := smallConfig()
	params := noisyParams(t, cfg, 15)
	b1, b2 := randomBatch(cfg, 3, 12, 8), randomBatch(cfg, 1, 12, 9)
	for i := range b1.Targets {
		if i%4 != 1 {
			b1.Targets[i] = -1
		}
	}
	for i := range b2.Targets {
		b2.Targets[i] = -1
	}
	count := b1.Counted() + b2.Counted()
	wantSum, wantGrads := refStep(t, cfg, params, count, b1, b2)
	for _, p := range precisions {
		t.Run(p.String(), func(t *testing.T) {
			run := func(dense bool) (float64, []float32) {
				m := newGPUWith(t, cfg, Options{Precision: p, ExplicitSync: true, HeadBlock: 5, DenseHead: dense}, params)
				return accumulate(t, m, count, b1, b2), gradsOf(t, m)
			}
			packedSum, packedGrads := run(false)
			denseSum, denseGrads := run(true)
			tol := tolFor(p)
			compareLoss(t, "packed-head/loss", p, packedSum/float64(count), wantSum/float64(count), tol.loss)
			g := widen(packedGrads)
			e := measure(g, wantGrads)
			if p == F32 {
				report(t, "packed-head/grad.all", p, "max_rel", e.maxRel, tol.grad, e.nonFinite)
			} else {
				report(t, "packed-head/grad.all", p, "rel_l2", e.relL2, tol.gradAll, e.nonFinite)
			}
			// Against the dense head the same products run over fewer
			// rows: only the summation order of the head's weight
			// gradient and of the loss differ (and, in bf16, the rounding
			// of the logits where another GEMM kernel is chosen).
			vsLoss, vsGrad := 1e-6, 1e-5
			if p == BF16 {
				vsLoss, vsGrad = 1e-3, 1e-2
			}
			compareLoss(t, "packed-head/vs-dense-loss", p, packedSum, denseSum, vsLoss)
			e = measure(g, widen(denseGrads))
			report(t, "packed-head/vs-dense-grad.all", p, "rel_l2", e.relL2, vsGrad, e.nonFinite)
		})
	}
}

// TestSyncModesAndOptimizer checks that the automatic mode gives the
// explicit mode's gradients, and that the device gradient norm and AdamW
// step equal model.GradNorm, ClipGrads and AdamW.Update on the host.
func TestSyncModesAndOptimizer(t *testing.T) {
	ctx := context.Background()
	cfg := smallConfig()
	cfg.TieEmbeddings, cfg.Bias = false, true
	params := noisyParams(t, cfg, 14)
	b := randomBatch(cfg, 2, 9, 7)

	explicit := newGPU(t, cfg, F32, params)
	explicit.ZeroGrads()
	re, err := explicit.ForwardBackward(ctx, b, model.StepOptions{})
	if err != nil {
		t.Fatal(err)
	}
	gExplicit := gradsOf(t, explicit)

	auto, err := New(gpuLib, cfg, Options{Precision: F32})
	if err != nil {
		t.Fatal(err)
	}
	defer auto.Close()
	if !auto.AutoSync() {
		t.Fatal("a model without ExplicitSync must start in automatic mode")
	}
	copy(auto.Params(), params)
	auto.ZeroGrads()
	ra, err := auto.ForwardBackward(ctx, b, model.StepOptions{})
	if err != nil {
		t.Fatal(err)
	}
	report(t, "sync/auto-loss", F32, "abs", math.Abs(ra.LossSum-re.LossSum), 0, false)
	e := measure(widen(auto.Grads()), widen(gExplicit))
	report(t, "sync/auto-grads", F32, "max_abs", e.maxAbs, 0, e.nonFinite)

	// Gradient norm and one clipped AdamW step against the host optimizer.
	norm, err := explicit.GradNorm()
	if err != nil {
		t.Fatal(err)
	}
	wantNorm := model.GradNorm(gExplicit)
	report(t, "optim/grad-norm", F32, "rel", math.Abs(norm-wantNorm)/wantNorm, 1e-12, math.IsNaN(norm))
	ac := model.DefaultAdamWConfig()
	const lr, maxNorm = 1e-2, 0.5
	hostOpt, err := model.NewAdamW[float32](explicit.Layout(), ac)
	if err != nil {
		t.Fatal(err)
	}
	devOpt, err := model.NewAdamW[float32](explicit.Layout(), ac)
	if err != nil {
		t.Fatal(err)
	}
	hostParams := append([]float32(nil), params...)
	hostGrads := append([]float32(nil), gExplicit...)
	for step := 0; step < 3; step++ {
		model.ClipGrads(hostGrads, maxNorm)
		hostOpt.Update(hostParams, hostGrads, lr)
		hostGrads = append(hostGrads[:0], gExplicit...)
		if err := explicit.OptimizerStep(devOpt, lr, model.ClipScale(norm, maxNorm)); err != nil {
			t.Fatal(err)
		}
	}
	if devOpt.Step != hostOpt.Step {
		t.Errorf("OptimizerStep left Step at %d, host optimizer at %d", devOpt.Step, hostOpt.Step)
	}
	if err := explicit.SyncToHost(model.SyncParams|model.SyncMoments, devOpt); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		got, want []float32
	}{{"params", explicit.Params(), hostParams}, {"m", devOpt.M, hostOpt.M}, {"v", devOpt.V, hostOpt.V}} {
		e := measure(widen(c.got), widen(c.want))
		// The kernel rounds each operation to f32 as the host does: 1 ulp
		// of slack for a fused multiply-add the compiler may form.
		report(t, "optim/"+c.name, F32, "max_rel", e.maxRel, 1e-6, e.nonFinite)
	}

	// The automatic mode's optimizer step sees the host mirrors.
	autoOpt, err := model.NewAdamW[float32](auto.Layout(), ac)
	if err != nil {
		t.Fatal(err)
	}
	if err := auto.OptimizerStep(autoOpt, lr, 1); err != nil {
		t.Fatal(err)
	}
	hp, hg := append([]float32(nil), params...), append([]float32(nil), auto.Grads()...)
	ho, err := model.NewAdamW[float32](auto.Layout(), ac)
	if err != nil {
		t.Fatal(err)
	}
	ho.Update(hp, hg, lr)
	e = measure(widen(auto.Params()), widen(hp))
	report(t, "optim/auto-params", F32, "max_rel", e.maxRel, 1e-6, e.nonFinite)

	// Switching modes keeps the state: explicit → auto downloads.
	if err := explicit.SetAutoSync(true); err != nil {
		t.Fatal(err)
	}
	e = measure(widen(explicit.Params()), widen(hostParams))
	report(t, "sync/switch-params", F32, "max_rel", e.maxRel, 1e-6, e.nonFinite)
	if err := explicit.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := explicit.Forward(ctx, b, model.StepOptions{}); err == nil {
		t.Error("Forward after Close succeeded")
	}
	fmt.Println("device:", auto.Device())
}

// refStep runs the float64 CPU reference with params over batches, each a
// micro-batch of one step that counts count targets, and returns the loss
// sum and the accumulated gradients.
func refStep(t *testing.T, cfg model.Config, params []float32, count int, batches ...*model.Batch) (float64, []float64) {
	t.Helper()
	cpu, err := ref.New[float64](cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range params {
		cpu.Params()[i] = float64(v)
	}
	var sum float64
	for _, b := range batches {
		r, err := cpu.ForwardBackward(context.Background(), b, model.StepOptions{Count: count})
		if err != nil {
			t.Fatal(err)
		}
		sum += r.LossSum
	}
	return sum, cpu.Grads()
}
