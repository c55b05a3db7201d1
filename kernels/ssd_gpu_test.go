//go:build gpu

package kernels

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/m2train/m2train/model/ssd"
)

// Tolerances of the SSD comparisons, as max|gpu − ref| / max|ref| over each
// tensor (ref: model/ssd in float64 on the same inputs).
//
// f32: 1e-4. Every quantity is computed in f32 with f32 accumulation; the
// largest term is the per-chunk cumsum of dt·A held in f32, whose absolute
// error (~|cs|·2^-24 ≈ 1e-5 for |cs| up to a few hundred) becomes the
// relative error of the decays exp(cs_i − cs_j).
//
// bf16: the activations are exactly representable (the reference reads the
// same rounded values), so the error comes from rounding to bf16, with unit
// roundoff u = 2^-8 in the convention that bounds |round(v) − v| by u·|v|
// with margin: the operands rebuilt inside the scan (decay-scaled CB, the
// states Hin_c, the scaled x of a chunk state, dCB) and the outputs. A
// reduction of K terms each perturbed by a relative u has error at most
// u·Σ|terms|; with independent rounding the error grows like √K·u·|term|,
// as does the sum of random-sign terms, so the normwise relative error stays
// a small multiple of u whatever the reduction length. Forward outputs pass
// through one rebuilt operand and one output rounding: 4u = 2^-6. Backward
// gradients pass through two chained rebuilt operands (e.g. states then dCB)
// and one output rounding: 8u = 2^-5. States and parameter gradients are
// f32 outputs fed by the same chains: 8u.
const (
	tolF32      = 1e-4
	tolBF16Fwd  = 1.0 / 64
	tolBF16Bwd  = 1.0 / 32
	elemRelFlor = 1e-3 // floor (relative to max|ref|) of the reported elementwise relative error
)

type ssdCase struct {
	name    string
	d       ssd.Dims
	chunk   int
	hdim    bool
	dtLimit [2]float64
	init    bool // nonzero initial state
	dfinal  bool // nonzero gradient of the final state
	strided bool // x, B, C in one buffer; dt, y with padded rows
}

var ssdCases = []ssdCase{
	{name: "tiny", d: ssd.Dims{Batch: 1, L: 64, H: 2, P: 16, N: 16, G: 1}, chunk: 32},
	{name: "ragged_g2_hdim_limit_init", d: ssd.Dims{Batch: 2, L: 200, H: 4, P: 32, N: 24, G: 2}, chunk: 64,
		hdim: true, dtLimit: [2]float64{0.01, 0.08}, init: true, dfinal: true},
	// More heads per group than one block of chunk_dcb / chunk_dbc takes
	// (4): the heads are split over blocks whose partial sums are added
	// afterwards, here 4 + 1 heads per group.
	{name: "head_splits_g2", d: ssd.Dims{Batch: 2, L: 150, H: 10, P: 32, N: 40, G: 2}, chunk: 64, dfinal: true},
	{name: "mamba2_dims", d: ssd.Dims{Batch: 2, L: 300, H: 2, P: 64, N: 128, G: 1}, chunk: 256, init: true, dfinal: true},
	{name: "odd_tiles", d: ssd.Dims{Batch: 1, L: 250, H: 3, P: 80, N: 72, G: 3}, chunk: 100, init: true},
	{name: "strided_g2", d: ssd.Dims{Batch: 2, L: 130, H: 4, P: 32, N: 16, G: 2}, chunk: 64, dfinal: true, strided: true},
	{name: "head_splits_g1", d: ssd.Dims{Batch: 1, L: 320, H: 12, P: 64, N: 128, G: 1}, chunk: 128, init: true},
	{name: "chunk_gt_L", d: ssd.Dims{Batch: 3, L: 40, H: 2, P: 16, N: 32, G: 1}, chunk: 256, hdim: true, init: true},
}

// ssdProblem holds one case's inputs in float64, already rounded to what
// the device sees.
type ssdProblem struct {
	c      ssdCase
	dt     DType
	in     ssd.Inputs[float64]
	dY     []float64
	dFinal []float64
}

func normals(r *rand.Rand, n int, mean, std float64) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = mean + std*r.NormFloat64()
	}
	return s
}

func roundTo(dt DType, s []float64) []float64 {
	for i, v := range s {
		if dt == BF16 {
			s[i] = float64(RoundBF16(float32(v)))
		} else {
			s[i] = float64(float32(v))
		}
	}
	return s
}

