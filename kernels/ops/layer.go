package ops

import (
	"github.com/m2train/m2train/kernels"
)

// EmbeddingForward writes row t of out (n×d, dtype dt) = row tokens[t] of
// emb (F32, vocab×d). tokens holds n int32 ids; an id outside [0, vocab)
// gives a row of NaN, so validate ids on the host (model.Batch.Validate).
func (o *Ops) EmbeddingForward(dt kernels.DType, out, emb, tokens *kernels.Buffer, n, d, vocab int, s kernels.Stream) error {
	c := newChecker("EmbeddingForward")
	c.dtype(dt)
	c.positive("n", n)
	c.positive("d", d)
	c.positive("vocab", vocab)
	pOut := c.buf("out", out, dt, n*d)
	pEmb := c.buf("emb", emb, kernels.F32, vocab*d)
	pTok := c.int32s("tokens", tokens, n)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_embedding_fwd", func() int32 {
		return o.f.embFwd(int32(dt), pOut, pEmb, pTok, int64(n), int64(d), int64(vocab), uintptr(s))
	})
}

// EmbeddingBackwardWorkspace returns the workspace bytes EmbeddingBackward
// needs for n tokens over vocab rows.
func (o *Ops) EmbeddingBackwardWorkspace(n, vocab int) (int64, error) {
	return o.rowsWorkspace("EmbeddingBackwardWorkspace", "m2k_embedding_bwd_workspace", "n", n, "vocab", vocab, o.f.embBwdWS)
}

// EmbeddingBackward adds row t of dout (n×d, dtype dt) into row tokens[t]
// of demb (F32, vocab×d): the scatter-add of the embedding gradient, each
// row's sum formed in position order by one owner (deterministic).
func (o *Ops) EmbeddingBackward(dt kernels.DType, demb, dout, tokens, workspace *kernels.Buffer, n, d, vocab int, s kernels.Stream) error {
	c := newChecker("EmbeddingBackward")
	c.dtype(dt)
	c.positive("n", n)
	c.positive("d", d)
	c.positive("vocab", vocab)
	if c.err != nil {
		return c.err
	}
	ws, err := o.EmbeddingBackwardWorkspace(n, vocab)
	if err != nil {
		return err
	}
	pDemb := c.buf("demb", demb, kernels.F32, vocab*d)
	pDout := c.buf("dout", dout, dt, n*d)
	pTok := c.int32s("tokens", tokens, n)
	pWS, wsBytes := c.workspace("workspace", workspace, ws)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_embedding_bwd", func() int32 {
		return o.f.embBwd(int32(dt), pDemb, pDout, pTok, int64(n), int64(d), int64(vocab), pWS, wsBytes, uintptr(s))
	})
}

// AddRMSNormArgs are the buffers of the fused residual add + RMSNorm
// forward over N rows of width D:
//
//	ResOut = Residual + X + Bias   (F32; each term optional; Residual may be ResOut itself)
//	Rstd   = (mean ResOut² + Eps)^-½   (F32, N)
//	Out    = ResOut·Rstd·W         (activation dtype; W F32, D)
//
// The first block passes the F32 embedding as Residual and no X; block i
// passes the residual stream and the out_proj output of block i−1 as X; the
// final norm does the same after the last block.
type AddRMSNormArgs struct {
	Out, ResOut, Rstd *kernels.Buffer
	Residual, X, Bias *kernels.Buffer
	W                 *kernels.Buffer
	N, D              int
	Eps               float32
}

// AddRMSNormForward runs the fused residual add + RMSNorm (see
// AddRMSNormArgs) with activations in dt.
func (o *Ops) AddRMSNormForward(dt kernels.DType, a *AddRMSNormArgs, s kernels.Stream) error {
	c := newChecker("AddRMSNormForward")
	c.dtype(dt)
	if a == nil {
		c.failf("args is nil")
		return c.err
	}
	c.positive("N", a.N)
	c.positive("D", a.D)
	c.rule(a.Eps > 0, "Eps = %g: must be positive", a.Eps)
	nd := a.N * a.D
	pOut := c.buf("Out", a.Out, dt, nd)
	pRes := c.buf("ResOut", a.ResOut, kernels.F32, nd)
	pRstd := c.buf("Rstd", a.Rstd, kernels.F32, a.N)
	pResidual := c.opt("Residual", a.Residual, kernels.F32, nd)
	pX := c.opt("X", a.X, dt, nd)
	pBias := c.opt("Bias", a.Bias, kernels.F32, a.D)
	pW := c.buf("W", a.W, kernels.F32, a.D)
	c.rule(pX == 0 || pX != pRes, "X and ResOut share an address: only Residual may be updated in place")
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_add_rmsnorm_fwd", func() int32 {
		return o.f.normFwd(int32(dt), pOut, pRes, pRstd, pResidual, pX, pBias, pW, int64(a.N), int64(a.D), a.Eps, uintptr(s))
	})
}

