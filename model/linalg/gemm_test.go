package linalg

import (
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// dims is one Gemm problem: sizes, transposes and the padding added to each
// stored row so that strides exceed widths.
type dims struct {
	m, n, k        int
	transA, transB bool
	pad            int
}

func (d dims) String() string {
	t := func(b bool) byte {
		if b {
			return 'T'
		}
		return 'N'
	}
	return fmt.Sprintf("%c%c/m%d_n%d_k%d_pad%d", t(d.transA), t(d.transB), d.m, d.n, d.k, d.pad)
}

// operands holds the stored matrices of one problem in float64, with the
// strides used.
type operands struct {
	d             dims
	a, b, c       []float64
	lda, ldb, ldc int
}

// newOperands fills A and B with values in [-1, 1) and C with cFill, or
// with random values when cFill is zero. Slices have exactly the minimum
// length Gemm accepts, so any read past the last row fails the bounds check.
func newOperands(d dims, rng *rand.Rand, cFill float64) operands {
	aRows, aCols := d.m, d.k
	if d.transA {
		aRows, aCols = d.k, d.m
	}
	bRows, bCols := d.k, d.n
	if d.transB {
		bRows, bCols = d.n, d.k
	}
	o := operands{d: d, lda: aCols + d.pad, ldb: bCols + d.pad, ldc: d.n + d.pad}
	o.a = randSlice(rng, minLen(aRows, aCols, o.lda))
	o.b = randSlice(rng, minLen(bRows, bCols, o.ldb))
	o.c = randSlice(rng, minLen(d.m, d.n, o.ldc))
	if cFill != 0 {
		for i := range o.c {
			o.c[i] = cFill
		}
	}
	return o
}

func minLen(rows, cols, stride int) int {
	if rows == 0 || cols == 0 {
		return 0
	}
	return (rows-1)*stride + cols
}

func randSlice(rng *rand.Rand, n int) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = 2*rng.Float64() - 1
	}
	return s
}

func convert[T float32 | float64](s []float64) []T {
	out := make([]T, len(s))
	for i, v := range s {
		out[i] = T(v)
	}
	return out
}

// reference computes alpha·op(A)·op(B) + beta·C with a naive triple loop in
// float64 on the values the tested type holds, and a bound on the rounding
// error of any summation order: (k+2)·u·(|alpha|·Σ|a||b| + |beta|·|c|).
func reference[T float32 | float64](o operands, alpha, beta T, a, b, c []T) (want, bound []float64) {
	d := o.d
	u := math.Pow(2, -52)
	if _, ok := any(alpha).(float32); ok {
		u = math.Pow(2, -23)
	}
	at := func(i, p int) float64 {
		if d.transA {
			return float64(a[p*o.lda+i])
		}
		return float64(a[i*o.lda+p])
	}
	bt := func(p, j int) float64 {
		if d.transB {
			return float64(b[j*o.ldb+p])
		}
		return float64(b[p*o.ldb+j])
	}
	want = make([]float64, len(c))
	bound = make([]float64, len(c))
	for i := 0; i < d.m; i++ {
		for j := 0; j < d.n; j++ {
			var s, mag float64
			for p := 0; p < d.k; p++ {
				s += at(i, p) * bt(p, j)
				mag += math.Abs(at(i, p) * bt(p, j))
			}
			idx := i*o.ldc + j
			v := float64(alpha) * s
			mag *= math.Abs(float64(alpha))
			if beta != 0 {
				v += float64(beta) * float64(c[idx])
				mag += math.Abs(float64(beta) * float64(c[idx]))
			}
			want[idx] = v
			bound[idx] = float64(d.k+2)*u*mag + 1e-300
		}
	}
	return want, bound
}

