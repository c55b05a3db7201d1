//go:build gpu

package gpu

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/m2train/m2train/model"
)

// TestSequenceParallel runs a batch as two sequence shards connected by a
// Boundary (states and halos through the host, as []float64) on two models
// and checks that the loss and the summed gradients equal those of one
// unsplit pass, with the cut on and off a chunk boundary and with a halo
// longer than the conv's own (W = 4, so the halo spans 3 rows).
//
// Tolerances: in f32 the two computations differ in summation order and in
// where the chunked scan starts its chunks (the cut off a boundary), so the
// f32 path's own 1e-4 (1e-5 for the loss). In bf16 they differ also in
// where activations are rounded inside the scan (the per-chunk states in
// bf16 start over at the cut), so the bf16 path's tolerances against the
// float64 reference apply.
func TestSequenceParallel(t *testing.T) {
	cfg := smallConfig() // Q = 4, W = 4
	const bt, l = 2, 16
	params := noisyParams(t, cfg, 15)
	full := randomBatch(cfg, bt, l, 8)
	count := full.Counted()
	shard := func(lo, hi int) *model.Batch {
		s := &model.Batch{Batch: bt, SeqLen: hi - lo}
		for b := 0; b < bt; b++ {
			s.Inputs = append(s.Inputs, full.Inputs[b*l+lo:b*l+hi]...)
			s.Targets = append(s.Targets, full.Targets[b*l+lo:b*l+hi]...)
		}
		return s
	}
	for _, p := range precisions {
		for _, cut := range []int{8, 5} {
			t.Run(fmt.Sprintf("%s/cut%d", p, cut), func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
				defer cancel()
				whole := newGPU(t, cfg, p, params)
				rw, err := whole.ForwardBackward(ctx, full, model.StepOptions{})
				if err != nil {
					t.Fatal(err)
				}
				gw := gradsOf(t, whole)

				fwd, bwd := make(chan [2][]float64, 1), make(chan [2][]float64, 1)
				p0 := &pipe{fwdOut: fwd, bwdIn: bwd}
				p1 := &pipe{fwdIn: fwd, bwdOut: bwd}
				m0, m1 := newGPU(t, cfg, p, params), newGPU(t, cfg, p, params)
				errc := make(chan error, 1)
				var r1 model.StepResult
				go func() {
					var err error
					r1, err = m1.ForwardBackward(ctx, shard(cut, l), model.StepOptions{Count: count, Boundary: p1})
					if err != nil {
						cancel() // unblock the other shard
					}
					errc <- err
				}()
				r0, err0 := m0.ForwardBackward(ctx, shard(0, cut), model.StepOptions{Count: count, Boundary: p0})
				if err0 != nil {
					cancel()
				}
				err1 := <-errc
				if err0 != nil || err1 != nil {
					t.Fatalf("shard 0: %v; shard 1: %v", err0, err1)
				}
				name := fmt.Sprintf("sp-cut%d", cut)
				tol := tolFor(p)
				compareLoss(t, name+"/loss", p, (r0.LossSum+r1.LossSum)/float64(count), rw.Loss, tol.loss)
				g0, g1 := gradsOf(t, m0), gradsOf(t, m1)
				sum := make([]float32, len(g0))
				for i := range sum {
					sum[i] = g0[i] + g1[i]
				}
				useL2 := p == BF16
				layout := whole.Layout()
				gs, want := widen(sum), widen(gw)
				for _, tn := range layout.Tensors {
					compareTensor(t, name+"/grad."+tn.Name, p, model.View(gs, &tn), model.View(want, &tn), tol.grad, tol.grad, useL2)
				}
				e := measure(gs, want)
				report(t, name+"/grad.all", p, "rel_l2", e.relL2, tol.gradAll, e.nonFinite)
			})
		}
	}
}
