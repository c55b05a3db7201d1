package ref

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

func randSlice(rng *rand.Rand, n int, scale float64) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = rng.NormFloat64() * scale
	}
	return s
}

func maxRelErr(got, want []float64) float64 {
	var diff, ref float64
	for i := range want {
		diff = math.Max(diff, math.Abs(got[i]-want[i]))
		ref = math.Max(ref, math.Abs(want[i]))
	}
	if ref == 0 {
		return diff
	}
	return diff / ref
}

func dot(a, b []float64) float64 {
	var s float64
	for i := range a {
		s += a[i] * b[i]
	}
	return s
}

// checkFD compares grad with central finite differences of loss over x.
func checkFD(t *testing.T, name string, x, grad []float64, loss func() float64, tol float64) {
	t.Helper()
	const eps = 1e-6
	fd := make([]float64, len(x))
	for i := range x {
		old := x[i]
		x[i] = old + eps
		lp := loss()
		x[i] = old - eps
		lm := loss()
		x[i] = old
		fd[i] = (lp - lm) / (2 * eps)
	}
	if e := maxRelErr(grad, fd); e > tol {
		t.Errorf("%s: analytic gradient differs from finite differences: max rel err %.3g > %.3g", name, e, tol)
	}
}

func TestConvOrientationIsIdentity(t *testing.T) {
	// With w = e_{W−1} and no bias, pre = xBC at the current position.
	s := convShape{bt: 2, l: 5, cd: 3, w: 4, ld: 3, off: 0}
	rng := rand.New(rand.NewPCG(1, 2))
	src := randSlice(rng, s.bt*s.l*s.cd, 1)
	w := make([]float64, s.cd*s.w)
	for c := 0; c < s.cd; c++ {
		w[c*s.w+s.w-1] = 1
	}
	pre := make([]float64, len(src))
	act := make([]float64, len(src))
	convFwd(s, pre, act, src, nil, w, nil)
	for i := range src {
		if pre[i] != src[i] {
			t.Fatalf("pre[%d] = %v, want the input %v", i, pre[i], src[i])
		}
		if want := silu(src[i]); act[i] != want {
			t.Fatalf("act[%d] = %v, want silu = %v", i, act[i], want)
		}
	}
}

func TestConvHaloSplitEqualsUnsplit(t *testing.T) {
	const bt, l, cd, w, cut = 2, 9, 5, 4, 4
	rng := rand.New(rand.NewPCG(3, 4))
	src := randSlice(rng, bt*l*cd, 1)
	wt := randSlice(rng, cd*w, 0.5)
	bias := randSlice(rng, cd, 0.1)
	dact := randSlice(rng, bt*l*cd, 1)
	full := convShape{bt: bt, l: l, cd: cd, w: w, ld: cd}
	pre := make([]float64, bt*l*cd)
	act := make([]float64, bt*l*cd)
	convFwd(full, pre, act, src, nil, wt, bias)
	dsrc := make([]float64, bt*l*cd)
	dw, db := make([]float64, cd*w), make([]float64, cd)
	convBwd(full, dsrc, dw, db, nil, dact, pre, src, nil, wt)

	// Split each sequence at cut: shard 0 = [0,cut), shard 1 = [cut,l).
	part := func(x []float64, lo, hi int) []float64 {
		var out []float64
		for b := 0; b < bt; b++ {
			out = append(out, x[(b*l+lo)*cd:(b*l+hi)*cd]...)
		}
		return out
	}
	s0 := convShape{bt: bt, l: cut, cd: cd, w: w, ld: cd}
	s1 := convShape{bt: bt, l: l - cut, cd: cd, w: w, ld: cd}
	src0, src1 := part(src, 0, cut), part(src, cut, l)
	halo := part(src, cut-(w-1), cut)
	pre0, act0 := make([]float64, len(src0)), make([]float64, len(src0))
	pre1, act1 := make([]float64, len(src1)), make([]float64, len(src1))
	convFwd(s0, pre0, act0, src0, nil, wt, bias)
	convFwd(s1, pre1, act1, src1, halo, wt, bias)
	if e := maxRelErr(append(pre0, pre1...), append(part(pre, 0, cut), part(pre, cut, l)...)); e > 1e-15 {
		t.Fatalf("split forward differs from unsplit: %g", e)
	}
	dw0, db0 := make([]float64, cd*w), make([]float64, cd)
	d0 := make([]float64, len(src0))
	d1 := make([]float64, len(src1))
	dhalo := make([]float64, bt*(w-1)*cd)
	convBwd(s1, d1, dw0, db0, dhalo, part(dact, cut, l), pre1, src1, halo, wt)
	convBwd(s0, d0, dw0, db0, nil, part(dact, 0, cut), pre0, src0, nil, wt)
	for b := 0; b < bt; b++ {
		for j := 0; j < w-1; j++ {
			for c := 0; c < cd; c++ {
				d0[(b*cut+cut-(w-1)+j)*cd+c] += dhalo[(b*(w-1)+j)*cd+c]
			}
		}
	}
	if e := maxRelErr(append(d0, d1...), append(part(dsrc, 0, cut), part(dsrc, cut, l)...)); e > 1e-14 {
		t.Errorf("split input gradient (with dhalo added to the predecessor) differs from unsplit: %g", e)
	}
	if e := maxRelErr(dw0, dw); e > 1e-14 {
		t.Errorf("split weight gradient differs: %g", e)
	}
	if e := maxRelErr(db0, db); e > 1e-14 {
		t.Errorf("split bias gradient differs: %g", e)
	}
}

