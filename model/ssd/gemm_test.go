package ssd

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestGemmNT compares the tiled kernel and its triangular variants with a
// plain triple loop on shapes that exercise every edge path. Zeros add
// nothing and the summation order is the same, so results must be
// identical.
func TestGemmNT(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, v := range []tri{full, lowerA, upperA, lowerC} {
		for _, s := range [][3]int{{1, 1, 1}, {2, 4, 3}, {3, 5, 7}, {5, 9, 1}, {8, 8, 16}, {7, 13, 0}, {7, 6, 7}, {6, 9, 6}} {
			m, n, k := s[0], s[1], s[2]
			if (v == lowerA || v == upperA) && k != m {
				continue // A is square
			}
			t.Run(fmt.Sprintf("tri%d_m%d_n%d_k%d", v, m, n, k), func(t *testing.T) {
				lda, ldb, ldc := k+2, k+1, n+3
				a, b := normals(r, m*lda, 0, 1), normals(r, n*ldb, 0, 1)
				for i := 0; i < m; i++ {
					for kk := 0; kk < k; kk++ {
						if (v == lowerA && kk > i) || (v == upperA && kk < i) {
							a[i*lda+kk] = 0
						}
					}
				}
				c := normals(r, m*ldc, 0, 1)
				want := append([]float64(nil), c...)
				for i := 0; i < m; i++ {
					for j := 0; j < n; j++ {
						var acc float64
						for kk := 0; kk < k; kk++ {
							acc += a[i*lda+kk] * b[j*ldb+kk]
						}
						want[i*ldc+j] = acc
					}
				}
				gemmNT(m, n, k, a, lda, b, ldb, c, ldc, v)
				for i := 0; i < m; i++ {
					for j := 0; j < n; j++ {
						if v == lowerC && j > i {
							continue
						}
						if !bitEqual(c[i*ldc+j:i*ldc+j+1], want[i*ldc+j:i*ldc+j+1]) {
							t.Fatalf("C[%d,%d] = %v, want %v", i, j, c[i*ldc+j], want[i*ldc+j])
						}
					}
				}
			})
		}
	}
}
