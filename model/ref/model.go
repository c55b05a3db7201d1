// Package ref is the pure-Go CPU reference backend of the Mamba-2 language
// model: the numerical oracle that the CUDA backend, sequence parallelism and
// every distributed test are checked against. It implements model.Backend
// for float32 (training) and float64 (tests), with a hand-written backward
// pass for every operation. Results do not depend on GOMAXPROCS: every
// reduction runs in a fixed order.
package ref

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/linalg"
	"github.com/m2train/m2train/model/ssd"
)

// ErrNoTargets is returned by ForwardBackward for a batch without targets.
var ErrNoTargets = errors.New("ref: batch has no targets")

// ErrShardTooShort is returned for a sequence shard (a pass with a
// Boundary) of fewer than d_conv−1 positions: every shard must hold the
// whole conv halo that it passes to the next one (MAMBA2_SPEC.md §5.1).
var ErrShardTooShort = errors.New("ref: sequence shard shorter than the conv halo")

// Model is the CPU backend: parameters and gradients in flat buffers with
// the layout of model.NewLayout, and the activations of the last forward pass
// kept for the backward pass.
type Model[T model.Float] struct {
	cfg    model.Config
	layout *model.Layout
	layers []model.LayerTensors
	emb    *model.Tensor
	head   *model.Tensor // the LM head matrix: the embedding when tied
	normF  *model.Tensor
	params []T
	grads  []T
	ws     *workspace[T]
	scan   ssd.Workspace[T] // reused by every layer's chunked scan
	// Recurrent selects the scan: the chunked algorithm (default) or the
	// token-by-token recurrence, for tests.
	Recurrent bool
}

var _ model.Backend[float32] = (*Model[float32])(nil)

// New returns a model with zero parameters; load or initialise them through
// Params.
func New[T model.Float](cfg model.Config) (*Model[T], error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	l := model.NewLayout(cfg)
	m := &Model[T]{cfg: cfg, layout: l, params: make([]T, l.Total), grads: make([]T, l.Total)}
	for i := 0; i < cfg.NLayer; i++ {
		m.layers = append(m.layers, l.Layer(i))
	}
	m.emb = l.Must(model.NameEmbedding)
	m.normF = l.Must(model.NameNormF)
	m.head = m.emb
	if !cfg.TieEmbeddings {
		m.head = l.Must(model.NameLMHead)
	}
	return m, nil
}

// Name reports the backend and its precision.
func (m *Model[T]) Name() string {
	var z T
	if _, ok := any(z).(float64); ok {
		return "cpu-float64"
	}
	return "cpu-float32"
}

// Config returns the model configuration.
func (m *Model[T]) Config() model.Config { return m.cfg }

// Layout returns the flat-buffer layout.
func (m *Model[T]) Layout() *model.Layout { return m.layout }

// Params returns the flat parameter buffer (shared, not a copy).
func (m *Model[T]) Params() []T { return m.params }

// Grads returns the flat gradient buffer (shared, not a copy).
func (m *Model[T]) Grads() []T { return m.grads }

// ZeroGrads clears the gradient buffer.
func (m *Model[T]) ZeroGrads() { clear(m.grads) }

// layerActs holds what the backward pass of one layer needs.
type layerActs[T model.Float] struct {
	u, rstd     []T // normed input (n×D), its rstd (n)
	zxbcdt      []T // in_proj output (n×F)
	pre, act    []T // conv output before and after SiLU (n×C_d)
	x, b, c, dt []T // contiguous SSD inputs
	y, o, grstd []T // SSD output, gated-norm output (n×E), its rstd (n × norm groups)
	state, halo []T // received from the previous shard; nil when zero
	// logDecay is Λ (Bt×H) of the shard's scan, kept in the parallel-prefix
	// mode for PrefixBackward.
	logDecay []T
}

