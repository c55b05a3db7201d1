package kernels

import (
	"fmt"
	"math"
)

// SSD limits of the kernels (m2kernels.h, ssd section).
const (
	SSDMaxChunk   = 256
	SSDMaxHeadDim = 256
	SSDMaxDState  = 256
)

// SSDShape describes one chunked scan (m2k_ssd_shape), in the letters of the
// SSD paper and with the conventions of model/ssd: head h reads B and C of
// group h/(H/G), DTLimit {0, 0} means no clamp, D has H entries or H·P with
// DHasHdim.
//
// The stride fields are row strides in elements between positions t and t+1
// of one sequence (a sequence starts at b·L·stride); 0 means dense. They let
// the scan read x, B, C and dt in place from a wider activation (the conv
// output, the in_projection) and write the gradients into the same layout.
type SSDShape struct {
	Batch, L, H, P, N, G int
	Chunk                int // Q, 1..SSDMaxChunk; a chunk longer than L is taken as L
	DType                DType
	DHasHdim             bool
	DTLimit              [2]float64
	XStride              int // x, dx: >= H·P
	DTStride             int // dt_raw, ddt_raw: >= H
	BStride              int // B, dB: >= G·N
	CStride              int // C, dC: >= G·N
	YStride              int // y, dy: >= H·P
}

// Validate checks the rules of m2kernels.h and names the field that breaks
// one.
func (s SSDShape) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"Batch", s.Batch}, {"L", s.L}, {"H", s.H}, {"P", s.P}, {"N", s.N}, {"G", s.G}, {"Chunk", s.Chunk}} {
		if f.v <= 0 {
			return invalid("SSDShape.%s must be positive, got %d", f.name, f.v)
		}
	}
	if s.H%s.G != 0 {
		return invalid("SSDShape.H = %d must be a multiple of G = %d", s.H, s.G)
	}
	if s.Chunk > SSDMaxChunk {
		return invalid("SSDShape.Chunk must be at most %d, got %d", SSDMaxChunk, s.Chunk)
	}
	if s.P > SSDMaxHeadDim {
		return invalid("SSDShape.P must be at most %d, got %d", SSDMaxHeadDim, s.P)
	}
	if s.N > SSDMaxDState {
		return invalid("SSDShape.N must be at most %d, got %d", SSDMaxDState, s.N)
	}
	if !s.DType.valid() {
		return invalid("SSDShape.DType must be F32 or BF16, got %d", int32(s.DType))
	}
	lo, hi := s.DTLimit[0], s.DTLimit[1]
	if math.IsNaN(lo) || math.IsNaN(hi) || lo < 0 || lo > hi {
		return invalid("SSDShape.DTLimit must satisfy 0 <= lo <= hi, got [%g, %g]", lo, hi)
	}
	for _, f := range []struct {
		name     string
		v, dense int
		rule     string
	}{
		{"XStride", s.XStride, s.H * s.P, "H·P"},
		{"DTStride", s.DTStride, s.H, "H"},
		{"BStride", s.BStride, s.G * s.N, "G·N"},
		{"CStride", s.CStride, s.G * s.N, "G·N"},
		{"YStride", s.YStride, s.H * s.P, "H·P"},
	} {
		if f.v != 0 && f.v < f.dense {
			return invalid("SSDShape.%s must be 0 (dense) or >= %s = %d, got %d", f.name, f.rule, f.dense, f.v)
		}
	}
	return nil
}

func stride(v, dense int) int {
	if v == 0 {
		return dense
	}
	return v
}

// Elements returns the number of elements each tensor of the scan spans,
// strides included: x (and dx), dt_raw, B, C, y, D, and a state (Bt·H·P·N).
func (s SSDShape) Elements() (x, dt, b, c, y, d, state int) {
	rows := s.Batch * s.L
	last := func(st, dense int) int { return (rows-1)*stride(st, dense) + dense }
	x = last(s.XStride, s.H*s.P)
	dt = last(s.DTStride, s.H)
	b = last(s.BStride, s.G*s.N)
	c = last(s.CStride, s.G*s.N)
	y = last(s.YStride, s.H*s.P)
	d = s.H
	if s.DHasHdim {
		d = s.H * s.P
	}
	state = s.Batch * s.H * s.P * s.N
	return
}

