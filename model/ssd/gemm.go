package ssd

import "github.com/m2train/m2train/model"

// tri selects the triangular variants of gemmNT, which skip work that is
// known to be zero or unused when A or C is triangular.
type tri int

const (
	// full: no structure.
	full tri = iota
	// lowerA: A is m×m lower triangular and its entries A[i, i+1] are
	// zero; row i sums k over [0, i] (row pairs read one extra zero).
	lowerA
	// upperA: A is m×m upper triangular and its entries A[i+1, i] are
	// zero; row i sums k over [i, K).
	upperA
	// lowerC: only C[i, j] for j <= i is needed; entries above the
	// diagonal are left unspecified.
	lowerC
)

// gemmNT overwrites the m×n matrix C with A·Bᵀ: C[i,j] = Σ_k A[i,k]·B[j,k],
// where A is m×k with row stride lda, B is n×k with row stride ldb, and C
// has row stride ldc. Both operands are read along contiguous rows. t
// selects a triangular variant (see tri).
//
// Tiles of 2×4 outputs are accumulated in registers to halve the loads per
// multiply-add. Every output element is one accumulator that adds its
// products in ascending k order, in the tiled and in the edge loops alike,
// so the result depends only on the operands.
func gemmNT[T model.Float](m, n, k int, a []T, lda int, b []T, ldb int, c []T, ldc int, t tri) {
	i := 0
	for ; i+2 <= m; i += 2 {
		k0, k1, nn := 0, k, n
		switch t {
		case lowerA:
			k1 = min(k, i+2)
		case upperA:
			k0 = i
		case lowerC:
			nn = min(n, i+2)
		}
		a0 := a[i*lda+k0 : i*lda+k1]
		a1 := a[(i+1)*lda+k0 : (i+1)*lda+k1]
		c0 := c[i*ldc : i*ldc+nn]
		c1 := c[(i+1)*ldc : (i+1)*ldc+nn]
		j := 0
		for ; j+4 <= nn; j += 4 {
			b0 := b[j*ldb+k0 : j*ldb+k1]
			b1 := b[(j+1)*ldb+k0 : (j+1)*ldb+k1]
			b2 := b[(j+2)*ldb+k0 : (j+2)*ldb+k1]
			b3 := b[(j+3)*ldb+k0 : (j+3)*ldb+k1]
			var s00, s01, s02, s03, s10, s11, s12, s13 T
			for kk, x0 := range a0 {
				x1 := a1[kk]
				y0, y1, y2, y3 := b0[kk], b1[kk], b2[kk], b3[kk]
				s00 += x0 * y0
				s01 += x0 * y1
				s02 += x0 * y2
				s03 += x0 * y3
				s10 += x1 * y0
				s11 += x1 * y1
				s12 += x1 * y2
				s13 += x1 * y3
			}
			c0[j], c0[j+1], c0[j+2], c0[j+3] = s00, s01, s02, s03
			c1[j], c1[j+1], c1[j+2], c1[j+3] = s10, s11, s12, s13
		}
		for ; j < nn; j++ {
			bj := b[j*ldb+k0 : j*ldb+k1]
			var s0, s1 T
			for kk, y := range bj {
				s0 += a0[kk] * y
				s1 += a1[kk] * y
			}
			c0[j], c1[j] = s0, s1
		}
	}
	if i < m {
		k0, k1, nn := 0, k, n
		switch t {
		case lowerA:
			k1 = min(k, i+1)
		case upperA:
			k0 = i
		case lowerC:
			nn = min(n, i+1)
		}
		a0 := a[i*lda+k0 : i*lda+k1]
		c0 := c[i*ldc : i*ldc+nn]
		for j := range c0 {
			bj := b[j*ldb+k0 : j*ldb+k1]
			var s T
			for kk, y := range bj {
				s += a0[kk] * y
			}
			c0[j] = s
		}
	}
}

// transposeInto writes the r×cols matrix src (row stride lds) transposed
// into dst as cols×r with row stride ldd, scaling row i of src by scale[i]
// when scale is not nil.
func transposeInto[T model.Float](r, cols int, src []T, lds int, scale []T, dst []T, ldd int) {
	for i := 0; i < r; i++ {
		row := src[i*lds : i*lds+cols]
		if scale != nil {
			s := scale[i]
			for j, v := range row {
				dst[j*ldd+i] = s * v
			}
		} else {
			for j, v := range row {
				dst[j*ldd+i] = v
			}
		}
	}
}