type workspace[T model.Float] struct {
	bt, l int
	res   [][]T // residual stream: res[0] = embedding, res[i+1] = after layer i
	acts  []layerActs[T]
	hf    []T // final norm output (n×D)
	frstd []T
	final []T // scratch for the SSD final state
	decay []T
	// Backward scratch, shared by the layers (one runs at a time).
	do, dy, dz, dact, du []T
	sg                   ssd.Grads[T]
}

func (m *Model[T]) workspace(bt, l int) *workspace[T] {
	if m.ws != nil && m.ws.bt == bt && m.ws.l == l {
		return m.ws
	}
	c := m.cfg
	n := bt * l
	D, E, F, Cd, G, N, H := c.DModel, c.DInner(), c.InProjDim(), c.ConvDim(), c.NGroups, c.DState, c.NHeads
	ws := &workspace[T]{bt: bt, l: l, hf: make([]T, n*D), frstd: make([]T, n),
		final: make([]T, bt*H*c.HeadDim*N), decay: make([]T, bt*H),
		do: make([]T, n*E), dy: make([]T, n*E), dz: make([]T, n*F), dact: make([]T, n*Cd), du: make([]T, n*D),
		sg: ssd.Grads[T]{X: make([]T, n*E), DTRaw: make([]T, n*H), B: make([]T, n*G*N), C: make([]T, n*G*N),
			DTBias: make([]T, H), ALog: make([]T, H), D: make([]T, c.DSize()), InitState: make([]T, bt*H*c.HeadDim*N)}}
	for i := 0; i <= c.NLayer; i++ {
		ws.res = append(ws.res, make([]T, n*D))
	}
	for i := 0; i < c.NLayer; i++ {
		ws.acts = append(ws.acts, layerActs[T]{
			u: make([]T, n*D), rstd: make([]T, n), zxbcdt: make([]T, n*F),
			pre: make([]T, n*Cd), act: make([]T, n*Cd),
			x: make([]T, n*E), b: make([]T, n*G*N), c: make([]T, n*G*N), dt: make([]T, n*H),
			y: make([]T, n*E), o: make([]T, n*E), grstd: make([]T, n*c.NormGroups()),
		})
	}
	m.ws = ws
	return ws
}

func (m *Model[T]) ssdDims(bt, l int) (ssd.Dims, ssd.Options) {
	c := m.cfg
	return ssd.Dims{Batch: bt, L: l, H: c.NHeads, P: c.HeadDim, N: c.DState, G: c.NGroups},
		ssd.Options{Chunk: c.ChunkSize, DTLimit: c.DTLimit, DHasHdim: c.DHasHdim}
}

func (m *Model[T]) convShape(bt, l int) convShape {
	c := m.cfg
	return convShape{bt: bt, l: l, cd: c.ConvDim(), w: c.DConv, ld: c.InProjDim(), off: c.DInner()}
}

func (m *Model[T]) gatedNorm(n int) gatedNorm {
	c := m.cfg
	return gatedNorm{n: n, e: c.DInner(), groups: c.NormGroups(), ldz: c.InProjDim(), eps: c.GatedNormEps,
		beforeGate: c.NormBeforeGate, enabled: c.GatedNorm}
}

// Forward runs the model without gradients.
func (m *Model[T]) Forward(ctx context.Context, b *model.Batch, o model.StepOptions) (model.StepResult, error) {
	return m.run(ctx, b, o, false)
}

// ForwardBackward runs the model and adds the gradients of LossSum/Count
// into Grads.
func (m *Model[T]) ForwardBackward(ctx context.Context, b *model.Batch, o model.StepOptions) (model.StepResult, error) {
	if b.Targets == nil {
		return model.StepResult{}, ErrNoTargets
	}
	return m.run(ctx, b, o, true)
}

