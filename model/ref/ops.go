package ref

import (
	"math"

	"github.com/m2train/m2train/model"
)

// This file holds the per-position operations of the Mamba-2 block on the
// CPU: RMSNorm, the causal depthwise conv1d with SiLU, and the gated RMSNorm,
// forward and backward (MAMBA2_SPEC.md §1.2, §2.2, §2.5, §4.2, §4.3, §4.7).
// Tokens are rows; n is the number of rows (batch·length).

func sigmoid(u float64) float64 { return 1 / (1 + math.Exp(-u)) }

func silu(u float64) float64 { return u * sigmoid(u) }

// siluGrad is d silu(u)/du = σ(u)·(1 + u·(1−σ(u))).
func siluGrad(u float64) float64 {
	s := sigmoid(u)
	return s * (1 + u*(1-s))
}

// rmsNormFwd writes out = x·r·w per row of width d and saves r = (mean x² + eps)^-½.
func rmsNormFwd[T model.Float](out, rstd, x, w []T, n, d int, eps float64) {
	parallelFor(n, 16, func(lo, hi int) {
		for t := lo; t < hi; t++ {
			row := x[t*d : (t+1)*d]
			var ss T
			for _, v := range row {
				ss += v * v
			}
			r := T(1 / math.Sqrt(float64(ss)/float64(d)+eps))
			rstd[t] = r
			o := out[t*d : (t+1)*d]
			for i, v := range row {
				o[i] = v * r * w[i]
			}
		}
	})
}

// rmsNormBwd adds the gradient with respect to x into dx and the weight
// gradient into dw, given dout.
func rmsNormBwd[T model.Float](dx, dw, dout, x, rstd, w []T, n, d int) {
	parallelFor(n, 16, func(lo, hi int) {
		for t := lo; t < hi; t++ {
			xr, dr, gx := x[t*d:(t+1)*d], dout[t*d:(t+1)*d], dx[t*d:(t+1)*d]
			r := rstd[t]
			var dot T
			for i := range xr {
				dot += dr[i] * w[i] * xr[i] * r
			}
			m := dot / T(d)
			for i := range xr {
				xh := xr[i] * r
				gx[i] += r * (dr[i]*w[i] - xh*m)
			}
		}
	})
	columnReduce(n, d, dw, func(t int, acc []T) {
		xr, dr := x[t*d:(t+1)*d], dout[t*d:(t+1)*d]
		r := rstd[t]
		for i := range acc {
			acc[i] += dr[i] * xr[i] * r
		}
	})
}

// convShape describes the causal depthwise conv over a batch: bt sequences of
// l positions with cd channels and kernel width w. The input is read from a
// strided matrix (row stride ld, first channel at column off) so that the
// in_proj output needs no copy.
type convShape struct {
	bt, l, cd, w, ld, off int
}

// convIn returns the pre-conv input of channel c at position tt of sequence
// b, reading the halo (the predecessor shard's last w−1 positions) or zero
// for tt < 0.
func convIn[T model.Float](s convShape, src, halo []T, b, tt, c int) T {
	if tt >= 0 {
		return src[(b*s.l+tt)*s.ld+s.off+c]
	}
	if halo == nil {
		return 0
	}
	return halo[(b*(s.w-1)+s.w-1+tt)*s.cd+c]
}

// convFwd computes pre = bias + Σ_k w[c,k]·xBC[t+k−(W−1)] and act = silu(pre).
func convFwd[T model.Float](s convShape, pre, act, src, halo, w, bias []T) {
	parallelFor(s.bt*s.l, 8, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			b, t := r/s.l, r%s.l
			po, ao := pre[r*s.cd:(r+1)*s.cd], act[r*s.cd:(r+1)*s.cd]
			for c := 0; c < s.cd; c++ {
				var v T
				if bias != nil {
					v = bias[c]
				}
				wc := w[c*s.w : (c+1)*s.w]
				for k := 0; k < s.w; k++ {
					v += wc[k] * convIn(s, src, halo, b, t+k-(s.w-1), c)
				}
				po[c] = v
				ao[c] = T(silu(float64(v)))
			}
		}
	})
}

// convBwd turns dact (gradient w.r.t. the activated output) into the
// gradient of the pre-conv input, written into dst (same strided layout as
// the source), the weight and bias gradients (added into dw, dbias), and the
// gradient of the halo (written into dhalo when it is non-nil).
func convBwd[T model.Float](s convShape, dst, dw, dbias, dhalo, dact, pre, src, halo, w []T) {
	n := s.bt * s.l
	dpre := make([]T, n*s.cd)
	parallelFor(n*s.cd, 4096, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			dpre[i] = dact[i] * T(siluGrad(float64(pre[i])))
		}
	})
	// Input gradient: position q receives w[c,k]·dpre[q−k+(W−1)].
	parallelFor(n, 8, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			b, q := r/s.l, r%s.l
			out := dst[r*s.ld+s.off : r*s.ld+s.off+s.cd]
			for c := range out {
				var v T
				for k := 0; k < s.w; k++ {
					if t := q - k + s.w - 1; t < s.l {
						v += w[c*s.w+k] * dpre[(b*s.l+t)*s.cd+c]
					}
				}
				out[c] = v
			}
		}
	})
	// Halo gradient: halo row j is the input at position j−(W−1), read by
	// output t = j−k through w[c,k] for every k with 0 <= t < L. Rows that
	// no output reads get zero; with L < W−1 (a sequence shorter than the
	// halo) the first admissible k is above zero.
	if dhalo != nil {
		for b := 0; b < s.bt; b++ {
			for j := 0; j < s.w-1; j++ {
				out := dhalo[(b*(s.w-1)+j)*s.cd : (b*(s.w-1)+j+1)*s.cd]
				for c := range out {
					var v T
					for k := max(0, j-s.l+1); k <= j; k++ {
						v += w[c*s.w+k] * dpre[(b*s.l+j-k)*s.cd+c]
					}
					out[c] = v
				}
			}
		}
	}
	width := s.cd * s.w
	if dbias != nil {
		width += s.cd
	}
	grad := make([]T, width)
	columnReduce(n, width, grad, func(r int, acc []T) {
		b, t := r/s.l, r%s.l
		dp := dpre[r*s.cd : (r+1)*s.cd]
		for c, g := range dp {
			for k := 0; k < s.w; k++ {
				acc[c*s.w+k] += g * convIn(s, src, halo, b, t+k-(s.w-1), c)
			}
		}
		if dbias != nil {
			for c, g := range dp {
				acc[width-s.cd+c] += g
			}
		}
	})
	for i := range dw {
		dw[i] += grad[i]
	}
	for c := range dbias {
		dbias[c] += grad[width-s.cd+c]
	}
}

