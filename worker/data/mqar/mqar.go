package mqar

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/worker/data"
)

// ErrInvalid marks a configuration or argument that breaks a rule; the
// wrapping message names the field and the rule.
var ErrInvalid = errors.New("mqar: invalid argument")

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...)
}

// Limits of a Config, matching the job spec's.
const (
	// MaxVocab is the largest vocabulary of the task.
	MaxVocab = 1 << 24
	// MaxSeqLen is the longest sequence.
	MaxSeqLen = 1 << 22
)

// Config is one MQAR task. Its fields have the meaning of the job spec's
// data.mqar and data.seq_len (docs/jobspec.md).
type Config struct {
	// VocabSize is V: keys are tokens of [1, V/2), values of [V/2, V) and
	// filler tokens of [0, V).
	VocabSize int
	// NumPairs is K, the key-value pairs at the start of every sequence.
	NumPairs int
	// NumQueries is Q ≤ K, the keys asked for in every sequence.
	NumQueries int
	// SeqLen is L ≥ 2K + 2Q, the tokens of a sequence.
	SeqLen int
	// Seed selects the sequences.
	Seed uint64
	// QueryPower is a in (0, 1]: query slot g is drawn with weight
	// (g+1)^(a-1).
	QueryPower float64
}

// Validate checks the configuration; its error names the field and the rule.
func (c Config) Validate() error {
	switch {
	case c.VocabSize < 4 || c.VocabSize > MaxVocab:
		return invalidf("VocabSize %d must be in [4, %d]", c.VocabSize, MaxVocab)
	case c.NumPairs < 1 || c.NumPairs > c.VocabSize/2-1:
		return invalidf("NumPairs %d must be in [1, VocabSize/2 - 1 = %d]: the keys of a sequence are distinct tokens of [1, %d)", c.NumPairs, c.VocabSize/2-1, c.VocabSize/2)
	case c.NumQueries < 1 || c.NumQueries > c.NumPairs:
		return invalidf("NumQueries %d must be in [1, NumPairs = %d]", c.NumQueries, c.NumPairs)
	case c.SeqLen > MaxSeqLen || c.SeqLen < 2*c.NumPairs+2*c.NumQueries:
		return invalidf("SeqLen %d must be in [2·NumPairs + 2·NumQueries = %d, %d]", c.SeqLen, 2*c.NumPairs+2*c.NumQueries, MaxSeqLen)
	case !(c.QueryPower > 0 && c.QueryPower <= 1):
		return invalidf("QueryPower %g must be in (0, 1]", c.QueryPower)
	}
	return nil
}

// ConfigFromSpec returns the task of a normalized job spec whose data is
// data.mqar.
func ConfigFromSpec(s *jobspec.Spec) (Config, error) {
	q := s.Data.MQAR
	if q == nil {
		return Config{}, invalidf("the spec's data has no mqar section")
	}
	seed := s.Seed
	if q.Seed != nil {
		seed = *q.Seed
	}
	c := Config{VocabSize: q.VocabSize, NumPairs: q.NumPairs, NumQueries: q.NumQueries, SeqLen: s.Data.SeqLen, Seed: seed, QueryPower: q.QueryPower}
	if c.NumQueries == 0 {
		c.NumQueries = c.NumPairs
	}
	if c.QueryPower == 0 {
		c.QueryPower = jobspec.DefaultMQARQueryPower
	}
	return c, c.Validate()
}

// KVLen is 2K, the positions of the key-value section.
func (c Config) KVLen() int { return 2 * c.NumPairs }

// Slots is the number of places a query can take: (L - 2K)/2. Slot g is
// position 2K + 2g; the position after it holds a filler token.
func (c Config) Slots() int { return (c.SeqLen - c.KVLen()) / 2 }

// ValueChance is the accuracy of guessing a uniformly random value token,
// 1/(V - V/2).
func (c Config) ValueChance() float64 { return 1 / float64(c.VocabSize-c.VocabSize/2) }

// Stream selects one of the independent sequences of samples of a seed.
type Stream uint8

// The streams: training reads Train; held-out evaluation reads Eval.
const (
	Train Stream = iota
	Eval
)

// streamSalt separates the streams of one seed (ASCII "mqar/trn", "mqar/evl").
var streamSalt = [...]uint64{Train: 0x6d7161722f74726e, Eval: 0x6d7161722f65766c}

func (s Stream) String() string {
	switch s {
	case Train:
		return "train"
	case Eval:
		return "eval"
	}
	return fmt.Sprintf("Stream(%d)", uint8(s))
}

// ParseStream parses "train" or "eval".
func ParseStream(name string) (Stream, error) {
	switch name {
	case "train":
		return Train, nil
	case "eval":
		return Eval, nil
	}
	return 0, invalidf("stream %q must be train or eval", name)
}

// SampleState is the SplitMix64 state that generates sample i of stream s:
// data.EpochSeed(seed XOR salt(s), i).
func SampleState(seed uint64, s Stream, i uint64) uint64 {
	return data.EpochSeed(seed^streamSalt[s], i)
}

