//go:build goexperiment.simd && amd64

package linalg

import "simd/archsimd"

// The AVX2 kernels keep a 6×16 (float32) or 6×8 (float64) tile in twelve
// 256-bit accumulators, leaving registers for two B vectors and one
// broadcast A value; every update is one fused multiply-add per lane.
var (
	avx2Kernel32 = kernel[float32]{name: "avx2-6x16", mr: 6, nr: 16, fn: avx2Kernel6x16, kc: 256, mc: 144, nc: 2048}
	avx2Kernel64 = kernel[float64]{name: "avx2-6x8", mr: 6, nr: 8, fn: avx2Kernel6x8, kc: 256, mc: 96, nc: 2048}
)

func init() {
	if archsimd.X86.AVX2() && archsimd.X86.FMA() {
		kernel32 = &avx2Kernel32
		kernel64 = &avx2Kernel64
	}
}

func avx2Kernel6x16(kc int, a, b, ab []float32) {
	var c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51 archsimd.Float32x8
	a = a[:6*kc]
	b = b[:16*kc]
	for len(a) >= 6 && len(b) >= 16 {
		b0 := archsimd.LoadFloat32x8Slice(b[0:8])
		b1 := archsimd.LoadFloat32x8Slice(b[8:16])
		x := archsimd.BroadcastFloat32x8(a[0])
		c00 = x.MulAdd(b0, c00)
		c01 = x.MulAdd(b1, c01)
		x = archsimd.BroadcastFloat32x8(a[1])
		c10 = x.MulAdd(b0, c10)
		c11 = x.MulAdd(b1, c11)
		x = archsimd.BroadcastFloat32x8(a[2])
		c20 = x.MulAdd(b0, c20)
		c21 = x.MulAdd(b1, c21)
		x = archsimd.BroadcastFloat32x8(a[3])
		c30 = x.MulAdd(b0, c30)
		c31 = x.MulAdd(b1, c31)
		x = archsimd.BroadcastFloat32x8(a[4])
		c40 = x.MulAdd(b0, c40)
		c41 = x.MulAdd(b1, c41)
		x = archsimd.BroadcastFloat32x8(a[5])
		c50 = x.MulAdd(b0, c50)
		c51 = x.MulAdd(b1, c51)
		a = a[6:]
		b = b[16:]
	}
	ab = ab[:96]
	c00.StoreSlice(ab[0:8])
	c01.StoreSlice(ab[8:16])
	c10.StoreSlice(ab[16:24])
	c11.StoreSlice(ab[24:32])
	c20.StoreSlice(ab[32:40])
	c21.StoreSlice(ab[40:48])
	c30.StoreSlice(ab[48:56])
	c31.StoreSlice(ab[56:64])
	c40.StoreSlice(ab[64:72])
	c41.StoreSlice(ab[72:80])
	c50.StoreSlice(ab[80:88])
	c51.StoreSlice(ab[88:96])
}

func avx2Kernel6x8(kc int, a, b, ab []float64) {
	var c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51 archsimd.Float64x4
	a = a[:6*kc]
	b = b[:8*kc]
	for len(a) >= 6 && len(b) >= 8 {
		b0 := archsimd.LoadFloat64x4Slice(b[0:4])
		b1 := archsimd.LoadFloat64x4Slice(b[4:8])
		x := archsimd.BroadcastFloat64x4(a[0])
		c00 = x.MulAdd(b0, c00)
		c01 = x.MulAdd(b1, c01)
		x = archsimd.BroadcastFloat64x4(a[1])
		c10 = x.MulAdd(b0, c10)
		c11 = x.MulAdd(b1, c11)
		x = archsimd.BroadcastFloat64x4(a[2])
		c20 = x.MulAdd(b0, c20)
		c21 = x.MulAdd(b1, c21)
		x = archsimd.BroadcastFloat64x4(a[3])
		c30 = x.MulAdd(b0, c30)
		c31 = x.MulAdd(b1, c31)
		x = archsimd.BroadcastFloat64x4(a[4])
		c40 = x.MulAdd(b0, c40)
		c41 = x.MulAdd(b1, c41)
		x = archsimd.BroadcastFloat64x4(a[5])
		c50 = x.MulAdd(b0, c50)
		c51 = x.MulAdd(b1, c51)
		a = a[6:]
		b = b[8:]
	}
	ab = ab[:48]
	c00.StoreSlice(ab[0:4])
	c01.StoreSlice(ab[4:8])
	c10.StoreSlice(ab[8:12])
	c11.StoreSlice(ab[12:16])
	c20.StoreSlice(ab[16:20])
	c21.StoreSlice(ab[20:24])
	c30.StoreSlice(ab[24:28])
	c31.StoreSlice(ab[28:32])
	c40.StoreSlice(ab[32:36])
	c41.StoreSlice(ab[36:40])
	c50.StoreSlice(ab[40:44])
	c51.StoreSlice(ab[44:48])
}
