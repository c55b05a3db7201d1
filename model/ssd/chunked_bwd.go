package ssd

import "github.com/m2train/m2train/model/linalg"

// Backward is the chunked backward of §4.6 using the workspace's buffers.
func (ws *Workspace[T]) Backward(d Dims, o Options, in *Inputs[T], dY, dFinal []T, g *Grads[T]) error {
	if err := checkInputs(d, o, in, true); err != nil {
		return err
	}
	if err := checkBackward(d, o, dY, dFinal, g); err != nil {
		return err
	}
	k := newGeom[T](d, o)
	nw := workers()
	ws.prepare(&k, nw, true)
	ws.chunkCumsum(&k, nw, in)
	QQ := k.Q * k.Q

	// Recompute CB and the chunk states; B1: dP_c = Σ_i exp(cs_i)·dY_i C_iᵀ.
	parallelFor(nw, k.Batch*k.G*k.nc, func(w, item int) {
		s := &ws.work[w]
		c := item % k.nc
		bg := item / k.nc
		b, grp := bg/k.G, bg%k.G
		t0, q := k.span(c)
		bmmChunk(&k, in, b, grp, c, ws.cb[(bg*k.nc+c)*QQ:(bg*k.nc+c+1)*QQ])
		for h := grp * k.R; h < (grp+1)*k.R; h++ {
			bh := b*k.H + h
			ws.chunkState(&k, in, b, h, c, stateAt(&k, ws.st, bh, c+1), s)
			cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
			e := s.coefs[:q]
			for i := range e {
				e[i] = T(decay(cs[i], k.cut))
			}
			scaleRows(&k, dY, b, t0, h, e, s.xw)
			linalg.GemmSerial(true, false, k.P, k.N, q, 1, s.xw, k.P, in.C[groupOff(&k, b, t0, grp):], k.G*k.N, 0, stateAt(&k, ws.gst, bh, c), k.N)
		}
	})

	// Forward state passing, then B2 (reverse state passing): gst[c+1] is
	// Gc_c, the gradient of the state at the end of chunk c, and gst[c]
	// becomes ∂loss/∂Hin_c = exp(Λ_c)·Gc_c + dP_c.
	parallelFor(nw, k.Batch*k.H, func(_, bh int) {
		ws.statePassing(&k, in, bh)
		gFin := stateAt(&k, ws.gst, bh, k.nc)
		if dFinal != nil {
			copy(gFin, dFinal[bh*k.PN:(bh+1)*k.PN])
		} else {
			clear(gFin)
		}
		for c := k.nc - 1; c >= 0; c-- {
			e := decay(ws.lam[bh*k.nc+c], k.cut)
			gc := stateAt(&k, ws.gst, bh, c+1)
			ws.dlam[bh*k.nc+c] = e * dot64(gc, stateAt(&k, ws.st, bh, c))
			axpy(T(e), gc, stateAt(&k, ws.gst, bh, c))
		}
		copy(g.InitState[bh*k.PN:(bh+1)*k.PN], stateAt(&k, ws.gst, bh, 0))
	})

	// B3 and B4 per (b, group, chunk), heads of the group in order.
	parallelFor(nw, k.Batch*k.G*k.nc, func(w, item int) {
		ws.chunkBackward(&k, o, in, dY, g, &ws.work[w], item)
	})

	// Scalar chain per (b, h); per-chunk D partials reduced in chunk order.
	acc := &ws.accum
	parallelFor(nw, k.Batch*k.H, func(_, bh int) {
		b, h := bh/k.H, bh%k.H
		off := b*k.L*k.H + h
		acc.dtBias[bh], acc.dA[bh] = scalarChain(in.DTRaw[off:], float64(in.DTBias[h]), ws.a[h], k.lo, k.hi,
			ws.ddt[bh*k.L:(bh+1)*k.L], ws.da[bh*k.L:(bh+1)*k.L], g.DTRaw[off:], k.H)
		for p := 0; p < k.dPer; p++ {
			var s float64
			for c := 0; c < k.nc; c++ {
				s += ws.dD[(bh*k.nc+c)*k.dPer+p]
			}
			acc.dD[bh*k.dPer+p] = s
		}
	})
	finishParams(d, acc, ws.a, k.dPer, g)
	return nil
}