func newSSDProblem(c ssdCase, dt DType, seed uint64) *ssdProblem {
	r := rand.New(rand.NewPCG(seed, 0x5d))
	d := c.d
	nx, ndt, nbc := d.Batch*d.L*d.H*d.P, d.Batch*d.L*d.H, d.Batch*d.L*d.G*d.N
	nst := d.Batch * d.H * d.P * d.N
	nd := d.H
	if c.hdim {
		nd = d.H * d.P
	}
	p := &ssdProblem{c: c, dt: dt}
	p.in.X = roundTo(dt, normals(r, nx, 0, 1))
	p.in.DTRaw = roundTo(dt, normals(r, ndt, -3, 1))
	p.in.DTBias = roundTo(F32, normals(r, d.H, 0, 0.5))
	p.in.ALog = make([]float64, d.H)
	for h := range p.in.ALog {
		p.in.ALog[h] = math.Log(1 + 15*r.Float64())
	}
	roundTo(F32, p.in.ALog)
	p.in.B = roundTo(dt, normals(r, nbc, 0, 1))
	p.in.C = roundTo(dt, normals(r, nbc, 0, 1))
	p.in.D = roundTo(F32, normals(r, nd, 0, 1))
	if c.init {
		p.in.InitState = roundTo(F32, normals(r, nst, 0, 1))
	}
	p.dY = roundTo(dt, normals(r, nx, 0, 1))
	if c.dfinal {
		p.dFinal = roundTo(F32, normals(r, nst, 0, 1))
	}
	return p
}

func (p *ssdProblem) opts() ssd.Options {
	return ssd.Options{Chunk: p.c.chunk, DTLimit: p.c.dtLimit, DHasHdim: p.c.hdim}
}

func (p *ssdProblem) shape() SSDShape {
	d := p.c.d
	s := SSDShape{Batch: d.Batch, L: d.L, H: d.H, P: d.P, N: d.N, G: d.G, Chunk: p.c.chunk, DType: p.dt,
		DHasHdim: p.c.hdim, DTLimit: p.c.dtLimit}
	if p.c.strided {
		w := d.H*d.P + 2*d.G*d.N + 8 // one (Bt·L, w) buffer holding x | B | C | 8 unused columns
		s.XStride, s.BStride, s.CStride = w, w, w
		s.DTStride = d.H + 3
		s.YStride = d.H*d.P + 5
	}
	return s
}

// sentinel fills the gaps of strided buffers; kernels must neither read
// it into a result nor overwrite it.
const sentinel = float32(-12345)

// rowsIn scatters a dense (rows, width) tensor into buf at column offset
// col with the given row stride.
func rowsIn(buf []float32, dense []float64, rows, width, stride, col int) {
	for r := 0; r < rows; r++ {
		for k := 0; k < width; k++ {
			buf[r*stride+col+k] = float32(dense[r*width+k])
		}
	}
}

// rowsOut gathers a dense (rows, width) tensor from buf.
func rowsOut(buf []float32, rows, width, stride, col int) []float64 {
	out := make([]float64, rows*width)
	for r := 0; r < rows; r++ {
		for k := 0; k < width; k++ {
			out[r*width+k] = float64(buf[r*stride+col+k])
		}
	}
	return out
}

func filled(n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = sentinel
	}
	return s
}

// cmpStats compares got with ref: max|a−b|, that over max|ref|, and the
// elementwise relative error with a floor of elemRelFlor·max|ref|.
func cmpStats(got, ref []float64) (maxAbs, maxRel, elemRel float64) {
	var refMax float64
	for _, v := range ref {
		refMax = max(refMax, math.Abs(v))
	}
	floor := elemRelFlor * refMax
	for i, v := range ref {
		d := math.Abs(got[i] - v)
		if math.IsNaN(got[i]) {
			d = math.Inf(1)
		}
		maxAbs = max(maxAbs, d)
		elemRel = max(elemRel, d/max(math.Abs(v), floor, 1e-300))
	}
	maxRel = maxAbs / max(refMax, 1e-300)
	return
}

