// Package ops binds the ops and gemm sections of m2kernels.h: the
// per-position operations of the Mamba-2 model on the GPU (embedding,
// fused residual add + RMSNorm, causal conv1d + SiLU, gated RMSNorm,
// cross-entropy over the vocabulary, AdamW and the global gradient norm),
// row copies by index (the LM head over the counted positions) and the
// cuBLASLt matrix products. Each operation is the twin of a CPU
// reference in model/ref (or model for the optimizer), against which the GPU
// tests (build tag gpu) compare it.
//
// Like package kernels it uses no cgo: the functions are bound through
// purego when the library is opened (kernels.RegisterSymbols), so the
// package compiles everywhere and only running an operation needs the
// library and a GPU.
//
// Arguments are device buffers (*kernels.Buffer). A sub-range of a larger
// allocation is passed as a Buffer literal with that Ptr, Len and DType.
// Activation tensors hold the dtype given to the call; parameters, their
// gradients, the residual stream and norm statistics are F32. Token ids and
// targets are int32 in buffers of 4-byte elements (see UploadInt32).
// Every call checks shapes, dtypes and lengths in Go and returns an error
// wrapping kernels.ErrInvalidArg that names the argument and the rule before
// anything is launched; launches are asynchronous on the given stream.
//
// Parameter gradients are added into, and reduced without floating-point
// atomics (per-block partials, then a fixed-order pass), so every result is
// bitwise reproducible. Calls that reduce take a workspace buffer whose size
// in bytes the matching *Workspace method returns.
package ops

import (
	"errors"
	"fmt"
	"sync"

	"github.com/m2train/m2train/kernels"
)

// funcs are the bound C functions of the ops and gemm sections.
type funcs struct {
	embFwd       func(dtype int32, out, emb, tokens uintptr, n, d, vocab int64, stream uintptr) int32
	embBwdWS     func(n, vocab int64, bytes *int64) int32
	embBwd       func(dtype int32, demb, dout, tokens uintptr, n, d, vocab int64, ws uintptr, wsBytes int64, stream uintptr) int32
	normFwd      func(dtype int32, out, resOut, rstd, residual, x, bias, w uintptr, n, d int64, eps float32, stream uintptr) int32
	normBwdWS    func(n, d int64, bytes *int64) int32
	normBwd      func(dtype int32, dres, dxOut, dw, dout, res, rstd, w uintptr, n, d int64, accumulate int32, ws uintptr, wsBytes int64, stream uintptr) int32
	addBias      func(dtype int32, x, bias uintptr, n, w, ldx int64, stream uintptr) int32
	colSumWS     func(n, w int64, bytes *int64) int32
	colSum       func(dtype int32, out, x uintptr, n, w, ldx int64, ws uintptr, wsBytes int64, stream uintptr) int32
	convFwd      func(dtype int32, act uintptr, ldAct int64, src uintptr, ld, off int64, halo, weight, bias uintptr, bt, l, cd, width int64, stream uintptr) int32
	convBwdWS    func(bt, l, cd, width int64, bytes *int64) int32
	convBwd      func(dtype int32, dsrc, dw, dbias, dhalo, dact uintptr, ldAct int64, src uintptr, ld, off int64, halo, weight, bias uintptr, bt, l, cd, width int64, ws uintptr, wsBytes int64, stream uintptr) int32
	gatedFwd     func(dtype int32, out, rstd, y, z uintptr, ldz int64, w uintptr, n, e, groups int64, eps float32, beforeGate, enabled int32, stream uintptr) int32
	gatedBwdWS   func(n, e int64, bytes *int64) int32
	gatedBwd     func(dtype int32, dy, dz, dw, dout, rstd, y, z uintptr, ldz int64, w uintptr, n, e, groups int64, beforeGate, enabled int32, ws uintptr, wsBytes int64, stream uintptr) int32
	crossEntropy func(dtype int32, logits uintptr, ld int64, targets uintptr, n, vocab int64, gradScale float32, computeGrad int32, rowLoss, lossSum uintptr, stream uintptr) int32
	adamw        func(params, grads, m, v uintptr, n int64, ranges uintptr, nranges int64, lr, beta1, beta2, eps, wd float64, step int64, gradScale float32, stream uintptr) int32
	gradNormWS   func(n int64, bytes *int64) int32
	gradNorm     func(grads uintptr, n int64, out, ws uintptr, wsBytes int64, stream uintptr) int32
	gemmCreate   func(handle *uintptr) int32
	gemmDestroy  func(handle uintptr) int32
	gemm         func(handle uintptr, dtypeIn, dtypeOut, transA, transB int32, m, n, k int64, alpha float32, a uintptr, lda int64, b uintptr, ldb int64, beta float32, c uintptr, ldc int64, stream uintptr) int32
	// copyRows is nil with a library older than m2k_copy_rows (see
	// HasRowCopies).
	copyRows func(dtype int32, dst uintptr, ldDst int64, src uintptr, ldSrc int64, idx uintptr, n, width, rows int64, scatter int32, stream uintptr) int32
}

