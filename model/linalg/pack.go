package linalg

// packA copies rows [i0, i0+mm) and columns [p0, p0+kb) of op(A) into one
// micro-panel dst of kb×mr elements laid out column by column:
// dst[p·mr+r] = op(A)[i0+r][p0+p]. Rows mm..mr-1 are zero.
func packA[F float32 | float64](trans bool, a []F, lda, i0, p0, mm, kb, mr int, dst []F) {
	dst = dst[:kb*mr]
	if trans {
		// op(A)[i][p] = a[p·lda+i]: each p is a contiguous run of mm values.
		for p := 0; p < kb; p++ {
			src := a[(p0+p)*lda+i0 : (p0+p)*lda+i0+mm]
			d := dst[p*mr : p*mr+mr]
			copy(d, src)
			clear(d[mm:])
		}
		return
	}
	// op(A)[i][p] = a[i·lda+p]: each row is contiguous; scatter it with
	// stride mr.
	for r := 0; r < mm; r++ {
		src := a[(i0+r)*lda+p0 : (i0+r)*lda+p0+kb]
		for p, v := range src {
			dst[p*mr+r] = v
		}
	}
	for r := mm; r < mr; r++ {
		for p := 0; p < kb; p++ {
			dst[p*mr+r] = 0
		}
	}
}

// packB copies rows [p0, p0+kb) and columns [j0, j0+nn) of op(B) into one
// micro-panel dst of kb×nr elements laid out row by row:
// dst[p·nr+j] = op(B)[p0+p][j0+j]. Columns nn..nr-1 are zero.
func packB[F float32 | float64](trans bool, b []F, ldb, p0, j0, kb, nn, nr int, dst []F) {
	dst = dst[:kb*nr]
	if !trans {
		// op(B)[p][j] = b[p·ldb+j]: each p is a contiguous run of nn values.
		for p := 0; p < kb; p++ {
			src := b[(p0+p)*ldb+j0 : (p0+p)*ldb+j0+nn]
			d := dst[p*nr : p*nr+nr]
			copy(d, src)
			clear(d[nn:])
		}
		return
	}
	// op(B)[p][j] = b[j·ldb+p]: each stored row j is contiguous in p;
	// scatter it with stride nr.
	for j := 0; j < nn; j++ {
		src := b[(j0+j)*ldb+p0 : (j0+j)*ldb+p0+kb]
		for p, v := range src {
			dst[p*nr+j] = v
		}
	}
	for j := nn; j < nr; j++ {
		for p := 0; p < kb; p++ {
			dst[p*nr+j] = 0
		}
	}
}
