package gpu

import (
	"errors"
	"fmt"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/model"
)

// layerActs are the device activations of one layer that the backward pass
// reads; act marks the activation dtype. Letters: n = Batch·L rows, D
// d_model, E inner width, F in_proj width, C_d conv channels.
type layerActs struct {
	u      *kernels.Buffer // act (n, D): normed input, the in_proj operand
	rstd   *kernels.Buffer // f32 (n): its RMSNorm statistic
	zxbcdt *kernels.Buffer // act (n, F): in_proj output [z | xBC | dt]
	xbc    *kernels.Buffer // act (n, C_d): conv + SiLU output [x | B | C]
	y      *kernels.Buffer // act (n, E): SSD output
	o      *kernels.Buffer // act (n, E): gated-norm output, the out_proj operand
	grstd  *kernels.Buffer // f32 (n, norm groups): gated-norm statistic (with the gated norm)
	// The scan's forward workspace, kept for the backward (bytes, sized by
	// the library; nil with Options.RecomputeSSD, when the forward runs in
	// the shared scratch and the backward recomputes it).
	ssd *kernels.Buffer

	// Received from the previous sequence shard in the forward pass
	// (allocated with the boundary buffers; has* say whether they hold
	// this pass's values or are absent, meaning zeros).
	state    *kernels.Buffer // f32 (Batch, H, P, N)
	halo     *kernels.Buffer // act (Batch, W−1, C_d)
	hasState bool
	hasHalo  bool
	gotHalo  bool // a halo came, possibly empty (conv width 1)
}

// workspace holds the activations of one (batch, length) shape.
type workspace struct {
	bt, l    int
	boundary bool // the sequence-parallel buffers are allocated

	tokens, targets *kernels.Buffer   // int32 (n)
	res             []*kernels.Buffer // f32 (n, D) × (n_layer+1): res[i] is the input of layer i, res[n_layer] that of the final norm
	acts            []layerActs
	out             *kernels.Buffer // act (n, D): out_proj output of the latest layer, added by the next norm
	hf              *kernels.Buffer // act (n, D): final norm output
	frstd           *kernels.Buffer // f32 (n)
	logits          *kernels.Buffer // act (min(block, n), V): one block of logits (and their gradient)
	rowLoss         *kernels.Buffer // f32 (n)
	// The counted positions of a pass that runs the LM head over them
	// alone: headRows (int32, the first nHead of n) their row indices,
	// headTargets (int32) their targets.
	headRows, headTargets *kernels.Buffer

	// Backward scratch, shared by the layers (one runs at a time).
	dhf     *kernels.Buffer // act (n, D)
	dres    *kernels.Buffer // f32 (n, D): gradient of the residual stream
	dresAct *kernels.Buffer // act (n, D): its copy in bf16 (with BF16; else dres itself)
	do      *kernels.Buffer // act (n, E)
	dy      *kernels.Buffer // act (n, E)
	dz      *kernels.Buffer // act (n, F): gradient of zxbcdt
	dxbc    *kernels.Buffer // act (n, C_d)
	du      *kernels.Buffer // act (n, D)
	dssd    *kernels.Buffer // f32 (2H + len D): the scan's dt_bias, A_log and D gradients

	// Sequence-parallel buffers (with boundary).
	final, dFinal, dInit *kernels.Buffer // f32 (Batch, H, P, N)
	dHalo, dHaloNext     *kernels.Buffer // f32 (Batch, W−1, C_d)
	span                 *kernels.Buffer // act ((W−2)·F + C_d): staging of the halo rows sent

	scratch *kernels.Buffer // the operations' workspace (bytes; sized with the library)
}

// slot is one buffer of a workspace's plan.
type slot struct {
	name string
	dst  **kernels.Buffer
	dt   kernels.DType
	n    int
}

func slotBytes(slots []slot) int64 {
	var b int64
	for _, s := range slots {
		b += int64(s.n) * int64(s.dt.Size())
	}
	return b
}

// newWorkspace returns the shape's workspace with nothing allocated.
func newWorkspace(cfg model.Config, bt, l int) *workspace {
	return &workspace{bt: bt, l: l, res: make([]*kernels.Buffer, cfg.NLayer+1), acts: make([]layerActs, cfg.NLayer)}
}

