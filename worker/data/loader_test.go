package data

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// openTestDataset writes a dataset of the given shard sizes and opens it.
func openTestDataset(t testing.TB, vocab uint32, sizes ...int) (*Dataset, []int32) {
	t.Helper()
	dir := t.TempDir()
	stream := makeDataset(t, dir, vocab, sizes...)
	ds, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ds.Close() })
	return ds, stream
}

func TestLoaderConfigValidate(t *testing.T) {
	ok := LoaderConfig{SeqLen: 4, MicroBatch: 2, GlobalBatch: 12, DPRank: 1, DPSize: 3}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	tests := []struct {
		name string
		edit func(*LoaderConfig)
	}{
		{"SeqLen", func(c *LoaderConfig) { c.SeqLen = 0 }},
		{"MicroBatch", func(c *LoaderConfig) { c.MicroBatch = 0 }},
		{"DPSize", func(c *LoaderConfig) { c.DPSize = 0 }},
		{"DPRank", func(c *LoaderConfig) { c.DPRank = 3 }},
		{"DPRank", func(c *LoaderConfig) { c.DPRank = -1 }},
		{"GlobalBatch", func(c *LoaderConfig) { c.GlobalBatch = 0 }},
		{"GlobalBatch", func(c *LoaderConfig) { c.GlobalBatch = 13 }},            // not a multiple of dp
		{"MicroBatch", func(c *LoaderConfig) { c.GlobalBatch, c.DPSize = 9, 3 }}, // 3 per rank, Bt 2
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.edit(&c)
			err := c.Validate()
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("error %v, want ErrInvalidArgument", err)
			}
			if !strings.Contains(err.Error(), tc.name) {
				t.Fatalf("error %q does not name %s", err, tc.name)
			}
		})
	}
	ds, _ := openTestDataset(t, 100, 4)
	if _, err := NewLoader(ds, LoaderConfig{SeqLen: 4, MicroBatch: 1, GlobalBatch: 1, DPSize: 1}); !errors.Is(err, ErrTooSmall) {
		t.Fatalf("NewLoader on 4 tokens at seq_len 4: %v, want ErrTooSmall", err)
	}
	if _, err := RankPositions(0, 10, 0, 3); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("RankPositions with gb 10, dp 3: %v", err)
	}
}

// TestLoaderDPPartition checks that at every step the ranks' positions are
// exactly [cursor, cursor+GB), each once, and that every row holds the
// sampler's sample for its position.
func TestLoaderDPPartition(t *testing.T) {
	const L = 6
	ds, stream := openTestDataset(t, 5000, 40, 3, 50, 17) // 110 tokens, 18 samples
	for _, tc := range []struct{ dp, bt, gb int }{{1, 4, 12}, {2, 3, 12}, {3, 2, 12}, {4, 1, 12}, {6, 2, 12}, {12, 1, 12}, {5, 1, 20}} {
		t.Run(fmt.Sprintf("dp%d_bt%d_gb%d", tc.dp, tc.bt, tc.gb), func(t *testing.T) {
			loaders := make([]*Loader, tc.dp)
			for r := range loaders {
				l, err := NewLoader(ds, LoaderConfig{SeqLen: L, MicroBatch: tc.bt, GlobalBatch: tc.gb, DPRank: r, DPSize: tc.dp, Seed: 3})
				if err != nil {
					t.Fatal(err)
				}
				loaders[r] = l
			}
			for step := range 5 { // 5 steps of 12 or 20 cross the 18-sample epoch
				count := map[uint64]int{}
				for r, l := range loaders {
					if got := l.Cursor(); got != uint64(step*tc.gb) {
						t.Fatalf("rank %d cursor %d before step %d", r, got, step)
					}
					bs, err := l.Next(context.Background())
					if err != nil {
						t.Fatal(err)
					}
					if len(bs) != tc.gb/tc.dp/tc.bt {
						t.Fatalf("%d micro-batches, want %d", len(bs), tc.gb/tc.dp/tc.bt)
					}
					for _, b := range bs {
						if b.Rows() != tc.bt || len(b.Inputs) != tc.bt*L || len(b.Targets) != tc.bt*L || b.SeqLen != L {
							t.Fatalf("batch shape rows %d inputs %d targets %d", b.Rows(), len(b.Inputs), len(b.Targets))
						}
						for row, g := range b.Positions {
							if (g-uint64(step*tc.gb))%uint64(tc.dp) != uint64(r) {
								t.Fatalf("rank %d got position %d", r, g)
							}
							count[g]++
							i := l.Sampler().SampleAt(g)
							if b.Samples[row] != i {
								t.Fatalf("position %d: sample %d, sampler says %d", g, b.Samples[row], i)
							}
							s := i * L
							if !slices.Equal(b.Inputs[row*L:(row+1)*L], stream[s:s+L]) || !slices.Equal(b.Targets[row*L:(row+1)*L], stream[s+1:s+L+1]) {
								t.Fatalf("position %d sample %d: wrong tokens", g, i)
							}
						}
					}
				}
				if len(count) != tc.gb {
					t.Fatalf("step %d covers %d positions, want %d", step, len(count), tc.gb)
				}
				for g := uint64(step * tc.gb); g < uint64((step+1)*tc.gb); g++ {
					if count[g] != 1 {
						t.Fatalf("step %d: position %d read %d times", step, g, count[g])
					}
				}
			}
		})
	}
}