// checkGemmResult runs Gemm on copies of the operands converted to T and
// compares every element of C, including the stride padding, which must be
// left untouched.
func checkGemmResult[T float32 | float64](t *testing.T, o operands, alpha, beta T) {
	t.Helper()
	d := o.d
	a, b, c := convert[T](o.a), convert[T](o.b), convert[T](o.c)
	want, bound := reference(o, alpha, beta, a, b, c)
	orig := append([]T(nil), c...)
	Gemm(d.transA, d.transB, d.m, d.n, d.k, alpha, a, o.lda, b, o.ldb, beta, c, o.ldc)
	bad := 0
	for idx := range c {
		i, j := idx/max(o.ldc, 1), idx%max(o.ldc, 1)
		if j >= d.n {
			if math.Float64bits(float64(c[idx])) != math.Float64bits(float64(orig[idx])) {
				t.Errorf("padding C[%d][%d] changed from %v to %v", i, j, orig[idx], c[idx])
				bad++
			}
			continue
		}
		got := float64(c[idx])
		if math.IsNaN(got) || math.Abs(got-want[idx]) > bound[idx] {
			t.Errorf("C[%d][%d] = %v, want %v (±%.3g)", i, j, got, want[idx], bound[idx])
			bad++
		}
		if bad > 10 {
			t.Fatal("too many mismatches")
		}
	}
}

// kernelPair is one float32 and one float64 micro-kernel that Gemm can use
// together.
type kernelPair struct {
	k32 *kernel[float32]
	k64 *kernel[float64]
}

// availableKernels lists the scalar kernels and, when package
// initialisation selected others for this CPU and build, those too.
func availableKernels() []kernelPair {
	pairs := []kernelPair{{&scalarKernel32, &scalarKernel64}}
	if kernel32 != &scalarKernel32 || kernel64 != &scalarKernel64 {
		pairs = append(pairs, kernelPair{kernel32, kernel64})
	}
	return pairs
}

// withKernels runs f once for every micro-kernel this build can use on
// this CPU, with that kernel installed, so that one test binary checks the
// vector kernels and the scalar fallback alike.
func withKernels(t *testing.T, f func(t *testing.T)) {
	pairs := availableKernels()
	if len(pairs) == 1 {
		t.Logf("only the %s kernels run here: no vector kernel for this build or CPU", pairs[0].k32.name)
	}
	saved32, saved64 := kernel32, kernel64
	defer func() { kernel32, kernel64 = saved32, saved64 }()
	for _, p := range pairs {
		kernel32, kernel64 = p.k32, p.k64
		t.Run(p.k32.name+"+"+p.k64.name, f)
	}
}

var transposes = [][2]bool{{false, false}, {false, true}, {true, false}, {true, true}}

func testDims() []dims {
	var out []dims
	small := []int{1, 2, 3, 7, 17}
	for _, tr := range transposes {
		for _, m := range small {
			for _, n := range small {
				for _, k := range small {
					out = append(out, dims{m: m, n: n, k: k, transA: tr[0], transB: tr[1], pad: (m + n + k) % 3})
				}
			}
		}
		for _, s := range [][3]int{
			{63, 65, 129}, {129, 63, 65}, {65, 129, 63}, // around the tile sizes
			{200, 300, 517},              // several mc blocks and kc slices
			{1, 300, 600}, {300, 1, 600}, // vectors
			{7, 2100, 3},                    // more than one nc block
			{0, 5, 5}, {5, 0, 5}, {5, 5, 0}, // empty
		} {
			out = append(out, dims{m: s[0], n: s[1], k: s[2], transA: tr[0], transB: tr[1], pad: 3})
		}
	}
	return out
}

func TestGemmAgainstNaive(t *testing.T) {
	withKernels(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(1, 2))
		for _, d := range testDims() {
			o := newOperands(d, rng, 0)
			t.Run("float32/"+d.String(), func(t *testing.T) { checkGemmResult[float32](t, o, 1.25, 0.5) })
			t.Run("float64/"+d.String(), func(t *testing.T) { checkGemmResult[float64](t, o, -0.75, 1) })
		}
	})
}

