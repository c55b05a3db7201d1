package mqar

import "math"

// Accuracy counts a model's answers: Correct of Total answer positions.
type Accuracy struct {
	Correct, Total int
}

// Value returns Correct/Total, or 0 when there were no answers.
func (a Accuracy) Value() float64 {
	if a.Total == 0 {
		return 0
	}
	return float64(a.Correct) / float64(a.Total)
}

// Add accumulates b into a.
func (a *Accuracy) Add(b Accuracy) {
	a.Correct += b.Correct
	a.Total += b.Total
}

// Argmax returns the index of the largest element of row, the first one on
// ties; NaNs never win, and a row without a number gives -1.
func Argmax(row []float64) int {
	best, arg := math.Inf(-1), -1
	for i, v := range row {
		if v > best || (arg < 0 && v == best) {
			best, arg = v, i
		}
	}
	return arg
}

// Score grades logits (rows × vocab, row-major, one row per position)
// against targets (one per row): every position with a non-negative target
// is an answer, correct when the argmax of its row is the target.
func Score(logits []float64, vocab int, targets []int32) (Accuracy, error) {
	if vocab <= 0 {
		return Accuracy{}, invalidf("vocab %d must be > 0", vocab)
	}
	if len(logits) != len(targets)*vocab {
		return Accuracy{}, invalidf("logits hold %d values, want %d positions × vocab %d = %d", len(logits), len(targets), vocab, len(targets)*vocab)
	}
	var a Accuracy
	for t, want := range targets {
		if want < 0 {
			continue
		}
		a.Total++
		if Argmax(logits[t*vocab:(t+1)*vocab]) == int(want) {
			a.Correct++
		}
	}
	return a, nil
}
