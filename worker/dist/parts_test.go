package dist

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/model"
)

func TestPlanBuckets(t *testing.T) {
	for _, c := range []struct {
		total, size int
		want        []Range
	}{
		{10, 4, []Range{{6, 10}, {2, 6}, {0, 2}}},
		{8, 4, []Range{{4, 8}, {0, 4}}},
		{3, 10, []Range{{0, 3}}},
		{0, 4, nil},
	} {
		got, err := PlanBuckets(c.total, c.size)
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("PlanBuckets(%d, %d) = %v, %v; want %v", c.total, c.size, got, err, c.want)
		}
	}
	if _, err := PlanBuckets(10, 0); err == nil {
		t.Error("a bucket size of 0 was accepted")
	}
}

func TestLayerEnds(t *testing.T) {
	cfg := tinyConfig()
	l := model.NewLayout(cfg)
	ends, err := LayerEnds(l, cfg.NLayer)
	if err != nil {
		t.Fatal(err)
	}
	if ends[0] != l.Layer(1).Norm.Offset || ends[1] != l.Must(model.NameNormF).Offset {
		t.Errorf("layer ends %v, want the offsets of layer 1 (%d) and of the final norm (%d)", ends, l.Layer(1).Norm.Offset, l.Must(model.NameNormF).Offset)
	}
	if _, err := LayerEnds(l, cfg.NLayer+1); err == nil {
		t.Error("a layer the layout lacks was accepted")
	}
}

func randomSlice[T model.Float](rng *rand.Rand, n int, scale float64) []T {
	s := make([]T, n)
	for i := range s {
		s[i] = T(rng.NormFloat64() * scale)
	}
	return s
}

// TestShardedAdamWIsBitwise checks that AdamW over the ShardLayout of each
// owned range updates the parameters and moments exactly as the optimizer
// over the whole buffer, weight decay per tensor included, for ranges that
// cut tensors anywhere.
func TestShardedAdamWIsBitwise(t *testing.T) {
	t.Run("float64", func(t *testing.T) { testShardedAdamW[float64](t) })
	t.Run("float32", func(t *testing.T) { testShardedAdamW[float32](t) })
}

func testShardedAdamW[T model.Float](t *testing.T) {
	cfg := tinyConfig()
	l := model.NewLayout(cfg)
	rng := rand.New(rand.NewPCG(1, 2))
	p0 := randomSlice[T](rng, l.Total, 0.1)
	grads := [3][]T{randomSlice[T](rng, l.Total, 1), randomSlice[T](rng, l.Total, 1), randomSlice[T](rng, l.Total, 1)}
	ac := model.DefaultAdamWConfig()
	whole, err := model.NewAdamW[T](l, ac)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]T(nil), p0...)
	for i, g := range grads {
		whole.Update(want, g, 0.01*float64(i+1))
	}
	for _, size := range []int{1, 3, 4, 7} {
		got := append([]T(nil), p0...)
		for r := range size {
			own := OwnedRange(l.Total, size, r)
			opt, err := model.NewAdamW[T](ShardLayout(l, own), ac)
			if err != nil {
				t.Fatal(err)
			}
			for i, g := range grads {
				opt.Update(got[own.Lo:own.Hi], g[own.Lo:own.Hi], 0.01*float64(i+1))
			}
			for i := range opt.M {
				if opt.M[i] != whole.M[own.Lo+i] || opt.V[i] != whole.V[own.Lo+i] {
					t.Fatalf("%d ranks, rank %d: moments differ at %d", size, r, own.Lo+i)
				}
			}
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("%d ranks: parameter %d is %v, the whole-buffer update gives %v", size, i, got[i], want[i])
			}
		}
	}
}

