package linalg

import (
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
)

// TestGemmSerialMatchesGemm checks that GemmSerial gives bitwise the C of
// Gemm, on every shape of the Gemm tests and on shapes large enough for
// Gemm to run in parallel.
func TestGemmSerialMatchesGemm(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(max(2, runtime.GOMAXPROCS(0))))
	withKernels(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(11, 12))
		all := testDims()
		for _, tr := range transposes {
			all = append(all, dims{m: 301, n: 2061, k: 530, transA: tr[0], transB: tr[1], pad: 1})
		}
		for _, d := range all {
			o := newOperands(d, rng, 0)
			t.Run("float32/"+d.String(), func(t *testing.T) { checkSerialMatches[float32](t, o, 1.25, 0.5) })
			t.Run("float64/"+d.String(), func(t *testing.T) { checkSerialMatches[float64](t, o, -0.75, 1) })
		}
	})
}

func checkSerialMatches[T float32 | float64](t *testing.T, o operands, alpha, beta T) {
	d := o.d
	a, b := convert[T](o.a), convert[T](o.b)
	want, got := convert[T](o.c), convert[T](o.c)
	Gemm(d.transA, d.transB, d.m, d.n, d.k, alpha, a, o.lda, b, o.ldb, beta, want, o.ldc)
	GemmSerial(d.transA, d.transB, d.m, d.n, d.k, alpha, a, o.lda, b, o.ldb, beta, got, o.ldc)
	for i := range got {
		if math.Float64bits(float64(got[i])) != math.Float64bits(float64(want[i])) {
			t.Fatalf("C[%d] = %v from GemmSerial, %v from Gemm", i, got[i], want[i])
		}
	}
}

// excluded reports whether op(A)[i][p] is outside the structure s.
func excluded(s Structure, i, p int) bool {
	return (s == LowerA && p > i) || (s == UpperA && p < i)
}

// TestGemmStructured checks every structure against Gemm on the same
// operands with the excluded entries of op(A) set to zero: GemmStructured
// is given NaN there instead, must not let it through, must compute the
// same values, and for LowerC must leave the entries above the diagonal of
// C, NaN or not, untouched. Shapes cover square and trapezoidal factors,
// tile edges, several kc slices and mc blocks, and every transpose.
func TestGemmStructured(t *testing.T) {
	nan := math.NaN()
	shapes := [][3]int{
		{1, 1, 1}, {5, 3, 5}, {6, 16, 6}, {7, 17, 7}, {13, 33, 13}, {64, 32, 64}, {64, 64, 32},
		{40, 9, 25}, {25, 9, 40}, {300, 20, 300}, {150, 70, 530}, {530, 40, 150},
	}
	coefs := []struct {
		name        string
		alpha, beta float64
		cFill       float64 // 0: random
	}{
		{"alpha1_beta0_nanC", 1, 0, nan},
		{"alpha1.25_beta1", 1.25, 1, 0},
		{"alpha-0.5_beta0.75", -0.5, 0.75, 0},
	}
	withKernels(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(13, 14))
		for _, s := range []Structure{Dense, LowerA, UpperA, LowerC} {
			for _, tr := range transposes {
				for _, sh := range shapes {
					for _, cf := range coefs {
						d := dims{m: sh[0], n: sh[1], k: sh[2], transA: tr[0], transB: tr[1], pad: 2}
						o := newOperands(d, rng, cf.cFill)
						zeroed := o
						zeroed.a = append([]float64(nil), o.a...)
						for i := 0; i < d.m; i++ {
							for p := 0; p < d.k; p++ {
								if excluded(s, i, p) {
									idx := i*o.lda + p
									if d.transA {
										idx = p*o.lda + i
									}
									o.a[idx], zeroed.a[idx] = nan, 0
								}
							}
						}
						name := fmt.Sprintf("%v/%s/%s", s, cf.name, d)
						t.Run("float32/"+name, func(t *testing.T) {
							checkStructured(t, s, o, zeroed, float32(cf.alpha), float32(cf.beta))
						})
						t.Run("float64/"+name, func(t *testing.T) {
							checkStructured(t, s, o, zeroed, cf.alpha, cf.beta)
						})
					}
				}
			}
		}
	})
}

func checkStructured[T float32 | float64](t *testing.T, s Structure, o, zeroed operands, alpha, beta T) {
	d := o.d
	c0 := convert[T](o.c)
	want := append([]T(nil), c0...)
	Gemm(d.transA, d.transB, d.m, d.n, d.k, alpha, convert[T](zeroed.a), o.lda, convert[T](o.b), o.ldb, beta, want, o.ldc)
	got := append([]T(nil), c0...)
	GemmStructured(s, d.transA, d.transB, d.m, d.n, d.k, alpha, convert[T](o.a), o.lda, convert[T](o.b), o.ldb, beta, got, o.ldc)
	for idx := range got {
		i, j := idx/o.ldc, idx%o.ldc
		if j >= d.n || (s == LowerC && j > i) {
			if math.Float64bits(float64(got[idx])) != math.Float64bits(float64(c0[idx])) {
				t.Fatalf("C[%d][%d] changed from %v to %v; it is not part of the product", i, j, c0[idx], got[idx])
			}
			continue
		}
		if got[idx] != want[idx] {
			t.Fatalf("C[%d][%d] = %v, want %v", i, j, got[idx], want[idx])
		}
	}
}

