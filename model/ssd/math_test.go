package ssd

import (
	"math"
	"testing"
)

// loss is Σ w·y + ⟨wf, final⟩, the scalar whose gradient a backward call
// with dY = w and dFinal = wf computes.
func loss(t *testing.T, p *problem) float64 {
	out := mustForward(t, false, p.d, p.o, &p.in)
	var s float64
	for i, v := range out.Y {
		s += p.dY[i] * v
	}
	for i, v := range out.FinalState {
		s += p.dFinal[i] * v
	}
	return s
}

// inputFields lists the inputs under the names gradFields uses.
func inputFields(in *Inputs[float64]) []namedSlice[float64] {
	return []namedSlice[float64]{
		{"x", in.X}, {"dt_raw", in.DTRaw}, {"dt_bias", in.DTBias}, {"A_log", in.ALog},
		{"B", in.B}, {"C", in.C}, {"D", in.D}, {"initial_state", in.InitState},
	}
}

func TestRecurrentBackwardFiniteDifferences(t *testing.T) {
	d := Dims{Batch: 2, L: 7, H: 4, P: 2, N: 3, G: 2}
	cases := []struct {
		name    string
		o       Options
		dtMean  float64
		bigDT   bool // put some dt_raw above the softplus threshold
		clamped bool // DTLimit must clamp on both sides somewhere
	}{
		{name: "default", o: Options{}, dtMean: 0},
		{name: "small_dt_hdim", o: Options{DHasHdim: true}, dtMean: -4},
		{name: "softplus_threshold", o: Options{}, dtMean: -1, bigDT: true},
		{name: "dt_limit", o: Options{DTLimit: [2]float64{0.4, 0.9}}, dtMean: 0, clamped: true},
	}
	const eps = 1e-6
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newProblem(uint64(100+i), d, tc.o, true, tc.dtMean)
			if tc.bigDT {
				for k := 0; k < len(p.in.DTRaw); k += 5 {
					p.in.DTRaw[k] = 21 + float64(k%3)
				}
			}
			if tc.clamped {
				var below, above int
				lo, hi := tc.o.dtLimit()
				for k, v := range p.in.DTRaw {
					sp := math.Log1p(math.Exp(v + p.in.DTBias[k%d.H]))
					if sp < lo {
						below++
					}
					if sp > hi {
						above++
					}
				}
				if below == 0 || above == 0 {
					t.Fatalf("DTLimit clamps %d below and %d above; the case must clamp on both sides", below, above)
				}
			}
			g := mustBackward(t, false, p.d, p.o, &p.in, p.dY, p.dFinal)
			gf := gradFields(g)
			for fi, f := range inputFields(&p.in) {
				fd := make([]float64, len(f.s))
				for k := range f.s {
					orig := f.s[k]
					f.s[k] = orig + eps
					up := loss(t, &p)
					f.s[k] = orig - eps
					down := loss(t, &p)
					f.s[k] = orig
					fd[k] = (up - down) / (2 * eps)
				}
				// The error of a central difference is absolute (eps² terms and
				// rounding of the loss over eps), so the scale has a floor.
				assertCloseFloor(t, f.name, gf[fi].s, fd, 1e-7, 0.1)
			}
		})
	}
}

