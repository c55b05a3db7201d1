package collective_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/m2train/m2train/collective"
)

// tensor is one rank's buffer in the tests, of any element type.
type tensor struct {
	dt  collective.DType
	f32 []float32
	f64 []float64
	bf  []uint16
}

func newTensor(dt collective.DType, vals []float64) tensor {
	x := tensor{dt: dt}
	switch dt {
	case collective.Float32:
		for _, v := range vals {
			x.f32 = append(x.f32, float32(v))
		}
	case collective.Float64:
		x.f64 = slices.Clone(vals)
	case collective.BFloat16, collective.BFloat16Rounded:
		for _, v := range vals {
			x.bf = append(x.bf, collective.Float32ToBFloat16(float32(v)))
		}
	}
	return x
}

func zeroTensor(dt collective.DType, n int) tensor { return newTensor(dt, make([]float64, n)) }

func (x tensor) buf() collective.Buffer {
	switch x.dt {
	case collective.Float32:
		return collective.Float32s(x.f32)
	case collective.Float64:
		return collective.Float64s(x.f64)
	case collective.BFloat16Rounded:
		return collective.BFloat16sRounded(x.bf)
	default:
		return collective.BFloat16s(x.bf)
	}
}

func (x tensor) len() int { return max(len(x.f32), len(x.f64), len(x.bf)) }

// bits returns the bit pattern of element i.
func (x tensor) bits(i int) uint64 {
	switch x.dt {
	case collective.Float32:
		return uint64(math.Float32bits(x.f32[i]))
	case collective.Float64:
		return math.Float64bits(x.f64[i])
	default:
		return uint64(x.bf[i])
	}
}

func (x tensor) clone() tensor {
	return tensor{dt: x.dt, f32: slices.Clone(x.f32), f64: slices.Clone(x.f64), bf: slices.Clone(x.bf)}
}

// copyRange copies elements [lo, hi) of src into x.
func (x tensor) copyRange(src tensor, lo, hi int) {
	switch x.dt {
	case collective.Float32:
		copy(x.f32[lo:hi], src.f32[lo:hi])
	case collective.Float64:
		copy(x.f64[lo:hi], src.f64[lo:hi])
	default:
		copy(x.bf[lo:hi], src.bf[lo:hi])
	}
}

// sameBits reports the first element in [lo, hi) where got and want differ.
func sameBits(got, want tensor, lo, hi int) error {
	if got.len() != want.len() {
		return errorf("length %d, want %d", got.len(), want.len())
	}
	for i := lo; i < hi; i++ {
		if got.bits(i) != want.bits(i) {
			return errorf("element %d is %#x, want %#x", i, got.bits(i), want.bits(i))
		}
	}
	return nil
}

// reference computes the sum of ins sequentially, in the order the package
// promises: segment c starts with rank c+1 and adds the following ranks,
// received + local, with float32 accumulation for bfloat16 and a rounding
// to bfloat16 after every addition for rounded bfloat16.
func reference(ins []tensor) tensor {
	n, length, dt := len(ins), ins[0].len(), ins[0].dt
	out := zeroTensor(dt, length)
	for c := range n {
		lo, hi := collective.Segment(length, n, c)
		for i := lo; i < hi; i++ {
			first := ins[(c+1)%n]
			switch dt {
			case collective.Float32:
				acc := first.f32[i]
				for j := 2; j <= n; j++ {
					acc += ins[(c+j)%n].f32[i]
				}
				out.f32[i] = acc
			case collective.Float64:
				acc := first.f64[i]
				for j := 2; j <= n; j++ {
					acc += ins[(c+j)%n].f64[i]
				}
				out.f64[i] = acc
			case collective.BFloat16Rounded:
				acc := first.bf[i]
				for j := 2; j <= n; j++ {
					acc = collective.Float32ToBFloat16(collective.BFloat16ToFloat32(acc) + collective.BFloat16ToFloat32(ins[(c+j)%n].bf[i]))
				}
				out.bf[i] = acc
			default:
				acc := collective.BFloat16ToFloat32(first.bf[i])
				for j := 2; j <= n; j++ {
					acc += collective.BFloat16ToFloat32(ins[(c+j)%n].bf[i])
				}
				out.bf[i] = collective.Float32ToBFloat16(acc)
			}
		}
	}
	return out
}