// RMSNormBackwardWorkspace returns the workspace bytes RMSNormBackward needs.
func (o *Ops) RMSNormBackwardWorkspace(n, d int) (int64, error) {
	return o.rowsWorkspace("RMSNormBackwardWorkspace", "m2k_rmsnorm_bwd_workspace", "n", n, "d", d, o.f.normBwdWS)
}

// RMSNormBackwardArgs are the buffers of the RMSNorm backward over N rows of
// width D, given Dout (activation dtype) and the forward's Res (its ResOut,
// F32), Rstd and W:
//
//	DRes (F32, N×D)  receives the input gradient — the gradient of the
//	                 residual stream — added to its contents when Accumulate,
//	                 else overwriting them
//	DX   (optional)  receives a copy of the new DRes in the activation dtype
//	DW   (optional)  += Σ_rows Dout·Res·Rstd
type RMSNormBackwardArgs struct {
	DRes, DX, DW       *kernels.Buffer
	Dout, Res, Rstd, W *kernels.Buffer
	N, D               int
	Accumulate         bool
	Workspace          *kernels.Buffer // RMSNormBackwardWorkspace bytes; needed with DW
}

// RMSNormBackward runs the RMSNorm backward (see RMSNormBackwardArgs).
func (o *Ops) RMSNormBackward(dt kernels.DType, a *RMSNormBackwardArgs, s kernels.Stream) error {
	c := newChecker("RMSNormBackward")
	c.dtype(dt)
	if a == nil {
		c.failf("args is nil")
		return c.err
	}
	c.positive("N", a.N)
	c.positive("D", a.D)
	if c.err != nil {
		return c.err
	}
	nd := a.N * a.D
	pDRes := c.buf("DRes", a.DRes, kernels.F32, nd)
	pDX := c.opt("DX", a.DX, dt, nd)
	pDW := c.opt("DW", a.DW, kernels.F32, a.D)
	pDout := c.buf("Dout", a.Dout, dt, nd)
	pRes := c.buf("Res", a.Res, kernels.F32, nd)
	pRstd := c.buf("Rstd", a.Rstd, kernels.F32, a.N)
	pW := c.buf("W", a.W, kernels.F32, a.D)
	var pWS uintptr
	var wsBytes int64
	if a.DW != nil {
		need, err := o.RMSNormBackwardWorkspace(a.N, a.D)
		if err != nil {
			return err
		}
		pWS, wsBytes = c.workspace("Workspace", a.Workspace, need)
	}
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_rmsnorm_bwd", func() int32 {
		return o.f.normBwd(int32(dt), pDRes, pDX, pDW, pDout, pRes, pRstd, pW, int64(a.N), int64(a.D), b2i(a.Accumulate), pWS, wsBytes, uintptr(s))
	})
}

// AddBias adds bias (F32, w) to each of the n rows of x (dtype dt, row
// stride ldx): the projection biases.
func (o *Ops) AddBias(dt kernels.DType, x, bias *kernels.Buffer, n, w, ldx int, s kernels.Stream) error {
	c := newChecker("AddBias")
	c.dtype(dt)
	c.positive("n", n)
	c.positive("w", w)
	c.rule(ldx >= w, "ldx = %d: must be at least w = %d", ldx, w)
	pX := c.buf("x", x, dt, strided(n, w, ldx, 0))
	pB := c.buf("bias", bias, kernels.F32, w)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_add_bias", func() int32 { return o.f.addBias(int32(dt), pX, pB, int64(n), int64(w), int64(ldx), uintptr(s)) })
}

// ColumnSumWorkspace returns the workspace bytes ColumnSum needs.
func (o *Ops) ColumnSumWorkspace(n, w int) (int64, error) {
	return o.rowsWorkspace("ColumnSumWorkspace", "m2k_column_sum_workspace", "n", n, "w", w, o.f.colSumWS)
}