// TestZeROMatchesAllReduce runs one ZeRO-1 step on 3 ranks and compares it
// with the all-reduce of the whole gradients followed by the whole-buffer
// AdamW: the reduced gradients are the same sums, so the parameters agree
// in every bit when clipping is off, and the gradient norm to rounding.
// Then the moments gathered to rank 1 are the whole optimizer's.
func TestZeROMatchesAllReduce(t *testing.T) {
	const n = 3
	cfg := tinyConfig()
	l := model.NewLayout(cfg)
	comms := memComms(t, n)
	rng := rand.New(rand.NewPCG(3, 4))
	p0 := randomSlice[float32](rng, l.Total, 0.1)
	var grads [n][]float32
	for r := range n {
		grads[r] = randomSlice[float32](rng, l.Total, 1)
	}
	ctx := context.Background()
	ac := model.DefaultAdamWConfig()

	// The reference: all-reduce, then the whole-buffer update on rank 0's copy.
	sum := make([][]float32, n)
	onAll(t, n, func(r int) error {
		sum[r] = append([]float32(nil), grads[r]...)
		return comms[r].AllReduce(ctx, collective.Float32s(sum[r]))
	})
	whole, err := model.NewAdamW[float32](l, ac)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]float32(nil), p0...)
	wantNorm := model.GradNorm(sum[0])
	whole.Update(want, sum[0], 0.01)

	params := make([][]float32, n)
	norms := make([]float64, n)
	fullM, fullV := make([]float32, l.Total), make([]float32, l.Total)
	onAll(t, n, func(r int) error {
		z, err := NewZeRO[float32](comms[r], l, ac)
		if err != nil {
			return err
		}
		g := append([]float32(nil), grads[r]...)
		params[r] = append([]float32(nil), p0...)
		if err := z.ReduceScatter(ctx, g); err != nil {
			return err
		}
		if norms[r], err = z.GradNorm(ctx, g); err != nil {
			return err
		}
		if err := z.UpdateShard(params[r], g, 0.01, 1); err != nil {
			return err
		}
		if err := z.GatherParams(ctx, params[r]); err != nil {
			return err
		}
		var m, v []float32
		if r == 1 {
			m, v = fullM, fullV
		}
		return z.GatherMoments(ctx, 1, m, v)
	})
	for r := range n {
		for i := range want {
			if params[r][i] != want[i] {
				t.Fatalf("rank %d: parameter %d is %v, the all-reduce path gives %v", r, i, params[r][i], want[i])
			}
		}
		if math.Float64bits(norms[r]) != math.Float64bits(norms[0]) {
			t.Errorf("rank %d: norm %v, rank 0 %v", r, norms[r], norms[0])
		}
	}
	if e := math.Abs(norms[0]-wantNorm) / wantNorm; e > 1e-12 {
		t.Errorf("sharded gradient norm %v, whole %v", norms[0], wantNorm)
	}
	if !reflect.DeepEqual(fullM, whole.M) || !reflect.DeepEqual(fullV, whole.V) {
		t.Error("the moments gathered to rank 1 are not the whole optimizer's")
	}
}

// TestReducerOverlap starts buckets as a backward pass would report its
// progress and checks that every rank ends with the same bits, the sums of
// one all-reduce of the whole buffer to rounding (each bucket's ring starts
// its chains at other ranks).
func TestReducerOverlap(t *testing.T) {
	const n, total = 3, 1000
	comms := memComms(t, n)
	rng := rand.New(rand.NewPCG(5, 6))
	var grads [n][]float64
	for r := range n {
		grads[r] = randomSlice[float64](rng, total, 1)
	}
	ctx := context.Background()
	want := make([][]float64, n)
	onAll(t, n, func(r int) error {
		want[r] = append([]float64(nil), grads[r]...)
		return comms[r].AllReduce(ctx, collective.Float64s(want[r]))
	})
	got := make([][]float64, n)
	stats := make([][2]int, n)
	onAll(t, n, func(r int) error {
		got[r] = append([]float64(nil), grads[r]...)
		red, err := NewReducer(comms[r], got[r], 128)
		if err != nil {
			return err
		}
		red.Begin(ctx)
		red.Ready(900) // bucket [872, 1000)
		red.Ready(600) // [616, 744), [744, 872)
		if err := red.Finish(ctx); err != nil {
			return err
		}
		over, all, _ := red.Stats()
		stats[r] = [2]int{over, all}
		return nil
	})
	for r := range n {
		if !reflect.DeepEqual(got[r], got[0]) {
			t.Errorf("rank %d: bucketed sums differ from rank 0's", r)
		}
		for i := range got[r] {
			if math.Abs(got[r][i]-want[0][i]) > 1e-15*(1+math.Abs(want[0][i])) {
				t.Fatalf("rank %d: element %d is %v, the whole all-reduce gives %v", r, i, got[r][i], want[0][i])
			}
		}
		if stats[r] != [2]int{3, 8} {
			t.Errorf("rank %d: %d of %d buckets overlapped, want 3 of 8", r, stats[r][0], stats[r][1])
		}
	}
}

