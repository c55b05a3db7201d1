package ssd

import (
	"math"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/linalg"
)

// Workspace holds the buffers of the chunked algorithm so that repeated
// calls (one forward and one backward per layer per training step) do not
// allocate. The zero value is ready to use; buffers grow to the largest
// problem seen. A Workspace must not be used by two calls at once.
type Workspace[T model.Float] struct {
	a     []float64 // (H): A = -exp(A_log)
	dt    []float64 // (Bt, H, L): clamped dt
	cs    []float64 // (Bt, H, L): inclusive cumsum of dt·A, restarting at every chunk
	lam   []float64 // (Bt, H, nc): chunk totals Λ_c
	base  []float64 // (Bt, H, nc+1): Σ of the chunk totals before chunk c (AddInitialState)
	dlam  []float64 // (Bt, H, nc): ∂loss/∂Λ_c (backward)
	st    []T       // (Bt, H, nc+1, P, N): chunk states, then Hin_c; [nc] is the final state
	gst   []T       // (Bt, H, nc+1, P, N): dP_c, then ∂loss/∂Hin_c; [c+1] is Gc_c (backward)
	cb    []T       // (Bt, G, nc, Q, Q): C_i·B_j, lower triangle (backward)
	ddt   []float64 // (Bt, H, L): direct ∂loss/∂dt (backward)
	da    []float64 // (Bt, H, L): ∂loss/∂a (backward)
	dD    []float64 // (Bt, H, nc, P or 1): per-chunk partials of ∂loss/∂D (backward)
	accum paramAccum
	work  []chunkScratch[T]
}

// chunkScratch is the per-goroutine scratch space of the chunked algorithm.
// The matrix products run on the calling goroutine through
// linalg.GemmSerial and linalg.GemmStructured, which read the chunks of X,
// B, C and dY in place (transposed or not) with their tensor strides.
type chunkScratch[T model.Float] struct {
	cb    []T       // (Q, Q): C_i·B_j, lower triangle (forward)
	mQQ   []T       // (Q, Q): decay-weighted CB, lower triangle
	dd    []T       // (Q, Q): dY_i·x_j of one head, lower triangle (backward)
	coefs []T       // (Q)
	xw    []T       // (Q, P): a chunk of X or dY with scaled rows
	mQP   []T       // (Q, P): Yoff before scaling; Gc B_j (backward)
	dcb   []T       // (Q, Q): dCB summed over the heads of a group, lower triangle (backward)
	br    []T       // (Q, P): the bracket of §4.6 B3 for dx and ddt (backward)
	xs    []T       // (Q, P): rows dt_j·exp(Λ−cs_j)·x_j (backward)
	mQN   []T       // (Q, N): Hin_cᵀ dY_i, the state part of dC (backward)
	f64   []float64 // (5Q): steps and row of segDecays; intra, u, v of §4.6 B4 (backward)
}

// Forward runs the chunked SSD algorithm of §3 with chunk length o.Chunk and
// writes Y, FinalState and LogDecay. It allocates its scratch space; see
// Workspace.Forward to reuse it.
func Forward[T model.Float](d Dims, o Options, in *Inputs[T], out *Outputs[T]) error {
	var ws Workspace[T]
	return ws.Forward(d, o, in, out)
}

// Backward computes every gradient of the chunked forward (§4.6 B1–B4, then
// the scalar chain of §4.4), recomputing the forward quantities it needs from
// the inputs. dY is ∂loss/∂Y and dFinal ∂loss/∂FinalState (nil means zero).
// It allocates its scratch space; see Workspace.Backward to reuse it.
func Backward[T model.Float](d Dims, o Options, in *Inputs[T], dY, dFinal []T, g *Grads[T]) error {
	var ws Workspace[T]
	return ws.Backward(d, o, in, dY, dFinal, g)
}

// chunkGeom describes the chunking of one call.
type chunkGeom struct {
	Dims
	Q, nc, R, PN int
	dPer         int
	lo, hi       float64
	cut          float64 // flushBelow of the element type
}

func newGeom[T model.Float](d Dims, o Options) chunkGeom {
	lo, hi := o.dtLimit()
	dPer := 1
	if o.DHasHdim {
		dPer = d.P
	}
	// A chunk longer than the sequence is the whole sequence.
	q := min(o.Chunk, d.L)
	return chunkGeom{Dims: d, Q: q, nc: (d.L + q - 1) / q, R: d.H / d.G, PN: d.P * d.N, dPer: dPer, lo: lo, hi: hi, cut: flushBelow[T]()}
}

