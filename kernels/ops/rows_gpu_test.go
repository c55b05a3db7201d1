//go:build gpu

package ops

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/m2train/m2train/kernels"
)

// TestCopyRowsGPU gathers and scatters strided rows by index against the
// same copies on the host: copies are exact, so the tolerance is zero. A
// gather of an index outside the rows gives a row of NaN, a scatter of one
// copies nothing.
func TestCopyRowsGPU(t *testing.T) {
	if !gpuOps.HasRowCopies() {
		t.Fatal("the library lacks m2k_copy_rows")
	}
	const rows, width, ldSrc, ldDst, n = 300, 70, 75, 72, 41
	for _, dt := range dtypes {
		rng := rand.New(rand.NewPCG(21, uint64(dt)))
		perm := rng.Perm(rows)
		idx := make([]int32, n)
		for i := range idx {
			idx[i] = int32(perm[i]) // distinct, as a scatter needs
		}

		// Gather: dst[i] = src[idx[i]], the last index out of range.
		src := act(rng, dt, rows*ldSrc, 1)
		gIdx := append([]int32(nil), idx...)
		gIdx[n-1] = rows
		dst0 := act(rng, dt, n*ldDst, 1)
		dst := upload(t, dt, dst0)
		must(t, gpuOps.GatherRows(dt, &CopyRowsArgs{Dst: dst, LDDst: ldDst, Src: upload(t, dt, src), LDSrc: ldSrc,
			Idx: int32Buf(t, gIdx), N: n, Width: width, Rows: rows}, 0))
		got := download(t, dst)
		want := f64(dst0)
		for i := 0; i < n-1; i++ {
			for c := 0; c < width; c++ {
				want[i*ldDst+c] = float64(src[int(gIdx[i])*ldSrc+c])
			}
		}
		nan := 0
		for c := 0; c < width; c++ {
			j := (n-1)*ldDst + c
			if math.IsNaN(float64(got[j])) {
				nan++
			}
			got[j], want[j] = 0, 0
		}
		if nan != width {
			t.Errorf("gather %s: the row of an index out of range has %d NaN of %d", dt, nan, width)
		}
		report(t, "copy_rows_gather", dt.String(), got, want, 0)

		// Scatter: dst[idx[i]] = src[i], the first index out of range;
		// every other row of dst keeps its values.
		sIdx := append([]int32(nil), idx...)
		sIdx[0] = -1
		src = act(rng, dt, n*ldSrc, 1)
		dst0 = act(rng, dt, rows*ldDst, 1)
		dst = upload(t, dt, dst0)
		must(t, gpuOps.ScatterRows(dt, &CopyRowsArgs{Dst: dst, LDDst: ldDst, Src: upload(t, dt, src), LDSrc: ldSrc,
			Idx: int32Buf(t, sIdx), N: n, Width: width, Rows: rows}, 0))
		want = f64(dst0)
		for i := 1; i < n; i++ {
			for c := 0; c < width; c++ {
				want[int(sIdx[i])*ldDst+c] = float64(src[i*ldSrc+c])
			}
		}
		report(t, "copy_rows_scatter", dt.String(), download(t, dst), want, 0)

		// N = 0 copies nothing and needs no index.
		must(t, gpuOps.ScatterRows(dt, &CopyRowsArgs{Dst: dst, LDDst: ldDst, Src: dst, LDSrc: ldDst,
			Idx: int32Buf(t, []int32{0}), N: 0, Width: width, Rows: rows}, 0))
	}
	// Argument rules reach the caller before any launch.
	b := zeros(t, kernels.F32, 8)
	err := gpuOps.GatherRows(kernels.F32, &CopyRowsArgs{Dst: b, LDDst: 2, Src: b, LDSrc: 4, Idx: int32Buf(t, []int32{0}),
		N: 1, Width: 4, Rows: 2}, 0)
	if err == nil {
		t.Error("LDDst below Width was accepted")
	}
}
