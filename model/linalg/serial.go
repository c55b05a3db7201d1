package linalg

import (
	"fmt"
	"unsafe"

	"github.com/m2train/m2train/model"
)

// Structure describes zeros in op(A), or entries of C that are not wanted,
// that GemmStructured may exploit to skip micro-tiles. Callers that run many
// small products on goroutines of their own (the SSD scan's per-chunk
// products) use it for causal, triangular factors.
type Structure uint8

const (
	// Dense has no structure: every term of every element is computed.
	Dense Structure = iota
	// LowerA declares op(A) lower trapezoidal: op(A)[i][p] contributes
	// nothing for p > i, whatever A holds there (it may hold garbage,
	// NaN included). Row i of C sums p over [0, min(i+1, k)).
	LowerA
	// UpperA declares op(A) upper trapezoidal: op(A)[i][p] contributes
	// nothing for p < i, whatever A holds there. Row i of C sums p over
	// [i, k); rows with i >= k sum nothing and become beta·C.
	UpperA
	// LowerC asks only for the lower trapezoid of C: C[i][j] with j <= i
	// is computed, and the entries with j > i are neither read nor
	// written.
	LowerC
)

// String returns the name of the structure.
func (s Structure) String() string {
	switch s {
	case Dense:
		return "Dense"
	case LowerA:
		return "LowerA"
	case UpperA:
		return "UpperA"
	case LowerC:
		return "LowerC"
	}
	return fmt.Sprintf("Structure(%d)", uint8(s))
}

