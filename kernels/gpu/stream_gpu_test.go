//go:build gpu

package gpu

import (
	"context"
	"math"
	"testing"

	"github.com/m2train/m2train/model"
)

// TestGradsToHostAsync queues the copies of two gradient ranges right
// behind a backward pass, before it has finished, waits for one of them
// from another goroutine, and checks that together they give the host
// mirror the gradients SyncToHost gives, bit for bit; and the rules: a
// second wait fails, a range outside the gradients and the automatic mode
// are refused.
func TestGradsToHostAsync(t *testing.T) {
	ctx := context.Background()
	cfg := smallConfig()
	params := noisyParams(t, cfg, 21)
	b := randomBatch(cfg, 2, 33, 5)
	for _, p := range []Precision{F32, BF16} {
		m := newGPU(t, cfg, p, params)
		total := m.Layout().Total
		m.ZeroGrads()
		if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err != nil {
			t.Fatal(err)
		}
		want := gradsOf(t, m)
		nan := float32(math.NaN())
		for i := range m.Grads() {
			m.Grads()[i] = nan
		}
		// Again, and queue the copies while the pass may still run.
		m.ZeroGrads()
		if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err != nil {
			t.Fatal(err)
		}
		mid := total / 3
		upper, err := m.GradsToHostAsync(mid, total)
		if err != nil {
			t.Fatal(err)
		}
		lower, err := m.GradsToHostAsync(0, mid)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- upper() }()
		if err := lower(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		bad := 0
		for i, g := range m.Grads() {
			if math.Float32bits(g) != math.Float32bits(want[i]) {
				bad++
			}
		}
		if bad > 0 {
			t.Errorf("%s: %d of %d streamed gradients differ from SyncToHost's", p, bad, total)
		}
		if err := lower(); err == nil {
			t.Errorf("%s: a second wait for the same copy succeeded", p)
		}
		for _, r := range [][2]int{{-1, 3}, {5, 4}, {0, total + 1}} {
			if _, err := m.GradsToHostAsync(r[0], r[1]); err == nil {
				t.Errorf("%s: GradsToHostAsync(%d, %d) of %d gradients succeeded", p, r[0], r[1], total)
			}
		}
		if err := m.SetAutoSync(true); err != nil {
			t.Fatal(err)
		}
		if _, err := m.GradsToHostAsync(0, total); err == nil {
			t.Errorf("%s: GradsToHostAsync in automatic mode succeeded", p)
		}
	}
}