// chunkBackward computes, for chunk c of (b, group), dx, the direct dt
// gradient and the log-decay gradient of every head of the group, the
// per-chunk D partials, and dB, dC summed over the heads in head order
// (§4.6 B3, B4).
func (ws *Workspace[T]) chunkBackward(k *chunkGeom, o Options, in *Inputs[T], dY []T, g *Grads[T], s *chunkScratch[T], item int) {
	c := item % k.nc
	bg := item / k.nc
	b, grp := bg/k.G, bg%k.G
	t0, q := k.span(c)
	P, N, Q := k.P, k.N, k.Q
	cb := ws.cb[(bg*k.nc+c)*Q*Q : (bg*k.nc+c+1)*Q*Q]
	dcb := s.dcb
	for t := t0; t < t0+q; t++ {
		clear(groupRow(k, g.B, b, t, grp))
		clear(groupRow(k, g.C, b, t, grp))
	}
	for h := grp * k.R; h < (grp+1)*k.R; h++ {
		first := h == grp*k.R
		bh := b*k.H + h
		dt := ws.dt[bh*k.L+t0 : bh*k.L+t0+q]
		cs := ws.cs[bh*k.L+t0 : bh*k.L+t0+q]
		lam := cs[q-1]
		hin := stateAt(k, ws.st, bh, c)
		gc := stateAt(k, ws.gst, bh, c+1)
		br := s.br[:q*P]
		intra, u, v := s.f64[:q], s.f64[Q:Q+q], s.f64[2*Q:2*Q+q]
		clear(intra)

		// Intra-chunk part: dCB[i,j] = exp(seg)·dt_j·(dY_i·x_j) for j <= i,
		// W = CB∘dCB feeding da through a row-wise prefix sum, and the
		// bracket Σ_{i>=j} exp(seg)·CB[i,j]·dY_i of dx_j and ddt_j, the
		// product M2ᵀ·dY with M2[i,j] = exp(seg[i,j])·CB[i,j] lower
		// triangular.
		dyOff, ldh := headOff(k, b, t0, h), k.H*P
		bcOff, ldg := groupOff(k, b, t0, grp), k.G*N
		dd, m2 := s.dd, s.mQQ
		linalg.GemmStructured(linalg.LowerC, false, true, q, q, P, 1, dY[dyOff:], ldh, in.X[dyOff:], ldh, 0, dd, Q)
		steps, seg := s.f64[3*Q:3*Q+q], s.f64[4*Q:4*Q+q]
		stepDecays(cs, steps)
		for i := 0; i < q; i++ {
			segDecays(cs, steps, i, k.cut, seg)
			var ri float64
			for j := 0; j <= i; j++ {
				e := seg[j]
				dc := T(e*dt[j]) * dd[i*Q+j]
				if first {
					dcb[i*Q+j] = dc
				} else {
					dcb[i*Q+j] += dc
				}
				cbv := cb[i*Q+j]
				if j < i {
					ri += float64(cbv * dc)
					intra[j+1] += ri
				}
				m2[i*Q+j] = T(e) * cbv
			}
		}
		linalg.GemmStructured(linalg.UpperA, true, false, q, P, q, 1, m2, Q, dY[dyOff:], ldh, 0, br, P)

		// Chunk-state part: Gc B_j joins the bracket; u_j and dB_j.
		gb := s.mQP
		linalg.GemmSerial(false, true, q, P, N, 1, in.B[bcOff:], ldg, gc, N, 0, gb, P)
		xs := s.xs[:q*P]
		for j := 0; j < q; j++ {
			xj := headRow(k, in.X, b, t0+j, h)
			ej := decay(lam-cs[j], k.cut)
			brj := br[j*P : (j+1)*P]
			gbj := gb[j*P : (j+1)*P]
			if ej != 0 {
				axpy(T(ej), gbj, brj)
			}
			dx, dy := headRow(k, g.X, b, t0+j, h), headRow(k, dY, b, t0+j, h)
			dtj := T(dt[j])
			if o.DHasHdim {
				dp := in.D[h*P : (h+1)*P]
				for p := range dx {
					dx[p] = dtj*brj[p] + dp[p]*dy[p]
				}
			} else {
				dh := in.D[h]
				for p := range dx {
					dx[p] = dtj*brj[p] + dh*dy[p]
				}
			}
			ws.ddt[bh*k.L+t0+j] = dot64(xj, brj)
			u[j] = dt[j] * ej * dot64(xj, gbj)
			coef := T(dt[j] * ej)
			xsj := xs[j*P : (j+1)*P]
			for p, xp := range xj {
				xsj[p] = coef * xp
			}
		}
		// dB_j += Σ_p xs_j[p]·Gc[p,:], as dB += xs·Gc.
		linalg.GemmSerial(false, false, q, N, P, 1, xs, P, gc, N, 1, g.B[bcOff:], ldg)

		// Off-diagonal part: dC_i += exp(cs_i)·Hin_cᵀ dY_i and v_i.
		// tmp_i = Hin_cᵀ dY_i for every i, as dY·Hin.
		linalg.GemmSerial(false, false, q, N, P, 1, dY[dyOff:], ldh, hin, N, 0, s.mQN, N)
		for i := 0; i < q; i++ {
			e := decay(cs[i], k.cut)
			v[i] = 0
			if e == 0 {
				continue
			}
			tmp := s.mQN[i*N : (i+1)*N]
			v[i] = e * dot64(tmp, groupRow(k, in.C, b, t0+i, grp))
			axpy(T(e), tmp, groupRow(k, g.C, b, t0+i, grp))
		}

		// da_k = Σ_{i>=k} Σ_{j<k} W[i,j] + Σ_{j<k} u_j + Σ_{i>=k} v_i + dΛ_c.
		da := ws.da[bh*k.L+t0 : bh*k.L+t0+q]
		suffix := ws.dlam[bh*k.nc+c]
		for i := q - 1; i >= 0; i-- {
			suffix += v[i]
			da[i] = intra[i] + suffix
		}
		var prefix float64
		for j := 0; j < q; j++ {
			da[j] += prefix
			prefix += u[j]
		}

		dD := ws.dD[(bh*k.nc+c)*k.dPer : (bh*k.nc+c+1)*k.dPer]
		clear(dD)
		for i := 0; i < q; i++ {
			dyi, xi := headRow(k, dY, b, t0+i, h), headRow(k, in.X, b, t0+i, h)
			for p := range dyi {
				dD[p%k.dPer] += float64(dyi[p]) * float64(xi[p])
			}
		}
	}

	// Group part of dB and dC through CB: dC += dCB·B and dB += dCBᵀ·C,
	// with dCB (lower triangular) summed over the group's heads.
	bcOff, ldg := groupOff(k, b, t0, grp), k.G*N
	linalg.GemmStructured(linalg.LowerA, false, false, q, N, q, 1, dcb, Q, in.B[bcOff:], ldg, 1, g.C[bcOff:], ldg)
	linalg.GemmStructured(linalg.UpperA, true, false, q, N, q, 1, dcb, Q, in.C[bcOff:], ldg, 1, g.B[bcOff:], ldg)
}