func TestGemmAlphaBeta(t *testing.T) {
	nan := math.NaN()
	tests := []struct {
		name        string
		alpha, beta float64
		cFill       float64 // 0: random
	}{
		{"alpha1_beta0_nanC", 1, 0, nan},
		{"alpha-2_beta0_infC", -2, 0, math.Inf(1)},
		{"alpha1_beta1", 1, 1, 0},
		{"alpha0.5_beta-1.5", 0.5, -1.5, 0},
		{"alpha0_beta0_nanC", 0, 0, nan},
		{"alpha0_beta2", 0, 2, 0},
		{"alpha0_beta1", 0, 1, 0},
	}
	withKernels(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(3, 4))
		for _, tc := range tests {
			for _, tr := range transposes {
				for _, s := range [][3]int{{17, 33, 300}, {3, 5, 0}} {
					d := dims{m: s[0], n: s[1], k: s[2], transA: tr[0], transB: tr[1], pad: 2}
					o := newOperands(d, rng, tc.cFill)
					if tc.alpha == 0 {
						// A and B must not be read: poison them.
						for i := range o.a {
							o.a[i] = nan
						}
						for i := range o.b {
							o.b[i] = nan
						}
					}
					t.Run(tc.name+"/float32/"+d.String(), func(t *testing.T) {
						checkGemmResult(t, o, float32(tc.alpha), float32(tc.beta))
					})
					t.Run(tc.name+"/float64/"+d.String(), func(t *testing.T) {
						checkGemmResult(t, o, tc.alpha, tc.beta)
					})
				}
			}
		}
	})
}

// TestGemmDeterministic checks that C is bitwise the same whatever the
// number of goroutines, on sizes large enough to run in parallel and with
// edges in every dimension.
func TestGemmDeterministic(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	withKernels(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(5, 6))
		for _, tr := range transposes {
			// The first shape spans two nc column blocks, the second several
			// mc row blocks and kc slices.
			for _, s := range [][3]int{{97, 2061, 300}, {301, 100, 530}} {
				d := dims{m: s[0], n: s[1], k: s[2], transA: tr[0], transB: tr[1], pad: 1}
				o := newOperands(d, rng, 0)
				t.Run("float32/"+d.String(), func(t *testing.T) { checkDeterministic[float32](t, o) })
				t.Run("float64/"+d.String(), func(t *testing.T) { checkDeterministic[float64](t, o) })
			}
		}
	})
}

func checkDeterministic[T float32 | float64](t *testing.T, o operands) {
	d := o.d
	a, b := convert[T](o.a), convert[T](o.b)
	var first []T
	for _, procs := range []int{1, 2, 4} {
		runtime.GOMAXPROCS(procs)
		c := convert[T](o.c)
		Gemm(d.transA, d.transB, d.m, d.n, d.k, 0.75, a, o.lda, b, o.ldb, 0.5, c, o.ldc)
		if first == nil {
			first = c
			continue
		}
		for i := range c {
			if math.Float64bits(float64(c[i])) != math.Float64bits(float64(first[i])) {
				t.Fatalf("GOMAXPROCS=%d: C[%d] = %v, GOMAXPROCS=1 gave %v", procs, i, c[i], first[i])
			}
		}
	}
}

// TestGemmDefinedType checks that a type defined on float32 goes through the
// same kernels and gives the same bits as float32.
func TestGemmDefinedType(t *testing.T) {
	type myFloat float32
	rng := rand.New(rand.NewPCG(7, 8))
	o := newOperands(dims{m: 37, n: 41, k: 300, transB: true}, rng, 0)
	a, b, c := convert[float32](o.a), convert[float32](o.b), convert[float32](o.c)
	ma, mb, mc := make([]myFloat, len(a)), make([]myFloat, len(b)), make([]myFloat, len(c))
	for i := range a {
		ma[i] = myFloat(a[i])
	}
	for i := range b {
		mb[i] = myFloat(b[i])
	}
	for i := range c {
		mc[i] = myFloat(c[i])
	}
	Gemm(false, true, 37, 41, 300, 1.5, a, o.lda, b, o.ldb, 0.25, c, o.ldc)
	Gemm(false, true, 37, 41, 300, 1.5, ma, o.lda, mb, o.ldb, 0.25, mc, o.ldc)
	for i := range c {
		if math.Float32bits(c[i]) != math.Float32bits(float32(mc[i])) {
			t.Fatalf("C[%d]: float32 %v, defined type %v", i, c[i], mc[i])
		}
	}
}