// TestReducerReadyAfter hands the reducer gradients that reach its buffer
// only inside the wait functions, as a device's asynchronous copies do: the
// buffer starts as garbage, each wait writes its range, and the result must
// be the all-reduce of the real values, with the waits called in order and
// exactly once, and a failing wait reported by Finish.
func TestReducerReadyAfter(t *testing.T) {
	const n, total = 3, 1000
	comms := memComms(t, n)
	rng := rand.New(rand.NewPCG(7, 8))
	var grads [n][]float64
	for r := range n {
		grads[r] = randomSlice[float64](rng, total, 1)
	}
	ctx := context.Background()
	want := append([]float64(nil), grads[0]...)
	for r := 1; r < n; r++ {
		for i := range want {
			want[i] += grads[r][i]
		}
	}
	got := make([][]float64, n)
	calls := make([][]int, n)
	onAll(t, n, func(r int) error {
		got[r] = make([]float64, total)
		for i := range got[r] {
			got[r][i] = math.NaN() // what a reduction started too early would sum
		}
		red, err := NewReducer(comms[r], got[r], 128)
		if err != nil {
			return err
		}
		var mu sync.Mutex
		arrive := func(id, lo, hi int) func() error {
			return func() error {
				mu.Lock()
				calls[r] = append(calls[r], id)
				mu.Unlock()
				copy(got[r][lo:hi], grads[r][lo:hi])
				return nil
			}
		}
		red.Begin(ctx)
		red.ReadyAfter(900, arrive(1, 900, total)) // bucket [872, 1000) needs [872, 900) too
		red.ReadyAfter(850, arrive(2, 850, 900))   // [744, 872) not yet: it needs [744, 850)
		red.ReadyAfter(600, arrive(3, 480, 850))
		red.Ready(480) // a plain Ready keeps its place behind the waits: [488, 616)
		if err := red.FinishAfter(ctx, arrive(4, 0, 480)); err != nil {
			return err
		}
		if over, all, _ := red.Stats(); over != 4 || all != 8 {
			return fmt.Errorf("%d of %d buckets overlapped, want 4 of 8", over, all)
		}
		return nil
	})
	for r := range n {
		if !reflect.DeepEqual(calls[r], []int{1, 2, 3, 4}) {
			t.Errorf("rank %d: waits called in the order %v, want [1 2 3 4]", r, calls[r])
		}
		for i := range got[r] {
			if math.IsNaN(got[r][i]) || math.Abs(got[r][i]-want[i]) > 1e-12*(1+math.Abs(want[i])) {
				t.Fatalf("rank %d: element %d is %v, want %v", r, i, got[r][i], want[i])
			}
		}
	}
	// A failed wait: nothing after it starts, and every rank reports it.
	boom := errors.New("copy failed")
	onAll(t, n, func(r int) error {
		red, err := NewReducer(comms[r], make([]float64, total), 128)
		if err != nil {
			return err
		}
		red.Begin(ctx)
		var later bool
		red.ReadyAfter(900, func() error { return boom })
		red.ReadyAfter(600, func() error { later = true; return nil })
		err = red.Finish(ctx)
		if !errors.Is(err, boom) || !later {
			return fmt.Errorf("Finish after a failed wait: %v (later wait called: %v), want the wait's error and every wait called", err, later)
		}
		return nil
	})
}

// TestGatherShards gathers the owned ranges of 4 ranks to rank 2.
func TestGatherShards(t *testing.T) {
	const n, total = 4, 10
	comms := memComms(t, n)
	full := make([]float64, total)
	onAll(t, n, func(r int) error {
		own := OwnedRange(total, n, r)
		shard := make([]float64, own.Len())
		for i := range shard {
			shard[i] = float64(own.Lo + i)
		}
		var dst []float64
		if r == 2 {
			dst = full
		}
		return GatherShards(context.Background(), comms[r], 2, shard, dst)
	})
	for i, v := range full {
		if v != float64(i) {
			t.Fatalf("gathered %v", full)
		}
	}
}

// TestBoundaryRejectsMisuse checks the errors of calls that break the
// protocol.
func TestBoundaryRejectsMisuse(t *testing.T) {
	cfg := tinyConfig()
	ctx := context.Background()
	comms := memComms(t, 2)
	seq, err := NewBoundary[float32](comms[0], cfg, model.SPSequential)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := seq.RecvBackward(ctx, 0); err == nil || !strings.Contains(err.Error(), "Begin") {
		t.Errorf("a call before Begin: %v", err)
	}
	seq.Begin(2, nil)
	if err := seq.SendForward(ctx, 2, nil, nil); err == nil || !strings.Contains(err.Error(), "layer 2") {
		t.Errorf("layer 2 of a 2-layer model: %v", err)
	}
	if err := seq.SendForward(ctx, 0, make([]float64, 3), nil); err == nil || !strings.Contains(err.Error(), "3 elements") {
		t.Errorf("a state of 3 values: %v", err)
	}
	if _, err := seq.PrefixForward(ctx, 0, nil, nil); err == nil || !strings.Contains(err.Error(), "sequential") {
		t.Errorf("PrefixForward in the sequential mode: %v", err)
	}
	pre, err := NewBoundary[float32](comms[0], cfg, model.SPPrefix)
	if err != nil {
		t.Fatal(err)
	}
	pre.Begin(2, nil)
	if err := pre.SendForward(ctx, 0, make([]float64, 2*cfg.NHeads*cfg.HeadDim*cfg.DState), nil); err == nil || !strings.Contains(err.Error(), "parallel-prefix") {
		t.Errorf("a state sent point to point in the prefix mode: %v", err)
	}
	if _, err := pre.PrefixForward(ctx, 0, make([]float64, 5), make([]float64, 2*cfg.NHeads)); err == nil || !strings.Contains(err.Error(), "want") {
		t.Errorf("a final state of 5 values: %v", err)
	}
	if _, err := NewBoundary[float32](nil, cfg, model.SPMode(7)); err == nil {
		t.Error("an unknown mode was accepted")
	}
	if err := seq.Flush(ctx); err != nil {
		t.Errorf("flush with nothing sent: %v", err)
	}
}
