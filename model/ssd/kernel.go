package ssd

import (
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/m2train/m2train/model"
)

// dot returns Σ_k a[k]·b[k] over len(a) elements. The four partial sums make
// the loop faster without making the result depend on anything but the
// inputs.
func dot[T model.Float](a, b []T) T {
	b = b[:len(a)]
	var s0, s1, s2, s3 T
	k := 0
	for ; k+4 <= len(a); k += 4 {
		s0 += a[k] * b[k]
		s1 += a[k+1] * b[k+1]
		s2 += a[k+2] * b[k+2]
		s3 += a[k+3] * b[k+3]
	}
	for ; k < len(a); k++ {
		s0 += a[k] * b[k]
	}
	return (s0 + s1) + (s2 + s3)
}

// axpy computes y += alpha·x over len(y) elements.
func axpy[T model.Float](alpha T, x, y []T) {
	x = x[:len(y)]
	k := 0
	for ; k+4 <= len(y); k += 4 {
		y[k] += alpha * x[k]
		y[k+1] += alpha * x[k+1]
		y[k+2] += alpha * x[k+2]
		y[k+3] += alpha * x[k+3]
	}
	for ; k < len(y); k++ {
		y[k] += alpha * x[k]
	}
}

// dot64 returns Σ_k a[k]·b[k] accumulated in float64, for the few long
// reductions that feed scalar gradients.
func dot64[T model.Float](a, b []T) float64 {
	b = b[:len(a)]
	var s0, s1 float64
	k := 0
	for ; k+2 <= len(a); k += 2 {
		s0 += float64(a[k]) * float64(b[k])
		s1 += float64(a[k+1]) * float64(b[k+1])
	}
	for ; k < len(a); k++ {
		s0 += float64(a[k]) * float64(b[k])
	}
	return s0 + s1
}

// grow returns s resized to n elements, reallocating only when the capacity
// is too small. The contents are unspecified.
func grow[E any](s []E, n int) []E {
	if cap(s) < n {
		return make([]E, n)
	}
	return s[:n]
}

// workers is the number of goroutines a call may use.
func workers() int { return max(1, runtime.GOMAXPROCS(0)) }

// parallelFor runs body(worker, item) for every item in [0, n) on at most
// nw goroutines. Items must write disjoint memory; worker identifies the
// goroutine so that body can use per-worker scratch space. Which worker runs
// which item depends on scheduling, so body's results must not.
func parallelFor(nw, n int, body func(worker, item int)) {
	nw = min(nw, n)
	if nw <= 1 {
		for i := 0; i < n; i++ {
			body(0, i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < nw; w++ {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				body(w, i)
			}
		})
	}
	wg.Wait()
}