func randomInputs(dt collective.DType, n, length int, seed uint64) []tensor {
	rng := rand.New(rand.NewPCG(seed, uint64(length)))
	ins := make([]tensor, n)
	for r := range ins {
		vals := make([]float64, length)
		for i := range vals {
			vals[i] = rng.NormFloat64() * 100
		}
		ins[r] = newTensor(dt, vals)
	}
	return ins
}

var dtypes = []collective.DType{collective.Float32, collective.Float64, collective.BFloat16, collective.BFloat16Rounded}

func lengths(n int) []int {
	ls := []int{0, 1, n - 1, n + 1, 3*1024*n + 5}
	slices.Sort(ls)
	return slices.Compact(ls)
}

func TestCollectives(t *testing.T) {
	for _, tc := range transports {
		t.Run(tc.name, func(t *testing.T) {
			for _, n := range []int{1, 2, 3, 4, 7, 16} {
				t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) {
					leakCheck(t)
					comms := tc.start(t, n, testConfig(t))
					for _, length := range lengths(n) {
						for _, dt := range dtypes {
							t.Run(fmt.Sprintf("len=%d/%s", length, dt), func(t *testing.T) {
								seed := uint64(n*1000 + length)
								t.Run("AllReduce", func(t *testing.T) { checkAllReduce(t, comms, randomInputs(dt, n, length, seed)) })
								t.Run("ReduceScatter", func(t *testing.T) { checkReduceScatter(t, comms, randomInputs(dt, n, length, seed+1)) })
								t.Run("AllGather", func(t *testing.T) { checkAllGather(t, comms, randomInputs(dt, n, length, seed+2)) })
								t.Run("Broadcast", func(t *testing.T) { checkBroadcast(t, comms, randomInputs(dt, n, length, seed+3), length%n) })
								t.Run("SendRecv", func(t *testing.T) { checkSendRecv(t, comms, randomInputs(dt, n, length, seed+4)) })
							})
						}
					}
					t.Run("Barrier", func(t *testing.T) {
						ctx := opCtx(t)
						for range 3 {
							mustAll(t, "Barrier", onAll(comms, func(_ int, c *collective.Communicator) error { return c.Barrier(ctx) }))
						}
					})
				})
			}
		})
	}
}

func checkAllReduce(t *testing.T, comms []*collective.Communicator, ins []tensor) {
	t.Helper()
	want := reference(ins)
	outs := make([]tensor, len(ins))
	for r := range ins {
		outs[r] = ins[r].clone()
	}
	ctx := opCtx(t)
	mustAll(t, "AllReduce", onAll(comms, func(r int, c *collective.Communicator) error { return c.AllReduce(ctx, outs[r].buf()) }))
	for r := range outs {
		if err := sameBits(outs[r], want, 0, want.len()); err != nil {
			t.Errorf("rank %d: %v", r, err)
		}
	}
}

func checkReduceScatter(t *testing.T, comms []*collective.Communicator, ins []tensor) {
	t.Helper()
	want := reference(ins)
	n := len(ins)
	outs := make([]tensor, n)
	for r := range ins {
		outs[r] = ins[r].clone()
	}
	ctx := opCtx(t)
	mustAll(t, "ReduceScatter", onAll(comms, func(r int, c *collective.Communicator) error { return c.ReduceScatter(ctx, outs[r].buf()) }))
	for r := range outs {
		lo, hi := collective.Segment(want.len(), n, r)
		if err := sameBits(outs[r], want, lo, hi); err != nil {
			t.Errorf("rank %d, segment [%d,%d): %v", r, lo, hi, err)
		}
	}
}

