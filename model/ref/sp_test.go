package ref

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"testing"

	"github.com/m2train/m2train/model"
)

// spGroup is an in-process sequence-parallel group of K shards, one
// goroutine each, connected in either mode: neighbour channels carry the
// (state, halo) pairs of the Boundary, and an all-gather over per-pair
// channels carries the prefix calls, whose scans use model.PrefixState and
// model.PrefixGrad as a distributed implementation may.
type spGroup struct {
	k    int
	mode model.SPMode
	// fwd[j] links shard j to j+1, bwd[j] shard j+1 to j.
	fwd, bwd []chan [2][]float64
	// inbox[r][s] carries shard s's contributions to shard r's gathers.
	inbox [][]chan gatherMsg
}

type gatherMsg struct {
	call     string // "forward" or "backward"
	layer    int
	vals     []float64
	logDecay []float64
}

func newSPGroup(k int, mode model.SPMode) *spGroup {
	g := &spGroup{k: k, mode: mode}
	for j := 0; j+1 < k; j++ {
		g.fwd = append(g.fwd, make(chan [2][]float64, 1))
		g.bwd = append(g.bwd, make(chan [2][]float64, 1))
	}
	for r := 0; r < k; r++ {
		row := make([]chan gatherMsg, k)
		for s := range row {
			// A shard can be one collective ahead of a peer that has not
			// yet read its message, never two.
			row[s] = make(chan gatherMsg, 2)
		}
		g.inbox = append(g.inbox, row)
	}
	return g
}

// spShard is shard k's view of the group: a model.PrefixBoundary.
type spShard struct {
	g    *spGroup
	k    int
	lams map[int][]float64 // Λ given to PrefixForward, by layer
}

func (g *spGroup) shard(k int) *spShard { return &spShard{g: g, k: k, lams: map[int][]float64{}} }

func (s *spShard) Mode() model.SPMode { return s.g.mode }

func recv[V any](ctx context.Context, c chan V) (V, error) {
	select {
	case v := <-c:
		return v, nil
	case <-ctx.Done():
		var z V
		return z, ctx.Err()
	}
}

func (s *spShard) RecvForward(ctx context.Context, layer int) ([]float64, []float64, error) {
	if s.k == 0 {
		return nil, nil, nil
	}
	v, err := recv(ctx, s.g.fwd[s.k-1])
	return v[0], v[1], err
}

func (s *spShard) SendForward(ctx context.Context, layer int, state, halo []float64) error {
	if s.g.mode == model.SPPrefix && state != nil {
		return fmt.Errorf("shard %d layer %d: SendForward with a state in the %v mode", s.k, layer, s.g.mode)
	}
	if s.k+1 < s.g.k {
		s.g.fwd[s.k] <- [2][]float64{state, halo}
	}
	return nil
}

func (s *spShard) RecvBackward(ctx context.Context, layer int) ([]float64, []float64, error) {
	if s.k+1 == s.g.k {
		return nil, nil, nil
	}
	v, err := recv(ctx, s.g.bwd[s.k])
	return v[0], v[1], err
}

func (s *spShard) SendBackward(ctx context.Context, layer int, dState, dHalo []float64) error {
	if s.g.mode == model.SPPrefix && dState != nil {
		return fmt.Errorf("shard %d layer %d: SendBackward with a state gradient in the %v mode", s.k, layer, s.g.mode)
	}
	if s.k > 0 {
		s.g.bwd[s.k-1] <- [2][]float64{dState, dHalo}
	}
	return nil
}

// gather is the all-gather of one collective call: every shard's message,
// in shard order, checked to belong to the same call.
func (s *spShard) gather(ctx context.Context, m gatherMsg) ([]gatherMsg, error) {
	for r := 0; r < s.g.k; r++ {
		if r != s.k {
			s.g.inbox[r][s.k] <- m
		}
	}
	all := make([]gatherMsg, s.g.k)
	for src := 0; src < s.g.k; src++ {
		if src == s.k {
			all[src] = m
			continue
		}
		v, err := recv(ctx, s.g.inbox[s.k][src])
		if err != nil {
			return nil, err
		}
		if v.call != m.call || v.layer != m.layer {
			return nil, fmt.Errorf("shard %d: %s of layer %d met shard %d's %s of layer %d: the calls are not collective", s.k, m.call, m.layer, src, v.call, v.layer)
		}
		all[src] = v
	}
	return all, nil
}