// span returns the first position and the number of real positions of
// chunk c. Positions past L are the padding of §3.3 (dt = 0, x = B = C = 0);
// they contribute nothing and are never visited.
func (k *chunkGeom) span(c int) (t0, q int) {
	t0 = c * k.Q
	return t0, min(k.Q, k.L-t0)
}

func (ws *Workspace[T]) prepare(k *chunkGeom, nw int, backward bool) {
	bh := k.Batch * k.H
	ws.a = grow(ws.a, k.H)
	ws.dt = grow(ws.dt, bh*k.L)
	ws.cs = grow(ws.cs, bh*k.L)
	ws.lam = grow(ws.lam, bh*k.nc)
	ws.st = grow(ws.st, bh*(k.nc+1)*k.PN)
	if backward {
		ws.dlam = grow(ws.dlam, bh*k.nc)
		ws.gst = grow(ws.gst, bh*(k.nc+1)*k.PN)
		ws.cb = grow(ws.cb, k.Batch*k.G*k.nc*k.Q*k.Q)
		ws.ddt = grow(ws.ddt, bh*k.L)
		ws.da = grow(ws.da, bh*k.L)
		ws.dD = grow(ws.dD, bh*k.nc*k.dPer)
		ws.accum.dtBias = grow(ws.accum.dtBias, bh)
		ws.accum.dA = grow(ws.accum.dA, bh)
		ws.accum.dD = grow(ws.accum.dD, bh*k.dPer)
	}
	if len(ws.work) < nw {
		ws.work = append(ws.work, make([]chunkScratch[T], nw-len(ws.work))...)
	}
	for w := 0; w < nw; w++ {
		s := &ws.work[w]
		s.cb = grow(s.cb, k.Q*k.Q)
		s.mQQ = grow(s.mQQ, k.Q*k.Q)
		s.coefs = grow(s.coefs, k.Q)
		s.f64 = grow(s.f64, 5*k.Q)
		s.xw = grow(s.xw, k.Q*k.P)
		s.mQP = grow(s.mQP, k.Q*k.P)
		if backward {
			s.dcb = grow(s.dcb, k.Q*k.Q)
			s.dd = grow(s.dd, k.Q*k.Q)
			s.br = grow(s.br, k.Q*k.P)
			s.xs = grow(s.xs, k.Q*k.P)
			s.mQN = grow(s.mQN, k.Q*k.N)
		}
	}
}

// headRow returns the P-vector of a (Bt, L, H, P) tensor at (b, t, h).
func headRow[T model.Float](k *chunkGeom, s []T, b, t, h int) []T {
	o := ((b*k.L+t)*k.H + h) * k.P
	return s[o : o+k.P : o+k.P]
}

// groupRow returns the N-vector of a (Bt, L, G, N) tensor at (b, t, g).
func groupRow[T model.Float](k *chunkGeom, s []T, b, t, g int) []T {
	o := ((b*k.L+t)*k.G + g) * k.N
	return s[o : o+k.N : o+k.N]
}

// stateAt returns the P×N state c of (b, h) in a (Bt, H, nc+1, P, N) buffer.
func stateAt[T model.Float](k *chunkGeom, s []T, bh, c int) []T {
	o := (bh*(k.nc+1) + c) * k.PN
	return s[o : o+k.PN : o+k.PN]
}

// chunkCumsum computes dt, the per-chunk inclusive cumsum of a = dt·A and
// the chunk totals Λ_c for every (b, h) (mamba_ssm's _chunk_cumsum_fwd).
func (ws *Workspace[T]) chunkCumsum(k *chunkGeom, nw int, in *Inputs[T]) {
	negA(in.ALog, ws.a)
	parallelFor(nw, k.Batch*k.H, func(_, bh int) {
		b, h := bh/k.H, bh%k.H
		bias, a := float64(in.DTBias[h]), ws.a[h]
		dt := ws.dt[bh*k.L : (bh+1)*k.L]
		cs := ws.cs[bh*k.L : (bh+1)*k.L]
		for t := range dt {
			dt[t], _ = discretize(float64(in.DTRaw[(b*k.L+t)*k.H+h])+bias, k.lo, k.hi)
		}
		for c := 0; c < k.nc; c++ {
			t0, q := k.span(c)
			var run float64
			for i := 0; i < q; i++ {
				run += dt[t0+i] * a
				cs[t0+i] = run
			}
			ws.lam[bh*k.nc+c] = run
		}
	})
}

