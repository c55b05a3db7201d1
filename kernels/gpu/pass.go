package gpu

import (
	"context"
	"fmt"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/kernels/ops"
	"github.com/m2train/m2train/model"
)

// Forward runs the model without gradients (evaluation).
func (m *Model) Forward(ctx context.Context, b *model.Batch, o model.StepOptions) (model.StepResult, error) {
	return m.run(ctx, b, o, false)
}

// ForwardBackward runs the model and adds the gradients of LossSum/Count
// into the gradient buffer.
func (m *Model) ForwardBackward(ctx context.Context, b *model.Batch, o model.StepOptions) (model.StepResult, error) {
	if b.Targets == nil {
		return model.StepResult{}, ErrNoTargets
	}
	return m.run(ctx, b, o, true)
}

func (m *Model) run(ctx context.Context, b *model.Batch, o model.StepOptions, backward bool) (model.StepResult, error) {
	if err := m.check(); err != nil {
		return model.StepResult{}, err
	}
	c := m.cfg
	if err := b.Validate(c.VocabSize); err != nil {
		return model.StepResult{}, err
	}
	if o.Boundary != nil && b.SeqLen < c.DConv-1 {
		return model.StepResult{}, fmt.Errorf("gpu: a sequence shard of %d positions is shorter than the conv halo d_conv−1 = %d", b.SeqLen, c.DConv-1)
	}
	if err := checkSPMode(o.Boundary); err != nil {
		return model.StepResult{}, err
	}
	if m.auto {
		what := model.SyncParams
		if backward {
			what |= model.SyncGrads
		}
		if err := m.push(what); err != nil {
			return model.StepResult{}, err
		}
	}
	ws, err := m.workspace(b.Batch, b.SeqLen, o.Boundary != nil)
	if err != nil {
		return model.StepResult{}, err
	}
	if err := m.refreshWeights(); err != nil {
		return model.StepResult{}, err
	}
	n, D := b.Batch*b.SeqLen, c.DModel
	if err := ops.CopyInt32(ws.tokens, b.Inputs); err != nil {
		return model.StepResult{}, err
	}
	targets := b.Targets
	if targets == nil {
		targets = make([]int32, n)
		for i := range targets {
			targets[i] = -1
		}
	}
	if err := ops.CopyInt32(ws.targets, targets); err != nil {
		return model.StepResult{}, err
	}

	// The residual stream starts as the f32 embedding.
	if err := m.ops.EmbeddingForward(kernels.F32, ws.res[0], m.pv(m.emb), ws.tokens, n, D, c.VocabSize, stream); err != nil {
		return model.StepResult{}, err
	}
	for i := range m.layers {
		if err := ctx.Err(); err != nil {
			return model.StepResult{}, err
		}
		if err := m.layerForward(ctx, i, o.Boundary); err != nil {
			return model.StepResult{}, err
		}
	}
	// Final norm of the last residual: res[n_layer] = res[n_layer−1] + out (+ bias).
	last := c.NLayer
	err = m.ops.AddRMSNormForward(m.act, &ops.AddRMSNormArgs{Out: ws.hf, ResOut: ws.res[last], Rstd: ws.frstd,
		Residual: ws.res[last-1], X: ws.out, Bias: m.pv(m.layers[last-1].OutProjBias), W: m.pv(m.normF),
		N: n, D: D, Eps: float32(c.NormEps)}, stream)
	if err != nil {
		return model.StepResult{}, fmt.Errorf("gpu: final norm: %w", err)
	}

	count := o.Count
	if count == 0 {
		count = b.Counted()
	}
	res := model.StepResult{Count: count}
	var logits []float64
	packed := -1
	if o.KeepLogits {
		logits = make([]float64, n*c.VocabSize)
	} else if packed, err = m.packHead(targets); err != nil {
		return model.StepResult{}, err
	}
	if err := m.lmHeadLoss(n, count, backward, logits, packed); err != nil {
		return model.StepResult{}, err
	}
	// The loss sum is read once the pass is queued: reading it here would
	// wait for the forward pass before the backward is queued.
	readLoss := func() error {
		sum, err := ops.ReadFloat64(m.lossSum)
		if err != nil {
			return err
		}
		res.LossSum = sum[0]
		if count > 0 {
			res.Loss = res.LossSum / float64(count)
		}
		return nil
	}
	res.Logits = logits
	if o.KeepHidden {
		for i := 1; i <= last; i++ {
			h, err := download(ws.res[i])
			if err != nil {
				return model.StepResult{}, err
			}
			res.Hidden = append(res.Hidden, h)
		}
		h, err := download(ws.hf)
		if err != nil {
			return model.StepResult{}, err
		}
		res.Hidden = append(res.Hidden, h)
	}
	if !backward {
		return res, readLoss()
	}

	// Backward. dres is the gradient of the residual stream (f32), dresAct
	// its copy in the activation dtype for the products.
	err = m.ops.RMSNormBackward(m.act, &ops.RMSNormBackwardArgs{DRes: ws.dres, DX: ws.dresAct, DW: m.gv(m.normF),
		Dout: ws.dhf, Res: ws.res[last], Rstd: ws.frstd, W: m.pv(m.normF), N: n, D: D, Workspace: ws.scratch}, stream)
	if err != nil {
		return model.StepResult{}, fmt.Errorf("gpu: final norm backward: %w", err)
	}
	for i := last - 1; i >= 0; i-- {
		if err := ctx.Err(); err != nil {
			return model.StepResult{}, err
		}
		if err := m.layerBackward(ctx, i, o.Boundary); err != nil {
			return model.StepResult{}, err
		}
	}
	err = m.ops.EmbeddingBackward(kernels.F32, m.gv(m.emb), ws.dres, ws.tokens, ws.scratch, n, D, c.VocabSize, stream)
	if err != nil {
		return model.StepResult{}, fmt.Errorf("gpu: embedding backward: %w", err)
	}
	if m.auto {
		if err := m.pull(model.SyncGrads); err != nil {
			return model.StepResult{}, err
		}
	}
	// Kernel failures are reported at the next synchronisation: make it
	// this call's.
	if err := m.lib.Sync(stream); err != nil {
		return model.StepResult{}, fmt.Errorf("gpu: backward pass: %w", err)
	}
	if err := readLoss(); err != nil {
		return model.StepResult{}, err
	}
	return res, nil
}

