package ops

import (
	"github.com/m2train/m2train/kernels"
)

// CrossEntropyArgs are the buffers of the cross-entropy of N rows of logits
// (activation dtype, row stride LD ≥ Vocab) against Targets (N int32):
//
//	RowLoss (F32, N)  = logsumexp(row) − row[target], 0 for a negative target
//	LossSum (optional, one float64 from AllocFloat64) += Σ RowLoss, in a fixed order
//
// With ComputeGrad the logits are overwritten by (softmax − onehot)·GradScale
// (GradScale = 1/count for the mean loss; a row with a negative target
// becomes zero). A target ≥ Vocab gives a NaN loss.
type CrossEntropyArgs struct {
	Logits      *kernels.Buffer
	LD          int
	Targets     *kernels.Buffer
	N, Vocab    int
	GradScale   float32
	ComputeGrad bool
	RowLoss     *kernels.Buffer
	LossSum     *kernels.Buffer
}

// CrossEntropy runs the cross-entropy (and its gradient in place) over one
// block of rows.
func (o *Ops) CrossEntropy(dt kernels.DType, a *CrossEntropyArgs, s kernels.Stream) error {
	c := newChecker("CrossEntropy")
	c.dtype(dt)
	if a == nil {
		c.failf("args is nil")
		return c.err
	}
	c.positive("N", a.N)
	c.positive("Vocab", a.Vocab)
	c.rule(a.LD >= a.Vocab, "LD = %d: must be at least Vocab = %d", a.LD, a.Vocab)
	pLogits := c.buf("Logits", a.Logits, dt, strided(a.N, a.Vocab, a.LD, 0))
	pTargets := c.int32s("Targets", a.Targets, a.N)
	pRow := c.buf("RowLoss", a.RowLoss, kernels.F32, a.N)
	pSum := c.opt("LossSum", a.LossSum, kernels.F32, 2)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_cross_entropy", func() int32 {
		return o.f.crossEntropy(int32(dt), pLogits, int64(a.LD), pTargets, int64(a.N), int64(a.Vocab), a.GradScale,
			b2i(a.ComputeGrad), pRow, pSum, uintptr(s))
	})
}

// LMHeadArgs are the buffers of the LM head and its cross-entropy over N
// rows, fused per Block rows so that only Block×Vocab logits exist at a
// time (model/ref's lmHeadLoss does the same per 128 rows):
//
//	Hidden  (activation dtype, N×D)    the final norm output
//	Head    (activation dtype, Vocab×D) the head matrix (the embedding when tied)
//	Targets (N int32)                   negative: not counted
//	Logits  (activation dtype, ≥ Block×Vocab) scratch
//	RowLoss (F32, N), LossSum (optional float64) as in CrossEntropyArgs
//	DHidden (activation dtype, N×D, optional) overwritten with the gradient
//	        of LossSum/Count with respect to Hidden
//	DHead   (F32, Vocab×D, with DHidden) += the gradient with respect to Head
//
// Count is the number of counted targets of the whole step (the mean's
// denominator), at least 1 when gradients are asked for.
type LMHeadArgs struct {
	Hidden, Head, Targets *kernels.Buffer
	Logits                *kernels.Buffer
	RowLoss, LossSum      *kernels.Buffer
	DHidden, DHead        *kernels.Buffer
	N, D, Vocab           int
	Block                 int
	Count                 int
}

func view(b *kernels.Buffer, off, n int) *kernels.Buffer {
	return &kernels.Buffer{Ptr: b.Offset(off), Len: n, DType: b.DType}
}

// LMHeadLoss runs, per block of rows, logits = Hidden·Headᵀ, the
// cross-entropy with its gradient in place, and the two products
// DHidden = dlogits·Head and DHead += dlogitsᵀ·Hidden, all on stream s with
// the GEMM context g.
func (o *Ops) LMHeadLoss(g *Gemm, dt kernels.DType, a *LMHeadArgs, s kernels.Stream) error {
	c := newChecker("LMHeadLoss")
	c.dtype(dt)
	if a == nil || g == nil {
		c.failf("args and the Gemm are required")
		return c.err
	}
	c.positive("N", a.N)
	c.positive("D", a.D)
	c.positive("Vocab", a.Vocab)
	c.positive("Block", a.Block)
	grad := a.DHidden != nil
	c.rule(!grad || a.Count >= 1, "Count = %d: must be positive when DHidden is given", a.Count)
	c.rule(grad == (a.DHead != nil), "DHidden and DHead go together")
	c.buf("Hidden", a.Hidden, dt, a.N*a.D)
	c.buf("Head", a.Head, dt, a.Vocab*a.D)
	c.int32s("Targets", a.Targets, a.N)
	c.buf("Logits", a.Logits, dt, min(a.Block, a.N)*a.Vocab)
	c.buf("RowLoss", a.RowLoss, kernels.F32, a.N)
	c.opt("LossSum", a.LossSum, kernels.F32, 2)
	c.opt("DHidden", a.DHidden, dt, a.N*a.D)
	c.opt("DHead", a.DHead, kernels.F32, a.Vocab*a.D)
	if c.err != nil {
		return c.err
	}
	var scale float32
	if grad {
		scale = float32(1 / float64(a.Count))
	}
	for t0 := 0; t0 < a.N; t0 += a.Block {
		nb := min(a.Block, a.N-t0)
		hid := view(a.Hidden, t0*a.D, nb*a.D)
		logits := view(a.Logits, 0, nb*a.Vocab)
		err := g.Run(&GemmArgs{In: dt, Out: dt, TransB: true, M: nb, N: a.Vocab, K: a.D, Alpha: 1,
			A: hid, LDA: a.D, B: a.Head, LDB: a.D, C: logits, LDC: a.Vocab}, s)
		if err != nil {
			return err
		}
		err = o.CrossEntropy(dt, &CrossEntropyArgs{Logits: logits, LD: a.Vocab, Targets: view(a.Targets, t0, nb),
			N: nb, Vocab: a.Vocab, GradScale: scale, ComputeGrad: grad, RowLoss: view(a.RowLoss, t0, nb), LossSum: a.LossSum}, s)
		if err != nil {
			return err
		}
		if !grad {
			continue
		}
		err = g.Run(&GemmArgs{In: dt, Out: dt, M: nb, N: a.D, K: a.Vocab, Alpha: 1,
			A: logits, LDA: a.Vocab, B: a.Head, LDB: a.D, C: view(a.DHidden, t0*a.D, nb*a.D), LDC: a.D}, s)
		if err != nil {
			return err
		}
		err = g.Run(&GemmArgs{In: dt, Out: kernels.F32, TransA: true, M: a.Vocab, N: a.D, K: nb, Alpha: 1, Beta: 1,
			A: logits, LDA: a.Vocab, B: hid, LDB: a.D, C: a.DHead, LDC: a.D}, s)
		if err != nil {
			return err
		}
	}
	return nil
}
