package ssd

import (
	"fmt"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/linalg"
)

// This file holds the part of a scan that its initial state contributes, on
// its own: the correction of the parallel prefix over sequence shards
// (MAMBA2_SPEC.md §5.3). The scan is linear in the initial state h_in, so
// with cs_t = Σ_{s≤t} dt_s·A the inclusive log-decay from the first
// position and Λ = cs_{L−1},
//
//	Y(h_in)     = Y(0) + exp(cs_t)·h_in C_t    at every position t (per head)
//	Final(h_in) = Final(0) + exp(Λ)·h_in
//
// A shard that scanned from a zero state adds these terms once the state
// entering it is known, instead of scanning again.

// InitialStateGrads are the gradients InitialStateBackward writes; the
// caller allocates them. A nil InitState or C is not computed; DTRaw,
// DTBias and ALog are computed together or not at all (all three nil).
// Every element of a non-nil slice is overwritten.
type InitialStateGrads[T model.Float] struct {
	InitState []T // (Bt, H, P, N): ∂loss/∂h_in
	C         []T // (Bt, L, G, N): summed over the heads of each group
	DTRaw     []T // (Bt, L, H)
	DTBias    []T // (H)
	ALog      []T // (H)
}

// AddInitialState adds the contribution of the initial state hIn
// (Bt, H, P, N) to the output y (Bt, L, H, P) of a scan of in that started
// from a zero state:
//
//	y[b,t,h,:] += exp(cs[b,t,h])·hIn[b,h] C[b,t,g(h),:],   cs[b,t,h] = Σ_{s≤t} dt[b,s,h]·A[h]
//
// and, when final is non-nil, exp(Λ[b,h])·hIn[b,h] to the final state
// final (Bt, H, P, N), Λ being cs at the last position. A nil hIn is zero
// and changes nothing. The inputs read are C, DTRaw, DTBias and ALog; X, B,
// D and InitState are not used. With Forward's y and final of in from a zero
// state, the result equals Forward of in started from hIn up to rounding.
// It allocates its scratch space; see Workspace.AddInitialState to reuse it.
func AddInitialState[T model.Float](d Dims, o Options, in *Inputs[T], hIn, y, final []T) error {
	var ws Workspace[T]
	return ws.AddInitialState(d, o, in, hIn, y, final)
}

// InitialStateBackward computes the gradients of the terms AddInitialState
// adds, given dY = ∂loss/∂y and dFinal = ∂loss/∂final (nil means zero, as
// for a call with a nil final):
//
//	∂loss/∂hIn[b,h] = Σ_t exp(cs_t)·dY_t C_tᵀ + exp(Λ)·dFinal
//	∂loss/∂C_t     += Σ_{h in the group} exp(cs_t)·hInᵀ dY_t
//	∂loss/∂cs_t     = exp(cs_t)·⟨dY_t, hIn C_t⟩ (+ exp(Λ)·⟨dFinal, hIn⟩ at t = L−1)
//
// and the log-decay gradients continue through a_s = dt_s·A (each a_s
// enters every cs_t with t ≥ s) into dt_raw, dt_bias and A_log as in
// Backward. The gradient of hIn does not depend on hIn, which may be nil
// (zero) when only that one is asked for. It allocates its scratch space;
// see Workspace.InitialStateBackward to reuse it.
func InitialStateBackward[T model.Float](d Dims, o Options, in *Inputs[T], hIn, dY, dFinal []T, g *InitialStateGrads[T]) error {
	var ws Workspace[T]
	return ws.InitialStateBackward(d, o, in, hIn, dY, dFinal, g)
}