func (m *Model[T]) run(ctx context.Context, b *model.Batch, o model.StepOptions, backward bool) (model.StepResult, error) {
	c := m.cfg
	if err := b.Validate(c.VocabSize); err != nil {
		return model.StepResult{}, err
	}
	if o.Boundary != nil && b.SeqLen < c.DConv-1 {
		return model.StepResult{}, fmt.Errorf("%w: SeqLen %d < d_conv−1 = %d; with sequence parallelism every shard needs at least d_conv−1 positions",
			ErrShardTooShort, b.SeqLen, c.DConv-1)
	}
	sp := newSPLink(o.Boundary)
	ws := m.workspace(b.Batch, b.SeqLen)
	n, D := b.Batch*b.SeqLen, c.DModel
	emb := model.View(m.params, m.emb)
	for t, id := range b.Inputs {
		copy(ws.res[0][t*D:(t+1)*D], emb[int(id)*D:(int(id)+1)*D])
	}
	for i := range m.layers {
		if err := ctx.Err(); err != nil {
			return model.StepResult{}, err
		}
		if err := m.layerForward(ctx, i, b, sp); err != nil {
			return model.StepResult{}, err
		}
	}
	last := ws.res[c.NLayer]
	rmsNormFwd(ws.hf, ws.frstd, last, model.View(m.params, m.normF), n, D, c.NormEps)

	count := o.Count
	if count == 0 {
		count = b.Counted()
	}
	res := model.StepResult{Count: count}
	var dhf []T
	if backward {
		dhf = make([]T, n*D)
	}
	var logits []float64
	if o.KeepLogits {
		logits = make([]float64, n*c.VocabSize)
	}
	res.LossSum = m.lmHeadLoss(b, ws.hf, count, dhf, logits)
	if count > 0 {
		res.Loss = res.LossSum / float64(count)
	}
	res.Logits = logits
	if o.KeepHidden {
		for i := 1; i <= c.NLayer; i++ {
			res.Hidden = append(res.Hidden, model.BoundaryFloat64s(ws.res[i]))
		}
		res.Hidden = append(res.Hidden, model.BoundaryFloat64s(ws.hf))
	}
	if !backward {
		return res, nil
	}

	// Backward: dres is the gradient of the residual stream, carried down.
	dres := make([]T, n*D)
	rmsNormBwd(dres, model.View(m.grads, m.normF), dhf, last, ws.frstd, model.View(m.params, m.normF), n, D)
	for i := c.NLayer - 1; i >= 0; i-- {
		if err := ctx.Err(); err != nil {
			return model.StepResult{}, err
		}
		if err := m.layerBackward(ctx, i, b, dres, sp); err != nil {
			return model.StepResult{}, err
		}
	}
	gemb := model.View(m.grads, m.emb)
	for t, id := range b.Inputs {
		linalg.Axpy(1, dres[t*D:(t+1)*D], gemb[int(id)*D:(int(id)+1)*D])
	}
	return res, nil
}

// headBlock is the number of positions whose logits are materialised at a
// time: the LM head and the cross-entropy (and its gradient) are fused per
// block so the full Batch×L×V probability tensor never exists.
const headBlock = 128