func TestGemmPanics(t *testing.T) {
	buf := make([]float64, 100)
	big := make([]float64, 200)
	tests := []struct {
		name string
		call func()
		want string
	}{
		{"negative m", func() { Gemm(false, false, -1, 2, 2, 1, buf, 2, buf, 2, 0, buf, 2) }, "negative size"},
		{"lda too small", func() { Gemm(false, false, 3, 3, 4, 1, buf, 3, buf, 3, 0, buf, 3) }, "lda = 3 is less than the 4 columns of stored A"},
		{"lda too small transA", func() { Gemm(true, false, 5, 3, 4, 1, buf, 4, buf, 3, 0, buf, 3) }, "lda = 4 is less than the 5 columns of stored A"},
		{"ldb too small transB", func() { Gemm(false, true, 3, 3, 4, 1, buf, 4, buf, 3, 0, buf, 3) }, "ldb = 3 is less than the 4 columns of stored B"},
		{"ldc too small", func() { Gemm(false, false, 3, 3, 4, 1, buf, 4, buf, 3, 0, buf, 2) }, "ldc = 2 is less than the 3 columns of stored C"},
		{"A too short", func() { Gemm(false, false, 30, 3, 4, 1, buf, 4, buf, 3, 0, buf, 3) }, "len(A) = 100, need at least 120"},
		{"B too short", func() { Gemm(false, true, 3, 30, 4, 1, buf, 4, buf, 4, 0, buf[:90], 30) }, "len(B) = 100, need at least 120"},
		{"C too short", func() { Gemm(false, false, 3, 30, 4, 1, buf, 4, big, 30, 0, buf[:50], 30) }, "len(C) = 50, need at least 90"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				r := recover()
				if r == nil {
					t.Fatal("Gemm did not panic")
				}
				if msg := fmt.Sprint(r); !strings.Contains(msg, tc.want) {
					t.Fatalf("panic %q does not contain %q", msg, tc.want)
				}
			}()
			tc.call()
		})
	}
}

// TestTileMergeMatchesStoreTile checks that a kernel that merges full tiles
// into C itself gives the same bits as its plain form followed by
// storeTile, which handles the edge tiles, for every merge mode and for
// depths around its unrolling.
func TestTileMergeMatchesStoreTile(t *testing.T) {
	tested := false
	for _, p := range availableKernels() {
		if p.k32.tile != nil {
			tested = true
			t.Run("float32/"+p.k32.name, func(t *testing.T) { checkTileMerge(t, p.k32) })
		}
		if p.k64.tile != nil {
			tested = true
			t.Run("float64/"+p.k64.name, func(t *testing.T) { checkTileMerge(t, p.k64) })
		}
	}
	if !tested {
		t.Skip("no kernel here merges tiles itself")
	}
}

func checkTileMerge[F float32 | float64](t *testing.T, kn *kernel[F]) {
	rng := rand.New(rand.NewPCG(9, 10))
	mr, nr := kn.mr, kn.nr
	ldc := nr + 3
	for _, kc := range []int{1, 2, 3, 4, 5, 7, 8, 9, 256} {
		for _, tc := range []struct {
			name        string
			alpha, beta F
			first       bool
		}{
			{"set", 1.5, 0, true},
			{"set_alpha1", 1, 0, true},
			{"add_first_beta1", -0.75, 1, true},
			{"add_later_slice", 1.25, 0.5, false},
			{"scale", 0.5, -1.5, true},
		} {
			t.Run(fmt.Sprintf("%s/kc%d", tc.name, kc), func(t *testing.T) {
				a := convert[F](randSlice(rng, mr*kc))
				b := convert[F](randSlice(rng, nr*kc))
				c0 := convert[F](randSlice(rng, mr*ldc))
				got := append([]F(nil), c0...)
				want := append([]F(nil), c0...)
				kn.tile(kc, a, b, got, ldc, tc.alpha, tc.beta, tc.first)
				ab := make([]F, mr*nr)
				kn.fn(kc, a, b, ab)
				storeTile(want, ldc, 0, 0, mr, nr, ab, nr, tc.alpha, tc.beta, tc.first)
				for i := range got {
					if math.Float64bits(float64(got[i])) != math.Float64bits(float64(want[i])) {
						t.Fatalf("C[%d][%d] = %v from the merging kernel, %v from storeTile", i/ldc, i%ldc, got[i], want[i])
					}
				}
			})
		}
	}
}
