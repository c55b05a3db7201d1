package dist

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/model"
)

// Boundary is the model.Boundary of one rank of a sequence-parallel group:
// shard k of K contiguous shards of the same micro-batch rows, the group
// being a collective.Communicator whose rank k holds shard k. In the
// sequential mode (MAMBA2_SPEC.md §5.2) the forward pass of every layer
// receives the SSM state and conv halo from rank k−1 and sends its own to
// rank k+1; the backward pass sends their gradients the other way. In the
// parallel-prefix mode (§5.3) only the halos travel point to point and the
// states are combined by an all-gather of the per-shard (final state,
// log-decay) pairs, so that every shard scans at once.
//
// Values travel in the backend's precision T (float32 for training, float64
// for the tests), which is the precision the backend keeps its running
// state in: the state crosses a shard boundary exactly as the unsplit scan
// carries it from one chunk to the next.
//
// Sends are asynchronous, in the order they are made: SendForward returns
// once the values are copied, so that shard k goes on with layer ℓ+1 while
// shard k+1 receives layer ℓ's state (the wavefront of §5.2). Flush waits
// until every send has been received.
//
// A Boundary with a nil communicator (or a group of one rank) moves
// nothing; it still reports the progress of the backward pass to the hook
// given to Begin, which is how a data-parallel run without sequence
// parallelism learns when a gradient bucket is final.
//
// A Boundary is used by one pass at a time; Begin starts each pass.
type Boundary[T model.Float] struct {
	comm       *collective.Communicator
	mode       model.SPMode
	k, K       int
	layers     int
	cfg        model.Config
	rows       int
	stateLen   int
	haloLen    int
	decayLen   int
	onBackward func(layer int)
	hooked     int // the lowest layer whose backward was reported this pass

	sends sendChain
	wait  time.Duration // time blocked receiving, since the last ResetWait
}

var _ model.PrefixBoundary = (*Boundary[float32])(nil)

// NewBoundary returns the boundary of this rank of the sequence-parallel
// group comm for a model of configuration cfg, in the given mode. comm may
// be nil for a rank that is alone in its group.
func NewBoundary[T model.Float](comm *collective.Communicator, cfg model.Config, mode model.SPMode) (*Boundary[T], error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if mode != model.SPSequential && mode != model.SPPrefix {
		return nil, fmt.Errorf("dist: sequence-parallel mode %v is not one of %v, %v", mode, model.SPSequential, model.SPPrefix)
	}
	b := &Boundary[T]{comm: comm, mode: mode, K: 1, layers: cfg.NLayer, cfg: cfg, hooked: cfg.NLayer}
	if comm != nil {
		b.k, b.K = comm.Rank(), comm.Size()
	}
	return b, nil
}

// Begin prepares the boundary for a pass over a micro-batch of rows
// sequences. onBackward, if not nil, is called in the backward pass with
// layer ℓ at the first boundary call of layer ℓ, which a layer-by-layer
// backend makes only after it finished the backward of every layer above
// ℓ; it is called once per layer, from the backend's goroutine.
func (b *Boundary[T]) Begin(rows int, onBackward func(layer int)) {
	c := b.cfg
	b.rows = rows
	b.stateLen = rows * c.NHeads * c.HeadDim * c.DState
	b.haloLen = rows * (c.DConv - 1) * c.ConvDim()
	b.decayLen = rows * c.NHeads
	b.onBackward = onBackward
	b.hooked = b.layers
}

// Mode implements model.PrefixBoundary.
func (b *Boundary[T]) Mode() model.SPMode { return b.mode }

// Shard returns k and K: this rank's shard and the number of shards.
func (b *Boundary[T]) Shard() (k, K int) { return b.k, b.K }

// WaitTime returns the time spent blocked receiving (point-to-point and in
// the prefix all-gathers) since the last ResetWait: the exposed
// communication of sequence parallelism, pipeline bubbles included.
func (b *Boundary[T]) WaitTime() time.Duration { return b.wait }

// ResetWait sets WaitTime back to zero.
func (b *Boundary[T]) ResetWait() { b.wait = 0 }

func (b *Boundary[T]) backward(layer int) {
	if layer < b.hooked {
		b.hooked = layer
		if b.onBackward != nil {
			b.onBackward(layer)
		}
	}
}

func (b *Boundary[T]) checkLayer(layer int) error {
	if layer < 0 || layer >= b.layers {
		return fmt.Errorf("dist: boundary call for layer %d of a %d-layer model", layer, b.layers)
	}
	if b.rows == 0 {
		return errors.New("dist: boundary used before Begin")
	}
	return nil
}

// pack copies the parts into one message, zeros for a nil part.
func pack[T model.Float](parts [][]float64, lens []int) ([]T, error) {
	n := 0
	for _, l := range lens {
		n += l
	}
	msg := make([]T, n)
	off := 0
	for i, p := range parts {
		if p != nil && len(p) != lens[i] {
			return nil, fmt.Errorf("dist: boundary value of %d elements, want %d", len(p), lens[i])
		}
		putFloat64(msg[off:off+lens[i]], p)
		off += lens[i]
	}
	return msg, nil
}