// lmHeadLoss computes the logits of every position, the summed cross-entropy of
// the counted targets, and, when dhf is non-nil, the gradient of the loss
// mean (over count positions) with respect to the final norm output (written
// into dhf) and the head matrix (added into the gradient buffer).
func (m *Model[T]) lmHeadLoss(b *model.Batch, hf []T, count int, dhf []T, keep []float64) float64 {
	c := m.cfg
	D, V := c.DModel, c.VocabSize
	n := b.Batch * b.SeqLen
	w := model.View(m.params, m.head)
	var gw []T
	if dhf != nil {
		gw = model.View(m.grads, m.head)
	}
	logits := make([]T, headBlock*V)
	rowLoss := make([]float64, n)
	for t0 := 0; t0 < n; t0 += headBlock {
		nb := min(headBlock, n-t0)
		lg := logits[:nb*V]
		linalg.Gemm(false, true, nb, V, D, 1, hf[t0*D:], D, w, D, 0, lg, V)
		if keep != nil {
			for i, v := range lg {
				keep[t0*V+i] = float64(v)
			}
		}
		parallelFor(nb, 4, func(lo, hi int) {
			for r := lo; r < hi; r++ {
				row := lg[r*V : (r+1)*V]
				tgt := -1
				if b.Targets != nil {
					tgt = int(b.Targets[t0+r])
				}
				if tgt < 0 {
					if dhf != nil {
						clear(row)
					}
					continue
				}
				mx := math.Inf(-1)
				for _, v := range row {
					mx = math.Max(mx, float64(v))
				}
				var s float64
				for _, v := range row {
					s += math.Exp(float64(v) - mx)
				}
				lse := mx + math.Log(s)
				rowLoss[t0+r] = lse - float64(row[tgt])
				if dhf == nil {
					continue
				}
				inv := 1 / float64(count)
				for j, v := range row {
					row[j] = T(math.Exp(float64(v)-lse) * inv)
				}
				row[tgt] -= T(inv)
			}
		})
		if dhf != nil && count > 0 {
			linalg.Gemm(false, false, nb, D, V, 1, lg, V, w, D, 0, dhf[t0*D:], D)
			linalg.Gemm(true, false, V, D, nb, 1, lg, V, hf[t0*D:], D, 1, gw, D)
		}
	}
	var sum float64
	for _, v := range rowLoss {
		sum += v
	}
	return sum
}

// spLink is the sequence-parallel boundary of one pass: bd is nil for an
// unsplit sequence, and prefix is set when it runs the parallel-prefix mode.
type spLink struct {
	bd     model.Boundary
	prefix model.PrefixBoundary
}

func newSPLink(bd model.Boundary) spLink {
	l := spLink{bd: bd}
	if model.ModeOf(bd) == model.SPPrefix {
		l.prefix = bd.(model.PrefixBoundary)
	}
	return l
}

