package ops

import (
	"fmt"
	"sync"

	"github.com/m2train/m2train/kernels"
)

// Gemm is a cuBLASLt context for matrix products: a handle, a 32 MiB device
// workspace and a cache of plans per distinct call shape. The workspace is
// shared by its calls, so use one Gemm per stream.
type Gemm struct {
	o      *Ops
	mu     sync.Mutex
	handle uintptr
}

// NewGemm creates a GEMM context; Close releases it.
func (o *Ops) NewGemm() (*Gemm, error) {
	var h uintptr
	if err := o.call("m2k_gemm_create", func() int32 { return o.f.gemmCreate(&h) }); err != nil {
		return nil, err
	}
	return &Gemm{o: o, handle: h}, nil
}

// Close waits for the device and releases the context; a second Close is a
// no-op.
func (g *Gemm) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.handle == 0 {
		return nil
	}
	h := g.handle
	g.handle = 0
	return g.o.call("m2k_gemm_destroy", func() int32 { return g.o.f.gemmDestroy(h) })
}

// GemmArgs describe C = Alpha·op(A)·op(B) + Beta·C with row-major
// matrices, the convention of model/linalg.Gemm: op(A) is M×K, op(B) is K×N,
// C is M×N; A is stored M×K (K×M when TransA) with row stride LDA, B is
// stored K×N (N×K when TransB) with row stride LDB, C has row stride LDC.
//
// In is the dtype of A and B, Out that of C: BF16 inputs accumulate in fp32
// and give BF16 or F32; F32 inputs use true fp32 arithmetic (no TF32) and
// give F32. C is read only when Beta != 0.
type GemmArgs struct {
	In, Out        kernels.DType
	TransA, TransB bool
	M, N, K        int
	Alpha, Beta    float32
	A, B, C        *kernels.Buffer
	LDA, LDB, LDC  int
}

// Run launches the product on stream s.
func (g *Gemm) Run(a *GemmArgs, s kernels.Stream) error {
	c := newChecker("Gemm")
	if a == nil {
		c.failf("args is nil")
		return c.err
	}
	c.rule(a.In == kernels.F32 || a.In == kernels.BF16, "In = %v: must be F32 or BF16", a.In)
	c.rule(a.Out == kernels.F32 || a.Out == kernels.BF16, "Out = %v: must be F32 or BF16", a.Out)
	c.rule(!(a.In == kernels.F32 && a.Out == kernels.BF16), "Out = BF16 with In = F32: f32 inputs give an F32 output")
	c.positive("M", a.M)
	c.positive("N", a.N)
	c.positive("K", a.K)
	if c.err != nil {
		return c.err
	}
	aRows, aCols := a.M, a.K
	if a.TransA {
		aRows, aCols = a.K, a.M
	}
	bRows, bCols := a.K, a.N
	if a.TransB {
		bRows, bCols = a.N, a.K
	}
	c.rule(a.LDA >= aCols, "LDA = %d: must be at least %d, the stored row width of A", a.LDA, aCols)
	c.rule(a.LDB >= bCols, "LDB = %d: must be at least %d, the stored row width of B", a.LDB, bCols)
	c.rule(a.LDC >= a.N, "LDC = %d: must be at least N = %d", a.LDC, a.N)
	pA := c.buf("A", a.A, a.In, strided(aRows, aCols, a.LDA, 0))
	pB := c.buf("B", a.B, a.In, strided(bRows, bCols, a.LDB, 0))
	pC := c.buf("C", a.C, a.Out, strided(a.M, a.N, a.LDC, 0))
	if c.err != nil {
		return c.err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.handle == 0 {
		return fmt.Errorf("ops: Gemm.Run: %w", kernels.ErrClosed)
	}
	h := g.handle
	return g.o.call("m2k_gemm", func() int32 {
		return g.o.f.gemm(h, int32(a.In), int32(a.Out), b2i(a.TransA), b2i(a.TransB), int64(a.M), int64(a.N), int64(a.K),
			a.Alpha, pA, int64(a.LDA), pB, int64(a.LDB), a.Beta, pC, int64(a.LDC), uintptr(s))
	})
}