// GemmSerial is Gemm computed entirely on the calling goroutine, whatever
// the problem size, for callers that already spread independent products
// over goroutines of their own. It takes the same arguments, panics on the
// same errors and gives bitwise the same C as Gemm.
func GemmSerial[T model.Float](transA, transB bool, m, n, k int, alpha T, a []T, lda int, b []T, ldb int, beta T, c []T, ldc int) {
	gemmSerialEntry("GemmSerial", Dense, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// GemmStructured is GemmSerial for a product with the structure s (see
// Structure): it computes C = alpha·op(A)·op(B) + beta·C on the calling
// goroutine, skipping the micro-tiles and the k ranges that s makes
// redundant. Every element that it computes sums its remaining terms in
// increasing p order, in the same kc slices as Gemm, so it equals Gemm on
// the same operands with the excluded entries of op(A) set to zero, up to
// the sign of zero results and the NaN that 0·Inf would have made.
//
// GemmStructured panics like Gemm on bad sizes, strides or lengths, and
// when s is not one of the declared structures.
func GemmStructured[T model.Float](s Structure, transA, transB bool, m, n, k int, alpha T, a []T, lda int, b []T, ldb int, beta T, c []T, ldc int) {
	gemmSerialEntry("GemmStructured", s, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

func gemmSerialEntry[T model.Float](fn string, s Structure, transA, transB bool, m, n, k int, alpha T, a []T, lda int, b []T, ldb int, beta T, c []T, ldc int) {
	if s > LowerC {
		panic(fmt.Sprintf("linalg: %s: unknown structure %v", fn, s))
	}
	checkArgs(fn, transA, transB, m, n, k, len(a), lda, len(b), ldb, len(c), ldc)
	if m == 0 || n == 0 {
		return
	}
	if k == 0 || alpha == 0 {
		if s == LowerC {
			scaleCLower(m, n, beta, c, ldc)
		} else {
			scaleC(m, n, beta, c, ldc)
		}
		return
	}
	if unsafe.Sizeof(alpha) == 4 {
		gemmSerial(kernel32, s, transA, transB, m, n, k, float32(alpha), asF32(a), lda, asF32(b), ldb, float32(beta), asF32(c), ldc)
		return
	}
	gemmSerial(kernel64, s, transA, transB, m, n, k, float64(alpha), asF64(a), lda, asF64(b), ldb, float64(beta), asF64(c), ldc)
}

// scaleCLower is scaleC restricted to the entries with j <= i.
func scaleCLower[T model.Float](m, n int, beta T, c []T, ldc int) {
	for i := 0; i < m; i++ {
		scaleC(1, min(n, i+1), beta, c[i*ldc:], ldc)
	}
}

// gemmSerial is the single-goroutine driver. It blocks and packs as gemm
// does (nc column blocks, kc slices in increasing order, mc row blocks), so
// that a Dense product rounds exactly as Gemm's, and applies the structure
// per micro-tile: the k range of a tile of LowerA or UpperA is cut to the
// terms its rows need, the entries of op(A) excluded inside that range are
// zeroed in the packed panel, and the tiles of LowerC above the diagonal
// are skipped while those that straddle it store only their lower part.
func gemmSerial[F float32 | float64](kn *kernel[F], s Structure, transA, transB bool, m, n, k int, alpha F, a []F, lda int, b []F, ldb int, beta F, c []F, ldc int) {
	mr, nr := kn.mr, kn.nr
	kcMax := min(kn.kc, k)
	ncMax := min(kn.nc, roundUp(n, nr))
	mcMax := min(kn.mc, roundUp(m, mr))
	buf := getBuf[F](kcMax * (ncMax + mcMax))
	defer putBuf(buf)
	packedB := (*buf)[:kcMax*ncMax]
	packedA := (*buf)[kcMax*ncMax:]
	var ab [maxTile]F
	tile := ab[:mr*nr]

	for jc := 0; jc < n; jc += kn.nc {
		nb := min(kn.nc, n-jc)
		if s == LowerC {
			// Columns j > m-1 are above the diagonal of every row.
			if jc >= m {
				break
			}
			nb = min(nb, m-jc)
		}
		bPanels := ceilDiv(nb, nr)
		for pc := 0; pc < k; pc += kn.kc {
			kb := min(kn.kc, k-pc)
			for q := 0; q < bPanels; q++ {
				j := q * nr
				packBPanel(transB, b, ldb, pc, jc+j, kb, min(nr, nb-j), nr, packedB[q*kb*nr:(q+1)*kb*nr])
			}
			for ic := 0; ic < m; ic += kn.mc {
				mb := min(kn.mc, m-ic)
				for ir := 0; ir < mb; ir += mr {
					i0, mm := ic+ir, min(mr, mb-ir)
					// Pack only the k range [lo, hi) that the panel's
					// tiles read (see rowRange).
					lo, hi := rowRange(s, i0, mm, k)
					lo, hi = max(lo, pc), min(hi, pc+kb)
					if lo >= hi {
						continue
					}
					pa := packedA[ir*kb+(lo-pc)*mr : ir*kb+(hi-pc)*mr]
					packAPanel(transA, a, lda, i0, lo, mm, hi-lo, mr, pa)
					maskPanel(s, pa, mr, i0, mm, lo, hi-lo)
				}
				for q := 0; q < bPanels; q++ {
					j := q * nr
					nn := min(nr, nb-j)
					bp := packedB[q*kb*nr : (q+1)*kb*nr]
					for ir := 0; ir < mb; ir += mr {
						i0, mm := ic+ir, min(mr, mb-ir)
						j0 := jc + j
						if s == LowerC && j0 >= i0+mm {
							continue
						}
						k0, k1 := rowRange(s, i0, mm, k)
						if k0 >= k1 {
							if pc == 0 {
								scaleC(mm, nn, beta, c[i0*ldc+j0:], ldc)
							}
							continue
						}
						lo, hi := max(k0, pc), min(k1, pc+kb)
						if lo >= hi {
							continue
						}
						first := lo == k0
						pa := packedA[ir*kb+(lo-pc)*mr : ir*kb+(hi-pc)*mr]
						pb := bp[(lo-pc)*nr : (hi-pc)*nr]
						if s == LowerC && j0+nn-1 > i0 {
							kn.fn(hi-lo, pa, pb, tile)
							storeTileLower(c, ldc, i0, j0, mm, nn, tile, nr, alpha, beta, first)
							continue
						}
						if kn.tile != nil && mm == mr && nn == nr {
							kn.tile(hi-lo, pa, pb, c[i0*ldc+j0:], ldc, alpha, beta, first)
							continue
						}
						kn.fn(hi-lo, pa, pb, tile)
						storeTile(c, ldc, i0, j0, mm, nn, tile, nr, alpha, beta, first)
					}
				}
			}
		}
	}
}

// rowRange returns the k range [k0, k1) that rows [i0, i0+mm) of op(A)
// need under the structure s.
func rowRange(s Structure, i0, mm, k int) (k0, k1 int) {
	switch s {
	case LowerA:
		return 0, min(k, i0+mm)
	case UpperA:
		return min(k, i0), k
	}
	return 0, k
}

// maskPanel zeroes, in the packed micro-panel pa of rows [i0, i0+mm) and
// columns [pc, pc+kb) of op(A), the entries that the structure excludes
// and that the tile's k range still covers: p in (i, i0+mm) for LowerA and
// p in [i0, i) for UpperA, for each row i.
func maskPanel[F float32 | float64](s Structure, pa []F, mr, i0, mm, pc, kb int) {
	switch s {
	case LowerA:
		for r := 0; r < mm; r++ {
			for p := max(pc, i0+r+1); p < min(pc+kb, i0+mm); p++ {
				pa[(p-pc)*mr+r] = 0
			}
		}
	case UpperA:
		for r := 1; r < mm; r++ {
			for p := max(pc, i0); p < min(pc+kb, i0+r); p++ {
				pa[(p-pc)*mr+r] = 0
			}
		}
	}
}

// storeTileLower is storeTile for a tile that straddles the diagonal of a
// LowerC product: row i0+r stores only the columns j <= i0+r.
func storeTileLower[F float32 | float64](c []F, ldc, i0, j0, mm, nn int, ab []F, nr int, alpha, beta F, first bool) {
	for r := 0; r < mm; r++ {
		if w := min(nn, i0+r-j0+1); w > 0 {
			storeTile(c, ldc, i0+r, j0, 1, w, ab[r*nr:], nr, alpha, beta, first)
		}
	}
}
