package ssd

import (
	"math"

	"github.com/m2train/m2train/model"
)

// ForwardRecurrent runs the scan token by token (§2.4):
//
//	h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t B_tᵀ,   y_t = h_t C_t + D·x_t
//
// It is the reference the chunked Forward is tested against; o.Chunk is
// ignored. Work is spread over (batch, head) pairs.
func ForwardRecurrent[T model.Float](d Dims, o Options, in *Inputs[T], out *Outputs[T]) error {
	if err := checkInputs(d, o, in, false); err != nil {
		return err
	}
	if err := checkOutputs(d, o, out); err != nil {
		return err
	}
	lo, hi := o.dtLimit()
	cut := flushBelow[T]()
	a := make([]float64, d.H)
	negA(in.ALog, a)
	nw := workers()
	states := make([][]T, nw)
	for w := range states {
		states[w] = make([]T, d.P*d.N)
	}
	P, N, H, G := d.P, d.N, d.H, d.G
	R := H / G
	parallelFor(nw, d.Batch*H, func(w, item int) {
		b, h := item/H, item%H
		g := h / R
		st := states[w]
		if in.InitState != nil {
			copy(st, in.InitState[item*P*N:(item+1)*P*N])
		} else {
			clear(st)
		}
		bias := float64(in.DTBias[h])
		var logDecay float64
		for t := 0; t < d.L; t++ {
			row := b*d.L + t
			dt, _ := discretize(float64(in.DTRaw[row*H+h])+bias, lo, hi)
			at := dt * a[h]
			logDecay += at
			alpha := T(decay(at, cut))
			x := in.X[(row*H+h)*P : (row*H+h+1)*P]
			bt := in.B[(row*G+g)*N : (row*G+g+1)*N]
			ct := in.C[(row*G+g)*N : (row*G+g+1)*N]
			y := out.Y[(row*H+h)*P : (row*H+h+1)*P]
			for p := 0; p < P; p++ {
				sp := st[p*N : (p+1)*N]
				f := T(dt) * x[p]
				for n := range sp {
					sp[n] = alpha*sp[n] + f*bt[n]
				}
				y[p] = dot(sp, ct) + dCoef(in.D, o, h, p, P)*x[p]
			}
		}
		copy(out.FinalState[item*P*N:(item+1)*P*N], st)
		out.LogDecay[item] = T(logDecay)
	})
	return nil
}

// dCoef is the D skip coefficient of channel (h, p).
func dCoef[T model.Float](dParam []T, o Options, h, p, P int) T {
	if o.DHasHdim {
		return dParam[h*P+p]
	}
	return dParam[h]
}