// ColumnSum adds the column sums of x (n rows of w, dtype dt, row stride
// ldx) into out (F32, w): the gradient of a bias.
func (o *Ops) ColumnSum(dt kernels.DType, out, x, workspace *kernels.Buffer, n, w, ldx int, s kernels.Stream) error {
	need, err := o.ColumnSumWorkspace(n, w)
	if err != nil {
		return err
	}
	c := newChecker("ColumnSum")
	c.dtype(dt)
	c.rule(ldx >= w, "ldx = %d: must be at least w = %d", ldx, w)
	pOut := c.buf("out", out, kernels.F32, w)
	pX := c.buf("x", x, dt, strided(n, w, ldx, 0))
	pWS, wsBytes := c.workspace("workspace", workspace, need)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_column_sum", func() int32 {
		return o.f.colSum(int32(dt), pOut, pX, int64(n), int64(w), int64(ldx), pWS, wsBytes, uintptr(s))
	})
}

// MaxConvWidth is the largest conv kernel width the kernels implement.
const MaxConvWidth = 8

// ConvShape is the shape of the causal depthwise conv1d: Batch sequences of
// L positions with Channels channels and kernel width Width. The input is
// read from a strided matrix (row stride LD, first channel at column Off:
// the xBC columns of the in_proj output), the activated output is written
// with row stride LDAct.
type ConvShape struct {
	Batch, L, Channels, Width int
	LD, Off                   int
	LDAct                     int
}

func (s ConvShape) check(c *checker) {
	c.positive("Batch", s.Batch)
	c.positive("L", s.L)
	c.positive("Channels", s.Channels)
	c.rule(s.Width >= 1 && s.Width <= MaxConvWidth, "Width = %d: must be in [1, %d]", s.Width, MaxConvWidth)
	c.rule(s.Off >= 0, "Off = %d: must be >= 0", s.Off)
	c.rule(s.LD >= s.Off+s.Channels, "LD = %d: must be at least Off + Channels = %d", s.LD, s.Off+s.Channels)
	c.rule(s.LDAct >= s.Channels, "LDAct = %d: must be at least Channels = %d", s.LDAct, s.Channels)
}

// ConvForwardArgs are the buffers of the conv forward:
// Act = silu(Bias + Σ_k Weight[c,k]·Src[t+k−(Width−1)]).
// Src, Halo and Act hold the activation dtype; Halo (Batch×(Width−1)×Channels,
// the previous shard's last Width−1 rows of Src) is optional (zeros);
// Weight (Channels×Width, last tap on the current position) and the
// optional Bias (Channels) are F32.
type ConvForwardArgs struct {
	Act, Src, Halo, Weight, Bias *kernels.Buffer
}

// ConvForward runs the causal depthwise conv1d + SiLU.
func (o *Ops) ConvForward(dt kernels.DType, sh ConvShape, a *ConvForwardArgs, s kernels.Stream) error {
	c := newChecker("ConvForward")
	c.dtype(dt)
	sh.check(c)
	if a == nil {
		c.failf("args is nil")
	}
	if c.err != nil {
		return c.err
	}
	rows := sh.Batch * sh.L
	pAct := c.buf("Act", a.Act, dt, strided(rows, sh.Channels, sh.LDAct, 0))
	pSrc := c.buf("Src", a.Src, dt, strided(rows, sh.Channels, sh.LD, sh.Off))
	pHalo := c.opt("Halo", a.Halo, dt, sh.Batch*(sh.Width-1)*sh.Channels)
	pW := c.buf("Weight", a.Weight, kernels.F32, sh.Channels*sh.Width)
	pB := c.opt("Bias", a.Bias, kernels.F32, sh.Channels)
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_conv_fwd", func() int32 {
		return o.f.convFwd(int32(dt), pAct, int64(sh.LDAct), pSrc, int64(sh.LD), int64(sh.Off), pHalo, pW, pB,
			int64(sh.Batch), int64(sh.L), int64(sh.Channels), int64(sh.Width), uintptr(s))
	})
}