// groupOff returns the offset of row t of group g of batch b in a
// (Bt, L, G, N) tensor; consecutive rows are G·N elements apart.
func groupOff(k *chunkGeom, b, t, g int) int { return ((b*k.L+t)*k.G + g) * k.N }

// headOff returns the offset of row t of head h of batch b in a
// (Bt, L, H, P) tensor; consecutive rows are H·P elements apart.
func headOff(k *chunkGeom, b, t, h int) int { return ((b*k.L+t)*k.H + h) * k.P }

// bmmChunk writes CB[i, j] = C_i·B_j for j <= i of chunk c of (b, g) into
// cb (row stride Q); the entries above the diagonal are left as they are.
func bmmChunk[T model.Float](k *chunkGeom, in *Inputs[T], b, g, c int, cb []T) {
	t0, q := k.span(c)
	o, ld := groupOff(k, b, t0, g), k.G*k.N
	linalg.GemmStructured(linalg.LowerC, false, true, q, q, k.N, 1, in.C[o:], ld, in.B[o:], ld, 0, cb, k.Q)
}

// scaleRows writes the q×P chunk of the (Bt, L, H, P) tensor src at
// (b, t0, h), row i scaled by w[i], into dst (row stride P).
func scaleRows[T model.Float](k *chunkGeom, src []T, b, t0, h int, w, dst []T) {
	o := headOff(k, b, t0, h)
	for i, wi := range w {
		row, d := src[o+i*k.H*k.P:o+i*k.H*k.P+k.P], dst[i*k.P:(i+1)*k.P]
		for p, v := range row {
			d[p] = wi * v
		}
	}
}

// chunkState writes S_c = Σ_j exp(Λ_c − cs_j)·dt_j·x_j B_jᵀ, the state that
// chunk c of (b, h) produces from a zero state, into s (P×N), as the product
// X̃ᵀB with X̃ the decay-scaled chunk of X.
func (ws *Workspace[T]) chunkState(k *chunkGeom, in *Inputs[T], b, h, c int, s []T, scr *chunkScratch[T]) {
	t0, q := k.span(c)
	bh := b*k.H + h
	dt := ws.dt[bh*k.L+t0 : bh*k.L+t0+q]
	cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
	lam := cs[q-1]
	w := scr.coefs[:q]
	for j := range w {
		w[j] = T(decay(lam-cs[j], k.cut) * dt[j])
	}
	scaleRows(k, in.X, b, t0, h, w, scr.xw)
	linalg.GemmSerial(true, false, k.P, k.N, q, 1, scr.xw, k.P, in.B[groupOff(k, b, t0, h/k.R):], k.G*k.N, 0, s, k.N)
}

// stepDecays writes steps[j] = exp(cs[j] − cs[j−1]) for j >= 1, the decay
// factor of one position of a chunk given its inclusive cumsum cs.
func stepDecays(cs, steps []float64) {
	for j := 1; j < len(steps); j++ {
		steps[j] = math.Exp(cs[j] - cs[j-1])
	}
}

// segDecays writes e[j] = decay(cs[i] − cs[j], cut) for j <= i, the decay
// factors of row i of a chunk's segment sum, from the step factors of
// stepDecays. They are running products from the diagonal down, one
// multiply each instead of an exponential: e[j] = e[j+1]·steps[j+1]. The
// log-decay cs[i] − cs[j] falls as j falls, so once it is below cut every
// remaining factor is flushed to zero as decay would. Above the cut every
// partial product stays a normal float64 (cut is far above its underflow),
// and its relative error grows by about one rounding per step.
func segDecays(cs, steps []float64, i int, cut float64, e []float64) {
	v := 1.0
	e[i] = v
	for j := i - 1; j >= 0; j-- {
		if cs[i]-cs[j] < cut {
			clear(e[:j+1])
			return
		}
		v *= steps[j+1]
		e[j] = v
	}
}