func (m *Model[T]) layerForward(ctx context.Context, i int, b *model.Batch, sp spLink) error {
	c, ws, lt := m.cfg, m.ws, &m.layers[i]
	a := &ws.acts[i]
	bt, l := b.Batch, b.SeqLen
	n := bt * l
	D, E, F, Cd, GN, H := c.DModel, c.DInner(), c.InProjDim(), c.ConvDim(), c.NGroups*c.DState, c.NHeads
	p := m.params
	in, out := ws.res[i], ws.res[i+1]

	rmsNormFwd(a.u, a.rstd, in, model.View(p, lt.Norm), n, D, c.NormEps)
	linalg.Gemm(false, true, n, F, D, 1, a.u, D, model.View(p, lt.InProj), D, 0, a.zxbcdt, F)
	if lt.InProjBias != nil {
		addBias(a.zxbcdt, model.View(p, lt.InProjBias), n, F)
	}
	a.state, a.halo, a.logDecay = nil, nil, nil
	stateLen := bt * H * c.HeadDim * c.DState
	if bd := sp.bd; bd != nil {
		if sp.prefix != nil {
			// Only the halo travels here, and it is ready before the scan:
			// send it first so that every shard exchanges at once.
			if err := bd.SendForward(ctx, i, nil, model.BoundaryFloat64s(m.haloOut(a.zxbcdt, bt, l))); err != nil {
				return fmt.Errorf("ref: layer %d: send halo: %w", i, err)
			}
		}
		st, halo, err := bd.RecvForward(ctx, i)
		if err != nil {
			return fmt.Errorf("ref: layer %d: receive state: %w", i, err)
		}
		if sp.prefix != nil {
			if err := requireZero(st, i, "RecvForward", "state"); err != nil {
				return err
			}
		} else if a.state, err = fromFloat64[T](st, stateLen, "state"); err != nil {
			return err
		}
		if a.halo, err = fromFloat64[T](halo, bt*(c.DConv-1)*Cd, "halo"); err != nil {
			return err
		}
	}
	var convB []T
	if lt.ConvBias != nil {
		convB = model.View(p, lt.ConvBias)
	}
	cs := m.convShape(bt, l)
	convFwd(cs, a.pre, a.act, a.zxbcdt, a.halo, model.View(p, lt.Conv), convB)
	for t := 0; t < n; t++ {
		row := a.act[t*Cd : (t+1)*Cd]
		copy(a.x[t*E:(t+1)*E], row[:E])
		copy(a.b[t*GN:(t+1)*GN], row[E:E+GN])
		copy(a.c[t*GN:(t+1)*GN], row[E+GN:])
		copy(a.dt[t*H:(t+1)*H], a.zxbcdt[t*F+E+Cd:t*F+F])
	}
	dims, opts := m.ssdDims(bt, l)
	sin := m.ssdInputs(a, lt)
	sout := &ssd.Outputs[T]{Y: a.y, FinalState: ws.final, LogDecay: ws.decay}
	var err error
	if m.Recurrent {
		err = ssd.ForwardRecurrent(dims, opts, sin, sout)
	} else {
		err = m.scan.Forward(dims, opts, sin, sout)
	}
	if err != nil {
		return fmt.Errorf("ref: layer %d: %w", i, err)
	}
	switch {
	case sp.prefix != nil:
		// The scan above started from zero; the group's prefix gives the
		// state that enters this shard, and its contribution is added.
		a.logDecay = append(a.logDecay[:0], ws.decay...)
		hIn, err := sp.prefix.PrefixForward(ctx, i, model.BoundaryFloat64s(ws.final), model.BoundaryFloat64s(ws.decay))
		if err != nil {
			return fmt.Errorf("ref: layer %d: prefix of the states: %w", i, err)
		}
		if a.state, err = fromFloat64[T](hIn, stateLen, "incoming state"); err != nil {
			return err
		}
		if err := m.scan.AddInitialState(dims, opts, sin, a.state, a.y, nil); err != nil {
			return fmt.Errorf("ref: layer %d: %w", i, err)
		}
	case sp.bd != nil:
		if err := sp.bd.SendForward(ctx, i, model.BoundaryFloat64s(ws.final), model.BoundaryFloat64s(m.haloOut(a.zxbcdt, bt, l))); err != nil {
			return fmt.Errorf("ref: layer %d: send state: %w", i, err)
		}
	}
	var gw []T
	if lt.GatedNorm != nil {
		gw = model.View(p, lt.GatedNorm)
	}
	gatedNormFwd(m.gatedNorm(n), a.o, a.grstd, a.y, a.zxbcdt, gw)
	copy(out, in)
	linalg.Gemm(false, true, n, D, E, 1, a.o, E, model.View(p, lt.OutProj), E, 1, out, D)
	if lt.OutProjBias != nil {
		addBias(out, model.View(p, lt.OutProjBias), n, D)
	}
	return nil
}

// haloOut returns the last W−1 positions of the pre-conv xBC of each
// sequence: what the next shard convolves with (Batch×(W−1)×C_d).
func (m *Model[T]) haloOut(zxbcdt []T, bt, l int) []T {
	c := m.cfg
	W, Cd, F, E := c.DConv, c.ConvDim(), c.InProjDim(), c.DInner()
	h := make([]T, bt*(W-1)*Cd)
	for b := 0; b < bt; b++ {
		for j := 0; j < W-1; j++ {
			t := l - (W - 1) + j
			copy(h[(b*(W-1)+j)*Cd:(b*(W-1)+j+1)*Cd], zxbcdt[(b*l+t)*F+E:(b*l+t)*F+E+Cd])
		}
	}
	return h
}

func (m *Model[T]) ssdInputs(a *layerActs[T], lt *model.LayerTensors) *ssd.Inputs[T] {
	p := m.params
	return &ssd.Inputs[T]{X: a.x, DTRaw: a.dt, DTBias: model.View(p, lt.DTBias), ALog: model.View(p, lt.ALog),
		B: a.b, C: a.c, D: model.View(p, lt.D), InitState: a.state}
}