func report(t *testing.T, kernel string, dt DType, got, ref []float64, tol float64) {
	t.Helper()
	maxAbs, maxRel, elemRel := cmpStats(got, ref)
	verdict := "PASS"
	if !(maxRel <= tol) {
		verdict = "FAIL"
		t.Errorf("%s %s: max_rel %.3g above tol %.3g", kernel, dt, maxRel, tol)
	}
	fmt.Printf("KERNEL %s %s max_abs=%.3g max_rel=%.3g elem_rel=%.3g tol=%.3g %s\n", kernel, dt, maxAbs, maxRel, elemRel, tol, verdict)
}

func openLib(t testing.TB) *Lib {
	t.Helper()
	l, err := Default()
	if err != nil {
		t.Fatalf("loading the library: %v", err)
	}
	return l
}

// dev allocates device buffers and frees them all at the end of a test.
type dev struct {
	t   testing.TB
	l   *Lib
	all []*Buffer
}

func (d *dev) buf(dt DType, vals []float32) *Buffer {
	d.t.Helper()
	b, err := d.l.Alloc(dt, len(vals))
	if err != nil {
		d.t.Fatal(err)
	}
	d.all = append(d.all, b)
	if err := b.SetF32(vals); err != nil {
		d.t.Fatal(err)
	}
	return b
}

func (d *dev) zeros(dt DType, n int) *Buffer {
	return d.buf(dt, make([]float32, n))
}

func (d *dev) f32(vals []float64) *Buffer {
	s := make([]float32, len(vals))
	for i, v := range vals {
		s[i] = float32(v)
	}
	return d.buf(F32, s)
}

func (d *dev) get(b *Buffer) []float32 {
	d.t.Helper()
	v, err := b.GetF32()
	if err != nil {
		d.t.Fatal(err)
	}
	return v
}

func (d *dev) free() {
	for _, b := range d.all {
		b.Free()
	}
}

func f64(s []float32) []float64 {
	out := make([]float64, len(s))
	for i, v := range s {
		out[i] = float64(v)
	}
	return out
}

// ssdRun holds the device side of one problem.
type ssdRun struct {
	*dev
	p                       *ssdProblem
	s                       SSDShape
	xbc, dt, dtBias, aLog   *Buffer
	d, init, y, fin, logd   *Buffer
	dy, dfin                *Buffer
	dxbc, ddt, dBias, dALog *Buffer
	dD, dInit               *Buffer
	xOff, bOff, cOff        int // element offsets of x, B, C in xbc
	// The latest forward's workspace, which backwardSaved hands to the
	// backward.
	fwdWS  uintptr
	fwdLen int64
}

func newSSDRun(t *testing.T, l *Lib, p *ssdProblem) *ssdRun {
	d := p.c.d
	s := p.shape()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	r := &ssdRun{dev: &dev{t: t, l: l}, p: p, s: s}
	rows := d.Batch * d.L
	hp, gn := d.H*d.P, d.G*d.N
	// x, B and C: one buffer, either three dense tensors back to back or
	// interleaved column ranges of one strided buffer.
	var xbc []float32
	if p.c.strided {
		w := s.XStride
		xbc = filled((rows-1)*w + w)
		r.xOff, r.bOff, r.cOff = 0, hp, hp+gn
		rowsIn(xbc, p.in.X, rows, hp, w, 0)
		rowsIn(xbc, p.in.B, rows, gn, w, hp)
		rowsIn(xbc, p.in.C, rows, gn, w, hp+gn)
	} else {
		xbc = make([]float32, rows*(hp+2*gn))
		r.xOff, r.bOff, r.cOff = 0, rows*hp, rows*(hp+gn)
		rowsIn(xbc, p.in.X, rows, hp, hp, 0)
		rowsIn(xbc[r.bOff:], p.in.B, rows, gn, gn, 0)
		rowsIn(xbc[r.cOff:], p.in.C, rows, gn, gn, 0)
	}
	r.xbc = r.buf(p.dt, xbc)
	_, ndt, _, _, ny, _, nst := s.Elements()
	dts := stride(s.DTStride, d.H)
	dtv := filled(ndt)
	rowsIn(dtv, p.in.DTRaw, rows, d.H, dts, 0)
	r.dt = r.buf(p.dt, dtv)
	r.dtBias, r.aLog, r.d = r.f32(p.in.DTBias), r.f32(p.in.ALog), r.f32(p.in.D)
	if p.in.InitState != nil {
		r.init = r.f32(p.in.InitState)
	}
	r.y = r.buf(p.dt, filled(ny))
	r.fin, r.logd = r.zeros(F32, nst), r.zeros(F32, d.Batch*d.H)
	dyv := filled(ny)
	rowsIn(dyv, p.dY, rows, hp, stride(s.YStride, hp), 0)
	r.dy = r.buf(p.dt, dyv)
	if p.dFinal != nil {
		r.dfin = r.f32(p.dFinal)
	}
	r.dxbc = r.buf(p.dt, filled(len(xbc)))
	r.ddt = r.buf(p.dt, filled(ndt))
	r.dBias, r.dALog = r.zeros(F32, d.H), r.zeros(F32, d.H)
	r.dD, r.dInit = r.zeros(F32, len(p.in.D)), r.zeros(F32, nst)
	return r
}