// checkInitInputs checks the sizes that AddInitialState and
// InitialStateBackward read.
func checkInitInputs[T model.Float](d Dims, o Options, in *Inputs[T], hIn []T) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if err := o.validate(true); err != nil {
		return err
	}
	if in == nil {
		return fmt.Errorf("%w: Inputs is nil", ErrLength)
	}
	_, dt, bc, _, st, _ := d.sizes(o)
	checks := []error{
		checkLen("Inputs.DTRaw", in.DTRaw, dt, "Bt·L·H"),
		checkLen("Inputs.DTBias", in.DTBias, d.H, "H"),
		checkLen("Inputs.ALog", in.ALog, d.H, "H"),
		checkLen("Inputs.C", in.C, bc, "Bt·L·G·N"),
	}
	if hIn != nil {
		checks = append(checks, checkLen("hIn", hIn, st, "Bt·H·P·N"))
	}
	return firstErr(checks)
}

// prepareInit sizes the buffers that the initial-state functions use.
func (ws *Workspace[T]) prepareInit(k *chunkGeom, nw int, backward bool) {
	bh := k.Batch * k.H
	ws.a = grow(ws.a, k.H)
	ws.dt = grow(ws.dt, bh*k.L)
	ws.cs = grow(ws.cs, bh*k.L)
	ws.lam = grow(ws.lam, bh*k.nc)
	ws.base = grow(ws.base, bh*(k.nc+1))
	if backward {
		ws.ddt = grow(ws.ddt, bh*k.L)
		ws.da = grow(ws.da, bh*k.L)
		ws.accum.dtBias = grow(ws.accum.dtBias, bh)
		ws.accum.dA = grow(ws.accum.dA, bh)
	}
	if len(ws.work) < nw {
		ws.work = append(ws.work, make([]chunkScratch[T], nw-len(ws.work))...)
	}
	for w := 0; w < nw; w++ {
		s := &ws.work[w]
		s.coefs = grow(s.coefs, k.Q)
		s.mQP = grow(s.mQP, k.Q*k.P)
		if backward {
			s.xw = grow(s.xw, k.Q*k.P)
			s.mQN = grow(s.mQN, k.Q*k.N)
		}
	}
}

// chunkBases writes, for every (b, h), base[c] = Σ_{c'<c} Λ_c', the
// log-decay from the first position to the start of chunk c, with
// base[nc] = Λ of the whole sequence. exp(base[c] + cs_i) is then the decay
// from the start to position i of chunk c.
func (ws *Workspace[T]) chunkBases(k *chunkGeom) {
	for bh := 0; bh < k.Batch*k.H; bh++ {
		base := ws.base[bh*(k.nc+1) : (bh+1)*(k.nc+1)]
		base[0] = 0
		for c := 0; c < k.nc; c++ {
			base[c+1] = base[c] + ws.lam[bh*k.nc+c]
		}
	}
}

// AddInitialState is the function AddInitialState using the workspace's
// buffers.
func (ws *Workspace[T]) AddInitialState(d Dims, o Options, in *Inputs[T], hIn, y, final []T) error {
	if err := checkInitInputs(d, o, in, hIn); err != nil {
		return err
	}
	x, _, _, _, st, _ := d.sizes(o)
	checks := []error{checkLen("y", y, x, "Bt·L·H·P")}
	if final != nil {
		checks = append(checks, checkLen("final", final, st, "Bt·H·P·N"))
	}
	if err := firstErr(checks); err != nil {
		return err
	}
	if hIn == nil {
		return nil
	}
	k := newGeom[T](d, o)
	nw := workers()
	ws.prepareInit(&k, nw, false)
	ws.chunkCumsum(&k, nw, in)
	ws.chunkBases(&k)

	// Per (b, h, chunk): m = C_chunk·hInᵀ, then y_i += exp(base_c + cs_i)·m_i.
	parallelFor(nw, k.Batch*k.H*k.nc, func(w, item int) {
		bh, c := item/k.nc, item%k.nc
		b, h := bh/k.H, bh%k.H
		t0, q := k.span(c)
		m := ws.work[w].mQP
		linalg.GemmSerial(false, true, q, k.P, k.N, 1, in.C[groupOff(&k, b, t0, h/k.R):], k.G*k.N, hIn[bh*k.PN:(bh+1)*k.PN], k.N, 0, m, k.P)
		base := ws.base[bh*(k.nc+1)+c]
		cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
		for i := 0; i < q; i++ {
			if e := T(decay(base+cs[i], k.cut)); e != 0 {
				axpy(e, m[i*k.P:(i+1)*k.P], headRow(&k, y, b, t0+i, h))
			}
		}
	})
	if final != nil {
		for bh := 0; bh < k.Batch*k.H; bh++ {
			if e := T(decay(ws.base[bh*(k.nc+1)+k.nc], k.cut)); e != 0 {
				axpy(e, hIn[bh*k.PN:(bh+1)*k.PN], final[bh*k.PN:(bh+1)*k.PN])
			}
		}
	}
	return nil
}