// readSteps runs every rank of a dp-way job for steps steps from cursor and
// returns the sample index at each global position, in position order, and
// the cursor after the last step (the same on every rank).
func readSteps(t *testing.T, ds *Dataset, dp, bt, gb int, cursor uint64, steps int) ([]int, uint64) {
	t.Helper()
	bySample := map[uint64]int{}
	var end uint64
	for r := range dp {
		l, err := NewLoader(ds, LoaderConfig{SeqLen: 5, MicroBatch: bt, GlobalBatch: gb, DPRank: r, DPSize: dp, Seed: 2026})
		if err != nil {
			t.Fatal(err)
		}
		l.Seek(cursor)
		for range steps {
			bs, err := l.Next(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, b := range bs {
				for row, g := range b.Positions {
					if _, dup := bySample[g]; dup {
						t.Fatalf("position %d read twice", g)
					}
					bySample[g] = b.Samples[row]
				}
			}
		}
		if r > 0 && l.Cursor() != end {
			t.Fatalf("ranks disagree on the cursor: %d vs %d", l.Cursor(), end)
		}
		end = l.Cursor()
	}
	out := make([]int, 0, len(bySample))
	for g := cursor; g < end; g++ {
		s, ok := bySample[g]
		if !ok {
			t.Fatalf("position %d not read", g)
		}
		out = append(out, s)
	}
	return out, end
}

func TestLoaderResumeWithDifferentDP(t *testing.T) {
	ds, _ := openTestDataset(t, 300, 31, 29, 41) // 101 tokens, 20 samples of 5
	// Reference: one rank reads 10 steps of 6 (three epochs of 20).
	ref, refEnd := readSteps(t, ds, 1, 2, 6, 0, 10)
	// dp=2 for 4 steps, then the job restarts from the saved cursor with dp=3.
	first, cursor := readSteps(t, ds, 2, 1, 6, 0, 4)
	if cursor != 24 {
		t.Fatalf("cursor after 4 steps of 6 = %d, want 24", cursor)
	}
	second, end := readSteps(t, ds, 3, 2, 6, cursor, 6)
	if end != refEnd {
		t.Fatalf("end cursor %d, want %d", end, refEnd)
	}
	got := append(first, second...)
	if !slices.Equal(got, ref) {
		t.Fatalf("dp 2 -> 3 sequence\n%v\nwant (dp 1)\n%v", got, ref)
	}
	// A cursor that is not a multiple of the new global batch continues too:
	// resume dp=1 at 25 with gb 5 and compare with the reference tail.
	tail, _ := readSteps(t, ds, 1, 5, 5, 25, 7)
	if !slices.Equal(tail, ref[25:60]) {
		t.Fatalf("resume at 25: %v, want %v", tail, ref[25:60])
	}
	// Each epoch of the reference is a permutation of the 20 samples.
	for e := range 3 {
		ep := slices.Clone(ref[e*20 : (e+1)*20])
		slices.Sort(ep)
		for i, v := range ep {
			if v != i {
				t.Fatalf("epoch %d is not a permutation: %v", e, ref[e*20:(e+1)*20])
			}
		}
	}
}

func TestLoaderBatchesAtAndCancel(t *testing.T) {
	ds, _ := openTestDataset(t, 300, 200)
	l, err := NewLoader(ds, LoaderConfig{SeqLen: 8, MicroBatch: 2, GlobalBatch: 4, DPRank: 0, DPSize: 1, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	at, err := l.BatchesAt(context.Background(), 8)
	if err != nil || l.Cursor() != 0 {
		t.Fatalf("BatchesAt moved the cursor or failed: %v", err)
	}
	l.Seek(8)
	next, err := l.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(at[1].Inputs, next[1].Inputs) || !slices.Equal(at[0].Positions, []uint64{8, 9}) || l.Cursor() != 12 {
		t.Fatalf("Next after Seek(8) differs from BatchesAt(8), cursor %d", l.Cursor())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Next(ctx); !errors.Is(err, context.Canceled) || l.Cursor() != 12 {
		t.Fatalf("Next on a cancelled context: %v, cursor %d", err, l.Cursor())
	}
}

func TestSPSlice(t *testing.T) {
	const L = 8
	ds, stream := openTestDataset(t, 1000, 100)
	l, err := NewLoader(ds, LoaderConfig{SeqLen: L, MicroBatch: 3, GlobalBatch: 3, DPSize: 1, Seed: 9})
	if err != nil {
		t.Fatal(err)
	}
	bs, err := l.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	b := bs[0]
	for _, K := range []int{1, 2, 4, 8} {
		t.Run(fmt.Sprintf("K%d", K), func(t *testing.T) {
			n := L / K
			parts := make([]Batch, K)
			for k := range K {
				s, err := b.SPSlice(K, k)
				if err != nil {
					t.Fatal(err)
				}
				if s.SeqLen != n || len(s.Inputs) != 3*n || len(s.Targets) != 3*n || !slices.Equal(s.Positions, b.Positions) {
					t.Fatalf("slice %d shape: seq %d inputs %d", k, s.SeqLen, len(s.Inputs))
				}
				parts[k] = s
			}
			for row := range 3 {
				start := b.Samples[row] * L
				for k, s := range parts {
					in := s.Inputs[row*n : (row+1)*n]
					tg := s.Targets[row*n : (row+1)*n]
					off := start + k*n
					if !slices.Equal(in, stream[off:off+n]) || !slices.Equal(tg, stream[off+1:off+n+1]) {
						t.Fatalf("row %d slice %d: inputs %v targets %v", row, k, in, tg)
					}
					// The last target of slice k is the first input of slice k+1.
					if k+1 < K && tg[n-1] != parts[k+1].Inputs[row*n] {
						t.Fatalf("row %d: slice %d ends with target %d, slice %d starts with input %d", row, k, tg[n-1], k+1, parts[k+1].Inputs[row*n])
					}
				}
			}
		})
	}
	for _, bad := range []struct{ K, k int }{{3, 0}, {0, 0}, {2, 2}, {2, -1}} {
		if _, err := b.SPSlice(bad.K, bad.k); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("SPSlice(%d, %d): %v, want ErrInvalidArgument", bad.K, bad.k, err)
		}
	}
}