// cSSDShape mirrors struct m2k_ssd_shape (every field 8 bytes, no padding).
type cSSDShape struct {
	batch, seqlen, nheads, headdim, dstate, ngroups, chunk int64
	dtype, dHasHdim                                        int64
	dtMin, dtMax                                           float64
	xStride, dtStride, bStride, cStride, yStride           int64
}

func (s SSDShape) c() cSSDShape {
	var hd int64
	if s.DHasHdim {
		hd = 1
	}
	return cSSDShape{
		batch: int64(s.Batch), seqlen: int64(s.L), nheads: int64(s.H), headdim: int64(s.P),
		dstate: int64(s.N), ngroups: int64(s.G), chunk: int64(s.Chunk),
		dtype: int64(s.DType), dHasHdim: hd, dtMin: s.DTLimit[0], dtMax: s.DTLimit[1],
		xStride: int64(s.XStride), dtStride: int64(s.DTStride), bStride: int64(s.BStride),
		cStride: int64(s.CStride), yStride: int64(s.YStride),
	}
}

// SSDForwardArgs are the device pointers of m2k_ssd_fwd (m2k_ssd_fwd_args).
// X, DTRaw, B, C and Y hold the activation dtype; DTBias, ALog, D and the
// states and LogDecay are f32. InitState 0 means zeros; FinalState or
// LogDecay 0 skips that output. The workspace must hold at least
// SSDWorkspaceBytes(shape, SSDForwardWorkspace) bytes.
type SSDForwardArgs struct {
	X, DTRaw, DTBias, ALog, B, C, D, InitState uintptr
	Y, FinalState, LogDecay                    uintptr
	Workspace                                  uintptr
	WorkspaceBytes                             int64
}

// SSDBackwardArgs are the device pointers of m2k_ssd_bwd (m2k_ssd_bwd_args):
// the forward inputs, the incoming gradients DY (activation dtype, layout of
// Y) and DFinalState (f32, 0 means zeros), and the gradients it overwrites:
// DX, DDTRaw, DB, DC in the activation dtype and the layout of their
// tensors; DDTBias, DALog, DD and DInitState in f32 (DInitState 0 skips it).
// Parameter gradients are sums over batch and time of this call.
//
// FwdWorkspace, when not 0, is the workspace of the SSDForward call whose
// gradients these are (same shape and inputs), untouched since: the
// backward reads the forward's intermediates (chunk states, C·Bᵀ, dt and
// the decay cumsums) from it instead of recomputing them, and Workspace
// then needs SSDWorkspaceBytes(shape, SSDBackwardSavedWorkspace) bytes;
// with 0 it needs SSDWorkspaceBytes(shape, SSDBackwardWorkspace).
type SSDBackwardArgs struct {
	X, DTRaw, DTBias, ALog, B, C, D, InitState uintptr
	DY, DFinalState                            uintptr
	DX, DDTRaw, DB, DC                         uintptr
	DDTBias, DALog, DD, DInitState             uintptr
	Workspace                                  uintptr
	WorkspaceBytes                             int64
	FwdWorkspace                               uintptr
	FwdWorkspaceBytes                          int64
}

// SSDWorkspace names what an SSD workspace serves (m2k_ssd_workspace_size's
// kind).
type SSDWorkspace int32

const (
	// SSDForwardWorkspace is the forward's workspace; after the forward it
	// holds what SSDBackwardArgs.FwdWorkspace passes to the backward.
	SSDForwardWorkspace SSDWorkspace = 0
	// SSDBackwardWorkspace is the workspace of a backward that recomputes
	// the forward's intermediates.
	SSDBackwardWorkspace SSDWorkspace = 1
	// SSDBackwardSavedWorkspace is the workspace of a backward given the
	// forward's workspace.
	SSDBackwardSavedWorkspace SSDWorkspace = 2
)

func (k SSDWorkspace) String() string {
	switch k {
	case SSDForwardWorkspace:
		return "forward"
	case SSDBackwardWorkspace:
		return "backward"
	case SSDBackwardSavedWorkspace:
		return "backward given the forward's workspace"
	}
	return fmt.Sprintf("SSDWorkspace(%d)", int32(k))
}