var (
	bindMu  sync.Mutex
	bound   funcs
	bindErr = errors.New("ops: no library has been opened")
)

func init() {
	kernels.RegisterSymbols(func(h uintptr) error {
		var f funcs
		err := bindAll(h, &f)
		bindMu.Lock()
		defer bindMu.Unlock()
		if err != nil {
			// A library built without the ops kernels still serves the
			// rest of package kernels; New reports this error.
			bindErr = fmt.Errorf("the library was built without the ops kernels: %w", err)
			return nil
		}
		// Optional symbols: a library built before them still serves
		// everything else, and HasRowCopies says so.
		if kernels.Bind(h, &f.copyRows, "m2k_copy_rows") != nil {
			f.copyRows = nil
		}
		bound, bindErr = f, nil
		return nil
	})
}

func bindAll(h uintptr, f *funcs) error {
	for _, b := range []struct {
		fptr any
		name string
	}{
		{&f.embFwd, "m2k_embedding_fwd"},
		{&f.embBwdWS, "m2k_embedding_bwd_workspace"},
		{&f.embBwd, "m2k_embedding_bwd"},
		{&f.normFwd, "m2k_add_rmsnorm_fwd"},
		{&f.normBwdWS, "m2k_rmsnorm_bwd_workspace"},
		{&f.normBwd, "m2k_rmsnorm_bwd"},
		{&f.addBias, "m2k_add_bias"},
		{&f.colSumWS, "m2k_column_sum_workspace"},
		{&f.colSum, "m2k_column_sum"},
		{&f.convFwd, "m2k_conv_fwd"},
		{&f.convBwdWS, "m2k_conv_bwd_workspace"},
		{&f.convBwd, "m2k_conv_bwd"},
		{&f.gatedFwd, "m2k_gated_norm_fwd"},
		{&f.gatedBwdWS, "m2k_gated_norm_bwd_workspace"},
		{&f.gatedBwd, "m2k_gated_norm_bwd"},
		{&f.crossEntropy, "m2k_cross_entropy"},
		{&f.adamw, "m2k_adamw"},
		{&f.gradNormWS, "m2k_grad_norm_workspace"},
		{&f.gradNorm, "m2k_grad_norm"},
		{&f.gemmCreate, "m2k_gemm_create"},
		{&f.gemmDestroy, "m2k_gemm_destroy"},
		{&f.gemm, "m2k_gemm"},
	} {
		if err := kernels.Bind(h, b.fptr, b.name); err != nil {
			return err
		}
	}
	return nil
}

// Ops runs the operations of one opened library. It is safe for concurrent
// use; kernels are ordered by the stream they are launched on.
type Ops struct {
	lib *kernels.Lib
	f   *funcs
}

// New returns the operations of l. It fails when l was built without the
// ops kernels.
func New(l *kernels.Lib) (*Ops, error) {
	if l == nil {
		return nil, fmt.Errorf("%w: ops.New: lib is nil", kernels.ErrInvalidArg)
	}
	bindMu.Lock()
	defer bindMu.Unlock()
	if bindErr != nil {
		return nil, bindErr
	}
	f := bound
	return &Ops{lib: l, f: &f}, nil
}

// Lib returns the library the operations run on.
func (o *Ops) Lib() *kernels.Lib { return o.lib }

// call runs one C function on a locked thread and turns its status into an
// error.
func (o *Ops) call(op string, fn func() int32) error { return o.lib.Call(op, fn) }

