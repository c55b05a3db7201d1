package ref

import (
	"math"
	"math/rand/v2"
	"testing"
)

// LMHeadLoss against the textbook softmax cross-entropy, with the gradients
// checked by finite differences.
func TestLMHeadLossExport(t *testing.T) {
	const n, d, vocab = 130, 3, 7 // more rows than one 128-row block
	rng := rand.New(rand.NewPCG(11, 12))
	hf, w := randSlice(rng, n*d, 1), randSlice(rng, vocab*d, 1)
	targets := make([]int32, n)
	count := 0
	for i := range targets {
		targets[i] = int32(rng.IntN(vocab))
		if i%4 == 0 {
			targets[i] = -1
		} else {
			count++
		}
	}
	var want float64
	for r := 0; r < n; r++ {
		if targets[r] < 0 {
			continue
		}
		logits := make([]float64, vocab)
		mx := math.Inf(-1)
		for j := range logits {
			logits[j] = dot(hf[r*d:(r+1)*d], w[j*d:(j+1)*d])
			mx = math.Max(mx, logits[j])
		}
		var s float64
		for _, v := range logits {
			s += math.Exp(v - mx)
		}
		want += mx + math.Log(s) - logits[targets[r]]
	}
	dhf, dw := make([]float64, n*d), make([]float64, vocab*d)
	got := LMHeadLoss(hf, w, targets, n, d, vocab, count, dhf, dw)
	if math.Abs(got-want) > 1e-12*math.Abs(want) {
		t.Fatalf("LMHeadLoss = %.15g, want %.15g", got, want)
	}
	if fwd := LMHeadLoss(hf, w, targets, n, d, vocab, count, nil, nil); fwd != got {
		t.Fatalf("forward-only LMHeadLoss = %v, with gradients %v", fwd, got)
	}
	mean := func() float64 { return LMHeadLoss(hf, w, targets, n, d, vocab, count, nil, nil) / float64(count) }
	checkFD(t, "dhf", hf, dhf, mean, 1e-6)
	checkFD(t, "dw", w, dw, mean, 1e-6)
}

func TestEmbeddingExport(t *testing.T) {
	const vocab, d = 5, 3
	rng := rand.New(rand.NewPCG(13, 14))
	emb := randSlice(rng, vocab*d, 1)
	tokens := []int32{4, 0, 4, 2}
	out := make([]float64, len(tokens)*d)
	EmbeddingForward(out, emb, tokens, d)
	for i, id := range tokens {
		for c := 0; c < d; c++ {
			if out[i*d+c] != emb[int(id)*d+c] {
				t.Fatalf("out[%d][%d] = %v, want emb[%d][%d] = %v", i, c, out[i*d+c], id, c, emb[int(id)*d+c])
			}
		}
	}
	dout := randSlice(rng, len(tokens)*d, 1)
	demb := make([]float64, vocab*d)
	EmbeddingBackward(demb, dout, tokens, d)
	for c := 0; c < d; c++ {
		if got, want := demb[4*d+c], dout[c]+dout[2*d+c]; got != want {
			t.Fatalf("demb[4][%d] = %v, want %v", c, got, want)
		}
		if demb[1*d+c] != 0 {
			t.Fatalf("demb[1][%d] = %v for a token never seen", c, demb[1*d+c])
		}
	}
}
