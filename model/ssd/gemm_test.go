package ssd

import (
	"math/rand/v2"
	"testing"
)

// TestGemmNT compares the tiled kernel with a plain triple loop on shapes
// that exercise every edge path; the summation order is the same, so the
// results must be identical.
func TestGemmNT(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, s := range [][3]int{{1, 1, 1}, {2, 4, 3}, {3, 5, 7}, {5, 9, 1}, {8, 8, 16}, {7, 13, 0}} {
		m, n, k := s[0], s[1], s[2]
		lda, ldb, ldc := k+2, k+1, n+3
		a, b := normals(r, m*lda, 0, 1), normals(r, n*ldb, 0, 1)
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
		gemmNT(m, n, k, a, lda, b, ldb, c, ldc)
		if !bitEqual(c, want) {
			t.Errorf("m=%d n=%d k=%d: tiled result differs from the plain loop", m, n, k)
		}
	}
}
