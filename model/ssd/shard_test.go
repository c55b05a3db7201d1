package ssd

import (
	"fmt"
	"math"
	"testing"
)

// seqSlice returns positions [t0, t1) of a (Bt, L, rest...) tensor.
func seqSlice(s []float64, bt, L, rest, t0, t1 int) []float64 {
	out := make([]float64, 0, bt*(t1-t0)*rest)
	for b := 0; b < bt; b++ {
		out = append(out, s[(b*L+t0)*rest:(b*L+t1)*rest]...)
	}
	return out
}

// seqPad appends extra positions filled with v to a (Bt, L, rest...) tensor.
func seqPad(s []float64, bt, L, rest, extra int, v float64) []float64 {
	out := make([]float64, 0, bt*(L+extra)*rest)
	for b := 0; b < bt; b++ {
		out = append(out, s[b*L*rest:(b+1)*L*rest]...)
		for k := 0; k < extra*rest; k++ {
			out = append(out, v)
		}
	}
	return out
}

// shard returns the problem restricted to positions [t0, t1), started from
// init, with upstream gradients dY restricted and dFinal given.
func shard(p *problem, t0, t1 int, init, dFinal []float64) problem {
	d := p.d
	q := problem{d: d, o: p.o, dFinal: dFinal}
	q.d.L = t1 - t0
	hp, gn := d.H*d.P, d.G*d.N
	q.in = Inputs[float64]{
		X: seqSlice(p.in.X, d.Batch, d.L, hp, t0, t1), DTRaw: seqSlice(p.in.DTRaw, d.Batch, d.L, d.H, t0, t1),
		B: seqSlice(p.in.B, d.Batch, d.L, gn, t0, t1), C: seqSlice(p.in.C, d.Batch, d.L, gn, t0, t1),
		DTBias: p.in.DTBias, ALog: p.in.ALog, D: p.in.D, InitState: init,
	}
	q.dY = seqSlice(p.dY, d.Batch, d.L, hp, t0, t1)
	return q
}

// TestPadding checks §3.3 and §7 item 6: positions appended with
// post-softplus dt = 0 (dt_raw = -1000) and x = B = C = 0 change neither the
// real outputs, the final state, nor the gradients at real positions, while
// padding the raw dt with zeros does change the final state.
func TestPadding(t *testing.T) {
	d := Dims{Batch: 2, L: 10, H: 4, P: 3, N: 4, G: 2}
	const extra = 5
	for _, chunked := range []bool{false, true} {
		for _, Q := range []int{3, 4, 5} {
			o := Options{Chunk: Q}
			p := newProblem(uint64(50+Q), d, o, true, 0)
			hp, gn := d.H*d.P, d.G*d.N
			pad := func(rawDT float64) problem {
				q := problem{d: d, o: o, dFinal: p.dFinal}
				q.d.L += extra
				q.in = p.in
				q.in.X = seqPad(p.in.X, d.Batch, d.L, hp, extra, 0)
				q.in.DTRaw = seqPad(p.in.DTRaw, d.Batch, d.L, d.H, extra, rawDT)
				q.in.B = seqPad(p.in.B, d.Batch, d.L, gn, extra, 0)
				q.in.C = seqPad(p.in.C, d.Batch, d.L, gn, extra, 0)
				q.dY = seqPad(p.dY, d.Batch, d.L, hp, extra, 0)
				return q
			}
			t.Run(fmt.Sprintf("chunked%v_Q%d", chunked, Q), func(t *testing.T) {
				want := mustForward(t, chunked, d, o, &p.in)
				q := pad(-1000)
				got := mustForward(t, chunked, q.d, o, &q.in)
				assertClose(t, "y", seqSlice(got.Y, d.Batch, q.d.L, hp, 0, d.L), want.Y, 0)
				assertClose(t, "final_state", got.FinalState, want.FinalState, 0)
				assertClose(t, "log_decay", got.LogDecay, want.LogDecay, 0)

				wg := mustBackward(t, chunked, d, o, &p.in, p.dY, p.dFinal)
				gg := mustBackward(t, chunked, q.d, o, &q.in, q.dY, q.dFinal)
				assertClose(t, "grad x", seqSlice(gg.X, d.Batch, q.d.L, hp, 0, d.L), wg.X, 0)
				assertClose(t, "grad dt_raw", seqSlice(gg.DTRaw, d.Batch, q.d.L, d.H, 0, d.L), wg.DTRaw, 0)
				assertClose(t, "grad B", seqSlice(gg.B, d.Batch, q.d.L, gn, 0, d.L), wg.B, 0)
				assertClose(t, "grad C", seqSlice(gg.C, d.Batch, q.d.L, gn, 0, d.L), wg.C, 0)
				for _, f := range []struct {
					name      string
					got, want []float64
				}{{"dt_bias", gg.DTBias, wg.DTBias}, {"A_log", gg.ALog, wg.ALog}, {"D", gg.D, wg.D}, {"initial_state", gg.InitState, wg.InitState}} {
					assertClose(t, "grad "+f.name, f.got, f.want, 1e-15)
				}
				padded := seqSlice(gg.X, d.Batch, q.d.L, hp, d.L, q.d.L)
				padded = append(padded, seqSlice(gg.DTRaw, d.Batch, q.d.L, d.H, d.L, q.d.L)...)
				for i, v := range padded {
					if v != 0 {
						t.Fatalf("padded position gets gradient %g at %d", v, i)
					}
				}

				// Negative: zero raw dt still has softplus(dt_bias) > 0 and decays the state.
				bad := pad(0)
				badOut := mustForward(t, chunked, bad.d, o, &bad.in)
				if e := relErr(badOut.FinalState, want.FinalState); e < 1e-3 {
					t.Errorf("raw-dt zero padding left the final state unchanged (rel. diff %.3g)", e)
				}
			})
		}
	}
}