// ConvBackwardWorkspace returns the workspace bytes ConvBackward needs.
func (o *Ops) ConvBackwardWorkspace(sh ConvShape) (int64, error) {
	c := newChecker("ConvBackwardWorkspace")
	sh.check(c)
	if c.err != nil {
		return 0, c.err
	}
	return o.workspaceBytes("m2k_conv_bwd_workspace", func(b *int64) int32 {
		return o.f.convBwdWS(int64(sh.Batch), int64(sh.L), int64(sh.Channels), int64(sh.Width), b)
	})
}

// ConvBackwardArgs are the buffers of the conv backward, given DAct (row
// stride LDAct) and the forward's Src, Halo, Weight and Bias (the
// pre-activation is recomputed):
//
//	DSrc  (activation dtype, strided like Src) overwritten in the Channels columns
//	DW    (F32, Channels×Width, optional)  += weight gradient
//	DBias (F32, Channels, optional)        += bias gradient
//	DHalo (F32, Batch×(Width−1)×Channels, optional) overwritten with the halo
//	      gradient, which the previous shard adds into its DSrc
type ConvBackwardArgs struct {
	DSrc, DW, DBias, DHalo        *kernels.Buffer
	DAct, Src, Halo, Weight, Bias *kernels.Buffer
	Workspace                     *kernels.Buffer // ConvBackwardWorkspace bytes
}

// ConvBackward runs the conv backward (see ConvBackwardArgs).
func (o *Ops) ConvBackward(dt kernels.DType, sh ConvShape, a *ConvBackwardArgs, s kernels.Stream) error {
	c := newChecker("ConvBackward")
	c.dtype(dt)
	sh.check(c)
	if a == nil {
		c.failf("args is nil")
	}
	if c.err != nil {
		return c.err
	}
	need, err := o.ConvBackwardWorkspace(sh)
	if err != nil {
		return err
	}
	rows := sh.Batch * sh.L
	halo := sh.Batch * (sh.Width - 1) * sh.Channels
	pDSrc := c.buf("DSrc", a.DSrc, dt, strided(rows, sh.Channels, sh.LD, sh.Off))
	pDW := c.opt("DW", a.DW, kernels.F32, sh.Channels*sh.Width)
	pDB := c.opt("DBias", a.DBias, kernels.F32, sh.Channels)
	pDHalo := c.opt("DHalo", a.DHalo, kernels.F32, halo)
	pDAct := c.buf("DAct", a.DAct, dt, strided(rows, sh.Channels, sh.LDAct, 0))
	pSrc := c.buf("Src", a.Src, dt, strided(rows, sh.Channels, sh.LD, sh.Off))
	pHalo := c.opt("Halo", a.Halo, dt, halo)
	pW := c.buf("Weight", a.Weight, kernels.F32, sh.Channels*sh.Width)
	pB := c.opt("Bias", a.Bias, kernels.F32, sh.Channels)
	pWS, wsBytes := c.workspace("Workspace", a.Workspace, need)
	c.rule(pDSrc != pSrc, "DSrc and Src share an address: the backward reads Src while writing DSrc")
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_conv_bwd", func() int32 {
		return o.f.convBwd(int32(dt), pDSrc, pDW, pDB, pDHalo, pDAct, int64(sh.LDAct), pSrc, int64(sh.LD), int64(sh.Off),
			pHalo, pW, pB, int64(sh.Batch), int64(sh.L), int64(sh.Channels), int64(sh.Width), pWS, wsBytes, uintptr(s))
	})
}

// GatedNormShape describes the gated RMSNorm over N rows of E channels in
// Groups norm groups (mamba_ssm's grouped form), z read with row stride LDZ
// (the z columns of the in_proj output). With BeforeGate the norm is taken
// of y and the gate applied after; with Enabled false the op is y·silu(z)
// (no norm, no weight).
type GatedNormShape struct {
	N, E, Groups, LDZ int
	Eps               float32
	BeforeGate        bool
	Enabled           bool
}

func (g GatedNormShape) check(c *checker) {
	c.positive("N", g.N)
	c.positive("E", g.E)
	c.rule(g.Groups >= 1 && g.E%g.Groups == 0, "Groups = %d: must be positive and divide E = %d", g.Groups, g.E)
	c.rule(g.LDZ >= g.E, "LDZ = %d: must be at least E = %d", g.LDZ, g.E)
	if g.Enabled {
		c.rule(g.Eps > 0, "Eps = %g: must be positive", g.Eps)
	}
}