func checkAllGather(t *testing.T, comms []*collective.Communicator, ins []tensor) {
	t.Helper()
	n, length := len(ins), ins[0].len()
	want := zeroTensor(ins[0].dt, length)
	bufs := make([]tensor, n)
	for r := range ins {
		lo, hi := collective.Segment(length, n, r)
		want.copyRange(ins[r], lo, hi)
		// Everything but the rank's own segment is garbage to overwrite.
		bufs[r] = ins[(r+1)%n].clone()
		bufs[r].copyRange(ins[r], lo, hi)
	}
	ctx := opCtx(t)
	mustAll(t, "AllGather", onAll(comms, func(r int, c *collective.Communicator) error { return c.AllGather(ctx, bufs[r].buf()) }))
	for r := range bufs {
		if err := sameBits(bufs[r], want, 0, length); err != nil {
			t.Errorf("rank %d: %v", r, err)
		}
	}
}

func checkBroadcast(t *testing.T, comms []*collective.Communicator, ins []tensor, root int) {
	t.Helper()
	want := ins[root].clone()
	ctx := opCtx(t)
	mustAll(t, "Broadcast", onAll(comms, func(r int, c *collective.Communicator) error { return c.Broadcast(ctx, ins[r].buf(), root) }))
	for r := range ins {
		if err := sameBits(ins[r], want, 0, want.len()); err != nil {
			t.Errorf("rank %d (root %d): %v", r, root, err)
		}
	}
}

// checkSendRecv shifts every buffer one rank up the ring.
func checkSendRecv(t *testing.T, comms []*collective.Communicator, ins []tensor) {
	t.Helper()
	n := len(ins)
	if n == 1 {
		return
	}
	outs := make([]tensor, n)
	for r := range ins {
		outs[r] = zeroTensor(ins[r].dt, ins[r].len())
	}
	ctx := opCtx(t)
	mustAll(t, "SendRecv", onAll(comms, func(r int, c *collective.Communicator) error {
		errc := make(chan error, 1)
		go func() { errc <- c.Send(ctx, (r+1)%n, ins[r].buf()) }()
		rerr := c.Recv(ctx, (r+n-1)%n, outs[r].buf())
		if serr := <-errc; serr != nil {
			return serr
		}
		return rerr
	}))
	for r := range outs {
		if err := sameBits(outs[r], ins[(r+n-1)%n], 0, ins[r].len()); err != nil {
			t.Errorf("rank %d: %v", r, err)
		}
	}
}

// TestGrid checks the data- and sequence-parallel groups of a 2×3 grid:
// all-reduce within each dp group, and a state passed along each sp chain.
func TestGrid(t *testing.T) {
	for _, tc := range transports {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			const dp, sp = 2, 3
			comms := tc.start(t, dp*sp, testConfig(t))
			ctx := opCtx(t)
			const length = 5000
			vals := func(r int) []float32 {
				v := make([]float32, length)
				for i := range v {
					v[i] = float32(r*length + i)
				}
				return v
			}
			mustAll(t, "Grid", onAll(comms, func(r int, c *collective.Communicator) error {
				dpc, spc, err := c.Grid(dp, sp)
				if err != nil {
					return err
				}
				dpRank, spRank := r/sp, r%sp
				if dpc.Size() != dp || dpc.Rank() != dpRank || spc.Size() != sp || spc.Rank() != spRank {
					return errorf("dp group %d/%d, sp group %d/%d; want %d/%d and %d/%d",
						dpc.Rank(), dpc.Size(), spc.Rank(), spc.Size(), dpRank, dp, spRank, sp)
				}
				// Data parallel: sum over the dp ranks that share spRank.
				g := vals(r)
				if err := dpc.AllReduce(ctx, collective.Float32s(g)); err != nil {
					return err
				}
				for i, v := range g {
					var want float32
					for d := range dp {
						want += float32((d*sp+spRank)*length + i)
					}
					if v != want {
						return errorf("dp all-reduce element %d = %v, want %v", i, v, want)
					}
				}
				// Sequence parallel: each sp rank adds its rank to the state it
				// receives and passes it on.
				state := make([]float64, 64)
				if spRank > 0 {
					if err := spc.Recv(ctx, spRank-1, collective.Float64s(state)); err != nil {
						return err
					}
				}
				for i := range state {
					state[i] += float64(spRank + 1)
				}
				if spRank < sp-1 {
					if err := spc.Send(ctx, spRank+1, collective.Float64s(state)); err != nil {
						return err
					}
				}
				if want := float64((spRank + 1) * (spRank + 2) / 2); state[0] != want {
					return errorf("sp state %v, want %v", state[0], want)
				}
				if spRank == 0 {
					if dpc.WorldRank(1) != sp+spRank {
						return errorf("dp group rank 1 is world rank %d, want %d", dpc.WorldRank(1), sp+spRank)
					}
				}
				return spc.Barrier(ctx)
			}))
		})
	}
}

