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
			// An element loop beats a memmove call for runs this short.
			for r, v := range src {
				d[r] = v
			}
			clear(d[mm:])
		}
		return
	}
	// op(A)[i][p] = a[i·lda+p]: each row is contiguous; scatter it with
	// stride mr.
	transposeInto(dst, mr, a[i0*lda+p0:], lda, mm, kb)
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
			for j, v := range src {
				d[j] = v
			}
			clear(d[nn:])
		}
		return
	}
	// op(B)[p][j] = b[j·ldb+p]: each stored row j is contiguous in p;
	// scatter it with stride nr.
	transposeInto(dst, nr, b[j0*ldb+p0:], ldb, nn, kb)
	for j := nn; j < nr; j++ {
		for p := 0; p < kb; p++ {
			dst[p*nr+j] = 0
		}
	}
}

// transposeInto copies rows r < rows of src (row stride ld, kb elements
// each) into columns of dst (row stride w): dst[p·w+r] = src[r·ld+p]. It
// takes four rows at a time, so that each step writes four adjacent
// elements of dst.
func transposeInto[F float32 | float64](dst []F, w int, src []F, ld, rows, kb int) {
	r := 0
	for ; r+4 <= rows; r += 4 {
		s0 := src[r*ld : r*ld+kb]
		s1 := src[(r+1)*ld : (r+1)*ld+kb]
		s2 := src[(r+2)*ld : (r+2)*ld+kb]
		s3 := src[(r+3)*ld : (r+3)*ld+kb]
		s1, s2, s3 = s1[:len(s0)], s2[:len(s0)], s3[:len(s0)]
		for p, v := range s0 {
			d := dst[p*w+r : p*w+r+4 : p*w+r+4]
			d[0], d[1], d[2], d[3] = v, s1[p], s2[p], s3[p]
		}
	}
	for ; r < rows; r++ {
		for p, v := range src[r*ld : r*ld+kb] {
			dst[p*w+r] = v
		}
	}
}