func ptr(b *Buffer) uintptr {
	if b == nil {
		return 0
	}
	return b.Ptr
}

func (r *ssdRun) workspace(kind SSDWorkspace) (uintptr, int64) {
	n, err := r.l.SSDWorkspaceBytes(r.s, kind)
	if err != nil {
		r.t.Fatal(err)
	}
	ws, err := r.l.Alloc(BF16, int((n+1)/2))
	if err != nil {
		r.t.Fatal(err)
	}
	r.all = append(r.all, ws)
	return ws.Ptr, n
}

func (r *ssdRun) forward() {
	ws, n := r.workspace(SSDForwardWorkspace)
	a := &SSDForwardArgs{
		X: r.xbc.Offset(r.xOff), DTRaw: r.dt.Ptr, DTBias: r.dtBias.Ptr, ALog: r.aLog.Ptr,
		B: r.xbc.Offset(r.bOff), C: r.xbc.Offset(r.cOff), D: r.d.Ptr, InitState: ptr(r.init),
		Y: r.y.Ptr, FinalState: r.fin.Ptr, LogDecay: r.logd.Ptr, Workspace: ws, WorkspaceBytes: n,
	}
	if err := r.l.SSDForward(r.s, a, 0); err != nil {
		r.t.Fatal(err)
	}
	if err := r.l.Sync(0); err != nil {
		r.t.Fatal(err)
	}
	r.fwdWS, r.fwdLen = ws, n
}

// backwardArgs are the backward's arguments, with a fresh workspace of kind.
func (r *ssdRun) backwardArgs(kind SSDWorkspace) *SSDBackwardArgs {
	ws, n := r.workspace(kind)
	return &SSDBackwardArgs{
		X: r.xbc.Offset(r.xOff), DTRaw: r.dt.Ptr, DTBias: r.dtBias.Ptr, ALog: r.aLog.Ptr,
		B: r.xbc.Offset(r.bOff), C: r.xbc.Offset(r.cOff), D: r.d.Ptr, InitState: ptr(r.init),
		DY: r.dy.Ptr, DFinalState: ptr(r.dfin),
		DX: r.dxbc.Offset(r.xOff), DDTRaw: r.ddt.Ptr, DB: r.dxbc.Offset(r.bOff), DC: r.dxbc.Offset(r.cOff),
		DDTBias: r.dBias.Ptr, DALog: r.dALog.Ptr, DD: r.dD.Ptr, DInitState: r.dInit.Ptr,
		Workspace: ws, WorkspaceBytes: n,
	}
}

func (r *ssdRun) runBackward(a *SSDBackwardArgs) {
	if err := r.l.SSDBackward(r.s, a, 0); err != nil {
		r.t.Fatal(err)
	}
	if err := r.l.Sync(0); err != nil {
		r.t.Fatal(err)
	}
}

// backward recomputes the forward's intermediates.
func (r *ssdRun) backward() { r.runBackward(r.backwardArgs(SSDBackwardWorkspace)) }

// backwardSaved takes them from the latest forward's workspace.
func (r *ssdRun) backwardSaved() {
	if r.fwdWS == 0 {
		r.t.Fatal("backwardSaved before forward")
	}
	a := r.backwardArgs(SSDBackwardSavedWorkspace)
	a.FwdWorkspace, a.FwdWorkspaceBytes = r.fwdWS, r.fwdLen
	r.runBackward(a)
}

// grads downloads every gradient the backward writes.
func (r *ssdRun) grads() [][]float32 {
	return [][]float32{r.get(r.dxbc), r.get(r.ddt), r.get(r.dBias), r.get(r.dALog), r.get(r.dD), r.get(r.dInit)}
}