// GatedNormForwardArgs: Out (N×E) and Y in the activation dtype, Z strided
// by LDZ; W (E) and Rstd (N×Groups) F32, both unused without the norm.
type GatedNormForwardArgs struct {
	Out, Rstd, Y, Z, W *kernels.Buffer
}

// GatedNormForward runs the gated RMSNorm forward.
func (o *Ops) GatedNormForward(dt kernels.DType, g GatedNormShape, a *GatedNormForwardArgs, s kernels.Stream) error {
	c := newChecker("GatedNormForward")
	c.dtype(dt)
	g.check(c)
	if a == nil {
		c.failf("args is nil")
	}
	if c.err != nil {
		return c.err
	}
	pOut := c.buf("Out", a.Out, dt, g.N*g.E)
	pY := c.buf("Y", a.Y, dt, g.N*g.E)
	pZ := c.buf("Z", a.Z, dt, strided(g.N, g.E, g.LDZ, 0))
	var pRstd, pW uintptr
	if g.Enabled {
		pRstd = c.buf("Rstd", a.Rstd, kernels.F32, g.N*g.Groups)
		pW = c.buf("W", a.W, kernels.F32, g.E)
	}
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_gated_norm_fwd", func() int32 {
		return o.f.gatedFwd(int32(dt), pOut, pRstd, pY, pZ, int64(g.LDZ), pW, int64(g.N), int64(g.E), int64(g.Groups), g.Eps,
			b2i(g.BeforeGate), b2i(g.Enabled), uintptr(s))
	})
}

// GatedNormBackwardWorkspace returns the workspace bytes GatedNormBackward
// needs.
func (o *Ops) GatedNormBackwardWorkspace(n, e int) (int64, error) {
	return o.rowsWorkspace("GatedNormBackwardWorkspace", "m2k_gated_norm_bwd_workspace", "n", n, "e", e, o.f.gatedBwdWS)
}

// GatedNormBackwardArgs: DY (N×E) and DZ (strided like Z) are overwritten in
// the activation dtype; DW (F32, E, optional, with the norm only) is added
// into; Dout, Rstd, Y, Z and W are the forward's.
type GatedNormBackwardArgs struct {
	DY, DZ, DW          *kernels.Buffer
	Dout, Rstd, Y, Z, W *kernels.Buffer
	Workspace           *kernels.Buffer // GatedNormBackwardWorkspace bytes; needed with DW
}

// GatedNormBackward runs the gated RMSNorm backward.
func (o *Ops) GatedNormBackward(dt kernels.DType, g GatedNormShape, a *GatedNormBackwardArgs, s kernels.Stream) error {
	c := newChecker("GatedNormBackward")
	c.dtype(dt)
	g.Eps = 1 // unused by the backward
	g.check(c)
	if a == nil {
		c.failf("args is nil")
	}
	if c.err != nil {
		return c.err
	}
	ne, zn := g.N*g.E, strided(g.N, g.E, g.LDZ, 0)
	pDY := c.buf("DY", a.DY, dt, ne)
	pDZ := c.buf("DZ", a.DZ, dt, zn)
	pDout := c.buf("Dout", a.Dout, dt, ne)
	pY := c.buf("Y", a.Y, dt, ne)
	pZ := c.buf("Z", a.Z, dt, zn)
	var pRstd, pW, pDW, pWS uintptr
	var wsBytes int64
	if g.Enabled {
		pRstd = c.buf("Rstd", a.Rstd, kernels.F32, g.N*g.Groups)
		pW = c.buf("W", a.W, kernels.F32, g.E)
		pDW = c.opt("DW", a.DW, kernels.F32, g.E)
		if a.DW != nil {
			need, err := o.GatedNormBackwardWorkspace(g.N, g.E)
			if err != nil {
				return err
			}
			pWS, wsBytes = c.workspace("Workspace", a.Workspace, need)
		}
	}
	if c.err != nil {
		return c.err
	}
	return o.call("m2k_gated_norm_bwd", func() int32 {
		return o.f.gatedBwd(int32(dt), pDY, pDZ, pDW, pDout, pRstd, pY, pZ, int64(g.LDZ), pW, int64(g.N), int64(g.E), int64(g.Groups),
			b2i(g.BeforeGate), b2i(g.Enabled), pWS, wsBytes, uintptr(s))
	})
}
