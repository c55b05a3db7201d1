package linalg

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"
)

// benchShapes are the model's GEMMs (D=768, E=1536, in_proj width 3352,
// 1024 tokens) plus a square reference size.
var benchShapes = []struct {
	name           string
	m, n, k        int
	transA, transB bool
}{
	{"in_proj_NT_1024x3352x768", 1024, 3352, 768, false, true},
	{"out_proj_NT_1024x768x1536", 1024, 768, 1536, false, true},
	{"dW_TN_768x3352x1024", 768, 3352, 1024, true, false},
	{"dX_NN_1024x768x3352", 1024, 768, 3352, false, false},
	{"square_NN_512x512x512", 512, 512, 512, false, false},
}

// BenchmarkGemm measures float32 Gemm against gonum's Sgemm on the same
// inputs. The ours and gonum sub-benchmarks report GFLOP/s each; the
// interleaved one alternates the two every iteration, so that load from
// other processes hits both alike, and reports the ratio ours/gonum.
func BenchmarkGemm(b *testing.B) {
	for _, s := range benchShapes {
		rng := rand.New(rand.NewPCG(1, 1))
		aRows, aCols := s.m, s.k
		if s.transA {
			aRows, aCols = s.k, s.m
		}
		bRows, bCols := s.k, s.n
		if s.transB {
			bRows, bCols = s.n, s.k
		}
		a := convert[float32](randSlice(rng, aRows*aCols))
		bm := convert[float32](randSlice(rng, bRows*bCols))
		c := make([]float32, s.m*s.n)
		flops := 2 * float64(s.m) * float64(s.n) * float64(s.k)
		ours := func() {
			Gemm(s.transA, s.transB, s.m, s.n, s.k, 1, a, aCols, bm, bCols, 0, c, s.n)
		}
		tA, tB := blas.NoTrans, blas.NoTrans
		if s.transA {
			tA = blas.Trans
		}
		if s.transB {
			tB = blas.Trans
		}
		theirs := func() {
			gonum.Implementation{}.Sgemm(tA, tB, s.m, s.n, s.k, 1, a, aCols, bm, bCols, 0, c, s.n)
		}
		b.Run(s.name+"/ours", func(b *testing.B) {
			for b.Loop() {
				ours()
			}
			b.ReportMetric(flops*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
		b.Run(s.name+"/gonum", func(b *testing.B) {
			for b.Loop() {
				theirs()
			}
			b.ReportMetric(flops*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
		b.Run(s.name+"/interleaved", func(b *testing.B) {
			var tOurs, tTheirs time.Duration
			for b.Loop() {
				t0 := time.Now()
				ours()
				t1 := time.Now()
				theirs()
				tOurs += t1.Sub(t0)
				tTheirs += time.Since(t1)
			}
			b.ReportMetric(flops*float64(b.N)/tOurs.Seconds()/1e9, "ours-GFLOP/s")
			b.ReportMetric(flops*float64(b.N)/tTheirs.Seconds()/1e9, "gonum-GFLOP/s")
			b.ReportMetric(tTheirs.Seconds()/tOurs.Seconds(), "ours/gonum")
		})
	}
}

// BenchmarkDot and BenchmarkAxpy cover the vector helpers at a row length
// of the model (E = 1536).
func BenchmarkDot(b *testing.B) {
	rng := rand.New(rand.NewPCG(2, 2))
	x, y := convert[float32](randSlice(rng, 1536)), convert[float32](randSlice(rng, 1536))
	b.SetBytes(int64(8 * len(x)))
	var s float32
	for b.Loop() {
		s += Dot(x, y)
	}
	_ = fmt.Sprint(s)
}

func BenchmarkAxpy(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 3))
	x, y := convert[float32](randSlice(rng, 1536)), convert[float32](randSlice(rng, 1536))
	b.SetBytes(int64(8 * len(x)))
	for b.Loop() {
		Axpy(1e-3, x, y)
	}
}
