package data

import (
	"context"
	"fmt"
)

// LoaderConfig describes how one data-parallel rank reads its share of each
// optimizer step.
type LoaderConfig struct {
	// SeqLen is L, the tokens per sample (inputs and targets each); > 0.
	SeqLen int
	// MicroBatch is Bt, the samples per micro-batch on one rank; > 0.
	MicroBatch int
	// GlobalBatch is GB, the samples per optimizer step over all DP ranks; a
	// multiple of DPSize*MicroBatch.
	GlobalBatch int
	// DPRank is this rank, in [0, DPSize).
	DPRank int
	// DPSize is the data-parallel degree; > 0.
	DPSize int
	// Seed is the run seed of the sampler.
	Seed uint64
}

// Validate checks the configuration; its error names the field and the rule.
func (c LoaderConfig) Validate() error {
	switch {
	case c.SeqLen <= 0:
		return invalidf("SeqLen %d must be > 0", c.SeqLen)
	case c.MicroBatch <= 0:
		return invalidf("MicroBatch %d must be > 0", c.MicroBatch)
	case c.DPSize <= 0:
		return invalidf("DPSize %d must be > 0", c.DPSize)
	case c.DPRank < 0 || c.DPRank >= c.DPSize:
		return invalidf("DPRank %d must be in [0, DPSize=%d)", c.DPRank, c.DPSize)
	case c.GlobalBatch <= 0:
		return invalidf("GlobalBatch %d must be > 0", c.GlobalBatch)
	case c.GlobalBatch%c.DPSize != 0:
		return invalidf("GlobalBatch %d must be a multiple of DPSize %d", c.GlobalBatch, c.DPSize)
	case (c.GlobalBatch/c.DPSize)%c.MicroBatch != 0:
		return invalidf("GlobalBatch/DPSize = %d samples per rank must be a multiple of MicroBatch %d", c.GlobalBatch/c.DPSize, c.MicroBatch)
	}
	return nil
}

// MicroBatches returns the number of micro-batches per step on one rank:
// GlobalBatch / DPSize / MicroBatch.
func (c LoaderConfig) MicroBatches() int { return c.GlobalBatch / c.DPSize / c.MicroBatch }

// RankPositions returns the global sample positions that DP rank r of dp
// reads in the step starting at cursor with global batch gb: cursor + r,
// cursor + r + dp, ..., gb/dp positions in all. Over all ranks these are
// exactly [cursor, cursor+gb), each once.
func RankPositions(cursor uint64, gb, r, dp int) ([]uint64, error) {
	if dp <= 0 || r < 0 || r >= dp || gb <= 0 || gb%dp != 0 {
		return nil, invalidf("global batch %d, dp rank %d, dp size %d: need dp > 0, 0 <= rank < dp, global batch a positive multiple of dp", gb, r, dp)
	}
	out := make([]uint64, gb/dp)
	for j := range out {
		out[j] = cursor + uint64(r) + uint64(j)*uint64(dp)
	}
	return out, nil
}

// Batch is one micro-batch: Bt rows of L tokens, row-major.
type Batch struct {
	// Inputs are the input tokens, Bt×L row-major.
	Inputs []int32
	// Targets are the next tokens of Inputs, Bt×L row-major: Targets[b*L+t]
	// is the token that follows Inputs[b*L+t] in the stream.
	Targets []int32
	// Positions are the global sample positions of the rows.
	Positions []uint64
	// Samples are the dataset sample indices of the rows.
	Samples []int
	// SeqLen is L, the columns of Inputs and Targets.
	SeqLen int
}

// Rows returns Bt, the number of sequences in the batch.
func (b Batch) Rows() int { return len(b.Positions) }

