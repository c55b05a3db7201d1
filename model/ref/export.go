package ref

import (
	"fmt"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/linalg"
)

// This file exports the CPU reference operations that the model's forward
// and backward passes are built from, so that another backend (the CUDA
// kernels) can be compared with them op by op on the same inputs. Each
// function is a thin wrapper: it checks slice lengths, panicking with a
// message that names the argument, and runs the very code the Model runs.
// Rows are tokens; n is the number of rows (batch·length).

func need[T any](op, name string, s []T, n int) {
	if len(s) < n {
		panic(fmt.Sprintf("ref: %s: %s has %d elements, need %d", op, name, len(s), n))
	}
}

// RMSNormForward is the reference RMSNorm: per row of width d,
// rstd = (mean x² + eps)^-½ and out = x·rstd·w. x and out are n×d, rstd has n
// entries, w has d.
func RMSNormForward[T model.Float](out, rstd, x, w []T, n, d int, eps float64) {
	const op = "RMSNormForward"
	need(op, "out", out, n*d)
	need(op, "rstd", rstd, n)
	need(op, "x", x, n*d)
	need(op, "w", w, d)
	rmsNormFwd(out, rstd, x, w, n, d, eps)
}

// RMSNormBackward is the reference RMSNorm backward: it adds the gradient
// with respect to x into dx and the weight gradient into dw, given dout and
// the forward's x and rstd.
func RMSNormBackward[T model.Float](dx, dw, dout, x, rstd, w []T, n, d int) {
	const op = "RMSNormBackward"
	need(op, "dx", dx, n*d)
	need(op, "dw", dw, d)
	need(op, "dout", dout, n*d)
	need(op, "x", x, n*d)
	need(op, "rstd", rstd, n)
	need(op, "w", w, d)
	rmsNormBwd(dx, dw, dout, x, rstd, w, n, d)
}

// ConvShape is the shape of the reference causal depthwise conv: Batch
// sequences of L positions with Channels channels and kernel width Width,
// the input read from a strided matrix (row stride LD, first channel at
// column Off).
type ConvShape struct {
	Batch, L, Channels, Width, LD, Off int
}

func (s ConvShape) internal() convShape {
	return convShape{bt: s.Batch, l: s.L, cd: s.Channels, w: s.Width, ld: s.LD, off: s.Off}
}

// ConvForward is the reference causal depthwise conv1d + SiLU:
// pre = bias + Σ_k w[c,k]·src[t+k−(W−1)] and act = silu(pre), both
// (Batch·L)×Channels. halo is Batch×(W−1)×Channels or nil (zeros); bias may
// be nil. w is Channels×W with the last tap on the current position.
func ConvForward[T model.Float](s ConvShape, pre, act, src, halo, w, bias []T) {
	const op = "ConvForward"
	n := s.Batch * s.L
	need(op, "pre", pre, n*s.Channels)
	need(op, "act", act, n*s.Channels)
	need(op, "src", src, (n-1)*s.LD+s.Off+s.Channels)
	if halo != nil {
		need(op, "halo", halo, s.Batch*(s.Width-1)*s.Channels)
	}
	need(op, "w", w, s.Channels*s.Width)
	if bias != nil {
		need(op, "bias", bias, s.Channels)
	}
	convFwd(s.internal(), pre, act, src, halo, w, bias)
}

// ConvBackward is the reference conv backward: given dact (the gradient of
// act) and the forward's pre, src and halo, it writes the input gradient
// into dst (strided like src), adds the weight and bias gradients into dw
// and dbias (dbias may be nil), and writes the halo gradient into dhalo when
// it is non-nil. The halo gradient is complete only for L >= Width−1, the
// shortest shard the Model accepts with a halo.
func ConvBackward[T model.Float](s ConvShape, dst, dw, dbias, dhalo, dact, pre, src, halo, w []T) {
	const op = "ConvBackward"
	n := s.Batch * s.L
	need(op, "dst", dst, (n-1)*s.LD+s.Off+s.Channels)
	need(op, "dw", dw, s.Channels*s.Width)
	if dbias != nil {
		need(op, "dbias", dbias, s.Channels)
	}
	if dhalo != nil {
		need(op, "dhalo", dhalo, s.Batch*(s.Width-1)*s.Channels)
	}
	need(op, "dact", dact, n*s.Channels)
	need(op, "pre", pre, n*s.Channels)
	need(op, "src", src, (n-1)*s.LD+s.Off+s.Channels)
	if halo != nil {
		need(op, "halo", halo, s.Batch*(s.Width-1)*s.Channels)
	}
	need(op, "w", w, s.Channels*s.Width)
	convBwd(s.internal(), dst, dw, dbias, dhalo, dact, pre, src, halo, w)
}

// GatedNormShape describes the reference gated RMSNorm: N rows of width E
// in Groups norm groups, z read with row stride LDZ. BeforeGate normalises
// y before multiplying by silu(z); with Enabled false the op is y·silu(z).
type GatedNormShape struct {
	N, E, Groups, LDZ int
	Eps               float64
	BeforeGate        bool
	Enabled           bool
}

