package linalg

import (
	"fmt"

	"github.com/m2train/m2train/model"
)

// Axpy computes y += alpha·x element by element. x and y must have the same
// length; it panics otherwise.
func Axpy[T model.Float](alpha T, x, y []T) {
	if len(x) != len(y) {
		panic(fmt.Sprintf("linalg: Axpy: len(x) = %d, len(y) = %d; they must be equal", len(x), len(y)))
	}
	if alpha == 0 {
		return
	}
	y = y[:len(x)]
	i := 0
	for ; i+4 <= len(x); i += 4 {
		xs := x[i : i+4 : i+4]
		ys := y[i : i+4 : i+4]
		ys[0] += alpha * xs[0]
		ys[1] += alpha * xs[1]
		ys[2] += alpha * xs[2]
		ys[3] += alpha * xs[3]
	}
	for ; i < len(x); i++ {
		y[i] += alpha * x[i]
	}
}

// Dot returns the inner product of x and y, which must have the same length
// (it panics otherwise). The summation order is fixed and depends only on
// the length: element i goes to partial sum i mod 4 for the largest prefix
// whose length is a multiple of 4, the partial sums are combined as
// (s0+s1)+(s2+s3), and the remaining elements are added in index order.
func Dot[T model.Float](x, y []T) T {
	if len(x) != len(y) {
		panic(fmt.Sprintf("linalg: Dot: len(x) = %d, len(y) = %d; they must be equal", len(x), len(y)))
	}
	y = y[:len(x)]
	var s0, s1, s2, s3 T
	i := 0
	for ; i+4 <= len(x); i += 4 {
		xs := x[i : i+4 : i+4]
		ys := y[i : i+4 : i+4]
		s0 += xs[0] * ys[0]
		s1 += xs[1] * ys[1]
		s2 += xs[2] * ys[2]
		s3 += xs[3] * ys[3]
	}
	s := (s0 + s1) + (s2 + s3)
	for ; i < len(x); i++ {
		s += x[i] * y[i]
	}
	return s
}