func (b *Boundary[T]) recv(ctx context.Context, peer int, n int) ([]T, error) {
	msg := make([]T, n)
	start := time.Now()
	err := b.comm.Recv(ctx, peer, bufferOf(msg))
	b.wait += time.Since(start)
	return msg, err
}

// RecvForward implements model.Boundary: shard 0 gets zeros (nil), every
// other shard the state (sequential mode only) and halo of shard k−1.
func (b *Boundary[T]) RecvForward(ctx context.Context, layer int) (state, halo []float64, err error) {
	if err := b.checkLayer(layer); err != nil {
		return nil, nil, err
	}
	if b.k == 0 {
		return nil, nil, nil
	}
	if b.mode == model.SPPrefix {
		msg, err := b.recv(ctx, b.k-1, b.haloLen)
		if err != nil {
			return nil, nil, fmt.Errorf("dist: layer %d: halo from shard %d: %w", layer, b.k-1, err)
		}
		return nil, model.BoundaryFloat64s(msg), nil
	}
	msg, err := b.recv(ctx, b.k-1, b.stateLen+b.haloLen)
	if err != nil {
		return nil, nil, fmt.Errorf("dist: layer %d: state from shard %d: %w", layer, b.k-1, err)
	}
	return model.BoundaryFloat64s(msg[:b.stateLen]), model.BoundaryFloat64s(msg[b.stateLen:]), nil
}

// SendForward implements model.Boundary: the last shard sends nothing.
func (b *Boundary[T]) SendForward(ctx context.Context, layer int, state, halo []float64) error {
	if err := b.checkLayer(layer); err != nil {
		return err
	}
	if b.k == b.K-1 {
		return nil
	}
	var msg []T
	var err error
	if b.mode == model.SPPrefix {
		if state != nil {
			return fmt.Errorf("dist: layer %d: a state sent point to point in the parallel-prefix mode", layer)
		}
		msg, err = pack[T]([][]float64{halo}, []int{b.haloLen})
	} else {
		msg, err = pack[T]([][]float64{state, halo}, []int{b.stateLen, b.haloLen})
	}
	if err != nil {
		return fmt.Errorf("%w (layer %d, forward)", err, layer)
	}
	return b.sends.send(ctx, b.comm, b.k+1, bufferOf(msg))
}

// RecvBackward implements model.Boundary: the last shard gets zeros (nil),
// every other shard the gradients of its final state (sequential mode
// only) and of the halo it sent, from shard k+1.
func (b *Boundary[T]) RecvBackward(ctx context.Context, layer int) (dState, dHalo []float64, err error) {
	if err := b.checkLayer(layer); err != nil {
		return nil, nil, err
	}
	b.backward(layer)
	if b.k == b.K-1 {
		return nil, nil, nil
	}
	if b.mode == model.SPPrefix {
		msg, err := b.recv(ctx, b.k+1, b.haloLen)
		if err != nil {
			return nil, nil, fmt.Errorf("dist: layer %d: halo gradient from shard %d: %w", layer, b.k+1, err)
		}
		return nil, model.BoundaryFloat64s(msg), nil
	}
	msg, err := b.recv(ctx, b.k+1, b.stateLen+b.haloLen)
	if err != nil {
		return nil, nil, fmt.Errorf("dist: layer %d: state gradient from shard %d: %w", layer, b.k+1, err)
	}
	return model.BoundaryFloat64s(msg[:b.stateLen]), model.BoundaryFloat64s(msg[b.stateLen:]), nil
}

// SendBackward implements model.Boundary: shard 0 sends nothing.
func (b *Boundary[T]) SendBackward(ctx context.Context, layer int, dState, dHalo []float64) error {
	if err := b.checkLayer(layer); err != nil {
		return err
	}
	b.backward(layer)
	if b.k == 0 {
		return nil
	}
	var msg []T
	var err error
	if b.mode == model.SPPrefix {
		if dState != nil {
			return fmt.Errorf("dist: layer %d: a state gradient sent point to point in the parallel-prefix mode", layer)
		}
		msg, err = pack[T]([][]float64{dHalo}, []int{b.haloLen})
	} else {
		msg, err = pack[T]([][]float64{dState, dHalo}, []int{b.stateLen, b.haloLen})
	}
	if err != nil {
		return fmt.Errorf("%w (layer %d, backward)", err, layer)
	}
	return b.sends.send(ctx, b.comm, b.k-1, bufferOf(msg))
}

