package ssd

import (
	"math"
	"unsafe"

	"github.com/m2train/m2train/model"
)

// softplusThreshold is the input above which softplus(u) is taken to be u,
// as in every Mamba-2 implementation (§0).
const softplusThreshold = 20

// discretize returns dt = clamp(softplus(u), lo, hi) and d dt / d u: σ(u)
// below the softplus threshold, 1 above it, and 0 where the clamp is active.
func discretize(u, lo, hi float64) (dt, grad float64) {
	var sp, dsp float64
	if u > softplusThreshold {
		sp, dsp = u, 1
	} else {
		sp = math.Log1p(math.Exp(u))
		dsp = 1 / (1 + math.Exp(-u))
	}
	if sp < lo {
		return lo, 0
	}
	if sp > hi {
		return hi, 0
	}
	return sp, dsp
}

// flushBelow returns the log-decay below which a decay factor exp(x) is
// taken to be exactly zero for element type T: about 2^-101 for float32 and
// 2^-966 for float64. Such factors scale terms that lie far below the
// rounding error of any sum they join (every decayed sum also holds an
// undecayed term), but computing them would produce subnormal numbers, whose
// arithmetic is two orders of magnitude slower on common CPUs. It is the
// flush-to-zero that GPU kernels get from their floating-point mode, applied
// with a margin so that products of the factor stay normal.
func flushBelow[T model.Float]() float64 {
	var z T
	if unsafe.Sizeof(z) == 4 {
		return -70
	}
	return -670
}

// decay returns exp(x), or 0 when x < cut (see flushBelow).
func decay(x, cut float64) float64 {
	if x < cut {
		return 0
	}
	return math.Exp(x)
}

// negA returns A = -exp(A_log) per head, in float64.
func negA[T model.Float](aLog []T, a []float64) {
	for h, v := range aLog {
		a[h] = -math.Exp(float64(v))
	}
}

// paramAccum holds the per-(b, h) partial sums of the parameter gradients
// that the scalar chain of §4.4 produces; they are reduced over the batch in
// order by finishParams.
type paramAccum struct {
	dtBias []float64 // (Bt, H)
	dA     []float64 // (Bt, H): ∂loss/∂A
	dD     []float64 // (Bt, H, P) or (Bt, H, 1)
}

// scalarChain applies the chain of §4.4 for one (b, h) from the direct dt
// gradients ddt and the log-decay gradients da over its L positions. It
// writes ∂loss/∂dt_raw into gDTRaw (stride H) and returns the (b, h)
// contributions to ∂loss/∂dt_bias and ∂loss/∂A.
func scalarChain[T model.Float](dtRaw []T, bias, a, lo, hi float64, ddt, da []float64, gDTRaw []T, stride int) (dBias, dA float64) {
	for t := range ddt {
		dt, grad := discretize(float64(dtRaw[t*stride])+bias, lo, hi)
		total := ddt[t] + a*da[t]
		dA += dt * da[t]
		g := total * grad
		gDTRaw[t*stride] = T(g)
		dBias += g
	}
	return dBias, dA
}

// finishParams reduces the per-(b, h) partials over the batch in batch order
// and writes the parameter gradients. dD partials have dPer entries per
// (b, h): P with DHasHdim, else 1.
func finishParams[T model.Float](d Dims, acc *paramAccum, a []float64, dPer int, g *Grads[T]) {
	for h := 0; h < d.H; h++ {
		var sb, sa float64
		for b := 0; b < d.Batch; b++ {
			sb += acc.dtBias[b*d.H+h]
			sa += acc.dA[b*d.H+h]
		}
		g.DTBias[h] = T(sb)
		g.ALog[h] = T(sa * a[h]) // ∂A/∂A_log = -exp(A_log) = A
		for p := 0; p < dPer; p++ {
			var s float64
			for b := 0; b < d.Batch; b++ {
				s += acc.dD[(b*d.H+h)*dPer+p]
			}
			g.D[h*dPer+p] = T(s)
		}
	}
}
