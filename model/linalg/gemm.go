package linalg

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/m2train/m2train/model"
)

// serialFlops is the problem size (2·m·n·k) below which Gemm runs on the
// calling goroutine: under it, starting workers costs more than it saves.
const serialFlops = 1 << 22

// Gemm computes C = alpha·op(A)·op(B) + beta·C for row-major matrices, where
// op(X) is Xᵀ when the corresponding flag is set and X otherwise.
//
// op(A) is m×k, op(B) is k×n and C is m×n. A is stored m×k (k×m when transA)
// with row stride lda, B is stored k×n (n×k when transB) with row stride ldb,
// and C has row stride ldc. Each stride must be at least the stored row
// width and each slice long enough to hold its last row.
//
// When beta is zero C is overwritten and never read, so NaN or Inf already
// in C does not propagate. When alpha is zero or k is zero, A and B are not
// read and C is scaled by beta. The result is bitwise independent of
// GOMAXPROCS and of scheduling.
//
// Gemm panics with a message naming the argument when a size is negative, a
// stride is too small or a slice is too short.
func Gemm[T model.Float](transA, transB bool, m, n, k int, alpha T, a []T, lda int, b []T, ldb int, beta T, c []T, ldc int) {
	checkArgs("Gemm", transA, transB, m, n, k, len(a), lda, len(b), ldb, len(c), ldc)
	if m == 0 || n == 0 {
		return
	}
	if k == 0 || alpha == 0 {
		scaleC(m, n, beta, c, ldc)
		return
	}
	// T is float32 or float64 or a type defined on one of them, so it has
	// the same size and representation as one of the two; the kernels are
	// written for the two concrete types.
	if unsafe.Sizeof(alpha) == 4 {
		gemm(kernel32, transA, transB, m, n, k, float32(alpha), asF32(a), lda, asF32(b), ldb, float32(beta), asF32(c), ldc)
		return
	}
	gemm(kernel64, transA, transB, m, n, k, float64(alpha), asF64(a), lda, asF64(b), ldb, float64(beta), asF64(c), ldc)
}

func asF32[T model.Float](s []T) []float32 {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(unsafe.SliceData(s))), len(s))
}

func asF64[T model.Float](s []T) []float64 {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*float64)(unsafe.Pointer(unsafe.SliceData(s))), len(s))
}

// checkArgs panics unless the sizes, strides and slice lengths describe
// matrices that fn (Gemm, GemmSerial, ...) can address without going out of
// bounds; fn names the caller in the message.
func checkArgs(fn string, transA, transB bool, m, n, k, lenA, lda, lenB, ldb, lenC, ldc int) {
	if m < 0 || n < 0 || k < 0 {
		panic(fmt.Sprintf("linalg: %s: negative size m=%d n=%d k=%d", fn, m, n, k))
	}
	aRows, aCols := m, k
	if transA {
		aRows, aCols = k, m
	}
	bRows, bCols := k, n
	if transB {
		bRows, bCols = n, k
	}
	checkMatrix(fn, "A", aRows, aCols, lenA, lda)
	checkMatrix(fn, "B", bRows, bCols, lenB, ldb)
	checkMatrix(fn, "C", m, n, lenC, ldc)
}

func checkMatrix(fn, name string, rows, cols, length, stride int) {
	if stride < cols {
		panic(fmt.Sprintf("linalg: %s: ld%c = %d is less than the %d columns of stored %s", fn, name[0]|0x20, stride, cols, name))
	}
	if rows == 0 || cols == 0 {
		return
	}
	if need := (rows-1)*stride + cols; length < need {
		panic(fmt.Sprintf("linalg: %s: len(%s) = %d, need at least %d for %d×%d with stride %d", fn, name, length, need, rows, cols, stride))
	}
}

