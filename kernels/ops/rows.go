package ops

import (
	"github.com/m2train/m2train/kernels"
)

// CopyRowsArgs are the buffers of a row copy by index (m2k_copy_rows): N
// int32 indices Idx, rows of Width activation values with row strides LDDst
// and LDSrc (each at least Width); Rows is the row count of the indexed
// matrix (Src for a gather, Dst for a scatter).
type CopyRowsArgs struct {
	Dst      *kernels.Buffer
	LDDst    int
	Src      *kernels.Buffer
	LDSrc    int
	Idx      *kernels.Buffer
	N, Width int
	Rows     int
}

// HasRowCopies reports whether the library has the row copies
// (GatherRows, ScatterRows); one built before them lacks them, and the
// caller then keeps to dense operations.
func (o *Ops) HasRowCopies() bool { return o.f.copyRows != nil }

// GatherRows writes Dst[i, :] = Src[Idx[i], :] for i < N on stream s (a row
// of NaN for an index outside [0, Rows)).
func (o *Ops) GatherRows(dt kernels.DType, a *CopyRowsArgs, s kernels.Stream) error {
	return o.copyRows("GatherRows", dt, a, false, s)
}

// ScatterRows writes Dst[Idx[i], :] = Src[i, :] for i < N on stream s; the
// indices must be distinct, other rows of Dst keep their values and an
// index outside [0, Rows) copies nothing.
func (o *Ops) ScatterRows(dt kernels.DType, a *CopyRowsArgs, s kernels.Stream) error {
	return o.copyRows("ScatterRows", dt, a, true, s)
}

func (o *Ops) copyRows(method string, dt kernels.DType, a *CopyRowsArgs, scatter bool, s kernels.Stream) error {
	c := newChecker(method)
	c.dtype(dt)
	if a == nil {
		c.failf("args is nil")
		return c.err
	}
	if o.f.copyRows == nil {
		c.failf("the library lacks m2k_copy_rows (built before it); rebuild it")
		return c.err
	}
	c.rule(a.N >= 0, "N = %d: must be >= 0", a.N)
	c.positive("Width", a.Width)
	c.positive("Rows", a.Rows)
	c.rule(a.LDDst >= a.Width, "LDDst = %d: must be at least Width = %d", a.LDDst, a.Width)
	c.rule(a.LDSrc >= a.Width, "LDSrc = %d: must be at least Width = %d", a.LDSrc, a.Width)
	dstRows, srcRows := a.N, a.Rows
	if scatter {
		dstRows, srcRows = a.Rows, a.N
	}
	pDst := c.buf("Dst", a.Dst, dt, strided(dstRows, a.Width, a.LDDst, 0))
	pSrc := c.buf("Src", a.Src, dt, strided(srcRows, a.Width, a.LDSrc, 0))
	pIdx := c.int32s("Idx", a.Idx, a.N)
	if c.err != nil {
		return c.err
	}
	if a.N == 0 {
		return nil
	}
	return o.call("m2k_copy_rows", func() int32 {
		return o.f.copyRows(int32(dt), pDst, int64(a.LDDst), pSrc, int64(a.LDSrc), pIdx, int64(a.N), int64(a.Width),
			int64(a.Rows), b2i(scatter), uintptr(s))
	})
}