// BackwardRecurrent computes every gradient of the scan by the reverse
// recurrence of §4.4 followed by the scalar chain (softplus, clamp, A_log).
// dY is ∂loss/∂Y and dFinal ∂loss/∂FinalState (nil means zero). The forward
// states are recomputed from the inputs, keeping about 2·√L of them per
// worker. Work is spread over (batch, group) pairs; the heads of a group run
// in head order, so dB and dC are summed in a fixed order.
func BackwardRecurrent[T model.Float](d Dims, o Options, in *Inputs[T], dY, dFinal []T, g *Grads[T]) error {
	if err := checkInputs(d, o, in, false); err != nil {
		return err
	}
	if err := checkBackward(d, o, dY, dFinal, g); err != nil {
		return err
	}
	lo, hi := o.dtLimit()
	cut := flushBelow[T]()
	a := make([]float64, d.H)
	negA(in.ALog, a)
	P, N, H, G, L := d.P, d.N, d.H, d.G, d.L
	R := H / G
	PN := P * N
	dPer := 1
	if o.DHasHdim {
		dPer = P
	}
	seg := int(math.Ceil(math.Sqrt(float64(L))))
	nseg := (L + seg - 1) / seg
	type scratch struct {
		ckpt, buf, gam []T
		gB             []T
		dt, ddt, da    []float64
	}
	nw := workers()
	scr := make([]scratch, nw)
	for w := range scr {
		scr[w] = scratch{
			ckpt: make([]T, nseg*PN), buf: make([]T, seg*PN), gam: make([]T, PN), gB: make([]T, P),
			dt: make([]float64, L), ddt: make([]float64, L), da: make([]float64, L),
		}
	}
	acc := paramAccum{
		dtBias: make([]float64, d.Batch*H),
		dA:     make([]float64, d.Batch*H),
		dD:     make([]float64, d.Batch*H*dPer),
	}
	parallelFor(nw, d.Batch*G, func(w, item int) {
		b, grp := item/G, item%G
		s := &scr[w]
		for t := 0; t < L; t++ {
			ob := ((b*L+t)*G + grp) * N
			clear(g.B[ob : ob+N])
			clear(g.C[ob : ob+N])
		}
		for h := grp * R; h < (grp+1)*R; h++ {
			bh := b*H + h
			bias := float64(in.DTBias[h])
			for t := 0; t < L; t++ {
				s.dt[t], _ = discretize(float64(in.DTRaw[(b*L+t)*H+h])+bias, lo, hi)
			}
			xRow := func(t int) []T { xo := ((b*L+t)*H + h) * P; return in.X[xo : xo+P] }
			bRow := func(t int) []T { ob := ((b*L+t)*G + grp) * N; return in.B[ob : ob+N] }
			cRow := func(t int) []T { ob := ((b*L+t)*G + grp) * N; return in.C[ob : ob+N] }
			// step advances state st (h_{t-1} → h_t) in place.
			step := func(t int, st []T) {
				alpha := T(decay(s.dt[t]*a[h], cut))
				x, bt := xRow(t), bRow(t)
				for p := 0; p < P; p++ {
					f := T(s.dt[t]) * x[p]
					sp := st[p*N : (p+1)*N]
					for n := range sp {
						sp[n] = alpha*sp[n] + f*bt[n]
					}
				}
			}
			// Checkpoints: ckpt[k] = h_{k·seg-1}.
			st := s.buf[:PN]
			if in.InitState != nil {
				copy(st, in.InitState[bh*PN:(bh+1)*PN])
			} else {
				clear(st)
			}
			for k := 0; k < nseg; k++ {
				copy(s.ckpt[k*PN:(k+1)*PN], st)
				for t := k * seg; t < min((k+1)*seg, L); t++ {
					step(t, st)
				}
			}
			gam := s.gam
			if dFinal != nil {
				copy(gam, dFinal[bh*PN:(bh+1)*PN])
			} else {
				clear(gam)
			}
			dD := acc.dD[bh*dPer : (bh+1)*dPer]
			for k := nseg - 1; k >= 0; k-- {
				t0, t1 := k*seg, min((k+1)*seg, L)
				prev := s.ckpt[k*PN : (k+1)*PN]
				for t := t0; t < t1; t++ {
					cur := s.buf[(t-t0)*PN : (t-t0+1)*PN]
					copy(cur, prev)
					step(t, cur)
					prev = cur
				}
				for t := t1 - 1; t >= t0; t-- {
					ht := s.buf[(t-t0)*PN : (t-t0+1)*PN]
					hprev := s.ckpt[k*PN : (k+1)*PN]
					if t > t0 {
						hprev = s.buf[(t-t0-1)*PN : (t-t0)*PN]
					}
					dt := s.dt[t]
					alpha := T(decay(dt*a[h], cut))
					x, bt, ct := xRow(t), bRow(t), cRow(t)
					xo := ((b*L+t)*H + h) * P
					dy, dx := dY[xo:xo+P], g.X[xo:xo+P]
					ob := ((b*L+t)*G + grp) * N
					dB, dC := g.B[ob:ob+N], g.C[ob:ob+N]
					var ddt, da T
					for p := 0; p < P; p++ {
						gp := gam[p*N : (p+1)*N]
						axpy(dy[p], ct, gp) // Γ += dy_t C_tᵀ
						axpy(dy[p], ht[p*N:(p+1)*N], dC)
						s.gB[p] = dot(gp, bt)
						axpy(T(dt)*x[p], gp, dB)
						da += dot(gp, hprev[p*N:(p+1)*N])
						for n := range gp {
							gp[n] *= alpha
						}
					}
					for p := 0; p < P; p++ {
						dx[p] = T(dt)*s.gB[p] + dCoef(in.D, o, h, p, P)*dy[p]
						ddt += x[p] * s.gB[p]
						dD[p%dPer] += float64(dy[p]) * float64(x[p])
					}
					s.ddt[t] = float64(ddt)
					s.da[t] = float64(alpha) * float64(da)
				}
			}
			copy(g.InitState[bh*PN:(bh+1)*PN], gam)
			acc.dtBias[bh], acc.dA[bh] = scalarChain(in.DTRaw[b*L*H+h:], bias, a[h], lo, hi, s.ddt, s.da, g.DTRaw[b*L*H+h:], H)
		}
	})
	finishParams(d, &acc, a, dPer, g)
	return nil
}