// scaleC computes C = beta·C, writing zeros without reading C when beta is
// zero.
func scaleC[T model.Float](m, n int, beta T, c []T, ldc int) {
	for i := 0; i < m; i++ {
		row := c[i*ldc : i*ldc+n]
		switch beta {
		case 0:
			clear(row)
		case 1:
		default:
			for j := range row {
				row[j] *= beta
			}
		}
	}
}

// kernel describes one micro-kernel and the cache blocking that suits it.
type kernel[F float32 | float64] struct {
	name string
	// mr×nr is the register tile; fn computes ab = Σ_p a[p·mr+i]·b[p·nr+j]
	// over kc steps of packed panels, p in increasing order, into the
	// row-major mr×nr buffer ab (overwritten).
	mr, nr int
	fn     func(kc int, a, b, ab []F)
	// tile, when not nil, computes the same mr×nr tile as fn and merges it
	// into the mr rows of nr elements at c (row stride ldc) itself, with
	// the arithmetic of storeTile; the driver uses it for full tiles.
	tile func(kc int, a, b, c []F, ldc int, alpha, beta F, first bool)
	// kc is the depth of a packed block (it fixes the rounding, so it must
	// not depend on the problem or the worker count), mc the rows of a
	// packed A block (a multiple of mr) and nc the columns of a packed B
	// block (a multiple of nr).
	kc, mc, nc int
}

// maxTile bounds mr·nr over all kernels; the tile buffer lives on the stack.
const maxTile = 128

// bufPool32 and bufPool64 recycle packing buffers between calls.
var (
	bufPool32 sync.Pool
	bufPool64 sync.Pool
)

func poolFor[F float32 | float64]() *sync.Pool {
	var z F
	if unsafe.Sizeof(z) == 4 {
		return &bufPool32
	}
	return &bufPool64
}

// getBuf returns a pooled buffer of at least n elements; its contents are
// unspecified.
func getBuf[F float32 | float64](n int) *[]F {
	if p, ok := poolFor[F]().Get().(*[]F); ok && cap(*p) >= n {
		*p = (*p)[:n]
		return p
	}
	s := make([]F, n)
	return &s
}

func putBuf[F float32 | float64](p *[]F) { poolFor[F]().Put(p) }

