package linalg

// kernel32 and kernel64 are the micro-kernels in use. They start as the
// portable scalar kernels; a build with a vector kernel for the running CPU
// replaces them during package initialisation.
var (
	kernel32 = &scalarKernel32
	kernel64 = &scalarKernel64
)

var (
	scalarKernel32 = kernel[float32]{name: "scalar-4x2", mr: 4, nr: 2, fn: scalar4x2[float32], kc: 256, mc: 128, nc: 2048}
	scalarKernel64 = kernel[float64]{name: "scalar-4x2", mr: 4, nr: 2, fn: scalar4x2[float64], kc: 256, mc: 128, nc: 2048}
)

// KernelName reports the micro-kernels that Gemm uses in this process for
// float32 and float64, for example "scalar-4x2" or "avx2-6x16".
func KernelName() (f32, f64 string) { return kernel32.name, kernel64.name }

// scalar4x2 is the portable micro-kernel: a 4×2 tile of accumulators held
// in registers. The loop takes two k steps per iteration; with one, the
// compiler schedules all eight products ahead of the accumulating adds and
// spills. The order of the terms of each element is still p = 0, 1, 2, ...
func scalar4x2[F float32 | float64](kc int, a, b, ab []F) {
	var c00, c01, c10, c11, c20, c21, c30, c31 F
	a = a[:4*kc]
	b = b[:2*kc]
	for len(a) >= 8 && len(b) >= 4 {
		a0, a1, a2, a3 := a[0], a[1], a[2], a[3]
		b0, b1 := b[0], b[1]
		c00 += a0 * b0
		c01 += a0 * b1
		c10 += a1 * b0
		c11 += a1 * b1
		c20 += a2 * b0
		c21 += a2 * b1
		c30 += a3 * b0
		c31 += a3 * b1
		a0, a1, a2, a3 = a[4], a[5], a[6], a[7]
		b0, b1 = b[2], b[3]
		c00 += a0 * b0
		c01 += a0 * b1
		c10 += a1 * b0
		c11 += a1 * b1
		c20 += a2 * b0
		c21 += a2 * b1
		c30 += a3 * b0
		c31 += a3 * b1
		a = a[8:]
		b = b[4:]
	}
	if len(a) >= 4 && len(b) >= 2 {
		a0, a1, a2, a3 := a[0], a[1], a[2], a[3]
		b0, b1 := b[0], b[1]
		c00 += a0 * b0
		c01 += a0 * b1
		c10 += a1 * b0
		c11 += a1 * b1
		c20 += a2 * b0
		c21 += a2 * b1
		c30 += a3 * b0
		c31 += a3 * b1
	}
	ab = ab[:8]
	ab[0], ab[1] = c00, c01
	ab[2], ab[3] = c10, c11
	ab[4], ab[5] = c20, c21
	ab[6], ab[7] = c30, c31
}
