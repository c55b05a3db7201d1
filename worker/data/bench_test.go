package data

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkLoader measures the tokens per second one DP rank's Loader
// delivers (inputs only; targets come from the same window) from 8 local
// shards of 1 Mi tokens, page-cache warm. Baseline for comparison in the same
// run: BenchmarkDatasetRead, one sequential ReadTokens of the same count.
func BenchmarkLoader(b *testing.B) {
	ds, _ := openTestDataset(b, 50257, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20)
	for _, tc := range []struct{ seqLen, bt int }{{256, 32}, {1024, 8}, {4096, 2}} {
		b.Run(fmt.Sprintf("L%d_Bt%d", tc.seqLen, tc.bt), func(b *testing.B) {
			l, err := NewLoader(ds, LoaderConfig{SeqLen: tc.seqLen, MicroBatch: tc.bt, GlobalBatch: 4 * tc.bt, DPRank: 1, DPSize: 2, Seed: 1})
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			tokensPerStep := 2 * tc.bt * tc.seqLen
			b.SetBytes(int64(tokensPerStep * 4)) // int32 input tokens delivered
			for b.Loop() {
				if _, err := l.Next(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(tokensPerStep)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}

// BenchmarkDatasetRead is the baseline for BenchmarkLoader: sequential reads
// of 8192 tokens through Dataset.ReadTokens.
func BenchmarkDatasetRead(b *testing.B) {
	ds, _ := openTestDataset(b, 50257, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20, 1<<20)
	const n = 8192
	dst := make([]int32, n)
	b.SetBytes(n * 4)
	var start uint64
	for b.Loop() {
		if start+n > ds.Tokens() {
			start = 0
		}
		if err := ds.ReadTokens(dst, start); err != nil {
			b.Fatal(err)
		}
		start += n
	}
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
}
