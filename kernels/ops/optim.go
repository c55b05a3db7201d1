package ops

import (
	"fmt"
	"math"

	"github.com/m2train/m2train/kernels"
)

// Range is the element range [Start, End) of a flat buffer.
type Range struct{ Start, End int }

// PackRanges checks that ranges are non-empty, ascending and disjoint and
// returns them flattened as start0, end0, start1, end1, …, adjacent ranges
// merged: the form AdamWArgs.NoDecay holds on the device (see UploadInt64).
// With model.Layout, the ranges are the Offset and Offset+Size of the
// tensors marked NoDecay.
func PackRanges(ranges []Range) ([]int64, error) {
	var out []int64
	prev := 0
	for i, r := range ranges {
		if r.Start < prev || r.End <= r.Start {
			return nil, fmt.Errorf("%w: ops.PackRanges: range %d = [%d, %d) must be non-empty and start at or after %d",
				kernels.ErrInvalidArg, i, r.Start, r.End, prev)
		}
		prev = r.End
		if n := len(out); n > 0 && out[n-1] == int64(r.Start) {
			out[n-1] = int64(r.End)
			continue
		}
		out = append(out, int64(r.Start), int64(r.End))
	}
	return out, nil
}

// AdamWArgs are the buffers and hyperparameters of one AdamW step over N
// F32 elements, with model.AdamW's formulation (PyTorch's):
//
//	g = Grads·GradScale; M = β1·M + (1−β1)·g; V = β2·V + (1−β2)·g²
//	Params = Params·(1 − LR·WeightDecay) − LR/(1−β1^Step) · M / (√V/√(1−β2^Step) + Eps)
//
// Step counts the updates including this one. Elements inside the NoDecay
// ranges (NRanges [start, end) pairs of int64 from PackRanges, uploaded
// with UploadInt64) take no weight decay. GradScale is the clipping
// coefficient, 1 for none. The result matches model.AdamW bit for bit.
type AdamWArgs struct {
	Params, Grads, M, V *kernels.Buffer
	N                   int
	NoDecay             *kernels.Buffer
	NRanges             int
	LR                  float64
	Beta1, Beta2        float64
	Eps, WeightDecay    float64
	Step                int64
	GradScale           float32
}

// AdamW applies one optimizer step on stream s.
func (o *Ops) AdamW(a *AdamWArgs, s kernels.Stream) error {
	c := newChecker("AdamW")
	if a == nil {
		c.failf("args is nil")
		return c.err
	}
	c.positive("N", a.N)
	pP := c.buf("Params", a.Params, kernels.F32, a.N)
	pG := c.buf("Grads", a.Grads, kernels.F32, a.N)
	pM := c.buf("M", a.M, kernels.F32, a.N)
	pV := c.buf("V", a.V, kernels.F32, a.N)
	c.rule(a.NRanges >= 0, "NRanges = %d: must be >= 0", a.NRanges)
	var pR uintptr
	if a.NRanges > 0 {
		pR = c.buf("NoDecay", a.NoDecay, kernels.F32, 4*a.NRanges)
	}
	c.rule(a.Beta1 >= 0 && a.Beta1 < 1, "Beta1 = %g: must be in [0, 1)", a.Beta1)
	c.rule(a.Beta2 >= 0 && a.Beta2 < 1, "Beta2 = %g: must be in [0, 1)", a.Beta2)
	c.rule(a.Eps > 0, "Eps = %g: must be positive", a.Eps)
	c.rule(a.WeightDecay >= 0, "WeightDecay = %g: must be >= 0", a.WeightDecay)
	c.rule(a.LR >= 0 && !math.IsInf(a.LR, 0), "LR = %g: must be finite and >= 0", a.LR)
	c.rule(a.Step >= 1, "Step = %d: must be >= 1 (updates including this one)", a.Step)
	c.rule(a.GradScale >= 0 && !math.IsInf(float64(a.GradScale), 0), "GradScale = %g: must be finite and >= 0", a.GradScale)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_adamw", func() int32 {
		return o.f.adamw(pP, pG, pM, pV, int64(a.N), pR, int64(a.NRanges), a.LR, a.Beta1, a.Beta2, a.Eps, a.WeightDecay,
			a.Step, a.GradScale, uintptr(s))
	})
}

// GradNormWorkspace returns the workspace bytes GradNorm needs for n
// gradients.
func (o *Ops) GradNormWorkspace(n int) (int64, error) {
	c := newChecker("GradNormWorkspace")
	c.positive("n", n)
	if c.err != nil {
		return 0, c.err
	}
	return o.workspaceBytes("m2k_grad_norm_workspace", func(b *int64) int32 { return o.f.gradNormWS(int64(n), b) })
}

// GradNorm writes the L2 norm of the n F32 values of grads into out (one
// float64, from AllocFloat64), summing squares in float64 in a fixed order
// (blocks of 2^14 elements as model.GradNorm, then a fixed tree).
func (o *Ops) GradNorm(grads, out, workspace *kernels.Buffer, n int, s kernels.Stream) error {
	need, err := o.GradNormWorkspace(n)
	if err != nil {
		return err
	}
	c := newChecker("GradNorm")
	pG := c.buf("grads", grads, kernels.F32, n)
	pOut := c.buf("out", out, kernels.F32, 2)
	pWS, wsBytes := c.workspace("workspace", workspace, need)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_grad_norm", func() int32 {
		return o.f.gradNorm(pG, int64(n), pOut, pWS, wsBytes, uintptr(s))
	})
}