// TestPrefixCombine checks §5.3 / §7 item 8: exp(Λ1)·h_init + S1 equals the
// final state of the run started from h_init, and ⊕ is associative and
// agrees with the unsplit run over three shards.
func TestPrefixCombine(t *testing.T) {
	d := Dims{Batch: 2, L: 18, H: 4, P: 3, N: 4, G: 2}
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprintf("chunked%v", chunked), func(t *testing.T) {
			o := Options{Chunk: 4}
			p := newProblem(61, d, o, true, 0)
			init := p.in.InitState
			PN := d.P * d.N

			fromInit := mustForward(t, chunked, d, o, &p.in)
			p.in.InitState = nil
			zero := mustForward(t, chunked, d, o, &p.in)
			comb := make([]float64, len(init))
			for bh := 0; bh < d.Batch*d.H; bh++ {
				e := math.Exp(zero.LogDecay[bh])
				for k := 0; k < PN; k++ {
					comb[bh*PN+k] = e*init[bh*PN+k] + zero.FinalState[bh*PN+k]
				}
			}
			assertClose(t, "exp(Λ)·h_init + S", comb, fromInit.FinalState, 1e-13)

			type pair struct{ lam, s []float64 }
			op := func(x, y pair) pair { // "x then y"
				r := pair{make([]float64, len(x.lam)), make([]float64, len(x.s))}
				for bh := range x.lam {
					r.lam[bh] = x.lam[bh] + y.lam[bh]
					e := math.Exp(y.lam[bh])
					for k := 0; k < PN; k++ {
						r.s[bh*PN+k] = e*x.s[bh*PN+k] + y.s[bh*PN+k]
					}
				}
				return r
			}
			var parts []pair
			for _, cut := range [][2]int{{0, 5}, {5, 12}, {12, 18}} {
				q := shard(&p, cut[0], cut[1], nil, nil)
				out := mustForward(t, chunked, q.d, o, &q.in)
				parts = append(parts, pair{out.LogDecay, out.FinalState})
			}
			left := op(op(parts[0], parts[1]), parts[2])
			right := op(parts[0], op(parts[1], parts[2]))
			assertClose(t, "associativity Λ", left.lam, right.lam, 1e-14)
			assertClose(t, "associativity S", left.s, right.s, 1e-13)
			assertClose(t, "three shards Λ", left.lam, zero.LogDecay, 1e-14)
			assertClose(t, "three shards S", left.s, zero.FinalState, 1e-13)
		})
	}
}

