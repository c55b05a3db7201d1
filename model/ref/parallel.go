package ref

import (
	"runtime"
	"sync"

	"github.com/m2train/m2train/model"
)

// parallelFor runs fn over [0, n) split into contiguous blocks of at least
// grain items, on at most GOMAXPROCS goroutines. fn must only write data owned
// by its block, so the result does not depend on the schedule.
func parallelFor(n, grain int, fn func(lo, hi int)) {
	if n <= 0 {
		return
	}
	workers := runtime.GOMAXPROCS(0)
	if grain < 1 {
		grain = 1
	}
	if maxW := (n + grain - 1) / grain; workers > maxW {
		workers = maxW
	}
	if workers <= 1 {
		fn(0, n)
		return
	}
	var wg sync.WaitGroup
	step := (n + workers - 1) / workers
	for lo := 0; lo < n; lo += step {
		hi := min(lo+step, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(lo, hi)
		}()
	}
	wg.Wait()
}

// reduceBlock is the number of rows whose contributions to a column sum are
// accumulated together before the partial sums are added in block order. It
// is a constant, not a function of the thread count, so that the bits of a
// reduction do not depend on GOMAXPROCS.
const reduceBlock = 64

// columnReduce computes out[j] += Σ_rows f(row, j) for j in [0, width) with a
// deterministic order: rows are grouped in blocks of reduceBlock, each block's
// partial sum is computed (in parallel across blocks), and the partials are
// added to out in block order. add(row, acc) must add row's contribution into
// acc (length width).
func columnReduce[T model.Float](rows, width int, out []T, add func(row int, acc []T)) {
	if rows <= 0 {
		return
	}
	nb := (rows + reduceBlock - 1) / reduceBlock
	partial := make([]T, nb*width)
	parallelFor(nb, 1, func(lo, hi int) {
		for b := lo; b < hi; b++ {
			acc := partial[b*width : (b+1)*width]
			r1 := min((b+1)*reduceBlock, rows)
			for r := b * reduceBlock; r < r1; r++ {
				add(r, acc)
			}
		}
	})
	for b := 0; b < nb; b++ {
		acc := partial[b*width : (b+1)*width]
		for j, v := range acc {
			out[j] += v
		}
	}
}
