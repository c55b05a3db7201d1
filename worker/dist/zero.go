package dist

import (
	"context"
	"fmt"
	"math"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/model"
)

// OwnedRange returns the part of a flat buffer of total elements that rank
// owns among size ranks under ZeRO-1: collective.Segment's split, the one
// that ReduceScatter leaves reduced and AllGather collects.
func OwnedRange(total, size, rank int) Range {
	lo, hi := collective.Segment(total, size, rank)
	return Range{Lo: lo, Hi: hi}
}

// ShardLayout returns the layout of the part r of the buffers of l: every
// tensor of l clipped to r, with offsets relative to r.Lo. A model.AdamW
// over it updates the shard exactly as the whole-buffer optimizer updates
// those elements, weight decay per tensor included.
func ShardLayout(l *model.Layout, r Range) *model.Layout {
	out := &model.Layout{Total: r.Len()}
	for _, t := range l.Tensors {
		lo, hi := max(t.Offset, r.Lo), min(t.Offset+t.Size, r.Hi)
		if lo >= hi {
			continue
		}
		c := t
		c.Offset, c.Size = lo-r.Lo, hi-lo
		c.Shape = []int{hi - lo}
		out.Tensors = append(out.Tensors, c)
	}
	return out
}

// ZeRO shards the optimizer of a flat parameter buffer over the ranks of a
// communicator (ZeRO stage 1): the gradients are reduce-scattered instead
// of all-reduced, each rank keeps AdamW's moments of its own range only and
// updates that range of the parameters, and an all-gather gives every rank
// the whole updated parameters. The clipping norm is computed from the
// owned ranges and combined in rank order, so every rank clips alike.
type ZeRO[T model.Float] struct {
	comm  *collective.Communicator
	total int
	own   Range
	opt   *model.AdamW[T]
}

// NewZeRO returns the ZeRO-1 state of this rank of comm for parameters of
// layout, with AdamW's hyperparameters cfg and zero moments.
func NewZeRO[T model.Float](comm *collective.Communicator, layout *model.Layout, cfg model.AdamWConfig) (*ZeRO[T], error) {
	if comm == nil {
		return nil, fmt.Errorf("dist: ZeRO-1 without a communicator")
	}
	own := OwnedRange(layout.Total, comm.Size(), comm.Rank())
	opt, err := model.NewAdamW[T](ShardLayout(layout, own), cfg)
	if err != nil {
		return nil, err
	}
	return &ZeRO[T]{comm: comm, total: layout.Total, own: own, opt: opt}, nil
}

// Own returns the range of the flat buffers this rank owns.
func (z *ZeRO[T]) Own() Range { return z.own }

// Optimizer returns the optimizer of the owned range: its M and V hold the
// moments of Own() and its Step counts the updates.
func (z *ZeRO[T]) Optimizer() *model.AdamW[T] { return z.opt }

// ReduceScatter sums grads over the ranks, leaving the sum of Own() in
// place; the rest of grads is scratch afterwards.
func (z *ZeRO[T]) ReduceScatter(ctx context.Context, grads []T) error {
	if len(grads) != z.total {
		return fmt.Errorf("dist: ZeRO-1 reduce-scatter of %d gradients, want %d", len(grads), z.total)
	}
	if err := z.comm.ReduceScatter(ctx, bufferOf(grads)); err != nil {
		return fmt.Errorf("dist: ZeRO-1 reduce-scatter of the gradients: %w", err)
	}
	return nil
}

// GradNorm returns the L2 norm of the whole reduced gradient from the owned
// ranges: each rank's sum of squares (float64, in order) is all-gathered
// and the sums are added in rank order, so every rank gets the same bits.
func (z *ZeRO[T]) GradNorm(ctx context.Context, grads []T) (float64, error) {
	parts := make([]float64, z.comm.Size())
	var s float64
	for _, v := range grads[z.own.Lo:z.own.Hi] {
		s += float64(v) * float64(v)
	}
	parts[z.comm.Rank()] = s
	if err := z.comm.AllGather(ctx, collective.Float64s(parts)); err != nil {
		return 0, fmt.Errorf("dist: ZeRO-1 gradient norm: %w", err)
	}
	var sum float64
	for _, v := range parts {
		sum += v
	}
	return math.Sqrt(sum), nil
}

