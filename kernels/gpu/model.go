package gpu

import (
	"errors"
	"fmt"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/kernels/ops"
	"github.com/m2train/m2train/model"
)

// stream is the CUDA legacy default stream, on which the model queues all
// its work: the library's synchronous copies are ordered with it, so a
// download after a kernel sees the kernel's result without an explicit
// synchronisation.
const stream kernels.Stream = 0

// Model is the CUDA backend of one model replica. It is not safe for
// concurrent use; several Models may share one GPU.
type Model struct {
	lib   *kernels.Lib
	ops   *ops.Ops
	gemm  *ops.Gemm
	cfg   model.Config
	opts  Options
	act   kernels.DType // activation dtype
	block int           // LM-head block

	layout           *model.Layout
	layers           []model.LayerTensors
	emb, head, normF *model.Tensor

	params, grads         *kernels.Buffer // f32, layout.Total
	hostParams, hostGrads []float32       // host mirrors (hostGrads pinned where possible)
	copier                *gradCopier     // GradsToHostAsync's stream and events, or nil

	// Product weights in the activation dtype: with F32 views of params,
	// with BF16 copies (copies[j] of tensor copySrc[j]) refreshed from
	// params before a pass when stale.
	wIn, wOut   []*kernels.Buffer
	wHead       *kernels.Buffer
	copies      []*kernels.Buffer
	copySrc     []*model.Tensor
	copiesStale bool

	mom     *moments        // optimizer moments, allocated at first use
	noDecay *kernels.Buffer // int64 [start, end) pairs of the tensors without weight decay
	nRanges int

	normOut, lossSum *kernels.Buffer // one float64 each
	normWS           *kernels.Buffer // workspace of the gradient norm

	ws *workspace

	// Host scratch of packHead, reused across passes of one shape.
	hostRows, hostHeadTargets []int32

	auto     bool  // host mirrors kept coherent at every call
	deferred error // failure of a call without an error result (ZeroGrads), returned by the next call
	closed   bool
}

// moments are AdamW's first and second moments on the device.
type moments struct{ m, v *kernels.Buffer }

var (
	_ model.Backend[float32]       = (*Model)(nil)
	_ model.DeviceBackend[float32] = (*Model)(nil)
	_ model.GradStreamer           = (*Model)(nil)
)