// TestSplitSequence checks §5.2: two shards, the second started from the
// first's final state, reproduce the unsplit run; in the backward the second
// shard's initial-state gradient is the first shard's dFinal. Per-position
// results are bitwise equal for the recurrence and for Q-aligned cuts of the
// chunked scan; parameter gradients (sums in another order) and unaligned
// chunked cuts agree to rounding.
func TestSplitSequence(t *testing.T) {
	d := Dims{Batch: 2, L: 20, H: 4, P: 3, N: 4, G: 2}
	for _, tc := range []struct {
		chunked bool
		cut     int
	}{{false, 7}, {false, 8}, {true, 8}, {true, 7}} {
		t.Run(fmt.Sprintf("chunked%v_cut%d", tc.chunked, tc.cut), func(t *testing.T) {
			o := Options{Chunk: 4, DHasHdim: tc.cut == 8}
			p := newProblem(71, d, o, true, -1)
			exact := !tc.chunked || tc.cut%o.Chunk == 0
			tol := 0.0
			if !exact {
				tol = 1e-13
			}
			hp, gn := d.H*d.P, d.G*d.N
			whole := mustForward(t, tc.chunked, d, o, &p.in)
			s1 := shard(&p, 0, tc.cut, p.in.InitState, nil)
			o1 := mustForward(t, tc.chunked, s1.d, o, &s1.in)
			s2 := shard(&p, tc.cut, d.L, o1.FinalState, p.dFinal)
			o2 := mustForward(t, tc.chunked, s2.d, o, &s2.in)
			assertClose(t, "y shard 1", o1.Y, seqSlice(whole.Y, d.Batch, d.L, hp, 0, tc.cut), tol)
			assertClose(t, "y shard 2", o2.Y, seqSlice(whole.Y, d.Batch, d.L, hp, tc.cut, d.L), tol)
			assertClose(t, "final_state", o2.FinalState, whole.FinalState, tol)

			gw := mustBackward(t, tc.chunked, d, o, &p.in, p.dY, p.dFinal)
			g2 := mustBackward(t, tc.chunked, s2.d, o, &s2.in, s2.dY, s2.dFinal)
			s1.dFinal = g2.InitState
			g1 := mustBackward(t, tc.chunked, s1.d, o, &s1.in, s1.dY, s1.dFinal)
			for _, f := range []struct {
				name        string
				whole, a, b []float64
				rest        int
			}{{"x", gw.X, g1.X, g2.X, hp}, {"dt_raw", gw.DTRaw, g1.DTRaw, g2.DTRaw, d.H}, {"B", gw.B, g1.B, g2.B, gn}, {"C", gw.C, g1.C, g2.C, gn}} {
				assertClose(t, "grad "+f.name+" shard 1", f.a, seqSlice(f.whole, d.Batch, d.L, f.rest, 0, tc.cut), tol)
				assertClose(t, "grad "+f.name+" shard 2", f.b, seqSlice(f.whole, d.Batch, d.L, f.rest, tc.cut, d.L), tol)
			}
			assertClose(t, "grad initial_state", g1.InitState, gw.InitState, tol)
			sum := func(a, b []float64) []float64 {
				out := make([]float64, len(a))
				for i := range a {
					out[i] = a[i] + b[i]
				}
				return out
			}
			assertClose(t, "grad dt_bias", sum(g1.DTBias, g2.DTBias), gw.DTBias, 1e-13)
			assertClose(t, "grad A_log", sum(g1.ALog, g2.ALog), gw.ALog, 1e-13)
			assertClose(t, "grad D", sum(g1.D, g2.D), gw.D, 1e-13)
		})
	}
}