func (g GatedNormShape) internal() gatedNorm {
	return gatedNorm{n: g.N, e: g.E, groups: g.Groups, ldz: g.LDZ, eps: g.Eps, beforeGate: g.BeforeGate, enabled: g.Enabled}
}

// GatedNormForward is the reference gated RMSNorm: it writes out (N×E) and,
// when enabled, the per-(row, group) rstd (N×Groups).
func GatedNormForward[T model.Float](g GatedNormShape, out, rstd, y, z, w []T) {
	const op = "GatedNormForward"
	if g.Groups < 1 || g.E%g.Groups != 0 {
		panic(fmt.Sprintf("ref: %s: Groups = %d must be positive and divide E = %d", op, g.Groups, g.E))
	}
	need(op, "out", out, g.N*g.E)
	need(op, "y", y, g.N*g.E)
	need(op, "z", z, (g.N-1)*g.LDZ+g.E)
	if g.Enabled {
		need(op, "rstd", rstd, g.N*g.Groups)
		need(op, "w", w, g.E)
	}
	gatedNormFwd(g.internal(), out, rstd, y, z, w)
}

// GatedNormBackward is the reference gated RMSNorm backward: it writes dy
// (N×E) and dz (strided like z) and, when enabled, adds the weight gradient
// into dw.
func GatedNormBackward[T model.Float](g GatedNormShape, dy, dz, dw, dout, rstd, y, z, w []T) {
	const op = "GatedNormBackward"
	if g.Groups < 1 || g.E%g.Groups != 0 {
		panic(fmt.Sprintf("ref: %s: Groups = %d must be positive and divide E = %d", op, g.Groups, g.E))
	}
	need(op, "dy", dy, g.N*g.E)
	need(op, "dz", dz, (g.N-1)*g.LDZ+g.E)
	need(op, "dout", dout, g.N*g.E)
	need(op, "y", y, g.N*g.E)
	need(op, "z", z, (g.N-1)*g.LDZ+g.E)
	if g.Enabled {
		need(op, "dw", dw, g.E)
		need(op, "rstd", rstd, g.N*g.Groups)
		need(op, "w", w, g.E)
	}
	gatedNormBwd(g.internal(), dy, dz, dw, dout, rstd, y, z, w)
}

// EmbeddingForward is the reference embedding lookup of the Model's
// forward pass: row t of out (len(tokens)×d) is row tokens[t] of emb.
func EmbeddingForward[T model.Float](out, emb []T, tokens []int32, d int) {
	const op = "EmbeddingForward"
	need(op, "out", out, len(tokens)*d)
	for t, id := range tokens {
		if id < 0 || int(id+1)*d > len(emb) {
			panic(fmt.Sprintf("ref: %s: tokens[%d] = %d is outside the %d rows of emb", op, t, id, len(emb)/d))
		}
		copy(out[t*d:(t+1)*d], emb[int(id)*d:(int(id)+1)*d])
	}
}

// EmbeddingBackward is the reference scatter-add of the Model's backward
// pass: row t of dout is added into row tokens[t] of demb, in position order.
func EmbeddingBackward[T model.Float](demb, dout []T, tokens []int32, d int) {
	const op = "EmbeddingBackward"
	need(op, "dout", dout, len(tokens)*d)
	for t, id := range tokens {
		if id < 0 || int(id+1)*d > len(demb) {
			panic(fmt.Sprintf("ref: %s: tokens[%d] = %d is outside the %d rows of demb", op, t, id, len(demb)/d))
		}
		linalg.Axpy(1, dout[t*d:(t+1)*d], demb[int(id)*d:(int(id)+1)*d])
	}
}

// LMHeadLoss is the reference fused LM head and cross-entropy of the
// Model: the logits hf·wᵀ of the n rows of hf (n×d) against the head matrix w
// (vocab×d), computed per block of 128 rows, and the summed cross-entropy of
// the rows whose target is not negative. When dhf is non-nil it also writes
// the gradient of LossSum/count with respect to hf into dhf and adds the
// gradient with respect to w into dw.
func LMHeadLoss[T model.Float](hf, w []T, targets []int32, n, d, vocab, count int, dhf, dw []T) float64 {
	const op = "LMHeadLoss"
	need(op, "hf", hf, n*d)
	need(op, "w", w, vocab*d)
	need(op, "targets", targets, n)
	if dhf != nil {
		need(op, "dhf", dhf, n*d)
		need(op, "dw", dw, vocab*d)
	}
	for i, tg := range targets[:n] {
		if int(tg) >= vocab {
			panic(fmt.Sprintf("ref: %s: targets[%d] = %d is not below vocab = %d", op, i, tg, vocab))
		}
	}
	head := &model.Tensor{Name: model.NameLMHead, Shape: []int{vocab, d}, Size: vocab * d}
	m := &Model[T]{cfg: model.Config{DModel: d, VocabSize: vocab}, head: head, params: w[:vocab*d]}
	if dhf != nil {
		m.grads = dw[:vocab*d]
	}
	b := &model.Batch{Batch: 1, SeqLen: n, Targets: targets[:n]}
	return m.lmHeadLoss(b, hf, count, dhf, nil)
}