// TestGemmStructuredScaleOnly checks that with k or alpha zero C only
// scales by beta, over the lower trapezoid alone for LowerC, and that A and
// B are not read.
func TestGemmStructuredScaleOnly(t *testing.T) {
	nan := math.NaN()
	for _, s := range []Structure{Dense, LowerA, UpperA, LowerC} {
		for _, tc := range []struct {
			name  string
			k     int
			alpha float64
		}{{"k0", 0, 1}, {"alpha0", 4, 0}} {
			t.Run(fmt.Sprintf("%v/%s", s, tc.name), func(t *testing.T) {
				const m, n = 5, 7
				a := make([]float64, m*4)
				b := make([]float64, 4*n)
				for i := range a {
					a[i] = nan
				}
				for i := range b {
					b[i] = nan
				}
				c := make([]float64, m*n)
				for i := range c {
					c[i] = float64(i + 1)
				}
				GemmStructured(s, false, false, m, n, tc.k, tc.alpha, a, 4, b, n, 2, c, n)
				for i := 0; i < m; i++ {
					for j := 0; j < n; j++ {
						want := 2 * float64(i*n+j+1)
						if s == LowerC && j > i {
							want /= 2
						}
						if c[i*n+j] != want {
							t.Fatalf("C[%d][%d] = %v, want %v", i, j, c[i*n+j], want)
						}
					}
				}
			})
		}
	}
}

func TestGemmSerialPanics(t *testing.T) {
	buf := make([]float64, 100)
	tests := []struct {
		name string
		call func()
		want string
	}{
		{"negative k", func() { GemmSerial(false, false, 2, 2, -1, 1, buf, 2, buf, 2, 0, buf, 2) }, "linalg: GemmSerial: negative size"},
		{"ldb too small", func() { GemmSerial(false, false, 3, 4, 3, 1, buf, 3, buf, 3, 0, buf, 4) }, "ldb = 3 is less than the 4 columns of stored B"},
		{"C too short", func() {
			GemmStructured(LowerC, false, false, 3, 30, 4, 1, buf, 4, make([]float64, 120), 30, 0, buf[:50], 30)
		}, "linalg: GemmStructured: len(C) = 50, need at least 90"},
		{"A too short transA", func() { GemmStructured(UpperA, true, false, 4, 3, 40, 1, buf, 4, buf, 3, 0, buf, 3) }, "len(A) = 100, need at least 160"},
		{"unknown structure", func() { GemmStructured(Structure(9), false, false, 1, 1, 1, 1, buf, 1, buf, 1, 0, buf, 1) }, "unknown structure Structure(9)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				r := recover()
				if r == nil {
					t.Fatal("no panic")
				}
				if msg := fmt.Sprint(r); !strings.Contains(msg, tc.want) {
					t.Fatalf("panic %q does not contain %q", msg, tc.want)
				}
			}()
			tc.call()
		})
	}
}

// TestPackPanelsMatchPack checks the fast packing paths of the serial
// driver against packA and packB on full and partial panels of every tile
// width, both transposes and a few depths.
func TestPackPanelsMatchPack(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	src := convert[float32](randSlice(rng, 40*40))
	const ld = 40
	for _, trans := range []bool{false, true} {
		for _, w := range []int{4, 6, 8, 16} {
			for _, used := range []int{w - 1, w} {
				for _, kb := range []int{0, 1, 5, 17} {
					t.Run(fmt.Sprintf("trans%v/w%d/used%d/kb%d", trans, w, used, kb), func(t *testing.T) {
						got, want := make([]float32, kb*w), make([]float32, kb*w)
						packAPanel(trans, src, ld, 3, 2, used, kb, w, got)
						packA(trans, src, ld, 3, 2, used, kb, w, want)
						if fmt.Sprint(got) != fmt.Sprint(want) {
							t.Fatalf("packAPanel = %v, packA = %v", got, want)
						}
						packBPanel(trans, src, ld, 2, 3, kb, used, w, got)
						packB(trans, src, ld, 2, 3, kb, used, w, want)
						if fmt.Sprint(got) != fmt.Sprint(want) {
							t.Fatalf("packBPanel = %v, packB = %v", got, want)
						}
					})
				}
			}
		}
	}
}