// checker collects the first broken rule of a call's arguments.
type checker struct {
	op  string
	err error
}

func newChecker(op string) *checker { return &checker{op: op} }

func (c *checker) failf(format string, args ...any) {
	if c.err == nil {
		c.err = fmt.Errorf("%w: ops.%s: %s", kernels.ErrInvalidArg, c.op, fmt.Sprintf(format, args...))
	}
}

func (c *checker) rule(ok bool, format string, args ...any) {
	if !ok {
		c.failf(format, args...)
	}
}

func (c *checker) positive(name string, v int) {
	c.rule(v >= 1, "%s = %d: must be positive", name, v)
}

func (c *checker) dtype(dt kernels.DType) {
	c.rule(dt == kernels.F32 || dt == kernels.BF16, "dtype = %v: must be F32 or BF16", dt)
}

// buf checks a required buffer of element type dt holding at least need
// elements and returns its device address.
func (c *checker) buf(name string, b *kernels.Buffer, dt kernels.DType, need int) uintptr {
	if b == nil {
		c.failf("%s is nil: a buffer is required", name)
		return 0
	}
	return c.check(name, b, dt, need)
}

// opt is buf for an optional buffer: nil gives the null pointer.
func (c *checker) opt(name string, b *kernels.Buffer, dt kernels.DType, need int) uintptr {
	if b == nil {
		return 0
	}
	return c.check(name, b, dt, need)
}

func (c *checker) check(name string, b *kernels.Buffer, dt kernels.DType, need int) uintptr {
	switch {
	case b.Ptr == 0:
		c.failf("%s has a null device pointer (freed?)", name)
	case b.DType != dt:
		c.failf("%s holds %v: must hold %v", name, b.DType, dt)
	case b.Len < need:
		c.failf("%s has %d elements: must have at least %d", name, b.Len, need)
	}
	return b.Ptr
}

// int32s checks a buffer of 4-byte elements holding int32 values.
func (c *checker) int32s(name string, b *kernels.Buffer, need int) uintptr {
	if b == nil {
		c.failf("%s is nil: a buffer of int32 is required", name)
		return 0
	}
	switch {
	case b.Ptr == 0:
		c.failf("%s has a null device pointer (freed?)", name)
	case b.DType.Size() != 4:
		c.failf("%s holds %v: int32 values need 4-byte elements (see UploadInt32)", name, b.DType)
	case b.Len < need:
		c.failf("%s has %d elements: must have at least %d", name, b.Len, need)
	}
	return b.Ptr
}

// workspace checks a scratch buffer of at least bytes bytes (any dtype)
// and returns its pointer and size, as the kernels take them.
func (c *checker) workspace(name string, b *kernels.Buffer, bytes int64) (uintptr, int64) {
	if b == nil {
		c.failf("%s is nil: %d bytes of workspace are required", name, bytes)
		return 0, 0
	}
	switch {
	case b.Ptr == 0:
		c.failf("%s has a null device pointer (freed?)", name)
	case b.Bytes() < bytes:
		c.failf("%s has %d bytes: must have at least %d", name, b.Bytes(), bytes)
	}
	return b.Ptr, b.Bytes()
}

// strided returns the elements a rows×cols matrix with row stride ld,
// starting at column off, spans.
func strided(rows, cols, ld, off int) int {
	if rows <= 0 || cols <= 0 {
		return 0
	}
	return (rows-1)*ld + off + cols
}

func b2i(b bool) int32 {
	if b {
		return 1
	}
	return 0
}

// workspaceBytes asks the library for a workspace size.
func (o *Ops) workspaceBytes(op string, fn func(*int64) int32) (int64, error) {
	var n int64
	err := o.call(op, func() int32 { return fn(&n) })
	return n, err
}

// rowsWorkspace is the workspace query of an op sized by two counts, rows
// and columns (or vocabulary): both must be positive, and method names the
// Go method in the error.
func (o *Ops) rowsWorkspace(method, symbol, aName string, a int, bName string, b int, query func(a, b int64, bytes *int64) int32) (int64, error) {
	c := newChecker(method)
	c.positive(aName, a)
	c.positive(bName, b)
	if c.err != nil {
		return 0, c.err
	}
	return o.workspaceBytes(symbol, func(n *int64) int32 { return query(int64(a), int64(b), n) })
}