// sameBits fails unless a and b hold the same bits.
func sameBits(t *testing.T, what string, a, b [][]float32) {
	t.Helper()
	for i := range a {
		for j := range a[i] {
			if math.Float32bits(a[i][j]) != math.Float32bits(b[i][j]) {
				t.Fatalf("%s: output %d element %d differs: %g vs %g", what, i, j, a[i][j], b[i][j])
			}
		}
	}
}

// split returns x, B, C (dense) from a device buffer laid out like xbc, and
// checks that the gaps still hold the sentinel.
func (r *ssdRun) split(b *Buffer, what string) (x, bb, cc []float64) {
	d := r.p.c.d
	rows, hp, gn := d.Batch*d.L, d.H*d.P, d.G*d.N
	v := r.get(b)
	if r.p.c.strided {
		w := r.s.XStride
		gap := sentinel
		if r.p.dt == BF16 {
			gap = RoundBF16(sentinel)
		}
		for row := 0; row < rows; row++ {
			for k := hp + 2*gn; k < w && row*w+k < len(v); k++ {
				if v[row*w+k] != gap {
					r.t.Fatalf("%s: gap element (row %d, col %d) overwritten with %g", what, row, k, v[row*w+k])
				}
			}
		}
		return rowsOut(v, rows, hp, w, 0), rowsOut(v, rows, gn, w, hp), rowsOut(v, rows, gn, w, hp+gn)
	}
	return rowsOut(v, rows, hp, hp, 0), rowsOut(v[r.bOff:], rows, gn, gn, 0), rowsOut(v[r.cOff:], rows, gn, gn, 0)
}

func (r *ssdRun) rows(b *Buffer, width, st int) []float64 {
	d := r.p.c.d
	return rowsOut(r.get(b), d.Batch*d.L, width, stride(st, width), 0)
}

func tols(dt DType) (fwd, bwd float64) {
	if dt == BF16 {
		return tolBF16Fwd, tolBF16Bwd
	}
	return tolF32, tolF32
}

func TestSSDForwardBackward(t *testing.T) {
	l := openLib(t)
	for ci, c := range ssdCases {
		if testing.Short() && ci > 2 {
			break // small shapes only, e.g. under compute-sanitizer
		}
		for _, dt := range []DType{F32, BF16} {
			t.Run(fmt.Sprintf("%s/%s", c.name, dt), func(t *testing.T) {
				p := newSSDProblem(c, dt, uint64(100+ci))
				d, o := c.d, p.opts()
				ref := ssd.Outputs[float64]{
					Y: make([]float64, len(p.in.X)), FinalState: make([]float64, d.Batch*d.H*d.P*d.N),
					LogDecay: make([]float64, d.Batch*d.H),
				}
				if err := ssd.Forward(d, o, &p.in, &ref); err != nil {
					t.Fatal(err)
				}
				g := ssd.Grads[float64]{
					X: make([]float64, len(p.in.X)), DTRaw: make([]float64, len(p.in.DTRaw)),
					B: make([]float64, len(p.in.B)), C: make([]float64, len(p.in.C)),
					DTBias: make([]float64, d.H), ALog: make([]float64, d.H), D: make([]float64, len(p.in.D)),
					InitState: make([]float64, len(ref.FinalState)),
				}
				if err := ssd.Backward(d, o, &p.in, p.dY, p.dFinal, &g); err != nil {
					t.Fatal(err)
				}

				r := newSSDRun(t, l, p)
				defer r.free()
				r.forward()
				tf, tb := tols(dt)
				name := func(k string) string { return fmt.Sprintf("ssd_%s/%s", k, c.name) }
				report(t, name("fwd.y"), dt, r.rows(r.y, d.H*d.P, r.s.YStride), ref.Y, tf)
				report(t, name("fwd.final_state"), dt, f64(r.get(r.fin)), ref.FinalState, tb)
				report(t, name("fwd.log_decay"), dt, f64(r.get(r.logd)), ref.LogDecay, tolF32)

				r.backward()
				dx, dB, dC := r.split(r.dxbc, "dxBC")
				report(t, name("bwd.dx"), dt, dx, g.X, tb)
				report(t, name("bwd.dB"), dt, dB, g.B, tb)
				report(t, name("bwd.dC"), dt, dC, g.C, tb)
				report(t, name("bwd.ddt_raw"), dt, r.rows(r.ddt, d.H, r.s.DTStride), g.DTRaw, tb)
				report(t, name("bwd.ddt_bias"), dt, f64(r.get(r.dBias)), g.DTBias, tb)
				report(t, name("bwd.dA_log"), dt, f64(r.get(r.dALog)), g.ALog, tb)
				report(t, name("bwd.dD"), dt, f64(r.get(r.dD)), g.D, tb)
				report(t, name("bwd.dinit_state"), dt, f64(r.get(r.dInit)), g.InitState, tb)
			})
		}
	}
}