// slots lists the buffers of the workspace for activation dtype act and
// LM-head block size block, without those of sequence parallelism
// (spSlots). The operations' scratch is not listed: its size comes from the
// library.
func (ws *workspace) slots(cfg model.Config, act kernels.DType, block int) []slot {
	n := ws.bt * ws.l
	D, E, F, Cd, H := cfg.DModel, cfg.DInner(), cfg.InProjDim(), cfg.ConvDim(), cfg.NHeads
	f32 := kernels.F32
	s := []slot{
		{"tokens", &ws.tokens, f32, n},
		{"targets", &ws.targets, f32, n},
		{"out", &ws.out, act, n * D},
		{"hf", &ws.hf, act, n * D},
		{"frstd", &ws.frstd, f32, n},
		{"logits", &ws.logits, act, min(block, n) * cfg.VocabSize},
		{"rowLoss", &ws.rowLoss, f32, n},
		{"headRows", &ws.headRows, f32, n},
		{"headTargets", &ws.headTargets, f32, n},
		{"dhf", &ws.dhf, act, n * D},
		{"dres", &ws.dres, f32, n * D},
		{"do", &ws.do, act, n * E},
		{"dy", &ws.dy, act, n * E},
		{"dz", &ws.dz, act, n * F},
		{"dxbc", &ws.dxbc, act, n * Cd},
		{"du", &ws.du, act, n * D},
		{"dssd", &ws.dssd, f32, 2*H + cfg.DSize()},
	}
	if act != kernels.F32 {
		s = append(s, slot{"dresAct", &ws.dresAct, act, n * D})
	}
	for i := range ws.res {
		s = append(s, slot{fmt.Sprintf("res.%d", i), &ws.res[i], f32, n * D})
	}
	for i := range ws.acts {
		a := &ws.acts[i]
		p := fmt.Sprintf("layer.%d.", i)
		s = append(s,
			slot{p + "u", &a.u, act, n * D},
			slot{p + "rstd", &a.rstd, f32, n},
			slot{p + "zxbcdt", &a.zxbcdt, act, n * F},
			slot{p + "xbc", &a.xbc, act, n * Cd},
			slot{p + "y", &a.y, act, n * E},
			slot{p + "o", &a.o, act, n * E},
		)
		if cfg.GatedNorm {
			s = append(s, slot{p + "grstd", &a.grstd, f32, n * cfg.NormGroups()})
		}
	}
	return s
}

// spSlots lists the buffers of sequence parallelism: per layer the state
// and halo received, and the states, halo gradients and staging of the
// values sent. A conv of width 1 has no halo.
func (ws *workspace) spSlots(cfg model.Config, act kernels.DType) []slot {
	F, Cd, W := cfg.InProjDim(), cfg.ConvDim(), cfg.DConv
	state := ws.bt * cfg.NHeads * cfg.HeadDim * cfg.DState
	halo := ws.bt * (W - 1) * Cd
	f32 := kernels.F32
	var s []slot
	for i := range ws.acts {
		a := &ws.acts[i]
		p := fmt.Sprintf("layer.%d.", i)
		s = append(s, slot{p + "state", &a.state, f32, state})
		if halo > 0 {
			s = append(s, slot{p + "halo", &a.halo, act, halo})
		}
	}
	s = append(s,
		slot{"final", &ws.final, f32, state},
		slot{"dFinal", &ws.dFinal, f32, state},
		slot{"dInit", &ws.dInit, f32, state},
	)
	if halo > 0 {
		s = append(s,
			slot{"dHalo", &ws.dHalo, f32, halo},
			slot{"dHaloNext", &ws.dHaloNext, f32, halo},
			slot{"span", &ws.span, act, (W-2)*F + Cd},
		)
	}
	return s
}

// ActivationBytes returns the device memory, in bytes, of the activations
// a Model with options o allocates for micro-batches of batch sequences of
// seqLen positions (boundary: with the buffers of sequence parallelism).
// It excludes the parameters, gradients, moments and bf16 weight copies
// (see ParameterBytes), and the buffers whose size the library decides: the
// operations' scratch (a few times the largest activation at most) and the
// scan's forward workspace each layer keeps for its backward (see
// Options.RecomputeSSD).
func ActivationBytes(cfg model.Config, batch, seqLen int, boundary bool, o Options) int64 {
	ws := newWorkspace(cfg, batch, seqLen)
	act := o.Precision.dtype()
	b := slotBytes(ws.slots(cfg, act, o.headBlock()))
	if boundary {
		b += slotBytes(ws.spSlots(cfg, act))
	}
	return b
}

// ParameterBytes returns the device memory, in bytes, of a Model's
// parameters, gradients and optimizer moments (fp32, layout total each), and
// with BF16 of the bf16 copies of the product weights (in_proj, out_proj and
// the LM head).
func ParameterBytes(cfg model.Config, o Options) int64 {
	l := model.NewLayout(cfg)
	b := 4 * 4 * int64(l.Total)
	if o.Precision == BF16 {
		b += 2 * int64(productWeights(cfg, l))
	}
	return b
}

// productWeights counts the elements of the weights used as product
// operands.
func productWeights(cfg model.Config, l *model.Layout) int {
	n := 0
	for i := 0; i < cfg.NLayer; i++ {
		lt := l.Layer(i)
		n += lt.InProj.Size + lt.OutProj.Size
	}
	if cfg.TieEmbeddings {
		return n + l.Must(model.NameEmbedding).Size
	}
	return n + l.Must(model.NameLMHead).Size
}

// alloc allocates every slot of the plan; on failure it frees what it
// allocated.
func (ws *workspace) alloc(lib *kernels.Lib, slots []slot) error {
	for _, s := range slots {
		b, err := lib.Alloc(s.dt, s.n)
		if err != nil {
			ws.free(slots)
			return fmt.Errorf("gpu: allocating activation %s (%d × %v): %w", s.name, s.n, s.dt, err)
		}
		*s.dst = b
	}
	return nil
}

// freeSSD releases the layers' scan forward workspaces.
func (ws *workspace) freeSSD() error {
	var errs []error
	for i := range ws.acts {
		if b := ws.acts[i].ssd; b != nil {
			errs = append(errs, b.Free())
			ws.acts[i].ssd = nil
		}
	}
	return errors.Join(errs...)
}

// free releases the slots' buffers that are allocated and clears them.
func (ws *workspace) free(slots []slot) error {
	var errs []error
	for _, s := range slots {
		if *s.dst != nil {
			errs = append(errs, (*s.dst).Free())
			*s.dst = nil
		}
	}
	return errors.Join(errs...)
}