// TestAllReduceAsync shows that an asynchronous all-reduce runs while its
// caller goes on: rank 0's handles cannot finish before the other ranks
// join, yet AllReduceAsync has returned; meanwhile rank 0 keeps computing and
// runs a later collective.
func TestAllReduceAsync(t *testing.T) {
	for _, tc := range transports {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			const n, buckets, length = 4, 3, 20000
			comms := tc.start(t, n, testConfig(t))
			ctx := opCtx(t)
			ins := make([][]tensor, buckets)
			bufs := make([][]tensor, buckets)
			for b := range buckets {
				ins[b] = randomInputs(collective.Float32, n, length, uint64(b))
				for r := range n {
					bufs[b] = append(bufs[b], ins[b][r].clone())
				}
			}
			handles := make([][]*collective.Handle, n)
			for b := range buckets {
				handles[0] = append(handles[0], comms[0].AllReduceAsync(ctx, bufs[b][0].buf()))
			}
			for b, h := range handles[0] {
				select {
				case <-h.Done():
					t.Fatalf("bucket %d finished before the other ranks started: %v", b, h.Err())
				default:
				}
			}
			errs := onAll(comms, func(r int, c *collective.Communicator) error {
				if r != 0 {
					for b := range buckets {
						handles[r] = append(handles[r], c.AllReduceAsync(ctx, bufs[b][r].buf()))
					}
				}
				// Work that overlaps the reductions, then a later collective.
				x := 0.0
				for i := range 200000 {
					x += math.Sqrt(float64(i))
				}
				if x <= 0 {
					return errorf("bad work")
				}
				if err := c.Barrier(ctx); err != nil {
					return err
				}
				for b, h := range handles[r] {
					if err := h.Wait(ctx); err != nil {
						return errorf("bucket %d: %w", b, err)
					}
				}
				return nil
			})
			mustAll(t, "async", errs)
			for b := range buckets {
				want := reference(ins[b])
				for r := range n {
					if err := sameBits(bufs[b][r], want, 0, length); err != nil {
						t.Errorf("bucket %d, rank %d: %v", b, r, err)
					}
				}
			}
		})
	}
}

