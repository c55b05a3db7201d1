package ref

import (
	"context"
	"fmt"
	"testing"

	"github.com/m2train/m2train/model"
)

// benchConfig is the stated small configuration of the CPU benchmark:
// d_model 256, 4 layers, d_state 64, headdim 32 (16 heads), 1 group,
// chunk 64, byte-level vocabulary 272; batch 4 × 512 tokens.
func benchConfig() model.Config {
	c := model.DefaultConfig(256, 4, 272)
	c.DState, c.HeadDim, c.ChunkSize = 64, 32, 64
	c.NHeads = c.Expand * c.DModel / c.HeadDim
	return c
}

// BenchmarkForwardBackward measures training throughput (forward and
// backward, float32) of the stated config with the chunked SSD scan, and in
// the same run with the token-by-token recurrence as the baseline.
func BenchmarkForwardBackward(b *testing.B) {
	cfg := benchConfig()
	const bt, l = 4, 512
	batch := randomBatch(cfg, bt, l, 1)
	for _, tc := range []struct {
		name      string
		recurrent bool
	}{{"chunked", false}, {"recurrent", true}} {
		b.Run(fmt.Sprintf("%s/d%d-n%d-N%d-B%dx%d", tc.name, cfg.DModel, cfg.NLayer, cfg.DState, bt, l), func(b *testing.B) {
			m := noisyModel[float32](b, cfg, 1)
			m.Recurrent = tc.recurrent
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				m.ZeroGrads()
				if _, err := m.ForwardBackward(ctx, batch, model.StepOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(bt*l*b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