// TestConvGradientsFD checks every conv gradient, the halo's included,
// against finite differences, also for sequences shorter than the halo
// (where every position reads part of it).
func TestConvGradientsFD(t *testing.T) {
	const bt, cd, w = 2, 3, 4
	for _, l := range []int{6, w - 1, 2, 1} {
		t.Run(fmt.Sprint("L", l), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(5, uint64(l)))
			s := convShape{bt: bt, l: l, cd: cd, w: w, ld: cd + 2, off: 1}
			src := randSlice(rng, bt*l*s.ld, 1)
			wt := randSlice(rng, cd*w, 0.5)
			bias := randSlice(rng, cd, 0.1)
			halo := randSlice(rng, bt*(w-1)*cd, 1)
			up := randSlice(rng, bt*l*cd, 1)
			loss := func() float64 {
				pre, act := make([]float64, bt*l*cd), make([]float64, bt*l*cd)
				convFwd(s, pre, act, src, halo, wt, bias)
				return dot(act, up)
			}
			pre, act := make([]float64, bt*l*cd), make([]float64, bt*l*cd)
			convFwd(s, pre, act, src, halo, wt, bias)
			dsrc := make([]float64, len(src))
			dw, db, dh := make([]float64, cd*w), make([]float64, cd), make([]float64, len(halo))
			convBwd(s, dsrc, dw, db, dh, up, pre, src, halo, wt)
			checkFD(t, "src", src, dsrc, loss, 1e-8)
			checkFD(t, "weight", wt, dw, loss, 1e-8)
			checkFD(t, "bias", bias, db, loss, 1e-8)
			checkFD(t, "halo", halo, dh, loss, 1e-8)
		})
	}
}

func TestRMSNormGradientsFD(t *testing.T) {
	const n, d = 5, 7
	rng := rand.New(rand.NewPCG(7, 8))
	x, w, up := randSlice(rng, n*d, 1), randSlice(rng, d, 1), randSlice(rng, n*d, 1)
	loss := func() float64 {
		out, r := make([]float64, n*d), make([]float64, n)
		rmsNormFwd(out, r, x, w, n, d, 1e-5)
		return dot(out, up)
	}
	out, r := make([]float64, n*d), make([]float64, n)
	rmsNormFwd(out, r, x, w, n, d, 1e-5)
	dx, dw := make([]float64, n*d), make([]float64, d)
	rmsNormBwd(dx, dw, up, x, r, w, n, d)
	checkFD(t, "x", x, dx, loss, 1e-8)
	checkFD(t, "w", w, dw, loss, 1e-8)
}

func TestGatedNorm(t *testing.T) {
	const n, e = 4, 12
	for _, tc := range []struct {
		name       string
		groups     int
		beforeGate bool
		enabled    bool
	}{
		{"G1", 1, false, true}, {"G3", 3, false, true}, {"G2-norm-before-gate", 2, true, true}, {"no-norm", 1, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(9, uint64(tc.groups)))
			g := gatedNorm{n: n, e: e, groups: tc.groups, ldz: e + 3, eps: 1e-5, beforeGate: tc.beforeGate, enabled: tc.enabled}
			y, z, w := randSlice(rng, n*e, 1), randSlice(rng, n*g.ldz, 1), randSlice(rng, e, 1)
			up := randSlice(rng, n*e, 1)
			fwd := func() []float64 {
				out, r := make([]float64, n*e), make([]float64, n*tc.groups)
				gatedNormFwd(g, out, r, y, z, w)
				return out
			}
			loss := func() float64 { return dot(fwd(), up) }
			out, r := make([]float64, n*e), make([]float64, n*tc.groups)
			gatedNormFwd(g, out, r, y, z, w)
			if tc.groups == 1 && tc.enabled && !tc.beforeGate {
				// G=1 is a plain RMSNorm of y·silu(z).
				s := make([]float64, n*e)
				for i := 0; i < n; i++ {
					for j := 0; j < e; j++ {
						s[i*e+j] = y[i*e+j] * silu(z[i*g.ldz+j])
					}
				}
				want, rr := make([]float64, n*e), make([]float64, n)
				rmsNormFwd(want, rr, s, w, n, e, 1e-5)
				if err := maxRelErr(out, want); err > 1e-15 {
					t.Fatalf("G=1 gated norm differs from RMSNorm(y·silu(z)): %g", err)
				}
			}
			dy, dz, dw := make([]float64, n*e), make([]float64, n*g.ldz), make([]float64, e)
			gatedNormBwd(g, dy, dz, dw, up, r, y, z, w)
			checkFD(t, "y", y, dy, loss, 1e-8)
			checkFD(t, "z", z, dz, loss, 1e-8)
			if tc.enabled {
				checkFD(t, "w", w, dw, loss, 1e-8)
			}
		})
	}
}