// The backward is bitwise reproducible: no floating-point atomics, every
// reduction in a fixed order.
func TestSSDBackwardDeterministic(t *testing.T) {
	l := openLib(t)
	for _, c := range []ssdCase{ssdCases[1], ssdCases[2]} { // one block per group's heads; heads split over blocks
		testSSDBackwardDeterministic(t, l, c)
	}
}

func testSSDBackwardDeterministic(t *testing.T, l *Lib, c ssdCase) {
	for _, dt := range []DType{F32, BF16} {
		p := newSSDProblem(c, dt, 7)
		r := newSSDRun(t, l, p)
		r.backward()
		first := r.grads()
		r.backward()
		sameBits(t, fmt.Sprintf("%s/%s: two runs", c.name, dt), first, r.grads())
		r.free()
	}
}

// A backward given the forward's workspace computes what one that
// recomputes the forward's intermediates does, bit for bit: the same
// kernels produce them either way.
func TestSSDBackwardSavedForward(t *testing.T) {
	l := openLib(t)
	for ci, c := range ssdCases {
		if testing.Short() && ci > 2 {
			break
		}
		for _, dt := range []DType{F32, BF16} {
			t.Run(fmt.Sprintf("%s/%s", c.name, dt), func(t *testing.T) {
				r := newSSDRun(t, l, newSSDProblem(c, dt, uint64(300+ci)))
				defer r.free()
				r.forward()
				r.backward()
				recomputed := r.grads()
				r.backwardSaved()
				sameBits(t, "saved vs recomputed", recomputed, r.grads())
			})
		}
	}
}

// Bad arguments come back as errors naming the rule, from Go and from the
// library.
func TestSSDArgumentErrors(t *testing.T) {
	l := openLib(t)
	p := newSSDProblem(ssdCases[0], F32, 1)
	r := newSSDRun(t, l, p)
	defer r.free()
	ws, n := r.workspace(SSDForwardWorkspace)
	a := &SSDForwardArgs{X: r.xbc.Ptr, DTRaw: r.dt.Ptr, DTBias: r.dtBias.Ptr, ALog: r.aLog.Ptr,
		B: r.xbc.Offset(r.bOff), C: r.xbc.Offset(r.cOff), D: r.d.Ptr, Y: r.y.Ptr, Workspace: ws, WorkspaceBytes: n - 1}
	err := l.SSDForward(r.s, a, 0)
	if !errors.Is(err, ErrWorkspace) {
		t.Fatalf("short workspace: got %v, want ErrWorkspace", err)
	}
	a.WorkspaceBytes = n
	a.Workspace = ws + 8
	if err := l.SSDForward(r.s, a, 0); !errors.Is(err, ErrInvalidArg) {
		t.Fatalf("misaligned workspace: got %v, want ErrInvalidArg", err)
	}
	if _, err := l.SSDWorkspaceBytes(r.s, SSDWorkspace(3)); !errors.Is(err, ErrInvalidArg) {
		t.Fatalf("workspace kind 3: got %v, want ErrInvalidArg", err)
	}

	// The backward given the forward's workspace checks that workspace's
	// size, and without it needs the larger workspace of a recomputing
	// backward.
	r.forward()
	b := r.backwardArgs(SSDBackwardSavedWorkspace)
	b.FwdWorkspace, b.FwdWorkspaceBytes = r.fwdWS, r.fwdLen-1
	err = l.SSDBackward(r.s, b, 0)
	if !errors.Is(err, ErrWorkspace) || !strings.Contains(err.Error(), "fwd_workspace_bytes") {
		t.Fatalf("short forward workspace: got %v, want ErrWorkspace naming fwd_workspace_bytes", err)
	}
	b.FwdWorkspace, b.FwdWorkspaceBytes = 0, 0
	if err := l.SSDBackward(r.s, b, 0); !errors.Is(err, ErrWorkspace) {
		t.Fatalf("saved-size workspace without the forward's: got %v, want ErrWorkspace", err)
	}
}