// gatherPairs all-gathers every shard's (x, Λ) pair, x of stateLen and Λ
// of decayLen values, and returns them by shard.
func (b *Boundary[T]) gatherPairs(ctx context.Context, x, logDecay []float64) (xs, decays [][]T, err error) {
	if len(x) != b.stateLen || len(logDecay) != b.decayLen {
		return nil, nil, fmt.Errorf("dist: prefix scan of a state of %d and a log-decay of %d values, want %d and %d", len(x), len(logDecay), b.stateLen, b.decayLen)
	}
	seg := b.stateLen + b.decayLen
	all := make([]T, b.K*seg)
	mine := all[b.k*seg : (b.k+1)*seg]
	putFloat64(mine[:b.stateLen], x)
	putFloat64(mine[b.stateLen:], logDecay)
	start := time.Now()
	err = b.comm.AllGather(ctx, bufferOf(all))
	b.wait += time.Since(start)
	if err != nil {
		return nil, nil, err
	}
	for j := range b.K {
		s := all[j*seg : (j+1)*seg]
		xs = append(xs, s[:b.stateLen])
		decays = append(decays, s[b.stateLen:])
	}
	return xs, decays, nil
}

// PrefixForward implements model.PrefixBoundary: h_in[k], the state that
// enters shard k, from the zero-state final states S_j and log-decays Λ_j
// of the shards j < k, by the forward recurrence h_in[j+1] =
// exp(Λ_j)·h_in[j] + S_j evaluated in float64 (model.PrefixState).
func (b *Boundary[T]) PrefixForward(ctx context.Context, layer int, final, logDecay []float64) ([]float64, error) {
	if err := b.checkLayer(layer); err != nil {
		return nil, err
	}
	if b.mode != model.SPPrefix {
		return nil, fmt.Errorf("dist: layer %d: PrefixForward on a boundary in the %v mode", layer, b.mode)
	}
	if b.K == 1 {
		return nil, nil
	}
	ss, decays, err := b.gatherPairs(ctx, final, logDecay)
	if err != nil {
		return nil, fmt.Errorf("dist: layer %d: gathering the shards' final states: %w", layer, err)
	}
	var states, logDecays [][]float64
	for j := 0; j < b.k; j++ {
		states, logDecays = append(states, model.BoundaryFloat64s(ss[j])), append(logDecays, model.BoundaryFloat64s(decays[j]))
	}
	return model.PrefixState(states, logDecays)
}

// PrefixBackward implements model.PrefixBoundary: g[k], the gradient of
// shard k's true final state, from the initial-state gradients U_j and
// log-decays Λ_j of the shards j > k, by the backward recurrence g[j−1] =
// exp(Λ_j)·g[j] + U_j evaluated in float64 (model.PrefixGrad).
func (b *Boundary[T]) PrefixBackward(ctx context.Context, layer int, logDecay, dHin []float64) ([]float64, error) {
	if err := b.checkLayer(layer); err != nil {
		return nil, err
	}
	b.backward(layer)
	if b.mode != model.SPPrefix {
		return nil, fmt.Errorf("dist: layer %d: PrefixBackward on a boundary in the %v mode", layer, b.mode)
	}
	if b.K == 1 {
		return nil, nil
	}
	us, decays, err := b.gatherPairs(ctx, dHin, logDecay)
	if err != nil {
		return nil, fmt.Errorf("dist: layer %d: gathering the shards' state gradients: %w", layer, err)
	}
	var dHins, logDecays [][]float64
	for j := b.k + 1; j < b.K; j++ {
		dHins, logDecays = append(dHins, model.BoundaryFloat64s(us[j])), append(logDecays, model.BoundaryFloat64s(decays[j]))
	}
	return model.PrefixGrad(dHins, logDecays)
}

// Flush waits until every send made so far has been received and returns
// the first send that failed, if one did. Call it after each pass.
func (b *Boundary[T]) Flush(ctx context.Context) error {
	start := time.Now()
	err := b.sends.flush(ctx)
	b.wait += time.Since(start)
	return err
}

// sendChain runs sends one after the other in the background, in the order
// they were made: point-to-point messages between two ranks are matched in
// the order the sends are issued, so each send starts only after the one
// before it returned.
type sendChain struct {
	mu   sync.Mutex
	last chan struct{} // closed when the newest send has returned
	err  error         // the first failure
}

func (c *sendChain) failure() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// send queues buf for peer and returns at once, or returns the failure of
// an earlier send.
func (c *sendChain) send(ctx context.Context, comm *collective.Communicator, peer int, buf collective.Buffer) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	prev := c.last
	done := make(chan struct{})
	c.last = done
	c.mu.Unlock()
	go func() {
		defer close(done)
		if prev != nil {
			<-prev
		}
		if c.failure() != nil {
			return
		}
		if err := comm.Send(ctx, peer, buf); err != nil {
			c.mu.Lock()
			if c.err == nil {
				c.err = fmt.Errorf("dist: send to shard %d: %w", peer, err)
			}
			c.mu.Unlock()
		}
	}()
	return nil
}

// flush waits for the newest send (and so for all of them).
func (c *sendChain) flush(ctx context.Context) error {
	c.mu.Lock()
	last := c.last
	c.mu.Unlock()
	if last != nil {
		select {
		case <-last:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return c.failure()
}