// TestBFloat16RoundedBytes checks what rounded bfloat16 is for: an
// all-reduce sends 2 bytes per element and hop where bfloat16 sends its
// partial sums as float32, and float32 4.
func TestBFloat16RoundedBytes(t *testing.T) {
	const n, length = 4, 4 * 1024
	comms := transports[0].start(t, n, testConfig(t))
	sent := func(dt collective.DType) int64 {
		ins := randomInputs(dt, n, length, 9)
		before := comms[0].Stats().BytesSent
		ctx := opCtx(t)
		mustAll(t, "AllReduce", onAll(comms, func(r int, c *collective.Communicator) error { return c.AllReduce(ctx, ins[r].buf()) }))
		return comms[0].Stats().BytesSent - before
	}
	seg := int64(length / n)
	for _, c := range []struct {
		dt   collective.DType
		want int64 // (n−1) hops of reduce-scatter, then (n−1) of all-gather
	}{
		{collective.Float32, (n-1)*seg*4 + (n-1)*seg*4},
		{collective.BFloat16, (n-1)*seg*4 + (n-1)*seg*2},
		{collective.BFloat16Rounded, (n-1)*seg*2 + (n-1)*seg*2},
	} {
		if got := sent(c.dt); got < c.want || got > c.want+c.want/10 {
			t.Errorf("%s: rank 0 sent %d bytes for %d elements over %d ranks, want %d of data (and little more)", c.dt, got, length, n, c.want)
		}
	}
}

func TestBFloat16Rounding(t *testing.T) {
	cases := []struct {
		in   float32
		want uint16
	}{
		{1, 0x3f80},
		{-2, 0xc000},
		{1 + 1.0/256, 0x3f80},            // tie, even stays
		{1 + 3.0/256, 0x3f82},            // tie, odd rounds up
		{1 + 1.0/256 + 1.0/4096, 0x3f81}, // above the tie
		{float32(math.Inf(1)), 0x7f80},
		{math.MaxFloat32, 0x7f80}, // rounds to infinity
	}
	for _, c := range cases {
		t.Run(fmt.Sprint(c.in), func(t *testing.T) {
			if got := collective.Float32ToBFloat16(c.in); got != c.want {
				t.Errorf("Float32ToBFloat16(%v) = %#x, want %#x", c.in, got, c.want)
			}
		})
	}
	if nan := collective.Float32ToBFloat16(float32(math.NaN())); !math.IsNaN(float64(collective.BFloat16ToFloat32(nan))) {
		t.Errorf("NaN became %#x", nan)
	}
}

func TestSegment(t *testing.T) {
	for _, c := range []struct{ n, size int }{{0, 1}, {0, 3}, {1, 3}, {10, 3}, {11, 4}, {64, 64}, {65, 64}} {
		t.Run(fmt.Sprintf("%d/%d", c.n, c.size), func(t *testing.T) {
			prev := 0
			for i := range c.size {
				lo, hi := collective.Segment(c.n, c.size, i)
				if lo != prev || hi < lo || hi-lo > c.n/c.size+1 || hi-lo < c.n/c.size {
					t.Fatalf("segment %d = [%d,%d) after %d", i, lo, hi, prev)
				}
				prev = hi
			}
			if prev != c.n {
				t.Fatalf("segments end at %d, want %d", prev, c.n)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	base := collective.DefaultConfig()
	if err := base.Validate(); err != nil {
		t.Fatalf("DefaultConfig: %v", err)
	}
	cases := []struct {
		name  string
		edit  func(*collective.Config)
		field string
	}{
		{"timeout", func(c *collective.Config) { c.Timeout = 0 }, "Config.Timeout"},
		{"heartbeat", func(c *collective.Config) { c.HeartbeatInterval = c.Timeout }, "Config.HeartbeatInterval"},
		{"chunk small", func(c *collective.Config) { c.ChunkSize = 100 }, "Config.ChunkSize"},
		{"chunk odd", func(c *collective.Config) { c.ChunkSize = 4097 }, "Config.ChunkSize"},
		{"streams", func(c *collective.Config) { c.StreamsPerPeer = 0 }, "Config.StreamsPerPeer"},
		{"window", func(c *collective.Config) { c.WindowSize = 1000 }, "Config.WindowSize"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := base
			c.edit(&cfg)
			err := cfg.Validate()
			if err == nil || !errorIs(err, collective.ErrInvalid) || !contains(err.Error(), c.field) {
				t.Fatalf("Validate = %v, want ErrInvalid naming %s", err, c.field)
			}
		})
	}
}