// gatedNorm describes the gated RMSNorm over rows of width e split into
// groups norm groups (MAMBA2_SPEC.md §2.5). z is read from a strided matrix
// (row stride ldz). With enabled false the op is out = y·silu(z).
type gatedNorm struct {
	n, e, groups, ldz int
	eps               float64
	beforeGate        bool
	enabled           bool
}

// fwd writes out and the per-(row, group) rstd.
func gatedNormFwd[T model.Float](g gatedNorm, out, rstd, y, z, w []T) {
	k := g.e / g.groups
	parallelFor(g.n, 8, func(lo, hi int) {
		s := make([]T, g.e)
		for t := lo; t < hi; t++ {
			yr, zr, or := y[t*g.e:(t+1)*g.e], z[t*g.ldz:t*g.ldz+g.e], out[t*g.e:(t+1)*g.e]
			for i := range s {
				gate := T(silu(float64(zr[i])))
				if g.beforeGate && g.enabled {
					s[i] = yr[i]
				} else {
					s[i] = yr[i] * gate
				}
			}
			if !g.enabled {
				copy(or, s)
				continue
			}
			for gr := 0; gr < g.groups; gr++ {
				var ss T
				for _, v := range s[gr*k : (gr+1)*k] {
					ss += v * v
				}
				r := T(1 / math.Sqrt(float64(ss)/float64(k)+g.eps))
				rstd[t*g.groups+gr] = r
				for i := gr * k; i < (gr+1)*k; i++ {
					or[i] = s[i] * r * w[i]
					if g.beforeGate {
						or[i] *= T(silu(float64(zr[i])))
					}
				}
			}
		}
	})
}

// gatedNormBwd writes dy and dz (strided like z) and adds the weight
// gradient into dw.
func gatedNormBwd[T model.Float](g gatedNorm, dy, dz, dw, dout, rstd, y, z, w []T) {
	k := g.e / g.groups
	parallelFor(g.n, 8, func(lo, hi int) {
		s := make([]T, g.e)
		gg := make([]T, g.e)
		for t := lo; t < hi; t++ {
			yr, zr, dor := y[t*g.e:(t+1)*g.e], z[t*g.ldz:t*g.ldz+g.e], dout[t*g.e:(t+1)*g.e]
			dyr, dzr := dy[t*g.e:(t+1)*g.e], dz[t*g.ldz:t*g.ldz+g.e]
			if !g.enabled {
				for i := range yr {
					zi := float64(zr[i])
					dyr[i] = dor[i] * T(silu(zi))
					dzr[i] = dor[i] * yr[i] * T(siluGrad(zi))
				}
				continue
			}
			for i := range s {
				if g.beforeGate {
					s[i] = yr[i]
					gg[i] = dor[i] * w[i] * T(silu(float64(zr[i])))
				} else {
					s[i] = yr[i] * T(silu(float64(zr[i])))
					gg[i] = dor[i] * w[i]
				}
			}
			for gr := 0; gr < g.groups; gr++ {
				r := rstd[t*g.groups+gr]
				var dot T
				for i := gr * k; i < (gr+1)*k; i++ {
					dot += gg[i] * s[i] * r
				}
				m := dot / T(k)
				for i := gr * k; i < (gr+1)*k; i++ {
					ds := r * (gg[i] - s[i]*r*m)
					zi := float64(zr[i])
					if g.beforeGate {
						dyr[i] = ds
						dzr[i] = dor[i] * s[i] * r * w[i] * T(siluGrad(zi))
					} else {
						dyr[i] = ds * T(silu(zi))
						dzr[i] = ds * yr[i] * T(siluGrad(zi))
					}
				}
			}
		}
	})
	if !g.enabled {
		return
	}
	columnReduce(g.n, g.e, dw, func(t int, acc []T) {
		yr, zr, dor := y[t*g.e:(t+1)*g.e], z[t*g.ldz:t*g.ldz+g.e], dout[t*g.e:(t+1)*g.e]
		for gr := 0; gr < g.groups; gr++ {
			r := rstd[t*g.groups+gr]
			for i := gr * k; i < (gr+1)*k; i++ {
				gate := T(silu(float64(zr[i])))
				if g.beforeGate {
					acc[i] += dor[i] * yr[i] * r * gate
				} else {
					acc[i] += dor[i] * yr[i] * gate * r
				}
			}
		}
	})
}
