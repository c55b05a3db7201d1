package data

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"

	"github.com/m2train/m2train/worker/checkpoint"
)

// stepRecord is what one optimizer step of a data-parallel job consumed,
// in global position order: samples[j] and inputs[j] belong to position
// cursor+j, whichever rank read it.
type stepRecord struct {
	cursor  uint64
	samples []int
	inputs  [][]int32
}

// runDPJob plays steps optimizer steps of a dp-way job from cursor the way
// its ranks would: one Loader per rank, sought to the cursor, each reading
// its micro-batches of every step. It checks that every rank reads exactly
// the positions RankPositions gives it, micro-batch after micro-batch, that
// the ranks together read each position of the step once, and that all
// ranks end at the same cursor, which it returns with the steps' records.
func runDPJob(t *testing.T, ds *Dataset, seed uint64, L, dp, bt, gb int, cursor uint64, steps int) ([]stepRecord, uint64) {
	t.Helper()
	loaders := make([]*Loader, dp)
	for r := range loaders {
		l, err := NewLoader(ds, LoaderConfig{SeqLen: L, MicroBatch: bt, GlobalBatch: gb, DPRank: r, DPSize: dp, Seed: seed})
		if err != nil {
			t.Fatalf("dp %d rank %d: %v", dp, r, err)
		}
		l.Seek(cursor)
		loaders[r] = l
	}
	var recs []stepRecord
	for range steps {
		start := loaders[0].Cursor()
		rec := stepRecord{cursor: start, samples: make([]int, gb), inputs: make([][]int32, gb)}
		seen := make([]bool, gb)
		for r, l := range loaders {
			if l.Cursor() != start {
				t.Fatalf("dp %d: rank %d at cursor %d, rank 0 at %d", dp, r, l.Cursor(), start)
			}
			bs, err := l.Next(context.Background())
			if err != nil {
				t.Fatalf("dp %d rank %d at cursor %d: %v", dp, r, start, err)
			}
			want, err := RankPositions(start, gb, r, dp)
			if err != nil {
				t.Fatal(err)
			}
			var got []uint64
			for _, b := range bs {
				if b.Rows() != bt {
					t.Fatalf("dp %d rank %d: micro-batch of %d rows, want %d", dp, r, b.Rows(), bt)
				}
				for row, g := range b.Positions {
					got = append(got, g)
					j := g - start
					if g < start || j >= uint64(gb) || seen[j] {
						t.Fatalf("dp %d rank %d: position %d outside the step [%d, %d) or read twice", dp, r, g, start, start+uint64(gb))
					}
					seen[j] = true
					rec.samples[j] = b.Samples[row]
					rec.inputs[j] = slices.Clone(b.Inputs[row*L : (row+1)*L])
				}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("dp %d rank %d at cursor %d read positions %v, RankPositions says %v", dp, r, start, got, want)
			}
		}
		if i := slices.Index(seen, false); i >= 0 {
			t.Fatalf("dp %d: no rank read position %d of the step at %d", dp, start+uint64(i), start)
		}
		recs = append(recs, rec)
	}
	end := loaders[0].Cursor()
	for r, l := range loaders {
		if l.Cursor() != end {
			t.Fatalf("dp %d: rank %d ends at cursor %d, rank 0 at %d", dp, r, l.Cursor(), end)
		}
	}
	return recs, end
}

// saveCursor passes the cursor through the trainer state of a checkpoint,
// encoded and decoded as trainer.json is, and returns what a resumed job
// reads back.
func saveCursor(t *testing.T, step int, cursor, seed uint64) (uint64, uint64) {
	t.Helper()
	b, err := json.Marshal(checkpoint.TrainerState{Step: step, Cursor: cursor, Seed: seed, Precision: "float32"})
	if err != nil {
		t.Fatal(err)
	}
	var back checkpoint.TrainerState
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Step != step {
		t.Fatalf("trainer state step %d read back as %d", step, back.Step)
	}
	return back.Cursor, back.Seed
}