// TestDualForm checks the recurrence against the attention form of §2.4:
// y_t = Σ_{s<=t} (C_t·B_s)·exp(a_{s+1}+…+a_t)·dt_s·x_s + exp(a_0+…+a_t)·h_{-1}C_t + D·x_t.
func TestDualForm(t *testing.T) {
	for _, hdim := range []bool{false, true} {
		d := Dims{Batch: 2, L: 9, H: 4, P: 3, N: 4, G: 2}
		o := Options{DHasHdim: hdim}
		p := newProblem(31, d, o, true, 0)
		got := mustForward(t, false, d, o, &p.in)
		in := &p.in
		R := d.H / d.G
		want := make([]float64, len(got.Y))
		wantFinal := make([]float64, len(got.FinalState))
		for b := 0; b < d.Batch; b++ {
			for h := 0; h < d.H; h++ {
				g := h / R
				dt := make([]float64, d.L)
				a := make([]float64, d.L)
				for t := range dt {
					u := in.DTRaw[(b*d.L+t)*d.H+h] + in.DTBias[h]
					dt[t] = math.Log1p(math.Exp(u))
					a[t] = -dt[t] * math.Exp(in.ALog[h])
				}
				seg := func(s, t int) float64 { // a_{s+1} + … + a_t
					var sum float64
					for k := s + 1; k <= t; k++ {
						sum += a[k]
					}
					return sum
				}
				bv := func(t int) []float64 { return in.B[((b*d.L+t)*d.G+g)*d.N:][:d.N] }
				cv := func(t int) []float64 { return in.C[((b*d.L+t)*d.G+g)*d.N:][:d.N] }
				xv := func(t int) []float64 { return in.X[((b*d.L+t)*d.H+h)*d.P:][:d.P] }
				h0 := in.InitState[(b*d.H+h)*d.P*d.N:][:d.P*d.N]
				for t := 0; t < d.L; t++ {
					y := want[((b*d.L+t)*d.H+h)*d.P:][:d.P]
					for s := 0; s <= t; s++ {
						var cb float64
						for n := 0; n < d.N; n++ {
							cb += cv(t)[n] * bv(s)[n]
						}
						w := cb * math.Exp(seg(s, t)) * dt[s]
						for pp := range y {
							y[pp] += w * xv(s)[pp]
						}
					}
					decay := math.Exp(seg(-1, t))
					for pp := range y {
						var hc float64
						for n := 0; n < d.N; n++ {
							hc += h0[pp*d.N+n] * cv(t)[n]
						}
						y[pp] += decay*hc + dCoef(in.D, o, h, pp, d.P)*xv(t)[pp]
					}
				}
				// Final state in the same form: Σ_s exp(a_{s+1..L-1})·dt_s·x_s B_sᵀ + exp(Σa)·h_{-1}.
				fin := wantFinal[(b*d.H+h)*d.P*d.N:][:d.P*d.N]
				for pp := 0; pp < d.P; pp++ {
					for n := 0; n < d.N; n++ {
						v := math.Exp(seg(-1, d.L-1)) * h0[pp*d.N+n]
						for s := 0; s < d.L; s++ {
							v += math.Exp(seg(s, d.L-1)) * dt[s] * xv(s)[pp] * bv(s)[n]
						}
						fin[pp*d.N+n] = v
					}
				}
			}
		}
		assertClose(t, "y", got.Y, want, 1e-13)
		assertClose(t, "final_state", got.FinalState, wantFinal, 1e-13)
	}
}

// TestGroupsEqualRepeatedHeads checks §7 item 5: G groups give the results of
// G = H with B and C repeated per head, and the grouped dB, dC are the
// per-head gradients summed over each group.
func TestGroupsEqualRepeatedHeads(t *testing.T) {
	for _, chunked := range []bool{false, true} {
		for _, G := range []int{1, 2} {
			d := Dims{Batch: 2, L: 11, H: 4, P: 3, N: 5, G: G}
			o := Options{Chunk: 4}
			p := newProblem(uint64(40+G), d, o, true, 0)
			R := d.H / G
			dh := d
			dh.G = d.H
			rep := func(s []float64) []float64 {
				out := make([]float64, d.Batch*d.L*d.H*d.N)
				for bt := 0; bt < d.Batch*d.L; bt++ {
					for h := 0; h < d.H; h++ {
						copy(out[(bt*d.H+h)*d.N:][:d.N], s[(bt*G+h/R)*d.N:][:d.N])
					}
				}
				return out
			}
			inH := p.in
			inH.B, inH.C = rep(p.in.B), rep(p.in.C)
			name := map[bool]string{false: "recurrent", true: "chunked"}[chunked]
			t.Run(name+"_G"+string(rune('0'+G)), func(t *testing.T) {
				got := mustForward(t, chunked, d, o, &p.in)
				want := mustForward(t, chunked, dh, o, &inH)
				wf := outFields(want)
				for i, f := range outFields(got) {
					assertClose(t, f.name, f.s, wf[i].s, 1e-14)
				}
				g := mustBackward(t, chunked, d, o, &p.in, p.dY, p.dFinal)
				gh := mustBackward(t, chunked, dh, o, &inH, p.dY, p.dFinal)
				sum := func(s []float64) []float64 {
					out := make([]float64, d.Batch*d.L*G*d.N)
					for bt := 0; bt < d.Batch*d.L; bt++ {
						for h := 0; h < d.H; h++ {
							dst := out[(bt*G+h/R)*d.N:][:d.N]
							for n, v := range s[(bt*d.H+h)*d.N:][:d.N] {
								dst[n] += v
							}
						}
					}
					return out
				}
				gh.B, gh.C = sum(gh.B), sum(gh.C)
				hf := gradFields(gh)
				for i, f := range gradFields(g) {
					assertClose(t, f.name, f.s, hf[i].s, 1e-13)
				}
			})
		}
	}
}