func split(all []gatherMsg) (vals, lams [][]float64) {
	for _, m := range all {
		vals = append(vals, m.vals)
		lams = append(lams, m.logDecay)
	}
	return vals, lams
}

func (s *spShard) PrefixForward(ctx context.Context, layer int, final, logDecay []float64) ([]float64, error) {
	s.lams[layer] = logDecay
	all, err := s.gather(ctx, gatherMsg{"forward", layer, final, logDecay})
	if err != nil {
		return nil, err
	}
	vals, lams := split(all)
	return model.PrefixState(vals[:s.k], lams[:s.k])
}

func (s *spShard) PrefixBackward(ctx context.Context, layer int, logDecay, dHin []float64) ([]float64, error) {
	if !slices.Equal(logDecay, s.lams[layer]) {
		return nil, fmt.Errorf("shard %d layer %d: PrefixBackward's log-decay differs from PrefixForward's", s.k, layer)
	}
	all, err := s.gather(ctx, gatherMsg{"backward", layer, dHin, logDecay})
	if err != nil {
		return nil, err
	}
	vals, lams := split(all)
	return model.PrefixGrad(vals[s.k+1:], lams[s.k+1:])
}

var _ model.PrefixBoundary = (*spShard)(nil)

// shardBatch returns positions [lo, hi) of every sequence of b.
func shardBatch(b *model.Batch, lo, hi int) *model.Batch {
	s := &model.Batch{Batch: b.Batch, SeqLen: hi - lo}
	for r := 0; r < b.Batch; r++ {
		s.Inputs = append(s.Inputs, b.Inputs[r*b.SeqLen+lo:r*b.SeqLen+hi]...)
		s.Targets = append(s.Targets, b.Targets[r*b.SeqLen+lo:r*b.SeqLen+hi]...)
	}
	return s
}

// spResult is what a split run produced, reassembled in unsplit order.
type spResult[T model.Float] struct {
	loss   float64
	logits []float64
	grads  []T // summed over shards
}

