// Command gemmbench compares linalg.Gemm with gonum's Sgemm (or Dgemm; Go
// with SSE assembly inner loops) on the model's GEMM shapes. Each
// repetition runs both on the same inputs back to back, so machine load
// affects them alike; it prints the median GFLOP/s of each and the ratio
// ours/gonum.
//
//	GOMAXPROCS=2 go run ./tools/gemmbench -reps 7
//	go run -tags purego ./tools/gemmbench   # the portable scalar kernel
//
// The first line of the output names the micro-kernel in use (see
// linalg.KernelName).
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"text/tabwriter"
	"time"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"

	"github.com/m2train/m2train/model/linalg"
)

type shape struct {
	m, n, k        int
	transA, transB bool
}

func (s shape) String() string {
	t := func(b bool) string {
		if b {
			return "T"
		}
		return "N"
	}
	return fmt.Sprintf("%s%s %dx%dx%d", t(s.transA), t(s.transB), s.m, s.n, s.k)
}

var shapes = []shape{
	{1024, 3352, 768, false, true},  // in_proj forward: X·Wᵀ
	{1024, 768, 1536, false, true},  // out_proj forward
	{768, 3352, 1024, true, false},  // weight gradient dYᵀ·X
	{1024, 768, 3352, false, false}, // input gradient dY·W
	{512, 512, 512, false, false},
}

func main() {
	reps := flag.Int("reps", 5, "timed repetitions of each implementation per shape")
	f64 := flag.Bool("f64", false, "benchmark float64 (Dgemm) instead of float32 (Sgemm)")
	flag.Parse()
	if *reps < 1 {
		fmt.Fprintln(os.Stderr, "gemmbench: -reps must be at least 1")
		os.Exit(2)
	}
	k32, k64 := linalg.KernelName()
	kname, typ := k32, "float32"
	if *f64 {
		kname, typ = k64, "float64"
	}
	fmt.Printf("%s, GOMAXPROCS=%d, kernel %s, %d reps, median\n", typ, runtime.GOMAXPROCS(0), kname, *reps)
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "size\tours GFLOP/s\tgonum GFLOP/s\tratio\t")
	for _, s := range shapes {
		var ours, theirs float64
		if *f64 {
			ours, theirs = run[float64](s, *reps, gonum.Implementation{}.Dgemm)
		} else {
			ours, theirs = run[float32](s, *reps, gonum.Implementation{}.Sgemm)
		}
		fmt.Fprintf(w, "%s\t%.2f\t%.2f\t%.2f\t\n", s, ours, theirs, ours/theirs)
	}
	w.Flush()
}

type gemmFunc[T float32 | float64] func(tA, tB blas.Transpose, m, n, k int, alpha T, a []T, lda int, b []T, ldb int, beta T, c []T, ldc int)

// run times both implementations on one shape and returns their median
// GFLOP/s. One untimed call of each comes first, to fill the packing
// buffer pool and fault in the pages of C.
func run[T float32 | float64](s shape, reps int, ref gemmFunc[T]) (ours, theirs float64) {
	rng := rand.New(rand.NewPCG(uint64(s.m), uint64(s.n)))
	a := randSlice[T](rng, s.m*s.k)
	b := randSlice[T](rng, s.k*s.n)
	c := make([]T, s.m*s.n)
	lda, ldb := s.k, s.n
	if s.transA {
		lda = s.m
	}
	if s.transB {
		ldb = s.k
	}
	tA, tB := blas.NoTrans, blas.NoTrans
	if s.transA {
		tA = blas.Trans
	}
	if s.transB {
		tB = blas.Trans
	}
	oursOnce := func() { linalg.Gemm(s.transA, s.transB, s.m, s.n, s.k, 1, a, lda, b, ldb, 0, c, s.n) }
	theirsOnce := func() { ref(tA, tB, s.m, s.n, s.k, 1, a, lda, b, ldb, 0, c, s.n) }
	oursOnce()
	theirsOnce()
	flops := 2 * float64(s.m) * float64(s.n) * float64(s.k)
	var to, tt []float64
	for range reps {
		to = append(to, flops/timed(oursOnce)/1e9)
		tt = append(tt, flops/timed(theirsOnce)/1e9)
	}
	return median(to), median(tt)
}

func timed(f func()) float64 {
	t := time.Now()
	f()
	return time.Since(t).Seconds()
}

func median(v []float64) float64 {
	slices.Sort(v)
	return v[len(v)/2]
}

func randSlice[T float32 | float64](rng *rand.Rand, n int) []T {
	s := make([]T, n)
	for i := range s {
		s[i] = T(2*rng.Float64() - 1)
	}
	return s
}