// UpdateShard multiplies the owned gradients by clipScale (when it is
// below 1, as model.ClipGrads does) and applies AdamW with learning rate lr
// to the owned range of params. GatherParams then gives every rank the
// whole updated parameters.
func (z *ZeRO[T]) UpdateShard(params, grads []T, lr, clipScale float64) error {
	if len(params) != z.total || len(grads) != z.total {
		return fmt.Errorf("dist: ZeRO-1 update of %d parameters and %d gradients, want %d", len(params), len(grads), z.total)
	}
	g := grads[z.own.Lo:z.own.Hi]
	if clipScale < 1 {
		c := T(clipScale)
		for i := range g {
			g[i] *= c
		}
	}
	z.opt.Update(params[z.own.Lo:z.own.Hi], g, lr)
	return nil
}

// GatherParams all-gathers the parameters: every rank contributes its
// owned range and receives the others'.
func (z *ZeRO[T]) GatherParams(ctx context.Context, params []T) error {
	if len(params) != z.total {
		return fmt.Errorf("dist: ZeRO-1 all-gather of %d parameters, want %d", len(params), z.total)
	}
	if err := z.comm.AllGather(ctx, bufferOf(params)); err != nil {
		return fmt.Errorf("dist: ZeRO-1 all-gather of the parameters: %w", err)
	}
	return nil
}

// GatherMoments collects the whole moments on rank root into m and v
// (len Total; ignored elsewhere), each rank sending its own range.
func (z *ZeRO[T]) GatherMoments(ctx context.Context, root int, m, v []T) error {
	if err := GatherShards(ctx, z.comm, root, z.opt.M, m); err != nil {
		return fmt.Errorf("dist: ZeRO-1 gathering the first moments: %w", err)
	}
	if err := GatherShards(ctx, z.comm, root, z.opt.V, v); err != nil {
		return fmt.Errorf("dist: ZeRO-1 gathering the second moments: %w", err)
	}
	return nil
}

// SetMoments loads this rank's range of whole moments m and v (from a
// checkpoint, which keeps them whole) and the optimizer step.
func (z *ZeRO[T]) SetMoments(m, v []T, step int64) error {
	if len(m) != z.total || len(v) != z.total {
		return fmt.Errorf("dist: ZeRO-1 moments of %d and %d elements, want %d", len(m), len(v), z.total)
	}
	copy(z.opt.M, m[z.own.Lo:z.own.Hi])
	copy(z.opt.V, v[z.own.Lo:z.own.Hi])
	z.opt.Step = step
	return nil
}

// GatherShards collects on rank root the ranges that the ranks of comm own
// (OwnedRange of len(full) on root): every other rank sends shard, its own
// range's values, point to point, and root receives them in rank order
// into full. Ranks other than root may pass a nil full. It moves nothing
// through the ranks but root, so no rank but root needs a whole buffer.
func GatherShards[T model.Float](ctx context.Context, comm *collective.Communicator, root int, shard, full []T) error {
	size, rank := comm.Size(), comm.Rank()
	if root < 0 || root >= size {
		return fmt.Errorf("dist: gather to rank %d of a group of %d", root, size)
	}
	if rank != root {
		if len(shard) == 0 {
			return nil
		}
		return comm.Send(ctx, root, bufferOf(shard))
	}
	total := len(full)
	for r := range size {
		own := OwnedRange(total, size, r)
		if r == root {
			if len(shard) != own.Len() {
				return fmt.Errorf("dist: gather: rank %d's shard has %d elements, want %d", r, len(shard), own.Len())
			}
			copy(full[own.Lo:own.Hi], shard)
			continue
		}
		if own.Len() == 0 {
			continue
		}
		if err := comm.Recv(ctx, r, bufferOf(full[own.Lo:own.Hi])); err != nil {
			return err
		}
	}
	return nil
}
