package mqar

import (
	"context"
	"errors"
	"hash/fnv"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/worker/data"
)

func mustNew(t testing.TB, c Config) *Generator {
	t.Helper()
	g, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func sample(t testing.TB, g *Generator, s Stream, i uint64) (in, tg []int32) {
	t.Helper()
	L := g.Config().SeqLen
	in, tg = make([]int32, L), make([]int32, L)
	if err := g.Sample(s, i, in, tg); err != nil {
		t.Fatal(err)
	}
	return in, tg
}

// checkFormat verifies every rule of a sample's layout (docs/mqar.md).
func checkFormat(t *testing.T, c Config, in, tg []int32) {
	t.Helper()
	K, Q, V, half := c.NumPairs, c.NumQueries, int32(c.VocabSize), int32(c.VocabSize/2)
	keys, values := map[int32]int{}, map[int32]bool{}
	for j := range K {
		k, v := in[2*j], in[2*j+1]
		if k < 1 || k >= half {
			t.Fatalf("pair %d: key %d outside [1, %d)", j, k, half)
		}
		if v < half || v >= V {
			t.Fatalf("pair %d: value %d outside [%d, %d)", j, v, half, V)
		}
		if _, dup := keys[k]; dup || values[v] {
			t.Fatalf("pair %d: key %d or value %d repeats in the key-value section", j, k, v)
		}
		keys[k], values[v] = j, true
		if tg[2*j] != -1 || tg[2*j+1] != -1 {
			t.Fatalf("pair %d carries targets %d %d in the key-value section", j, tg[2*j], tg[2*j+1])
		}
	}
	asked := map[int]bool{}
	for p := 2 * K; p < c.SeqLen; p++ {
		if in[p] < 0 || in[p] >= V {
			t.Fatalf("position %d: token %d outside [0, %d)", p, in[p], V)
		}
		if tg[p] < 0 {
			if tg[p] != -1 {
				t.Fatalf("position %d: target %d, want -1 or a value", p, tg[p])
			}
			continue
		}
		if (p-2*K)%2 != 0 {
			t.Fatalf("answer at position %d, not on a query slot 2K+2g", p)
		}
		j, ok := keys[in[p]]
		if !ok {
			t.Fatalf("answer at position %d follows token %d, which is not a key of the sequence", p, in[p])
		}
		if tg[p] != in[2*j+1] {
			t.Fatalf("query of key %d at %d: target %d, want its value %d", in[p], p, tg[p], in[2*j+1])
		}
		if j >= Q || asked[j] {
			t.Fatalf("query at %d asks for pair %d: want each of pairs 0..%d once", p, j, Q-1)
		}
		asked[j] = true
	}
	if len(asked) != Q {
		t.Fatalf("%d answers, want %d", len(asked), Q)
	}
}

var formatConfigs = []Config{
	{VocabSize: 16, NumPairs: 2, NumQueries: 2, SeqLen: 8, Seed: 1, QueryPower: 0.01},
	{VocabSize: 64, NumPairs: 8, NumQueries: 3, SeqLen: 41, Seed: 2, QueryPower: 1},
	{VocabSize: 8192, NumPairs: 64, NumQueries: 64, SeqLen: 256, Seed: 3, QueryPower: 0.01},
	{VocabSize: 21, NumPairs: 9, NumQueries: 9, SeqLen: 40, Seed: 4, QueryPower: 0.5}, // every key of [1, 10) but one
}

func TestSampleFormat(t *testing.T) {
	for _, c := range formatConfigs {
		g := mustNew(t, c)
		for _, s := range []Stream{Train, Eval} {
			for i := range uint64(200) {
				in, tg := sample(t, g, s, i)
				checkFormat(t, c, in, tg)
			}
		}
	}
}

// TestSampleGolden pins the bytes of the documented construction: an
// accidental change of the generator fails here, an intended one must
// change docs/mqar.md and these values.
func TestSampleGolden(t *testing.T) {
	g := mustNew(t, Config{VocabSize: 16, NumPairs: 2, NumQueries: 2, SeqLen: 12, Seed: 42, QueryPower: 0.01})
	in, tg := sample(t, g, Train, 0)
	// Keys 1, 3 and values 10, 15; slots at positions 4, 6, 8, 10; key 1
	// asked at slot 0, key 3 at slot 3; filler elsewhere.
	wantIn := []int32{1, 10, 3, 15, 1, 14, 8, 12, 11, 4, 3, 8}
	wantTg := []int32{-1, -1, -1, -1, 10, -1, -1, -1, -1, -1, 15, -1}
	if !slices.Equal(in, wantIn) || !slices.Equal(tg, wantTg) {
		t.Errorf("sample 0:\ninputs  %v\ntargets %v\nwant\ninputs  %v\ntargets %v", in, tg, wantIn, wantTg)
	}
	h := fnv.New64a()
	big := mustNew(t, Config{VocabSize: 8192, NumPairs: 64, NumQueries: 48, SeqLen: 512, Seed: 7, QueryPower: 0.01})
	for _, s := range []Stream{Train, Eval} {
		for i := range uint64(50) {
			in, tg := sample(t, big, s, i)
			for k := range in {
				h.Write([]byte{byte(in[k]), byte(in[k] >> 8), byte(tg[k]), byte(tg[k] >> 8)})
			}
		}
	}
	if got, want := h.Sum64(), uint64(0x9db0874f45bee391); got != want {
		t.Errorf("FNV-64a of 100 samples = %#x, want %#x", got, want)
	}
}

func TestSampleDeterministicAndIndependent(t *testing.T) {
	c := formatConfigs[2]
	g1, g2 := mustNew(t, c), mustNew(t, c)
	in7, tg7 := sample(t, g1, Train, 7)
	// The same sample from another generator, after other samples, in a batch.
	sample(t, g2, Eval, 3)
	b, err := g2.Batch(Train, []uint64{9, 7})
	if err != nil {
		t.Fatal(err)
	}
	L := c.SeqLen
	if !slices.Equal(b.Inputs[L:], in7) || !slices.Equal(b.Targets[L:], tg7) || b.Samples[1] != 7 || b.Positions[1] != 7 {
		t.Errorf("sample 7 differs between Sample and Batch, or between generators")
	}
	differs := func(name string, a, b []int32) {
		if slices.Equal(a, b) {
			t.Errorf("%s: identical samples", name)
		}
	}
	inEval, _ := sample(t, g1, Eval, 7)
	differs("train vs eval stream", in7, inEval)
	in8, _ := sample(t, g1, Train, 8)
	differs("sample 7 vs 8", in7, in8)
	c.Seed++
	inSeed, _ := sample(t, mustNew(t, c), Train, 7)
	differs("seed 3 vs 4", in7, inSeed)
}

// TestQueryPlacement checks the direction of the power law: with Zoology's
// a = 0.01 most queries come in the first slots after the key-value
// section; with a = 1 they spread uniformly. The thresholds sit far from
// both expectations (about 0.5 and 0.083).
func TestQueryPlacement(t *testing.T) {
	frac := func(power float64) float64 {
		c := Config{VocabSize: 1024, NumPairs: 8, NumQueries: 8, SeqLen: 256, Seed: 5, QueryPower: power}
		g := mustNew(t, c)
		early, all := 0, 0
		for i := range uint64(200) {
			_, tg := sample(t, g, Train, i)
			for p, v := range tg {
				if v >= 0 {
					all++
					if (p-c.KVLen())/2 < 10 {
						early++
					}
				}
			}
		}
		return float64(early) / float64(all)
	}
	f01, f1 := frac(0.01), frac(1)
	t.Logf("queries in the first 10 slots: %.3f at a = 0.01, %.3f at a = 1", f01, f1)
	if f := f01; f < 0.3 {
		t.Errorf("a = 0.01: %.3f of queries in the first 10 of 120 slots, want > 0.3", f)
	}
	if f := f1; f > 0.15 {
		t.Errorf("a = 1: %.3f of queries in the first 10 of 120 slots, want < 0.15", f)
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{VocabSize: 64, NumPairs: 8, NumQueries: 8, SeqLen: 32, QueryPower: 0.01}
	for _, tc := range []struct {
		edit func(*Config)
		msg  string
	}{
		{func(c *Config) { c.VocabSize = 2 }, "VocabSize 2"},
		{func(c *Config) { c.NumPairs = 32 }, "NumPairs 32 must be in [1, VocabSize/2 - 1 = 31]"},
		{func(c *Config) { c.NumQueries = 9 }, "NumQueries 9 must be in [1, NumPairs = 8]"},
		{func(c *Config) { c.SeqLen = 31 }, "SeqLen 31 must be in [2·NumPairs + 2·NumQueries = 32"},
		{func(c *Config) { c.QueryPower = math.NaN() }, "QueryPower NaN"},
	} {
		c := ok
		tc.edit(&c)
		_, err := New(c)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("New(%+v) = %v, want ErrInvalid mentioning %q", c, err, tc.msg)
		}
	}
	if _, err := New(ok); err != nil {
		t.Errorf("New(%+v) = %v", ok, err)
	}
	g := mustNew(t, ok)
	if err := g.Sample(Train, 0, make([]int32, 31), make([]int32, 32)); !errors.Is(err, ErrInvalid) {
		t.Errorf("Sample with a short buffer = %v, want ErrInvalid", err)
	}
	if err := g.Sample(Stream(2), 0, make([]int32, 32), make([]int32, 32)); !errors.Is(err, ErrInvalid) {
		t.Errorf("Sample of stream 2 = %v, want ErrInvalid", err)
	}
}

func TestConfigFromSpec(t *testing.T) {
	doc := `name: a
model: {config: {d_model: 16, n_layer: 1, vocab_size: 64, headdim: 8}}
data: {mqar: {vocab_size: 64, num_pairs: 4}, seq_len: 32}
schedule: {total_steps: 1}
seed: 9
`
	s, err := jobspec.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := ConfigFromSpec(s)
	want := Config{VocabSize: 64, NumPairs: 4, NumQueries: 4, SeqLen: 32, Seed: 9, QueryPower: jobspec.DefaultMQARQueryPower}
	if err != nil || c != want {
		t.Errorf("ConfigFromSpec = %+v, %v; want %+v", c, err, want)
	}
	s.Data.MQAR = nil
	if _, err := ConfigFromSpec(s); !errors.Is(err, ErrInvalid) {
		t.Errorf("ConfigFromSpec without mqar = %v, want ErrInvalid", err)
	}
}

// TestLoaderRanks: the dp ranks of a step read disjoint samples that
// together are the step's global positions, each row being the stream's
// sample at its position; a single-rank loader reads the same samples.
func TestLoaderRanks(t *testing.T) {
	c := Config{VocabSize: 64, NumPairs: 4, NumQueries: 3, SeqLen: 24, Seed: 11, QueryPower: 0.01}
	g := mustNew(t, c)
	ctx := context.Background()
	const gb, mb = 8, 2
	one, err := NewLoader(g, data.LoaderConfig{SeqLen: c.SeqLen, MicroBatch: mb, GlobalBatch: gb, DPRank: 0, DPSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	one.Seek(16)
	rowsOf := func(bs []data.Batch) map[uint64][]int32 {
		m := map[uint64][]int32{}
		for _, b := range bs {
			if b.Rows() != mb || b.SeqLen != c.SeqLen {
				t.Fatalf("micro-batch of %d rows × %d, want %d × %d", b.Rows(), b.SeqLen, mb, c.SeqLen)
			}
			mbatch := counted(b)
			if mbatch != mb*c.NumQueries {
				t.Fatalf("micro-batch counts %d targets, want rows·NumQueries = %d", mbatch, mb*c.NumQueries)
			}
			for r, p := range b.Positions {
				m[p] = append(slices.Clone(b.Inputs[r*c.SeqLen:(r+1)*c.SeqLen]), b.Targets[r*c.SeqLen:(r+1)*c.SeqLen]...)
			}
		}
		return m
	}
	bs, err := one.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := rowsOf(bs)
	if one.Cursor() != 16+gb {
		t.Errorf("cursor after a step = %d, want %d", one.Cursor(), 16+gb)
	}
	got := map[uint64][]int32{}
	for r := range 2 {
		l, err := NewLoader(g, data.LoaderConfig{SeqLen: c.SeqLen, MicroBatch: mb, GlobalBatch: gb, DPRank: r, DPSize: 2})
		if err != nil {
			t.Fatal(err)
		}
		bs, err := l.BatchesAt(ctx, 16)
		if err != nil {
			t.Fatal(err)
		}
		for p, row := range rowsOf(bs) {
			if _, dup := got[p]; dup {
				t.Fatalf("position %d read by two ranks", p)
			}
			got[p] = row
		}
	}
	if len(got) != gb {
		t.Fatalf("ranks read %d positions, want %d", len(got), gb)
	}
	for p := uint64(16); p < 16+gb; p++ {
		in, tg := sample(t, g, Train, p)
		if !slices.Equal(got[p], append(in, tg...)) || !slices.Equal(want[p], got[p]) {
			t.Errorf("position %d: rank rows, single-rank rows and Sample(%d) disagree", p, p)
		}
	}
	if _, err := NewLoader(g, data.LoaderConfig{SeqLen: 23, MicroBatch: 1, GlobalBatch: 1, DPSize: 1}); !errors.Is(err, ErrInvalid) {
		t.Errorf("NewLoader with another SeqLen = %v, want ErrInvalid", err)
	}
}

// counted counts the targets a model.Batch of b counts in its loss.
func counted(b data.Batch) int {
	n := 0
	for _, v := range b.Targets {
		if v >= 0 {
			n++
		}
	}
	return n
}

func TestScore(t *testing.T) {
	const V = 8
	targets := []int32{-1, 5, -1, 6, 7, -1}
	onehot := func(pick func(t int, want int32) int) []float64 {
		l := make([]float64, len(targets)*V)
		for t, w := range targets {
			l[t*V+pick(t, w)] = 1
		}
		return l
	}
	perfect := onehot(func(t int, w int32) int {
		if w < 0 {
			return 0
		}
		return int(w)
	})
	if a, err := Score(perfect, V, targets); err != nil || a != (Accuracy{3, 3}) || a.Value() != 1 {
		t.Errorf("perfect logits: %+v %v, want 3/3", a, err)
	}
	wrong := onehot(func(t int, w int32) int { return int(w+1) % V })
	if a, _ := Score(wrong, V, targets); a != (Accuracy{0, 3}) || a.Value() != 0 {
		t.Errorf("wrong logits: %+v, want 0/3", a)
	}
	// One right answer of three; a tie goes to the first index, so a row
	// of equal logits answers token 0.
	mixed := make([]float64, len(targets)*V)
	mixed[3*V+6] = 2
	mixed[4*V+7] = math.NaN()
	if a, _ := Score(mixed, V, targets); a != (Accuracy{1, 3}) {
		t.Errorf("mixed logits: %+v, want 1/3", a)
	}
	if _, err := Score(perfect[:len(perfect)-1], V, targets); !errors.Is(err, ErrInvalid) {
		t.Errorf("short logits: %v, want ErrInvalid", err)
	}
	for _, tc := range []struct {
		row  []float64
		want int
	}{
		{[]float64{1, 3, 3}, 1},
		{[]float64{math.NaN(), -1, math.NaN()}, 1},
		{[]float64{math.NaN()}, -1},
		{[]float64{math.Inf(-1), math.Inf(-1)}, 0},
		{nil, -1},
	} {
		if got := Argmax(tc.row); got != tc.want {
			t.Errorf("Argmax(%v) = %d, want %d", tc.row, got, tc.want)
		}
	}
	var acc Accuracy
	if acc.Value() != 0 {
		t.Errorf("empty accuracy = %v, want 0", acc.Value())
	}
	acc.Add(Accuracy{1, 2})
	acc.Add(Accuracy{2, 2})
	if acc != (Accuracy{3, 4}) {
		t.Errorf("Add: %+v", acc)
	}
}

// FuzzSample: every configuration New accepts yields well-formed samples.
func FuzzSample(f *testing.F) {
	f.Add(uint32(16), uint16(2), uint16(2), uint32(8), uint64(1), uint64(0), 0.01)
	f.Add(uint32(21), uint16(9), uint16(9), uint32(36), uint64(2), uint64(5), 1.0)
	f.Add(uint32(8192), uint16(64), uint16(10), uint32(300), uint64(3), uint64(1<<40), 0.5)
	f.Fuzz(func(t *testing.T, vocab uint32, pairs, queries uint16, seqLen uint32, seed, index uint64, power float64) {
		c := Config{VocabSize: int(vocab % (1 << 20)), NumPairs: int(pairs), NumQueries: int(queries), SeqLen: int(seqLen % 4096), Seed: seed, QueryPower: power}
		g, err := New(c)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("New(%+v) = %v, not ErrInvalid", c, err)
			}
			return
		}
		for _, s := range []Stream{Train, Eval} {
			in, tg := sample(t, g, s, index)
			checkFormat(t, c, in, tg)
		}
	})
}