// statePassing turns the chunk states st[c+1] = S_c of (b, h) into the
// states entering each chunk, Hin_{c+1} = exp(Λ_c)·Hin_c + S_c, with
// st[0] = the initial state. st[nc] is then the final state.
func (ws *Workspace[T]) statePassing(k *chunkGeom, in *Inputs[T], bh int) {
	h0 := stateAt(k, ws.st, bh, 0)
	if in.InitState != nil {
		copy(h0, in.InitState[bh*k.PN:(bh+1)*k.PN])
	} else {
		clear(h0)
	}
	for c := 0; c < k.nc; c++ {
		axpy(T(decay(ws.lam[bh*k.nc+c], k.cut)), stateAt(k, ws.st, bh, c), stateAt(k, ws.st, bh, c+1))
	}
}

// Forward is the chunked forward of §3.2 using the workspace's buffers.
func (ws *Workspace[T]) Forward(d Dims, o Options, in *Inputs[T], out *Outputs[T]) error {
	if err := checkInputs(d, o, in, true); err != nil {
		return err
	}
	if err := checkOutputs(d, o, out); err != nil {
		return err
	}
	k := newGeom[T](d, o)
	nw := workers()
	ws.prepare(&k, nw, false)
	ws.chunkCumsum(&k, nw, in)

	// Steps (0)-(2) per (b, group, chunk): CB once per group, then for each
	// head of the group the diagonal block plus D·x and the chunk state.
	parallelFor(nw, k.Batch*k.G*k.nc, func(w, item int) {
		s := &ws.work[w]
		c := item % k.nc
		b, g := item/k.nc/k.G, item/k.nc%k.G
		t0, q := k.span(c)
		bmmChunk(&k, in, b, g, c, s.cb)
		for h := g * k.R; h < (g+1)*k.R; h++ {
			bh := b*k.H + h
			dt := ws.dt[bh*k.L+t0 : bh*k.L+t0+q]
			cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
			// Y = D·x, then Y += Ydiag = (L ∘ CB ∘ exp(seg) · diag(dt)) X,
			// a lower-triangular product.
			mm := s.mQQ
			steps, e := s.f64[3*k.Q:3*k.Q+q], s.f64[4*k.Q:4*k.Q+q]
			stepDecays(cs, steps)
			for i := 0; i < q; i++ {
				segDecays(cs, steps, i, k.cut, e)
				row, cbRow := mm[i*k.Q:i*k.Q+i+1], s.cb[i*k.Q:i*k.Q+i+1]
				for j := range row {
					row[j] = T(e[j]*dt[j]) * cbRow[j]
				}
			}
			for i := 0; i < q; i++ {
				y := headRow(&k, out.Y, b, t0+i, h)
				xi := headRow(&k, in.X, b, t0+i, h)
				if o.DHasHdim {
					dp := in.D[h*k.P : (h+1)*k.P]
					for p := range y {
						y[p] = dp[p] * xi[p]
					}
				} else {
					dh := in.D[h]
					for p := range y {
						y[p] = dh * xi[p]
					}
				}
			}
			xo, ld := headOff(&k, b, t0, h), k.H*k.P
			linalg.GemmStructured(linalg.LowerA, false, false, q, k.P, q, 1, mm, k.Q, in.X[xo:], ld, 1, out.Y[xo:], ld)
			ws.chunkState(&k, in, b, h, c, stateAt(&k, ws.st, bh, c+1), s)
		}
	})

	// Step (3): state passing, sequential in c.
	parallelFor(nw, k.Batch*k.H, func(_, bh int) {
		ws.statePassing(&k, in, bh)
		copy(out.FinalState[bh*k.PN:(bh+1)*k.PN], stateAt(&k, ws.st, bh, k.nc))
		var lam float64
		for c := 0; c < k.nc; c++ {
			lam += ws.lam[bh*k.nc+c]
		}
		out.LogDecay[bh] = T(lam)
	})

	// Step (4): Yoff = exp(cs_i)·Hin_c C_i, per (b, head, chunk).
	parallelFor(nw, k.Batch*k.H*k.nc, func(w, item int) {
		bh, c := item/k.nc, item%k.nc
		b, h := bh/k.H, bh%k.H
		t0, q := k.span(c)
		cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
		m := ws.work[w].mQP
		linalg.GemmSerial(false, true, q, k.P, k.N, 1, in.C[groupOff(&k, b, t0, h/k.R):], k.G*k.N, stateAt(&k, ws.st, bh, c), k.N, 0, m, k.P)
		for i := 0; i < q; i++ {
			if e := T(decay(cs[i], k.cut)); e != 0 {
				axpy(e, m[i*k.P:(i+1)*k.P], headRow(&k, out.Y, b, t0+i, h))
			}
		}
	})
	return nil
}