// packHead decides whether the LM head of a pass with these targets runs
// over the counted positions alone and, if so, uploads their row indices
// and targets (ws.headRows, ws.headTargets) and returns their number. It
// returns -1 for the head over every position: every position counted,
// Options.DenseHead, or a library without the row copies.
func (m *Model) packHead(targets []int32) (int, error) {
	if m.opts.DenseHead || !m.ops.HasRowCopies() {
		return -1, nil
	}
	n := len(targets)
	if len(m.hostRows) != n {
		m.hostRows, m.hostHeadTargets = make([]int32, n), make([]int32, n)
	}
	k := 0
	for i, t := range targets {
		if t >= 0 {
			m.hostRows[k], m.hostHeadTargets[k] = int32(i), t
			k++
		}
	}
	if k == n {
		return -1, nil
	}
	if k > 0 {
		// Whole buffers: the entries past k are stale and never read.
		if err := ops.CopyInt32(m.ws.headRows, m.hostRows); err != nil {
			return 0, err
		}
		if err := ops.CopyInt32(m.ws.headTargets, m.hostHeadTargets); err != nil {
			return 0, err
		}
	}
	return k, nil
}

// lmHeadLoss computes, per block of positions, the logits of the final norm
// output, their cross-entropy against the targets (the sum over counted
// positions is added into m.lossSum, zeroed first), and with grad the
// gradient of the loss mean over count positions with respect to the final
// norm output (written into dhf) and to the head matrix (added into its
// gradient). keep, when non-nil, receives the logits (n × V). packed ≥ 0
// runs it over the packed positions of packHead alone: their rows of the
// final norm output are gathered into ws.do, their gradient computed in
// ws.du (both backward scratch, free until the layers' backward) and
// scattered into dhf, whose other rows are zero.
func (m *Model) lmHeadLoss(n, count int, grad bool, keep []float64, packed int) error {
	c, ws := m.cfg, m.ws
	D, V := c.DModel, c.VocabSize
	if err := m.lossSum.ZeroAsync(stream); err != nil {
		return err
	}
	// Without counted targets the loss mean has no gradient (model/ref
	// leaves dhf zero as well).
	compute := grad && count > 0
	var scale float32
	if compute {
		scale = float32(1 / float64(count))
	}
	if grad && (packed >= 0 || !compute) {
		if err := ws.dhf.ZeroAsync(stream); err != nil {
			return err
		}
	}
	hf, dhf, targets, rows := ws.hf, ws.dhf, ws.targets, n
	if packed >= 0 {
		if packed == 0 {
			return nil
		}
		hf, dhf, targets, rows = view(ws.do, 0, packed*D), view(ws.du, 0, packed*D), ws.headTargets, packed
		err := m.ops.GatherRows(m.act, &ops.CopyRowsArgs{Dst: hf, LDDst: D, Src: ws.hf, LDSrc: D, Idx: ws.headRows,
			N: packed, Width: D, Rows: n}, stream)
		if err != nil {
			return fmt.Errorf("gpu: LM head: packing the counted positions: %w", err)
		}
	}
	for t0 := 0; t0 < rows; t0 += m.block {
		nb := min(m.block, rows-t0)
		hid := view(hf, t0*D, nb*D)
		lg := view(ws.logits, 0, nb*V)
		err := m.gemm.Run(&ops.GemmArgs{In: m.act, Out: m.act, TransB: true, M: nb, N: V, K: D, Alpha: 1,
			A: hid, LDA: D, B: m.wHead, LDB: D, C: lg, LDC: V}, stream)
		if err != nil {
			return fmt.Errorf("gpu: LM head: %w", err)
		}
		if keep != nil {
			v, err := ws.logits.GetF32()
			if err != nil {
				return err
			}
			for i, x := range v[:nb*V] {
				keep[t0*V+i] = float64(x)
			}
		}
		err = m.ops.CrossEntropy(m.act, &ops.CrossEntropyArgs{Logits: lg, LD: V, Targets: view(targets, t0, nb),
			N: nb, Vocab: V, GradScale: scale, ComputeGrad: compute, RowLoss: view(ws.rowLoss, t0, nb), LossSum: m.lossSum}, stream)
		if err != nil {
			return fmt.Errorf("gpu: cross-entropy: %w", err)
		}
		if !compute {
			continue
		}
		// dhf = dlogits·W and dW += dlogitsᵀ·hf.
		err = m.gemm.Run(&ops.GemmArgs{In: m.act, Out: m.act, M: nb, N: D, K: V, Alpha: 1,
			A: lg, LDA: V, B: m.wHead, LDB: D, C: view(dhf, t0*D, nb*D), LDC: D}, stream)
		if err != nil {
			return fmt.Errorf("gpu: LM head backward: %w", err)
		}
		err = m.gemm.Run(&ops.GemmArgs{In: m.act, Out: kernels.F32, TransA: true, M: V, N: D, K: nb, Alpha: 1, Beta: 1,
			A: lg, LDA: V, B: hid, LDB: D, C: m.gv(m.head), LDC: D}, stream)
		if err != nil {
			return fmt.Errorf("gpu: LM head weight gradient: %w", err)
		}
	}
	if packed > 0 && compute {
		err := m.ops.ScatterRows(m.act, &ops.CopyRowsArgs{Dst: ws.dhf, LDDst: D, Src: dhf, LDSrc: D, Idx: ws.headRows,
			N: packed, Width: D, Rows: n}, stream)
		if err != nil {
			return fmt.Errorf("gpu: LM head: unpacking the gradient: %w", err)
		}
	}
	return nil
}