// Open loads the kernel library and returns a model on its GPU: the library
// at path, or with an empty path the one kernels.Default finds ($M2K_LIB,
// next to the executable, kernels/build/). When the library or a GPU is
// missing the error wraps ErrUnavailable (and the kernels package's
// reason); the caller then falls back to the CPU backend.
func Open(path string, cfg model.Config, o Options) (*Model, error) {
	lib, err := kernels.Load(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return New(lib, cfg, o)
}

// New returns a model for cfg on the GPU of lib with zero parameters and
// gradients. Write the parameters into Params (and, with
// Options.ExplicitSync, upload them with SyncFromHost).
func New(lib *kernels.Lib, cfg model.Config, o Options) (*Model, error) {
	if lib == nil {
		return nil, fmt.Errorf("%w: gpu.New: the library is nil", ErrUnavailable)
	}
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if err := CheckConfig(cfg); err != nil {
		return nil, err
	}
	op, err := ops.New(lib)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	// A library built without the SSD kernels still opens; find out now.
	probe := kernels.SSDShape{Batch: 1, L: 1, H: cfg.NHeads, P: cfg.HeadDim, N: cfg.DState, G: cfg.NGroups,
		Chunk: cfg.ChunkSize, DType: o.Precision.dtype(), DHasHdim: cfg.DHasHdim, DTLimit: cfg.DTLimit}
	if _, err := lib.SSDWorkspaceBytes(probe, kernels.SSDForwardWorkspace); err != nil {
		if errors.Is(err, kernels.ErrABI) {
			return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		return nil, fmt.Errorf("gpu: the SSD kernels reject the configuration: %w", err)
	}
	l := model.NewLayout(cfg)
	m := &Model{lib: lib, ops: op, cfg: cfg, opts: o, act: o.Precision.dtype(), block: o.headBlock(),
		layout: l, auto: !o.ExplicitSync,
		hostParams: make([]float32, l.Total)}
	for i := 0; i < cfg.NLayer; i++ {
		m.layers = append(m.layers, l.Layer(i))
	}
	m.emb = l.Must(model.NameEmbedding)
	m.normF = l.Must(model.NameNormF)
	m.head = m.emb
	if !cfg.TieEmbeddings {
		m.head = l.Must(model.NameLMHead)
	}
	if err := m.allocate(); err != nil {
		m.Close()
		return nil, err
	}
	m.allocHostGrads()
	return m, nil
}

// allocate creates the model-level device state: the GEMM context, the
// flat buffers (zeroed), the product-weight copies, the no-decay ranges
// and the scalars.
func (m *Model) allocate() error {
	var err error
	if m.gemm, err = m.ops.NewGemm(); err != nil {
		return err
	}
	total := m.layout.Total
	for _, b := range []**kernels.Buffer{&m.params, &m.grads} {
		if *b, err = m.lib.Alloc(kernels.F32, total); err != nil {
			return fmt.Errorf("gpu: allocating %d parameters: %w", total, err)
		}
		if err = (*b).Zero(); err != nil {
			return err
		}
	}
	for i := range m.layers {
		lt := &m.layers[i]
		in, err := m.productWeight(lt.InProj)
		if err != nil {
			return err
		}
		out, err := m.productWeight(lt.OutProj)
		if err != nil {
			return err
		}
		m.wIn, m.wOut = append(m.wIn, in), append(m.wOut, out)
	}
	if m.wHead, err = m.productWeight(m.head); err != nil {
		return err
	}
	m.copiesStale = true

	var rs []ops.Range
	for _, t := range m.layout.Tensors {
		if t.NoDecay {
			rs = append(rs, ops.Range{Start: t.Offset, End: t.Offset + t.Size})
		}
	}
	packed, err := ops.PackRanges(rs)
	if err != nil {
		return err
	}
	if len(packed) > 0 {
		if m.noDecay, err = ops.UploadInt64(m.lib, packed); err != nil {
			return err
		}
		m.nRanges = len(packed) / 2
	}
	if m.normOut, err = ops.AllocFloat64(m.lib, 1); err != nil {
		return err
	}
	if m.lossSum, err = ops.AllocFloat64(m.lib, 1); err != nil {
		return err
	}
	need, err := m.ops.GradNormWorkspace(total)
	if err != nil {
		return err
	}
	m.normWS, err = allocBytes(m.lib, need)
	return err
}

// productWeight returns the operand of the products for tensor t: a view
// of the parameters with F32, a bf16 copy with BF16.
func (m *Model) productWeight(t *model.Tensor) (*kernels.Buffer, error) {
	if m.act == kernels.F32 {
		return m.pv(t), nil
	}
	b, err := m.lib.Alloc(kernels.BF16, t.Size)
	if err != nil {
		return nil, fmt.Errorf("gpu: allocating the bf16 copy of %s: %w", t.Name, err)
	}
	m.copies = append(m.copies, b)
	m.copySrc = append(m.copySrc, t)
	return b, nil
}

// allocBytes allocates a scratch buffer of at least bytes bytes (one
// element at least, so that it has an address).
func allocBytes(lib *kernels.Lib, bytes int64) (*kernels.Buffer, error) {
	return lib.Alloc(kernels.F32, max(1, int((bytes+3)/4)))
}

// view is the sub-range [off, off+n) of b, for passing to the kernels.
func view(b *kernels.Buffer, off, n int) *kernels.Buffer {
	return &kernels.Buffer{Ptr: b.Offset(off), Len: n, DType: b.DType}
}

// pv is the view of tensor t in the parameters (nil for an absent tensor).
func (m *Model) pv(t *model.Tensor) *kernels.Buffer {
	if t == nil {
		return nil
	}
	return view(m.params, t.Offset, t.Size)
}

// gv is the view of tensor t in the gradients (nil for an absent tensor).
func (m *Model) gv(t *model.Tensor) *kernels.Buffer {
	if t == nil {
		return nil
	}
	return view(m.grads, t.Offset, t.Size)
}

// Name reports the backend and its precision.
func (m *Model) Name() string { return "cuda-" + m.opts.Precision.String() }

// Device names the GPU.
func (m *Model) Device() string {
	d := m.lib.Device()
	return fmt.Sprintf("%s (device %d, %d MiB, sm_%d%d)", d.Name, d.Index, d.TotalMem>>20, d.CCMajor, d.CCMinor)
}

// Precision returns the model's precision.
func (m *Model) Precision() Precision { return m.opts.Precision }

// Config returns the model configuration.
func (m *Model) Config() model.Config { return m.cfg }

// Layout returns the flat-buffer layout.
func (m *Model) Layout() *model.Layout { return m.layout }

// Params returns the host mirror of the parameters. With automatic
// synchronisation it is the model's parameters: each pass uploads it. In
// explicit mode it is current after SyncToHost(SyncParams) and reaches the
// device through SyncFromHost(SyncParams).
func (m *Model) Params() []float32 { return m.hostParams }

// Grads returns the host mirror of the gradients. With automatic
// synchronisation ForwardBackward uploads it before the pass and overwrites
// it with the accumulated gradients after. In explicit mode it is current
// after SyncToHost(SyncGrads).
func (m *Model) Grads() []float32 { return m.hostGrads }

// ZeroGrads clears the gradients: the host mirror with automatic
// synchronisation, the device buffer in explicit mode (the host mirror is
// then left as it is). A device failure is returned by the next call that
// returns an error.
func (m *Model) ZeroGrads() {
	if m.closed {
		return
	}
	if m.auto {
		clear(m.hostGrads)
		return
	}
	if err := m.grads.ZeroAsync(stream); err != nil && m.deferred == nil {
		m.deferred = fmt.Errorf("gpu: ZeroGrads: %w", err)
	}
}

// check returns ErrClosed after Close, else the deferred failure of an
// earlier call (once).
func (m *Model) check() error {
	if m.closed {
		return ErrClosed
	}
	err := m.deferred
	m.deferred = nil
	return err
}

// Close frees the model's device memory; a second Close is a no-op.
func (m *Model) Close() error {
	if m.closed {
		return nil
	}
	m.closed = true
	var errs []error
	if m.gemm != nil {
		errs = append(errs, m.gemm.Close())
	}
	errs = append(errs, m.freeWorkspace())
	for _, b := range m.copies {
		errs = append(errs, b.Free())
	}
	if m.mom != nil {
		errs = append(errs, m.mom.m.Free(), m.mom.v.Free())
	}
	if m.copier != nil {
		// The copies in flight finish before the memory they use goes.
		errs = append(errs, m.copier.close())
		if m.copier.pinned != nil {
			m.hostGrads = nil
		}
		m.copier = nil
	}
	for _, b := range []*kernels.Buffer{m.params, m.grads, m.noDecay, m.normOut, m.lossSum, m.normWS} {
		if b != nil {
			errs = append(errs, b.Free())
		}
	}
	m.copies, m.mom, m.wIn, m.wOut, m.wHead = nil, nil, nil, nil, nil
	return errors.Join(errs...)
}

// freeWorkspace releases the activations.
func (m *Model) freeWorkspace() error {
	ws := m.ws
	if ws == nil {
		return nil
	}
	m.ws = nil
	errs := []error{ws.free(ws.slots(m.cfg, m.act, m.block)), ws.free(ws.spSlots(m.cfg, m.act)), ws.freeSSD()}
	if ws.scratch != nil {
		errs = append(errs, ws.scratch.Free())
	}
	return errors.Join(errs...)
}

// workspace returns the activations of a (bt, l) pass, allocating them when
// the shape changes, and those of sequence parallelism when boundary is set.
func (m *Model) workspace(bt, l int, boundary bool) (*workspace, error) {
	if m.ws != nil && (m.ws.bt != bt || m.ws.l != l) {
		if err := m.freeWorkspace(); err != nil {
			return nil, err
		}
	}
	if m.ws == nil {
		ws := newWorkspace(m.cfg, bt, l)
		if err := ws.alloc(m.lib, ws.slots(m.cfg, m.act, m.block)); err != nil {
			return nil, err
		}
		m.ws = ws
		if !m.opts.RecomputeSSD {
			if err := m.allocSSD(ws); err != nil {
				return nil, err
			}
		}
		need, err := m.scratchBytes(bt, l)
		if err != nil {
			return nil, err
		}
		if ws.scratch, err = allocBytes(m.lib, need); err != nil {
			return nil, fmt.Errorf("gpu: allocating %d bytes of kernel workspace: %w", need, err)
		}
	}
	if boundary && !m.ws.boundary {
		if err := m.ws.alloc(m.lib, m.ws.spSlots(m.cfg, m.act)); err != nil {
			return nil, err
		}
		m.ws.boundary = true
	}
	return m.ws, nil
}

// allocSSD allocates each layer's forward workspace of the scan, which the
// layer's backward reads.
func (m *Model) allocSSD(ws *workspace) error {
	need, err := m.lib.SSDWorkspaceBytes(m.ssdShape(ws.bt, ws.l), kernels.SSDForwardWorkspace)
	if err != nil {
		return err
	}
	for i := range ws.acts {
		if ws.acts[i].ssd, err = allocBytes(m.lib, need); err != nil {
			return fmt.Errorf("gpu: allocating layer %d's scan forward workspace (%d bytes): %w", i, need, err)
		}
	}
	return nil
}

// scratchBytes is the largest workspace any operation of a (bt, l) pass
// needs; the operations run one after another on one stream, so they share
// it.
func (m *Model) scratchBytes(bt, l int) (int64, error) {
	c := m.cfg
	n := bt * l
	var need int64
	take := func(b int64, err error) error {
		need = max(need, b)
		return err
	}
	sh := m.ssdShape(bt, l)
	errs := []error{
		take(m.lib.SSDWorkspaceBytes(sh, kernels.SSDBackwardSavedWorkspace)),
		take(m.ops.RMSNormBackwardWorkspace(n, c.DModel)),
		take(m.ops.ColumnSumWorkspace(1, c.NHeads)),
		take(m.ops.ColumnSumWorkspace(1, c.DSize())),
		take(m.ops.ConvBackwardWorkspace(m.convShape(bt, l))),
		take(m.ops.EmbeddingBackwardWorkspace(n, c.VocabSize)),
	}
	if m.opts.RecomputeSSD {
		errs = append(errs, take(m.lib.SSDWorkspaceBytes(sh, kernels.SSDForwardWorkspace)),
			take(m.lib.SSDWorkspaceBytes(sh, kernels.SSDBackwardWorkspace)))
	}
	if c.Bias {
		errs = append(errs, take(m.ops.ColumnSumWorkspace(n, c.InProjDim())), take(m.ops.ColumnSumWorkspace(n, c.DModel)))
	}
	if c.GatedNorm {
		errs = append(errs, take(m.ops.GatedNormBackwardWorkspace(n, c.DInner())))
	}
	return need, errors.Join(errs...)
}

func (m *Model) ssdShape(bt, l int) kernels.SSDShape {
	c := m.cfg
	return kernels.SSDShape{Batch: bt, L: l, H: c.NHeads, P: c.HeadDim, N: c.DState, G: c.NGroups,
		Chunk: c.ChunkSize, DType: m.act, DHasHdim: c.DHasHdim, DTLimit: c.DTLimit,
		// x, B and C are column ranges of the conv output, dt_raw one of
		// the in_proj output; the gradients go to the same layouts.
		XStride: c.ConvDim(), BStride: c.ConvDim(), CStride: c.ConvDim(), DTStride: c.InProjDim()}
}

func (m *Model) convShape(bt, l int) ops.ConvShape {
	c := m.cfg
	return ops.ConvShape{Batch: bt, L: l, Channels: c.ConvDim(), Width: c.DConv,
		LD: c.InProjDim(), Off: c.DInner(), LDAct: c.ConvDim()}
}

func (m *Model) gatedShape(n int) ops.GatedNormShape {
	c := m.cfg
	return ops.GatedNormShape{N: n, E: c.DInner(), Groups: c.NormGroups(), LDZ: c.InProjDim(),
		Eps: float32(c.GatedNormEps), BeforeGate: c.NormBeforeGate, Enabled: c.GatedNorm}
}

// refreshWeights converts the product weights to bf16 when the parameters
// changed since the last conversion.
func (m *Model) refreshWeights() error {
	if !m.copiesStale {
		return nil
	}
	for j, b := range m.copies {
		if err := m.lib.ConvertF32ToBF16(b, m.pv(m.copySrc[j]), stream); err != nil {
			return fmt.Errorf("gpu: bf16 copy of %s: %w", m.copySrc[j].Name, err)
		}
	}
	m.copiesStale = false
	return nil
}