// Generator makes the samples of one task. It is safe for concurrent use.
type Generator struct {
	cfg Config
	// invWeight[g] is 1/w(g) = (g+1)^(1-a), the divisor of slot g's
	// log-uniform key.
	invWeight []float64
}

// New returns the generator of cfg.
func New(cfg Config) (*Generator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	g := &Generator{cfg: cfg, invWeight: make([]float64, cfg.Slots())}
	for i := range g.invWeight {
		g.invWeight[i] = math.Pow(float64(i+1), 1-cfg.QueryPower)
	}
	return g, nil
}

// Config returns the task.
func (g *Generator) Config() Config { return g.cfg }

// Vocab returns V, the vocabulary the model must embed.
func (g *Generator) Vocab() int { return g.cfg.VocabSize }

// Sample writes sample i of stream s into inputs and targets, each of
// length SeqLen. Targets are -1 except at the NumQueries query positions,
// whose target is the value paired with the key there.
func (g *Generator) Sample(s Stream, i uint64, inputs, targets []int32) error {
	c := g.cfg
	if int(s) >= len(streamSalt) {
		return invalidf("stream %d is neither Train nor Eval", s)
	}
	if len(inputs) != c.SeqLen || len(targets) != c.SeqLen {
		return invalidf("sample buffers: inputs %d and targets %d tokens, must both be SeqLen = %d", len(inputs), len(targets), c.SeqLen)
	}
	rng := data.SplitMix64{State: SampleState(c.Seed, s, i)}
	K, Q, V := c.NumPairs, c.NumQueries, c.VocabSize
	half := V / 2

	// 1. Keys, then values: the first K draws of a Fisher–Yates shuffle of
	// [1, V/2), then of [V/2, V).
	keys := drawDistinct(&rng, 1, half, K)
	values := drawDistinct(&rng, half, V, K)
	for j := range K {
		inputs[2*j] = keys[j]
		inputs[2*j+1] = values[j]
	}

	// 2. Query slots: weighted sampling without replacement by
	// Efraimidis–Spirakis keys ln(u_g)/w(g), one uniform u_g per slot in
	// slot order; the slot with the j-th largest key holds the key of pair j.
	type slotKey struct {
		key  float64
		slot int
	}
	sk := make([]slotKey, len(g.invWeight))
	for slot, inv := range g.invWeight {
		sk[slot] = slotKey{math.Log(unitOpen(rng.Next())) * inv, slot}
	}
	slices.SortFunc(sk, func(a, b slotKey) int {
		if c := cmp.Compare(b.key, a.key); c != 0 {
			return c
		}
		return cmp.Compare(a.slot, b.slot)
	})
	for t := range targets {
		targets[t] = -1
	}
	query := make([]bool, c.SeqLen)
	for j := range Q {
		p := c.KVLen() + 2*sk[j].slot
		inputs[p] = keys[j]
		targets[p] = values[j]
		query[p] = true
	}

	// 3. Filler: every other position after the key-value section, in
	// order, gets a uniform token of [0, V).
	for p := c.KVLen(); p < c.SeqLen; p++ {
		if !query[p] {
			inputs[p] = int32(rng.Below(uint64(V)))
		}
	}
	return nil
}

// drawDistinct returns the first k elements of a Fisher–Yates shuffle of
// [lo, hi) from the bottom: for j = 0..k-1, swap element j with element
// j + Below(n - j). Only displaced elements are stored, so the cost is O(k).
func drawDistinct(rng *data.SplitMix64, lo, hi, k int) []int32 {
	n := uint64(hi - lo)
	moved := make(map[uint64]uint64, k)
	at := func(x uint64) uint64 {
		if v, ok := moved[x]; ok {
			return v
		}
		return x
	}
	out := make([]int32, k)
	for j := range uint64(k) {
		r := j + rng.Below(n-j)
		out[j] = int32(lo + int(at(r)))
		moved[r] = at(j)
	}
	return out
}

// unitOpen maps 64 random bits to a float64 in the open interval (0, 1):
// (top 53 bits + 0.5) / 2^53.
func unitOpen(x uint64) float64 {
	return (float64(x>>11) + 0.5) / (1 << 53)
}

// Batch returns the samples of stream s at the given indices as one
// micro-batch: row r is sample indices[r].
func (g *Generator) Batch(s Stream, indices []uint64) (data.Batch, error) {
	L := g.cfg.SeqLen
	b := data.Batch{
		Inputs:    make([]int32, len(indices)*L),
		Targets:   make([]int32, len(indices)*L),
		Positions: slices.Clone(indices),
		Samples:   make([]int, len(indices)),
		SeqLen:    L,
	}
	for r, i := range indices {
		b.Samples[r] = int(i)
		if err := g.Sample(s, i, b.Inputs[r*L:(r+1)*L], b.Targets[r*L:(r+1)*L]); err != nil {
			return data.Batch{}, err
		}
	}
	return b, nil
}