func layerErr(i int, what string, err error) error {
	return fmt.Errorf("gpu: layer %d: %s: %w", i, what, err)
}

// layerForward runs layer i: the residual add of the previous layer's
// output and the pre-norm, in_proj, conv + SiLU, the SSD scan, the gated
// norm and out_proj, whose output (in ws.out) the next norm adds to the
// residual stream.
func (m *Model) layerForward(ctx context.Context, i int, bd model.Boundary) error {
	c, ws, lt := m.cfg, m.ws, &m.layers[i]
	a := &ws.acts[i]
	bt, l := ws.bt, ws.l
	n := bt * l
	D, E, F, Cd, GN := c.DModel, c.DInner(), c.InProjDim(), c.ConvDim(), c.NGroups*c.DState
	act := m.act

	norm := &ops.AddRMSNormArgs{Out: a.u, ResOut: ws.res[i], Rstd: a.rstd, W: m.pv(lt.Norm), N: n, D: D, Eps: float32(c.NormEps)}
	if i == 0 {
		norm.Residual = ws.res[0] // the embedding, in place
	} else {
		norm.Residual, norm.X, norm.Bias = ws.res[i-1], ws.out, m.pv(m.layers[i-1].OutProjBias)
	}
	if err := m.ops.AddRMSNormForward(act, norm, stream); err != nil {
		return layerErr(i, "norm", err)
	}
	// in_proj: zxbcdt = u·W_inᵀ (+ b_in).
	err := m.gemm.Run(&ops.GemmArgs{In: act, Out: act, TransB: true, M: n, N: F, K: D, Alpha: 1,
		A: a.u, LDA: D, B: m.wIn[i], LDB: D, C: a.zxbcdt, LDC: F}, stream)
	if err != nil {
		return layerErr(i, "in_proj", err)
	}
	if lt.InProjBias != nil {
		if err := m.ops.AddBias(act, a.zxbcdt, m.pv(lt.InProjBias), n, F, F, stream); err != nil {
			return layerErr(i, "in_proj bias", err)
		}
	}
	a.hasState, a.hasHalo, a.gotHalo = false, false, false
	if bd != nil {
		if err := m.recvForward(ctx, i, bd); err != nil {
			return err
		}
	}
	var halo *kernels.Buffer
	if a.hasHalo {
		halo = a.halo
	}
	err = m.ops.ConvForward(act, m.convShape(bt, l), &ops.ConvForwardArgs{Act: a.xbc, Src: a.zxbcdt, Halo: halo,
		Weight: m.pv(lt.Conv), Bias: m.pv(lt.ConvBias)}, stream)
	if err != nil {
		return layerErr(i, "conv", err)
	}
	fa := &kernels.SSDForwardArgs{
		X: a.xbc.Offset(0), B: a.xbc.Offset(E), C: a.xbc.Offset(E + GN), DTRaw: a.zxbcdt.Offset(E + Cd),
		DTBias: m.pv(lt.DTBias).Ptr, ALog: m.pv(lt.ALog).Ptr, D: m.pv(lt.D).Ptr,
		Y: a.y.Ptr, Workspace: ws.scratch.Ptr, WorkspaceBytes: ws.scratch.Bytes(),
	}
	if a.ssd != nil {
		fa.Workspace, fa.WorkspaceBytes = a.ssd.Ptr, a.ssd.Bytes()
	}
	if a.hasState {
		fa.InitState = a.state.Ptr
	}
	if bd != nil {
		fa.FinalState = ws.final.Ptr
	}
	if err := m.lib.SSDForward(m.ssdShape(bt, l), fa, stream); err != nil {
		return layerErr(i, "SSD scan", err)
	}
	if bd != nil {
		if err := m.sendForward(ctx, i, bd); err != nil {
			return err
		}
	}
	err = m.ops.GatedNormForward(act, m.gatedShape(n), &ops.GatedNormForwardArgs{Out: a.o, Rstd: a.grstd, Y: a.y,
		Z: a.zxbcdt, W: m.pv(lt.GatedNorm)}, stream)
	if err != nil {
		return layerErr(i, "gated norm", err)
	}
	// out_proj: out = o·W_outᵀ; its bias is added by the next norm.
	err = m.gemm.Run(&ops.GemmArgs{In: act, Out: act, TransB: true, M: n, N: D, K: E, Alpha: 1,
		A: a.o, LDA: E, B: m.wOut[i], LDB: E, C: ws.out, LDC: D}, stream)
	if err != nil {
		return layerErr(i, "out_proj", err)
	}
	return nil
}

