package mqar

import (
	"context"

	"github.com/m2train/m2train/worker/data"
)

// BatchSource is what a training loop reads its micro-batches from: the
// contract of worker/data's Loader, which MQAR's Loader follows too. The
// cursor is the global sample position where the next step starts; it
// counts samples over all data-parallel ranks, so a checkpointed cursor
// resumes the same global sequence under any dp degree.
type BatchSource interface {
	// Next returns this rank's micro-batches of the step at the cursor and
	// advances the cursor by the global batch.
	Next(ctx context.Context) ([]data.Batch, error)
	// BatchesAt returns this rank's micro-batches of the step starting at
	// cursor without moving the source.
	BatchesAt(ctx context.Context, cursor uint64) ([]data.Batch, error)
	// Cursor returns the global sample position of the next step.
	Cursor() uint64
	// Seek moves the source to a saved cursor.
	Seek(cursor uint64)
	// Config returns the batch geometry.
	Config() data.LoaderConfig
}

var (
	_ BatchSource = (*data.Loader)(nil)
	_ BatchSource = (*Loader)(nil)
)

// Loader serves the Train stream of a Generator to one data-parallel rank.
// Global sample position p is sample p of the stream (the stream is endless
// and already random, so there is no epoch shuffle); within a step, rank r
// of dp reads the positions data.RankPositions gives it, exactly as
// worker/data's Loader does. A Loader is not safe for concurrent use.
type Loader struct {
	gen    *Generator
	cfg    data.LoaderConfig
	cursor uint64
}

// NewLoader returns a loader at cursor 0. cfg.SeqLen must equal the
// generator's SeqLen; cfg.Seed is not used (the generator's seed selects the
// samples).
func NewLoader(gen *Generator, cfg data.LoaderConfig) (*Loader, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.SeqLen != gen.cfg.SeqLen {
		return nil, invalidf("loader SeqLen %d must equal the task's SeqLen %d", cfg.SeqLen, gen.cfg.SeqLen)
	}
	return &Loader{gen: gen, cfg: cfg}, nil
}

// Config returns the loader's configuration.
func (l *Loader) Config() data.LoaderConfig { return l.cfg }

// Generator returns the generator the loader reads.
func (l *Loader) Generator() *Generator { return l.gen }

// Cursor returns the global sample position where the next step starts.
func (l *Loader) Cursor() uint64 { return l.cursor }

// Seek moves the loader to a cursor saved by any loader of the same task.
func (l *Loader) Seek(cursor uint64) { l.cursor = cursor }

// Next returns this rank's micro-batches of the step at the cursor and
// advances the cursor by GlobalBatch.
func (l *Loader) Next(ctx context.Context) ([]data.Batch, error) {
	bs, err := l.BatchesAt(ctx, l.cursor)
	if err != nil {
		return nil, err
	}
	l.cursor += uint64(l.cfg.GlobalBatch)
	return bs, nil
}

// BatchesAt returns this rank's micro-batches of the step starting at
// cursor: micro-batch m holds the rank's positions m*Bt .. m*Bt+Bt-1 in the
// order of data.RankPositions.
func (l *Loader) BatchesAt(ctx context.Context, cursor uint64) ([]data.Batch, error) {
	c := l.cfg
	pos, err := data.RankPositions(cursor, c.GlobalBatch, c.DPRank, c.DPSize)
	if err != nil {
		return nil, err
	}
	out := make([]data.Batch, c.MicroBatches())
	for m := range out {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		b, err := l.gen.Batch(Train, pos[m*c.MicroBatch:(m+1)*c.MicroBatch])
		if err != nil {
			return nil, err
		}
		out[m] = b
	}
	return out, nil
}
