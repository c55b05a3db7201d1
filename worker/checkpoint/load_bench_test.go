package checkpoint

import (
	"context"
	"fmt"
	"testing"

	"github.com/m2train/m2train/model"
)

// BenchmarkLoad loads a checkpoint of about 100 MB from a local
// directory (the page cache, after the first iteration): whole objects
// streamed and verified, and segments read and verified in parallel.
func BenchmarkLoad(b *testing.B) {
	ctx := context.Background()
	cfg := model.DefaultConfig(512, 8, 8192)
	l := model.NewLayout(cfg)
	s := &State[float32]{Config: cfg, Layout: l, Params: make([]float32, l.Total), M: make([]float32, l.Total), V: make([]float32, l.Total),
		Trainer: TrainerState{Step: 1, OptimizerStep: 1, Precision: "float32"}}
	for i := range s.Params {
		s.Params[i], s.M[i], s.V[i] = float32(i), float32(-i), float32(i%13)
	}
	store := LocalStore{Root: b.TempDir()}
	man, err := SaveWith(ctx, store, "", s, SaveOptions{SegmentSize: 8 << 20})
	if err != nil {
		b.Fatal(err)
	}
	run := func(b *testing.B, st Store, opts LoadOptions) {
		b.SetBytes(man.Size())
		for b.Loop() {
			if _, _, err := LoadWith[float32](ctx, st, "", 1, opts); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("stream", func(b *testing.B) { run(b, plainStore{store}, LoadOptions{}) })
	for _, c := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("segments-%d", c), func(b *testing.B) { run(b, store, LoadOptions{Concurrency: c}) })
	}
}