// checkInitGrads checks dY, dFinal and the requested gradients.
func checkInitGrads[T model.Float](d Dims, o Options, dY, dFinal []T, g *InitialStateGrads[T]) error {
	if g == nil {
		return fmt.Errorf("%w: InitialStateGrads is nil", ErrLength)
	}
	x, dt, bc, _, st, _ := d.sizes(o)
	checks := []error{checkLen("dY", dY, x, "Bt·L·H·P")}
	if dFinal != nil {
		checks = append(checks, checkLen("dFinal", dFinal, st, "Bt·H·P·N"))
	}
	if g.InitState != nil {
		checks = append(checks, checkLen("InitialStateGrads.InitState", g.InitState, st, "Bt·H·P·N"))
	}
	if g.C != nil {
		checks = append(checks, checkLen("InitialStateGrads.C", g.C, bc, "Bt·L·G·N"))
	}
	switch n := btoi(g.DTRaw != nil) + btoi(g.DTBias != nil) + btoi(g.ALog != nil); n {
	case 0:
	case 3:
		checks = append(checks,
			checkLen("InitialStateGrads.DTRaw", g.DTRaw, dt, "Bt·L·H"),
			checkLen("InitialStateGrads.DTBias", g.DTBias, d.H, "H"),
			checkLen("InitialStateGrads.ALog", g.ALog, d.H, "H"))
	default:
		checks = append(checks, fmt.Errorf("%w: InitialStateGrads.DTRaw, DTBias and ALog must be all nil or all set, got %d of 3 set", ErrLength, n))
	}
	return firstErr(checks)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// InitialStateBackward is the function InitialStateBackward using the
// workspace's buffers.
func (ws *Workspace[T]) InitialStateBackward(d Dims, o Options, in *Inputs[T], hIn, dY, dFinal []T, g *InitialStateGrads[T]) error {
	if err := checkInitInputs(d, o, in, hIn); err != nil {
		return err
	}
	if err := checkInitGrads(d, o, dY, dFinal, g); err != nil {
		return err
	}
	k := newGeom[T](d, o)
	nw := workers()
	ws.prepareInit(&k, nw, true)
	ws.chunkCumsum(&k, nw, in)
	ws.chunkBases(&k)
	needDT := g.DTRaw != nil

	if g.InitState != nil {
		// Per (b, h): Σ over chunks of (exp(base_c + cs_i)·dY_i)ᵀ C_i, then
		// the final-state term.
		parallelFor(nw, k.Batch*k.H, func(w, bh int) {
			s := &ws.work[w]
			b, h := bh/k.H, bh%k.H
			dst := g.InitState[bh*k.PN : (bh+1)*k.PN]
			for c := 0; c < k.nc; c++ {
				t0, q := k.span(c)
				base := ws.base[bh*(k.nc+1)+c]
				cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
				e := s.coefs[:q]
				for i := range e {
					e[i] = T(decay(base+cs[i], k.cut))
				}
				scaleRows(&k, dY, b, t0, h, e, s.xw)
				beta := T(1)
				if c == 0 {
					beta = 0
				}
				linalg.GemmSerial(true, false, k.P, k.N, q, 1, s.xw, k.P, in.C[groupOff(&k, b, t0, h/k.R):], k.G*k.N, beta, dst, k.N)
			}
			if dFinal != nil {
				if e := T(decay(ws.base[bh*(k.nc+1)+k.nc], k.cut)); e != 0 {
					axpy(e, dFinal[bh*k.PN:(bh+1)*k.PN], dst)
				}
			}
		})
	}
	if g.C == nil && !needDT {
		return nil
	}
	if hIn == nil {
		// Every term of these gradients is linear in hIn.
		clear(g.C)
		clear(g.DTRaw)
		clear(g.DTBias)
		clear(g.ALog)
		return nil
	}

	// Per (b, group, chunk), heads in order: tmp_i = hInᵀ dY_i (as dY·hIn),
	// dC_i += exp(cs_i)·tmp_i and ∂loss/∂cs_i = exp(cs_i)·⟨tmp_i, C_i⟩,
	// kept in da until the suffix sums below.
	parallelFor(nw, k.Batch*k.G*k.nc, func(w, item int) {
		s := &ws.work[w]
		c := item % k.nc
		b, grp := item/k.nc/k.G, item/k.nc%k.G
		t0, q := k.span(c)
		if g.C != nil {
			for t := t0; t < t0+q; t++ {
				clear(groupRow(&k, g.C, b, t, grp))
			}
		}
		for h := grp * k.R; h < (grp+1)*k.R; h++ {
			bh := b*k.H + h
			linalg.GemmSerial(false, false, q, k.N, k.P, 1, dY[headOff(&k, b, t0, h):], k.H*k.P, hIn[bh*k.PN:(bh+1)*k.PN], k.N, 0, s.mQN, k.N)
			base := ws.base[bh*(k.nc+1)+c]
			cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
			for i := 0; i < q; i++ {
				e := decay(base+cs[i], k.cut)
				tmp := s.mQN[i*k.N : (i+1)*k.N]
				if needDT {
					ws.da[bh*k.L+t0+i] = e * dot64(tmp, groupRow(&k, in.C, b, t0+i, grp))
				}
				if g.C != nil && e != 0 {
					axpy(T(e), tmp, groupRow(&k, g.C, b, t0+i, grp))
				}
			}
		}
	})
	if !needDT {
		return nil
	}

	// Per (b, h): ∂loss/∂a_s = Σ_{t≥s} ∂loss/∂cs_t, the final state's term
	// entering at the last position, then the scalar chain of Backward.
	acc := &ws.accum
	parallelFor(nw, k.Batch*k.H, func(_, bh int) {
		b, h := bh/k.H, bh%k.H
		da := ws.da[bh*k.L : (bh+1)*k.L]
		var run float64
		if dFinal != nil {
			if e := decay(ws.base[bh*(k.nc+1)+k.nc], k.cut); e != 0 {
				run = e * dot64(dFinal[bh*k.PN:(bh+1)*k.PN], hIn[bh*k.PN:(bh+1)*k.PN])
			}
		}
		for t := k.L - 1; t >= 0; t-- {
			run += da[t]
			da[t] = run
		}
		ddt := ws.ddt[bh*k.L : (bh+1)*k.L]
		clear(ddt)
		off := b*k.L*k.H + h
		acc.dtBias[bh], acc.dA[bh] = scalarChain(in.DTRaw[off:], float64(in.DTBias[h]), ws.a[h], k.lo, k.hi, ddt, da, g.DTRaw[off:], k.H)
	})
	for h := 0; h < k.H; h++ {
		var sb, sa float64
		for b := 0; b < k.Batch; b++ {
			sb += acc.dtBias[b*k.H+h]
			sa += acc.dA[b*k.H+h]
		}
		g.DTBias[h] = T(sb)
		g.ALog[h] = T(sa * ws.a[h])
	}
	return nil
}