// SPSlice returns the part of the batch that sequence-parallel rank k of K
// trains on: the k-th contiguous slice of L/K positions of every row, for
// inputs and targets alike. Because targets are pre-shifted, the last target
// of slice k is the first input of slice k+1. L must be a multiple of K.
func (b Batch) SPSlice(K, k int) (Batch, error) {
	L := b.SeqLen
	switch {
	case K <= 0:
		return Batch{}, invalidf("sp size %d must be > 0", K)
	case k < 0 || k >= K:
		return Batch{}, invalidf("sp rank %d must be in [0, sp size=%d)", k, K)
	case L%K != 0:
		return Batch{}, invalidf("SeqLen %d must be a multiple of sp size %d", L, K)
	}
	n := L / K
	rows := b.Rows()
	out := Batch{
		Inputs:    make([]int32, rows*n),
		Targets:   make([]int32, rows*n),
		Positions: b.Positions,
		Samples:   b.Samples,
		SeqLen:    n,
	}
	for r := range rows {
		src := r*L + k*n
		copy(out.Inputs[r*n:(r+1)*n], b.Inputs[src:src+n])
		copy(out.Targets[r*n:(r+1)*n], b.Targets[src:src+n])
	}
	return out, nil
}

// Loader reads the micro-batches of one DP rank, step after step, from a
// Dataset in the order of a Sampler. Its position is a cursor: the global
// sample position where the next step starts. Because the cursor counts
// samples over all ranks, a job resumed with another DP degree (and the same
// seed, dataset and sequence length) continues the same global sequence. A
// Loader is not safe for concurrent use.
type Loader struct {
	ds      *Dataset
	sampler *Sampler
	cfg     LoaderConfig
	cursor  uint64
	win     []int32
	scratch *[]byte
}

// NewLoader returns a loader at cursor 0.
func NewLoader(ds *Dataset, cfg LoaderConfig) (*Loader, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := ds.NumSamples(cfg.SeqLen)
	if n == 0 {
		return nil, fmt.Errorf("%w: %d tokens hold no sample of seq_len %d (need %d)", ErrTooSmall, ds.Tokens(), cfg.SeqLen, cfg.SeqLen+1)
	}
	s, err := NewSampler(n, cfg.Seed)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 0, (cfg.SeqLen+1)*4)
	return &Loader{ds: ds, sampler: s, cfg: cfg, win: make([]int32, cfg.SeqLen+1), scratch: &b}, nil
}

// Config returns the loader's configuration.
func (l *Loader) Config() LoaderConfig { return l.cfg }

// Sampler returns the loader's sampler.
func (l *Loader) Sampler() *Sampler { return l.sampler }

// Cursor returns the global sample position where the next step starts. Save
// it in a checkpoint after the step's update is applied.
func (l *Loader) Cursor() uint64 { return l.cursor }

// Seek moves the loader to a cursor saved by any loader of the same dataset,
// sequence length and seed, whatever its DP degree.
func (l *Loader) Seek(cursor uint64) { l.cursor = cursor }

// Next returns this rank's micro-batches of the step at the cursor and
// advances the cursor by GlobalBatch.
func (l *Loader) Next(ctx context.Context) ([]Batch, error) {
	bs, err := l.BatchesAt(ctx, l.cursor)
	if err != nil {
		return nil, err
	}
	l.cursor += uint64(l.cfg.GlobalBatch)
	return bs, nil
}

// BatchesAt returns this rank's micro-batches of the step starting at cursor,
// without moving the loader. Micro-batch m holds the rank's positions
// m*Bt .. m*Bt+Bt-1 in the order of RankPositions.
func (l *Loader) BatchesAt(ctx context.Context, cursor uint64) ([]Batch, error) {
	c := l.cfg
	pos, err := RankPositions(cursor, c.GlobalBatch, c.DPRank, c.DPSize)
	if err != nil {
		return nil, err
	}
	L := c.SeqLen
	out := make([]Batch, c.MicroBatches())
	for m := range out {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		p := pos[m*c.MicroBatch : (m+1)*c.MicroBatch]
		b := Batch{
			Inputs:    make([]int32, len(p)*L),
			Targets:   make([]int32, len(p)*L),
			Positions: p,
			Samples:   make([]int, len(p)),
			SeqLen:    L,
		}
		for r, g := range p {
			i := l.sampler.SampleAt(g)
			b.Samples[r] = i
			if err := l.ds.sample(uint64(i), b.Inputs[r*L:(r+1)*L], b.Targets[r*L:(r+1)*L], l.win, l.scratch); err != nil {
				return nil, err
			}
		}
		out[m] = b
	}
	return out, nil
}
