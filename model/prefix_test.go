package model

import (
	"context"
	"math"
	"math/rand/v2"
	"testing"
)

// TestPrefixScans checks PrefixState and PrefixGrad against the closed
// forms h_in[k] = Σ_{j<k} exp(Σ_{j<i<k} Λ_i)·S_j and
// g[k] = Σ_{m>k} exp(Σ_{k<i<m} Λ_i)·U_m, for every shard of a group of 4,
// and checks that the backward scan is the transpose of the forward one:
// Σ_k ⟨U_k, h_in[k]⟩ = Σ_j ⟨g[j], S_j⟩.
func TestPrefixScans(t *testing.T) {
	const K, bh, pn = 4, 3, 5
	rng := rand.New(rand.NewPCG(1, 2))
	vec := func(n int, scale float64) []float64 {
		v := make([]float64, n)
		for i := range v {
			v[i] = scale * rng.NormFloat64()
		}
		return v
	}
	var S, U, lam [][]float64
	for j := 0; j < K; j++ {
		S, U = append(S, vec(bh*pn, 1)), append(U, vec(bh*pn, 1))
		l := vec(bh, 1)
		for i := range l {
			l[i] = -math.Abs(l[i])
		}
		lam = append(lam, l)
	}
	closed := func(vals [][]float64, from, to int, k int) []float64 { // Σ over j in [from, to) of exp(Σ of Λ strictly between j and k)·vals[j]
		out := make([]float64, bh*pn)
		for j := from; j < to; j++ {
			for r := 0; r < bh; r++ {
				var s float64
				for i := min(j, k) + 1; i < max(j, k); i++ {
					s += lam[i][r]
				}
				for p := 0; p < pn; p++ {
					out[r*pn+p] += math.Exp(s) * vals[j][r*pn+p]
				}
			}
		}
		return out
	}
	relErr := func(got, want []float64) float64 {
		var d, s float64
		for i := range want {
			d = math.Max(d, math.Abs(got[i]-want[i]))
			s = math.Max(s, math.Abs(want[i]))
		}
		return d / s
	}
	var lhs, rhs float64
	for k := 0; k < K; k++ {
		h, err := PrefixState(S[:k], lam[:k])
		if err != nil {
			t.Fatal(err)
		}
		g, err := PrefixGrad(U[k+1:], lam[k+1:])
		if err != nil {
			t.Fatal(err)
		}
		if k == 0 {
			if h != nil {
				t.Error("shard 0: PrefixState of no shards is not nil")
			}
		} else if e := relErr(h, closed(S, 0, k, k)); e > 1e-14 {
			t.Errorf("shard %d: h_in differs from the closed form by %.3g", k, e)
		}
		if k == K-1 {
			if g != nil {
				t.Error("last shard: PrefixGrad of no shards is not nil")
			}
		} else if e := relErr(g, closed(U, k+1, K, k)); e > 1e-14 {
			t.Errorf("shard %d: g differs from the closed form by %.3g", k, e)
		}
		for i := range U[k] {
			if h != nil {
				lhs += U[k][i] * h[i]
			}
			if g != nil {
				rhs += g[i] * S[k][i]
			}
		}
	}
	if math.Abs(lhs-rhs) > 1e-13*math.Abs(lhs) {
		t.Errorf("the backward scan is not the transpose of the forward: %v != %v", lhs, rhs)
	}

	if _, err := PrefixState(S[:2], lam[:1]); err == nil {
		t.Error("PrefixState accepted 2 states for 1 log-decay")
	}
	if _, err := PrefixGrad([][]float64{U[0], U[1][:4]}, lam[:2]); err == nil {
		t.Error("PrefixGrad accepted shards of different lengths")
	}
	if _, err := PrefixState([][]float64{S[0][:7]}, lam[:1]); err == nil {
		t.Error("PrefixState accepted a state that is not a multiple of the log-decays")
	}
}

type plainBoundary struct{}

func (plainBoundary) RecvForward(context.Context, int) ([]float64, []float64, error) {
	return nil, nil, nil
}
func (plainBoundary) SendForward(context.Context, int, []float64, []float64) error { return nil }
func (plainBoundary) RecvBackward(context.Context, int) ([]float64, []float64, error) {
	return nil, nil, nil
}
func (plainBoundary) SendBackward(context.Context, int, []float64, []float64) error { return nil }

type modeBoundary struct {
	plainBoundary
	mode SPMode
}

func (b modeBoundary) Mode() SPMode { return b.mode }
func (modeBoundary) PrefixForward(context.Context, int, []float64, []float64) ([]float64, error) {
	return nil, nil
}
func (modeBoundary) PrefixBackward(context.Context, int, []float64, []float64) ([]float64, error) {
	return nil, nil
}

func TestModeOf(t *testing.T) {
	for _, tc := range []struct {
		b    Boundary
		want SPMode
	}{
		{nil, SPSequential},
		{plainBoundary{}, SPSequential},
		{modeBoundary{mode: SPSequential}, SPSequential},
		{modeBoundary{mode: SPPrefix}, SPPrefix},
	} {
		if got := ModeOf(tc.b); got != tc.want {
			t.Errorf("ModeOf(%T %v) = %v, want %v", tc.b, tc.b, got, tc.want)
		}
	}
	if SPPrefix.String() != "parallel-prefix" || SPSequential.String() != "sequential" || SPMode(7).String() != "SPMode(7)" {
		t.Errorf("mode names: %v, %v, %v", SPSequential, SPPrefix, SPMode(7))
	}
}
