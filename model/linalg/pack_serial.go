package linalg

// packAPanel is packA with fast paths for the full micro-panels of the
// vector kernels (mr = 6): a transposed panel copies six contiguous values
// per k step, and a plain one reads its six rows side by side. Other panels
// go through packA. The packed values are the same either way.
func packAPanel[F float32 | float64](trans bool, a []F, lda, i0, p0, mm, kb, mr int, dst []F) {
	if mm != 6 || mr != 6 || kb == 0 {
		packA(trans, a, lda, i0, p0, mm, kb, mr, dst)
		return
	}
	dst = dst[:kb*6]
	if trans {
		for p := 0; p < kb; p++ {
			o := (p0+p)*lda + i0
			*(*[6]F)(dst[p*6:]) = *(*[6]F)(a[o : o+6])
		}
		return
	}
	o := i0*lda + p0
	s0 := a[o : o+kb]
	s1 := a[o+lda : o+lda+kb]
	s2 := a[o+2*lda : o+2*lda+kb]
	s3 := a[o+3*lda : o+3*lda+kb]
	s4 := a[o+4*lda : o+4*lda+kb]
	s5 := a[o+5*lda : o+5*lda+kb]
	for p, v := range s0 {
		d := dst[p*6 : p*6+6 : p*6+6]
		d[0], d[1], d[2], d[3], d[4], d[5] = v, s1[p], s2[p], s3[p], s4[p], s5[p]
	}
}

// packBPanel is packB with a fast path for full, untransposed micro-panels
// of the vector kernels (nr = 16 or 8), which copies whole rows as arrays.
// The packed values are the same as packB's.
func packBPanel[F float32 | float64](trans bool, b []F, ldb, p0, j0, kb, nn, nr int, dst []F) {
	if trans || nn != nr {
		packB(trans, b, ldb, p0, j0, kb, nn, nr, dst)
		return
	}
	switch nr {
	case 16:
		for p := 0; p < kb; p++ {
			o := (p0+p)*ldb + j0
			*(*[16]F)(dst[p*16:]) = *(*[16]F)(b[o : o+16])
		}
	case 8:
		for p := 0; p < kb; p++ {
			o := (p0+p)*ldb + j0
			*(*[8]F)(dst[p*8:]) = *(*[8]F)(b[o : o+8])
		}
	default:
		packB(trans, b, ldb, p0, j0, kb, nn, nr, dst)
	}
}