// layerBackward runs layer i backward. On entry ws.dres (and ws.dresAct)
// hold the gradient of the residual stream after the layer, which is that
// of its out_proj output; on return they hold that of its input.
func (m *Model) layerBackward(ctx context.Context, i int, bd model.Boundary) error {
	c, ws, lt := m.cfg, m.ws, &m.layers[i]
	a := &ws.acts[i]
	bt, l := ws.bt, ws.l
	n := bt * l
	D, E, F, Cd, GN, H, W := c.DModel, c.DInner(), c.InProjDim(), c.ConvDim(), c.NGroups*c.DState, c.NHeads, c.DConv
	act := m.act
	dres := ws.dresAct
	if dres == nil {
		dres = ws.dres // F32: one buffer serves both
	}

	// out_proj: out = o·W_outᵀ + b_out.
	if lt.OutProjBias != nil {
		if err := m.ops.ColumnSum(kernels.F32, m.gv(lt.OutProjBias), ws.dres, ws.scratch, n, D, D, stream); err != nil {
			return layerErr(i, "out_proj bias gradient", err)
		}
	}
	err := m.gemm.Run(&ops.GemmArgs{In: act, Out: kernels.F32, TransA: true, M: D, N: E, K: n, Alpha: 1, Beta: 1,
		A: dres, LDA: D, B: a.o, LDB: E, C: m.gv(lt.OutProj), LDC: E}, stream)
	if err != nil {
		return layerErr(i, "out_proj weight gradient", err)
	}
	err = m.gemm.Run(&ops.GemmArgs{In: act, Out: act, M: n, N: E, K: D, Alpha: 1,
		A: dres, LDA: D, B: m.wOut[i], LDB: E, C: ws.do, LDC: E}, stream)
	if err != nil {
		return layerErr(i, "out_proj backward", err)
	}

	// Gated norm: dy, and dz straight into the z columns of dzxbcdt.
	err = m.ops.GatedNormBackward(act, m.gatedShape(n), &ops.GatedNormBackwardArgs{DY: ws.dy, DZ: ws.dz,
		DW: m.gv(lt.GatedNorm), Dout: ws.do, Rstd: a.grstd, Y: a.y, Z: a.zxbcdt, W: m.pv(lt.GatedNorm),
		Workspace: ws.scratch}, stream)
	if err != nil {
		return layerErr(i, "gated norm backward", err)
	}

	var hasDFinal, hasDHaloNext bool
	if bd != nil {
		if hasDFinal, hasDHaloNext, err = m.recvBackward(ctx, i, bd); err != nil {
			return err
		}
	}
	// SSD: dx, dB, dC into the columns of dxbc, ddt_raw into the dt
	// columns of dzxbcdt; the parameter gradients into dssd, then added.
	ba := &kernels.SSDBackwardArgs{
		X: a.xbc.Offset(0), B: a.xbc.Offset(E), C: a.xbc.Offset(E + GN), DTRaw: a.zxbcdt.Offset(E + Cd),
		DTBias: m.pv(lt.DTBias).Ptr, ALog: m.pv(lt.ALog).Ptr, D: m.pv(lt.D).Ptr,
		DY: ws.dy.Ptr,
		DX: ws.dxbc.Offset(0), DB: ws.dxbc.Offset(E), DC: ws.dxbc.Offset(E + GN), DDTRaw: ws.dz.Offset(E + Cd),
		DDTBias: ws.dssd.Offset(0), DALog: ws.dssd.Offset(H), DD: ws.dssd.Offset(2 * H),
		Workspace: ws.scratch.Ptr, WorkspaceBytes: ws.scratch.Bytes(),
	}
	if a.ssd != nil {
		ba.FwdWorkspace, ba.FwdWorkspaceBytes = a.ssd.Ptr, a.ssd.Bytes()
	}
	if a.hasState {
		ba.InitState = a.state.Ptr
		ba.DInitState = ws.dInit.Ptr
	}
	if hasDFinal {
		ba.DFinalState = ws.dFinal.Ptr
	}
	if err := m.lib.SSDBackward(m.ssdShape(bt, l), ba, stream); err != nil {
		return layerErr(i, "SSD scan backward", err)
	}
	for _, p := range []struct {
		t       *model.Tensor
		off, sz int
	}{{lt.DTBias, 0, H}, {lt.ALog, H, H}, {lt.D, 2 * H, c.DSize()}} {
		// A column sum over one row adds the scan's gradient into the
		// gradient buffer.
		if err := m.ops.ColumnSum(kernels.F32, m.gv(p.t), view(ws.dssd, p.off, p.sz), ws.scratch, 1, p.sz, p.sz, stream); err != nil {
			return layerErr(i, "SSD parameter gradients", err)
		}
	}

	// Conv: the gradient of its activated output is dxbc = [dx | dB | dC];
	// it writes the xBC columns of dzxbcdt.
	ca := &ops.ConvBackwardArgs{DSrc: ws.dz, DW: m.gv(lt.Conv), DBias: m.gv(lt.ConvBias), DAct: ws.dxbc,
		Src: a.zxbcdt, Weight: m.pv(lt.Conv), Bias: m.pv(lt.ConvBias), Workspace: ws.scratch}
	if a.hasHalo {
		ca.Halo, ca.DHalo = a.halo, ws.dHalo
	}
	if err := m.ops.ConvBackward(act, m.convShape(bt, l), ca, stream); err != nil {
		return layerErr(i, "conv backward", err)
	}
	if hasDHaloNext {
		// The next shard convolved this shard's last W−1 rows of xBC: add
		// the gradient it computed for them.
		for b := 0; b < bt; b++ {
			for j := 0; j < W-1; j++ {
				row := b*l + l - (W - 1) + j
				err := m.ops.AddBias(act, view(ws.dz, row*F+E, Cd), view(ws.dHaloNext, (b*(W-1)+j)*Cd, Cd), 1, Cd, Cd, stream)
				if err != nil {
					return layerErr(i, "halo gradient", err)
				}
			}
		}
	}
	if bd != nil {
		if err := m.sendBackward(ctx, i, bd); err != nil {
			return err
		}
	}

	// in_proj: zxbcdt = u·W_inᵀ + b_in.
	err = m.gemm.Run(&ops.GemmArgs{In: act, Out: kernels.F32, TransA: true, M: F, N: D, K: n, Alpha: 1, Beta: 1,
		A: ws.dz, LDA: F, B: a.u, LDB: D, C: m.gv(lt.InProj), LDC: D}, stream)
	if err != nil {
		return layerErr(i, "in_proj weight gradient", err)
	}
	if lt.InProjBias != nil {
		if err := m.ops.ColumnSum(act, m.gv(lt.InProjBias), ws.dz, ws.scratch, n, F, F, stream); err != nil {
			return layerErr(i, "in_proj bias gradient", err)
		}
	}
	err = m.gemm.Run(&ops.GemmArgs{In: act, Out: act, M: n, N: D, K: F, Alpha: 1,
		A: ws.dz, LDA: F, B: m.wIn[i], LDB: D, C: ws.du, LDC: D}, stream)
	if err != nil {
		return layerErr(i, "in_proj backward", err)
	}
	// Pre-norm: adds the gradient of the layer's input into dres.
	err = m.ops.RMSNormBackward(act, &ops.RMSNormBackwardArgs{DRes: ws.dres, DX: ws.dresAct, DW: m.gv(lt.Norm),
		Dout: ws.du, Res: ws.res[i], Rstd: a.rstd, W: m.pv(lt.Norm), N: n, D: D, Accumulate: true,
		Workspace: ws.scratch}, stream)
	if err != nil {
		return layerErr(i, "norm backward", err)
	}
	return nil
}
