package dist

import (
	"context"
	"fmt"
	"math"

	"github.com/m2train/m2train/collective"
)

// PositionLosses returns the cross-entropy −log p(target) of every
// position of a micro-batch from its logits (positions × vocab, as
// model.StepResult.Logits holds them) and targets; positions whose target
// is negative get 0. The arithmetic is that of the CPU reference backend
// (model/ref): the maximum, then the sum of exp(logit − max) in vocabulary
// order, all in float64, so that its losses are the backend's bit for bit.
func PositionLosses(logits []float64, targets []int32, vocab int) []float64 {
	out := make([]float64, len(targets))
	if len(logits) < len(targets)*vocab {
		panic(fmt.Sprintf("dist: %d logits for %d positions of a vocabulary of %d", len(logits), len(targets), vocab))
	}
	for t, tgt := range targets {
		if tgt < 0 {
			continue
		}
		row := logits[t*vocab : (t+1)*vocab]
		mx := math.Inf(-1)
		for _, v := range row {
			mx = math.Max(mx, v)
		}
		var s float64
		for _, v := range row {
			s += math.Exp(v - mx)
		}
		out[t] = mx + math.Log(s) - row[tgt]
	}
	return out
}

// OrderedLossSum returns the sum of the per-position losses of a
// micro-batch of rows sequences split over the sequence-parallel group sp,
// added in the order of the unsplit micro-batch (row by row, each row from
// its first position to its last), which is the order in which a single
// process sums them. losses are this rank's positions, rows × L/K
// row-major; every rank of the group gets the same sum.
func OrderedLossSum(ctx context.Context, sp *collective.Communicator, rows int, losses []float64) (float64, error) {
	if rows <= 0 || len(losses)%rows != 0 {
		return 0, fmt.Errorf("dist: ordered loss of %d positions over %d rows", len(losses), rows)
	}
	K, k := 1, 0
	if sp != nil {
		K, k = sp.Size(), sp.Rank()
	}
	n := len(losses)
	all := losses
	if K > 1 {
		all = make([]float64, K*n)
		copy(all[k*n:], losses)
		if err := sp.AllGather(ctx, collective.Float64s(all)); err != nil {
			return 0, fmt.Errorf("dist: gathering the per-position losses: %w", err)
		}
	}
	lk := n / rows
	var sum float64
	for b := range rows {
		for j := range K {
			for _, v := range all[j*n+b*lk : j*n+(b+1)*lk] {
				sum += v
			}
		}
	}
	return sum, nil
}