type ssdFuncs struct {
	workspaceSize func(shape *cSSDShape, kind int32, bytes *int64) int32
	fwd           func(shape *cSSDShape, args *SSDForwardArgs, stream uintptr) int32
	bwd           func(shape *cSSDShape, args *SSDBackwardArgs, stream uintptr) int32
}

func (f *ssdFuncs) bind(h uintptr) error {
	return bindAll(h, []binding{
		{&f.workspaceSize, "m2k_ssd_workspace_size"},
		{&f.fwd, "m2k_ssd_fwd"},
		{&f.bwd, "m2k_ssd_bwd"},
	})
}

// SSDWorkspaceBytes returns the bytes of workspace that use kind of the scan
// needs for shape s.
func (l *Lib) SSDWorkspaceBytes(s SSDShape, kind SSDWorkspace) (int64, error) {
	if l.ssdErr != nil {
		return 0, l.ssdErr
	}
	if err := s.Validate(); err != nil {
		return 0, err
	}
	if kind < SSDForwardWorkspace || kind > SSDBackwardSavedWorkspace {
		return 0, invalid("SSDWorkspaceBytes: kind must be SSDForwardWorkspace, SSDBackwardWorkspace or SSDBackwardSavedWorkspace, got %d", int32(kind))
	}
	cs := s.c()
	var n int64
	err := l.Call("m2k_ssd_workspace_size", func() int32 { return l.ssd.workspaceSize(&cs, int32(kind), &n) })
	return n, err
}

func nonZero(fields ...namedPtr) error {
	for _, f := range fields {
		if f.p == 0 {
			return invalid("%s is a null device pointer", f.name)
		}
	}
	return nil
}

type namedPtr struct {
	name string
	p    uintptr
}

// SSDForward launches the chunked forward scan on stream st.
func (l *Lib) SSDForward(s SSDShape, a *SSDForwardArgs, st Stream) error {
	if l.ssdErr != nil {
		return l.ssdErr
	}
	if err := s.Validate(); err != nil {
		return err
	}
	if a == nil {
		return invalid("SSDForward: args is nil")
	}
	if err := nonZero(namedPtr{"X", a.X}, namedPtr{"DTRaw", a.DTRaw}, namedPtr{"DTBias", a.DTBias},
		namedPtr{"ALog", a.ALog}, namedPtr{"B", a.B}, namedPtr{"C", a.C}, namedPtr{"D", a.D},
		namedPtr{"Y", a.Y}, namedPtr{"Workspace", a.Workspace}); err != nil {
		return err
	}
	cs := s.c()
	return l.Call("m2k_ssd_fwd", func() int32 { return l.ssd.fwd(&cs, a, uintptr(st)) })
}

// SSDBackward launches the chunked backward scan on stream st.
func (l *Lib) SSDBackward(s SSDShape, a *SSDBackwardArgs, st Stream) error {
	if l.ssdErr != nil {
		return l.ssdErr
	}
	if err := s.Validate(); err != nil {
		return err
	}
	if a == nil {
		return invalid("SSDBackward: args is nil")
	}
	if err := nonZero(namedPtr{"X", a.X}, namedPtr{"DTRaw", a.DTRaw}, namedPtr{"DTBias", a.DTBias},
		namedPtr{"ALog", a.ALog}, namedPtr{"B", a.B}, namedPtr{"C", a.C}, namedPtr{"D", a.D},
		namedPtr{"DY", a.DY}, namedPtr{"DX", a.DX}, namedPtr{"DDTRaw", a.DDTRaw}, namedPtr{"DB", a.DB},
		namedPtr{"DC", a.DC}, namedPtr{"DDTBias", a.DDTBias}, namedPtr{"DALog", a.DALog}, namedPtr{"DD", a.DD},
		namedPtr{"Workspace", a.Workspace}); err != nil {
		return err
	}
	cs := s.c()
	return l.Call("m2k_ssd_bwd", func() int32 { return l.ssd.bwd(&cs, a, uintptr(st)) })
}