// compareSteps checks that got consumed, step by step, the same samples
// in the same global order with the same tokens as want.
func compareSteps(t *testing.T, got, want []stepRecord) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d steps, want %d", len(got), len(want))
	}
	for s := range got {
		g, w := got[s], want[s]
		if g.cursor != w.cursor {
			t.Fatalf("step %d starts at cursor %d, want %d", s, g.cursor, w.cursor)
		}
		gs, ws := slices.Clone(g.samples), slices.Clone(w.samples)
		slices.Sort(gs)
		slices.Sort(ws)
		if !slices.Equal(gs, ws) {
			t.Fatalf("step %d (cursor %d) consumed the samples %v, an uninterrupted run %v", s, g.cursor, gs, ws)
		}
		if !slices.Equal(g.samples, w.samples) {
			t.Fatalf("step %d (cursor %d): same samples, other order: %v, want %v", s, g.cursor, g.samples, w.samples)
		}
		for j := range g.inputs {
			if !slices.Equal(g.inputs[j], w.inputs[j]) {
				t.Fatalf("step %d position %d: sample %d has tokens %v, want %v", s, g.cursor+uint64(j), g.samples[j], g.inputs[j], w.inputs[j])
			}
		}
	}
}

// TestResumeWithOtherDPConsumesTheSameSamples runs a job at dp = 2 for k
// steps, saves the cursor as a checkpoint does, and resumes it at dp = 1,
// 3, 4 and 6 (the global batch of 12 divides among them, with one or more
// micro-batches per rank). Step by step, every resumed run must consume
// exactly the samples of an uninterrupted dp = 1 run, in the same global
// order, with the same tokens. The dataset has 23 samples, so steps of 12
// straddle epoch boundaries and the resume points fall inside an epoch.
func TestResumeWithOtherDPConsumesTheSameSamples(t *testing.T) {
	const (
		L     = 5
		gb    = 12
		seed  = 77
		total = 9 // steps; 108 positions, more than four epochs of 23
	)
	ds, _ := openTestDataset(t, 700, 40, 3, 50, 23) // 116 tokens: 23 samples of 5
	if n := ds.NumSamples(L); n != 23 {
		t.Fatalf("dataset has %d samples, want 23", n)
	}
	ref, refEnd := runDPJob(t, ds, seed, L, 1, 4, gb, 0, total)
	if refEnd != total*gb {
		t.Fatalf("uninterrupted run ends at cursor %d, want %d", refEnd, total*gb)
	}
	for _, k := range []int{1, 3, 5} { // resume at cursors 12, 36 (inside epoch 1) and 60
		first, cursor := runDPJob(t, ds, seed, L, 2, 3, gb, 0, k)
		compareSteps(t, first, ref[:k])
		resumeAt, resumeSeed := saveCursor(t, k, cursor, seed)
		if resumeAt != uint64(k*gb) {
			t.Fatalf("after %d steps of %d the saved cursor is %d", k, gb, resumeAt)
		}
		for _, tc := range []struct{ dp, bt int }{{1, 4}, {1, 12}, {3, 2}, {4, 1}, {4, 3}, {6, 2}} {
			t.Run(fmt.Sprintf("after%d/dp2_to_dp%d_bt%d", k, tc.dp, tc.bt), func(t *testing.T) {
				rest, end := runDPJob(t, ds, resumeSeed, L, tc.dp, tc.bt, gb, resumeAt, total-k)
				if end != refEnd {
					t.Fatalf("resumed run ends at cursor %d, uninterrupted at %d", end, refEnd)
				}
				compareSteps(t, append(slices.Clone(first), rest...), ref)
			})
		}
	}
}

// TestResumeWithOtherDPMidStepCursor resumes at dp = 3 from a cursor that a
// dp = 2 run with a global batch of 8 saved, under a global batch of 6: the
// cursor (32) is no multiple of the new global batch, and the resumed steps
// must still be positions [32, 38), [38, 44), ... of the same global order.
func TestResumeWithOtherDPMidStepCursor(t *testing.T) {
	const L, seed = 5, 5
	ds, _ := openTestDataset(t, 700, 40, 3, 50, 23)
	_, cursor := runDPJob(t, ds, seed, L, 2, 2, 8, 0, 4)
	resumeAt, _ := saveCursor(t, 4, cursor, seed)
	rest, _ := runDPJob(t, ds, seed, L, 3, 1, 6, resumeAt, 5)
	ref, _ := runDPJob(t, ds, seed, L, 1, 1, 1, 0, int(resumeAt)+5*6)
	for s, rec := range rest {
		for j, sample := range rec.samples {
			g := resumeAt + uint64(s*6+j)
			if rec.cursor+uint64(j) != g {
				t.Fatalf("resumed step %d starts at %d, want %d", s, rec.cursor, resumeAt+uint64(s*6))
			}
			if w := ref[g].samples[0]; sample != w {
				t.Fatalf("position %d: sample %d, an uninterrupted run reads %d", g, sample, w)
			}
		}
	}
}