// gemm is the blocked driver. For each nc-wide column block of C and each
// kc-deep slice of the k dimension (in increasing order), it packs the B
// block once, shared by all workers, and then hands out tasks of one mc-row
// block of A times a range of B micro-panels; each task packs its own A
// block. The k loop stays outside the parallel region, so every element of C
// sees its k slices in order on whichever goroutine computes it.
func gemm[F float32 | float64](kn *kernel[F], transA, transB bool, m, n, k int, alpha F, a []F, lda int, b []F, ldb int, beta F, c []F, ldc int) {
	workers := runtime.GOMAXPROCS(0)
	if 2*float64(m)*float64(n)*float64(k) < serialFlops {
		workers = 1
	}
	mr, nr := kn.mr, kn.nr
	kcMax := min(kn.kc, k)
	ncMax := min(kn.nc, roundUp(n, nr))
	bBuf := getBuf[F](kcMax * ncMax)
	defer putBuf(bBuf)
	packedB := *bBuf

	// Even out the row blocks (mc does not change the rounding) so that
	// the last one is not a sliver that leaves a worker idle.
	mBlocks := ceilDiv(m, kn.mc)
	mc := roundUp(ceilDiv(m, mBlocks), mr)
	mBlocks = ceilDiv(m, mc)
	for jc := 0; jc < n; jc += kn.nc {
		nb := min(kn.nc, n-jc)
		bPanels := ceilDiv(nb, nr)
		// Split the panels of this column block so that there are a few
		// tasks per worker even when m is small.
		chunks := 1
		if workers > 1 {
			chunks = min(bPanels, max(1, ceilDiv(4*workers, mBlocks)))
		}
		panelsPerChunk := ceilDiv(bPanels, chunks)
		chunks = ceilDiv(bPanels, panelsPerChunk)

		for pc := 0; pc < k; pc += kn.kc {
			kb := min(kn.kc, k-pc)
			first := pc == 0

			parallelFor(workers, bPanels, func(q int) {
				j := q * nr
				packB(transB, b, ldb, pc, jc+j, kb, min(nr, nb-j), nr, packedB[q*kb*nr:(q+1)*kb*nr])
			})

			parallelFor(workers, mBlocks*chunks, func(t int) {
				ic := (t / chunks) * mc
				q0 := (t % chunks) * panelsPerChunk
				q1 := min(bPanels, q0+panelsPerChunk)
				mb := min(mc, m-ic)
				aBuf := getBuf[F](roundUp(mb, mr) * kb)
				packedA := *aBuf
				for ir := 0; ir < mb; ir += mr {
					packA(transA, a, lda, ic+ir, pc, min(mr, mb-ir), kb, mr, packedA[ir*kb:(ir+mr)*kb])
				}
				var ab [maxTile]F
				tile := ab[:mr*nr]
				for q := q0; q < q1; q++ {
					j := q * nr
					nn := min(nr, nb-j)
					bp := packedB[q*kb*nr : (q+1)*kb*nr]
					for ir := 0; ir < mb; ir += mr {
						pa := packedA[ir*kb : (ir+mr)*kb]
						mm := min(mr, mb-ir)
						if kn.tile != nil && mm == mr && nn == nr {
							kn.tile(kb, pa, bp, c[(ic+ir)*ldc+jc+j:], ldc, alpha, beta, first)
							continue
						}
						kn.fn(kb, pa, bp, tile)
						storeTile(c, ldc, ic+ir, jc+j, mm, nn, tile, nr, alpha, beta, first)
					}
				}
				putBuf(aBuf)
			})
		}
	}
}

// parallelFor runs fn(0..n-1) on up to workers goroutines, handing out
// indices dynamically. Which goroutine runs an index never changes what it
// computes.
func parallelFor(workers, n int, fn func(int)) {
	if workers <= 1 || n <= 1 {
		for i := 0; i < n; i++ {
			fn(i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	g := min(workers, n)
	wg.Add(g)
	for w := 0; w < g; w++ {
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				fn(i)
			}
		}()
	}
	wg.Wait()
}

// How a tile is merged into C: the first k slice applies beta (and does not
// read C when beta is zero); later slices accumulate.
const (
	mergeSet   = 0 // C = alpha·tile
	mergeAdd   = 1 // C += alpha·tile
	mergeScale = 2 // C = alpha·tile + beta·C
)

func mergeMode[F float32 | float64](beta F, first bool) int {
	switch {
	case !first || beta == 1:
		return mergeAdd
	case beta == 0:
		return mergeSet
	default:
		return mergeScale
	}
}

// storeTile merges the mm×nn top-left part of the tile ab (row stride nr)
// into C at (i0, j0) as mergeMode says. Each product is rounded before the
// sum (the conversions forbid fusing them into one multiply-add), so that
// edge tiles round exactly as the full tiles that vector kernels merge
// themselves.
func storeTile[F float32 | float64](c []F, ldc, i0, j0, mm, nn int, ab []F, nr int, alpha, beta F, first bool) {
	mode := mergeMode(beta, first)
	for r := 0; r < mm; r++ {
		row := c[(i0+r)*ldc+j0 : (i0+r)*ldc+j0+nn]
		src := ab[r*nr : r*nr+nn]
		switch mode {
		case mergeAdd:
			for j := range row {
				row[j] += F(alpha * src[j])
			}
		case mergeSet:
			for j := range row {
				row[j] = alpha * src[j]
			}
		default:
			for j := range row {
				row[j] = F(alpha*src[j]) + F(beta*row[j])
			}
		}
	}
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

func roundUp(a, b int) int { return ceilDiv(a, b) * b }