func (m *Model[T]) layerBackward(ctx context.Context, i int, b *model.Batch, dres []T, sp spLink) error {
	c, ws, lt := m.cfg, m.ws, &m.layers[i]
	a := &ws.acts[i]
	bt, l := b.Batch, b.SeqLen
	n := bt * l
	D, E, F, Cd, GN, H, W := c.DModel, c.DInner(), c.InProjDim(), c.ConvDim(), c.NGroups*c.DState, c.NHeads, c.DConv
	p, g := m.params, m.grads

	// out_proj: out = o·Woutᵀ.
	linalg.Gemm(true, false, D, E, n, 1, dres, D, a.o, E, 1, model.View(g, lt.OutProj), E)
	if lt.OutProjBias != nil {
		columnSum(model.View(g, lt.OutProjBias), dres, n, D)
	}
	do := ws.do
	linalg.Gemm(false, false, n, E, D, 1, dres, D, model.View(p, lt.OutProj), E, 0, do, E)

	// Gated norm: dy, and dz straight into the z columns of dzxbcdt.
	dz, dy := ws.dz, ws.dy
	var gw, ggw []T
	if lt.GatedNorm != nil {
		gw, ggw = model.View(p, lt.GatedNorm), model.View(g, lt.GatedNorm)
	}
	gatedNormBwd(m.gatedNorm(n), dy, dz, ggw, do, a.grstd, a.y, a.zxbcdt, gw)

	var dFinal, dHaloNext []T
	stateLen := bt * H * c.HeadDim * c.DState
	dims, opts := m.ssdDims(bt, l)
	sg := &ws.sg
	var err error
	switch {
	case sp.prefix != nil:
		// U = ∂loss/∂h_in through this shard's outputs; the group's reverse
		// prefix of the U returns the gradient of this shard's final state.
		u := &ssd.InitialStateGrads[T]{InitState: sg.InitState}
		if err := m.scan.InitialStateBackward(dims, opts, m.ssdInputs(a, lt), nil, dy, nil, u); err != nil {
			return fmt.Errorf("ref: layer %d: %w", i, err)
		}
		g, err := sp.prefix.PrefixBackward(ctx, i, model.BoundaryFloat64s(a.logDecay), model.BoundaryFloat64s(u.InitState))
		if err != nil {
			return fmt.Errorf("ref: layer %d: reverse prefix of the state gradients: %w", i, err)
		}
		if dFinal, err = fromFloat64[T](g, stateLen, "final-state gradient"); err != nil {
			return err
		}
	case sp.bd != nil:
		st, halo, err := sp.bd.RecvBackward(ctx, i)
		if err != nil {
			return fmt.Errorf("ref: layer %d: receive state gradient: %w", i, err)
		}
		if dFinal, err = fromFloat64[T](st, stateLen, "state gradient"); err != nil {
			return err
		}
		if dHaloNext, err = fromFloat64[T](halo, bt*(W-1)*Cd, "halo gradient"); err != nil {
			return err
		}
	}
	if m.Recurrent {
		err = ssd.BackwardRecurrent(dims, opts, m.ssdInputs(a, lt), dy, dFinal, sg)
	} else {
		err = m.scan.Backward(dims, opts, m.ssdInputs(a, lt), dy, dFinal, sg)
	}
	if err != nil {
		return fmt.Errorf("ref: layer %d: %w", i, err)
	}
	linalg.Axpy(1, sg.DTBias, model.View(g, lt.DTBias))
	linalg.Axpy(1, sg.ALog, model.View(g, lt.ALog))
	linalg.Axpy(1, sg.D, model.View(g, lt.D))

	// Conv: the gradient of the activated xBC is [dx | dB | dC].
	dact := ws.dact
	for t := 0; t < n; t++ {
		row := dact[t*Cd : (t+1)*Cd]
		copy(row[:E], sg.X[t*E:(t+1)*E])
		copy(row[E:E+GN], sg.B[t*GN:(t+1)*GN])
		copy(row[E+GN:], sg.C[t*GN:(t+1)*GN])
		copy(dz[t*F+E+Cd:t*F+F], sg.DTRaw[t*H:(t+1)*H])
	}
	var dhalo, convGB []T
	if a.halo != nil {
		dhalo = make([]T, bt*(W-1)*Cd)
	}
	if lt.ConvBias != nil {
		convGB = model.View(g, lt.ConvBias)
	}
	convBwd(m.convShape(bt, l), dz, model.View(g, lt.Conv), convGB, dhalo, dact, a.pre, a.zxbcdt, a.halo, model.View(p, lt.Conv))
	if sp.prefix != nil {
		if err := sp.bd.SendBackward(ctx, i, nil, model.BoundaryFloat64s(dhalo)); err != nil {
			return fmt.Errorf("ref: layer %d: send halo gradient: %w", i, err)
		}
		st, halo, err := sp.bd.RecvBackward(ctx, i)
		if err != nil {
			return fmt.Errorf("ref: layer %d: receive halo gradient: %w", i, err)
		}
		if err := requireZero(st, i, "RecvBackward", "state gradient"); err != nil {
			return err
		}
		if dHaloNext, err = fromFloat64[T](halo, bt*(W-1)*Cd, "halo gradient"); err != nil {
			return err
		}
	}
	if dHaloNext != nil {
		for bb := 0; bb < bt; bb++ {
			for j := 0; j < W-1; j++ {
				t := bb*l + l - (W - 1) + j
				linalg.Axpy(1, dHaloNext[(bb*(W-1)+j)*Cd:(bb*(W-1)+j+1)*Cd], dz[t*F+E:t*F+E+Cd])
			}
		}
	}
	if sp.bd != nil && sp.prefix == nil {
		var dInit []T
		if a.state != nil {
			dInit = sg.InitState
		}
		if err := sp.bd.SendBackward(ctx, i, model.BoundaryFloat64s(dInit), model.BoundaryFloat64s(dhalo)); err != nil {
			return fmt.Errorf("ref: layer %d: send state gradient: %w", i, err)
		}
	}

	// in_proj: zxbcdt = u·Winᵀ.
	linalg.Gemm(true, false, F, D, n, 1, dz, F, a.u, D, 1, model.View(g, lt.InProj), D)
	if lt.InProjBias != nil {
		columnSum(model.View(g, lt.InProjBias), dz, n, F)
	}
	du := ws.du
	linalg.Gemm(false, false, n, D, F, 1, dz, F, model.View(p, lt.InProj), D, 0, du, D)
	rmsNormBwd(dres, model.View(g, lt.Norm), du, ws.res[i], a.rstd, model.View(p, lt.Norm), n, D)
	return nil
}

func addBias[T model.Float](x, bias []T, n, w int) {
	for t := 0; t < n; t++ {
		linalg.Axpy(1, bias, x[t*w:(t+1)*w])
	}
}

func columnSum[T model.Float](out, x []T, n, w int) {
	columnReduce(n, w, out, func(t int, acc []T) {
		linalg.Axpy(1, x[t*w:(t+1)*w], acc)
	})
}

func fromFloat64[T model.Float](x []float64, want int, what string) ([]T, error) {
	if x == nil {
		return nil, nil
	}
	if len(x) != want {
		return nil, fmt.Errorf("ref: received %s of %d values, want %d", what, len(x), want)
	}
	out := make([]T, len(x))
	for i, v := range x {
		out[i] = T(v)
	}
	return out, nil
}

// requireZero checks that a state the parallel-prefix mode does not use
// came back from the Boundary as nil or zeros: states travel through
// PrefixForward and PrefixBackward in that mode.
func requireZero(x []float64, layer int, call, what string) error {
	for _, v := range x {
		if v != 0 {
			return fmt.Errorf("ref: layer %d: %s returned a nonzero %s in the %v mode, which passes states only through the prefix calls", layer, call, what, model.SPPrefix)
		}
	}
	return nil
}