// runSplit runs the batch split at cuts (shard k holds [cuts[k], cuts[k+1]))
// on one fresh model per shard, all in parallel goroutines.
func runSplit[T model.Float](t *testing.T, cfg model.Config, seed uint64, b *model.Batch, cuts []int, mode model.SPMode, recurrent, backward bool) spResult[T] {
	t.Helper()
	K := len(cuts) - 1
	g := newSPGroup(K, mode)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	models := make([]*Model[T], K)
	results := make([]model.StepResult, K)
	errs := make([]error, K)
	for k := range models {
		models[k] = noisyModel[T](t, cfg, seed)
		models[k].Recurrent = recurrent
	}
	count := b.Counted()
	var wg sync.WaitGroup
	for k := 0; k < K; k++ {
		wg.Go(func() {
			o := model.StepOptions{Count: count, KeepLogits: true, Boundary: g.shard(k)}
			sb := shardBatch(b, cuts[k], cuts[k+1])
			if backward {
				results[k], errs[k] = models[k].ForwardBackward(ctx, sb, o)
			} else {
				results[k], errs[k] = models[k].Forward(ctx, sb, o)
			}
			if errs[k] != nil {
				cancel() // release the peers waiting on this shard
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	V := cfg.VocabSize
	r := spResult[T]{logits: make([]float64, b.Batch*b.SeqLen*V)}
	var lossSum float64
	for k, res := range results {
		lossSum += res.LossSum
		l := cuts[k+1] - cuts[k]
		for s := 0; s < b.Batch; s++ {
			copy(r.logits[(s*b.SeqLen+cuts[k])*V:(s*b.SeqLen+cuts[k+1])*V], res.Logits[s*l*V:(s+1)*l*V])
		}
	}
	r.loss = lossSum / float64(count)
	r.grads = make([]T, len(models[0].Grads()))
	for _, m := range models {
		for i, v := range m.Grads() {
			r.grads[i] += v
		}
	}
	return r
}

// tensorRelErr returns the largest, over the layout's tensors, of
// max |got − want| / max |want| within the tensor, and the tensor's name.
func tensorRelErr[A, B model.Float](l *model.Layout, got []A, want []B) (float64, string) {
	var worst float64
	var name string
	for _, tn := range l.Tensors {
		var diff, scale float64
		for i := tn.Offset; i < tn.Offset+tn.Size; i++ {
			diff = math.Max(diff, math.Abs(float64(got[i])-float64(want[i])))
			scale = math.Max(scale, math.Abs(float64(want[i])))
		}
		e := diff
		if scale > 0 {
			e = diff / scale
		}
		if !(e <= worst) { // NaN counts as worst
			worst, name = e, tn.Name
		}
	}
	return worst, name
}

// spCuts are the shard boundaries of a 15-position sequence: shards of
// 3 = d_conv−1 positions (the minimum) to 8, most of them not a multiple of
// the chunk length Q = 4, so that shards end inside chunks.
var spCuts = map[int][]int{
	2: {0, 7, 15},
	3: {0, 3, 8, 15},
	4: {0, 3, 7, 10, 15},
}

// TestSequenceParallelEqualsUnsplit runs K = 2, 3, 4 shards in both modes
// and compares the loss, the logits and every gradient with the unsplit
// pass, per tensor.
func TestSequenceParallelEqualsUnsplit(t *testing.T) {
	const bt, L, seed = 2, 15, 21
	variants := map[string]func(*model.Config){
		"published":    func(*model.Config) {},
		"hdim-dtlimit": func(c *model.Config) { c.DHasHdim = true; c.DTLimit = [2]float64{0.002, 0.5}; c.Bias = true },
	}
	for vname, mod := range variants {
		cfg := tinyConfig()
		mod(&cfg)
		b := randomBatch(cfg, bt, L, 9)
		ctx := context.Background()
		whole := noisyModel[float64](t, cfg, seed)
		rw, err := whole.ForwardBackward(ctx, b, model.StepOptions{KeepLogits: true})
		if err != nil {
			t.Fatal(err)
		}
		whole32 := noisyModel[float32](t, cfg, seed)
		rw32, err := whole32.ForwardBackward(ctx, b, model.StepOptions{KeepLogits: true})
		if err != nil {
			t.Fatal(err)
		}
		for _, K := range []int{2, 3, 4} {
			for _, mode := range []model.SPMode{model.SPSequential, model.SPPrefix} {
				t.Run(fmt.Sprintf("%s/K%d/%v", vname, K, mode), func(t *testing.T) {
					r := runSplit[float64](t, cfg, seed, b, spCuts[K], mode, false, true)
					if e := math.Abs(r.loss-rw.Loss) / math.Abs(rw.Loss); e > 1e-10 {
						t.Errorf("loss %v, unsplit %v: relative error %.3g", r.loss, rw.Loss, e)
					}
					if e := maxRelErr(r.logits, rw.Logits); e > 1e-10 {
						t.Errorf("logits: relative error %.3g", e)
					}
					e, name := tensorRelErr(whole.Layout(), r.grads, whole.Grads())
					if e > 1e-10 {
						t.Errorf("gradient of %s: relative error %.3g", name, e)
					}
					t.Logf("float64: loss %.2g, logits %.2g, worst gradient %.2g (%s)",
						math.Abs(r.loss-rw.Loss)/math.Abs(rw.Loss), maxRelErr(r.logits, rw.Logits), e, name)

					r32 := runSplit[float32](t, cfg, seed, b, spCuts[K], mode, false, true)
					if e := math.Abs(r32.loss-rw32.Loss) / math.Abs(rw32.Loss); e > 1e-5 {
						t.Errorf("float32 loss %v, unsplit %v: relative error %.3g", r32.loss, rw32.Loss, e)
					}
					if e := maxRelErr(r32.logits, rw32.Logits); e > 1e-5 {
						t.Errorf("float32 logits: relative error %.3g", e)
					}
					e32, name32 := tensorRelErr(whole.Layout(), r32.grads, whole32.Grads())
					if e32 > 1e-5 {
						t.Errorf("float32 gradient of %s: relative error %.3g", name32, e32)
					}
					t.Logf("float32: worst gradient %.2g (%s)", e32, name32)
				})
			}
		}
	}
}

// TestPrefixModeVariants covers the recurrent scan, a forward-only pass and
// a conv of width 1 (an empty halo) in the parallel-prefix mode.
func TestPrefixModeVariants(t *testing.T) {
	const bt, L, seed = 2, 15, 22
	ctx := context.Background()
	t.Run("recurrent", func(t *testing.T) {
		cfg := tinyConfig()
		b := randomBatch(cfg, bt, L, 10)
		whole := noisyModel[float64](t, cfg, seed)
		whole.Recurrent = true
		rw, err := whole.ForwardBackward(ctx, b, model.StepOptions{})
		if err != nil {
			t.Fatal(err)
		}
		r := runSplit[float64](t, cfg, seed, b, spCuts[3], model.SPPrefix, true, true)
		if e := math.Abs(r.loss-rw.Loss) / rw.Loss; e > 1e-10 {
			t.Errorf("loss: relative error %.3g", e)
		}
		if e, name := tensorRelErr(whole.Layout(), r.grads, whole.Grads()); e > 1e-10 {
			t.Errorf("gradient of %s: relative error %.3g", name, e)
		}
	})
	t.Run("forward-only", func(t *testing.T) {
		cfg := tinyConfig()
		b := randomBatch(cfg, bt, L, 11)
		whole := noisyModel[float64](t, cfg, seed)
		rw, err := whole.Forward(ctx, b, model.StepOptions{KeepLogits: true})
		if err != nil {
			t.Fatal(err)
		}
		r := runSplit[float64](t, cfg, seed, b, spCuts[4], model.SPPrefix, false, false)
		if e := maxRelErr(r.logits, rw.Logits); e > 1e-10 {
			t.Errorf("logits: relative error %.3g", e)
		}
		for _, v := range r.grads {
			if v != 0 {
				t.Fatal("a forward-only pass wrote gradients")
			}
		}
	})
	t.Run("conv-width-1", func(t *testing.T) {
		cfg := tinyConfig()
		cfg.DConv = 1
		b := randomBatch(cfg, bt, L, 12)
		whole := noisyModel[float64](t, cfg, seed)
		rw, err := whole.ForwardBackward(ctx, b, model.StepOptions{})
		if err != nil {
			t.Fatal(err)
		}
		r := runSplit[float64](t, cfg, seed, b, []int{0, 1, 2, 9, 15}, model.SPPrefix, false, true)
		if e := math.Abs(r.loss-rw.Loss) / rw.Loss; e > 1e-10 {
			t.Errorf("loss: relative error %.3g", e)
		}
		if e, name := tensorRelErr(whole.Layout(), r.grads, whole.Grads()); e > 1e-10 {
			t.Errorf("gradient of %s: relative error %.3g", name, e)
		}
	})
}

// stateLeak is a prefix-mode boundary for a middle shard whose RecvForward
// wrongly delivers a state.
type stateLeak struct{ spShard }

func (s *stateLeak) RecvForward(ctx context.Context, layer int) ([]float64, []float64, error) {
	cfg := tinyConfig()
	st := make([]float64, cfg.NHeads*cfg.HeadDim*cfg.DState)
	st[0] = 1
	return st, make([]float64, (cfg.DConv-1)*cfg.ConvDim()), nil
}

func TestSequenceParallelRejects(t *testing.T) {
	cfg := tinyConfig()
	ctx := context.Background()
	m := noisyModel[float64](t, cfg, 23)
	b := randomBatch(cfg, 1, 8, 13)

	short := shardBatch(b, 0, cfg.DConv-2)
	for _, mode := range []model.SPMode{model.SPSequential, model.SPPrefix} {
		_, err := m.ForwardBackward(ctx, short, model.StepOptions{Boundary: newSPGroup(1, mode).shard(0)})
		if !errors.Is(err, ErrShardTooShort) {
			t.Errorf("%v: a shard of %d < d_conv−1 positions: got %v, want ErrShardTooShort", mode, short.SeqLen, err)
		}
	}

	leak := &stateLeak{*newSPGroup(1, model.SPPrefix).shard(0)}
	if _, err := m.Forward(ctx, b, model.StepOptions{Boundary: leak}); err == nil {
		t.Error("the prefix mode accepted a nonzero state from RecvForward")
	}
}
