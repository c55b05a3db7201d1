package linalg

// kernel32 and kernel64 are the micro-kernels in use. They start as the
// portable scalar kernels; a build with a vector kernel for the running CPU
// replaces them during package initialisation.
var (
	kernel32 = &scalarKernel32
	kernel64 = &scalarKernel64
)

var (
	scalarKernel32 = kernel[float32]{name: "scalar-4x4", mr: 4, nr: 4, fn: scalar4x4[float32], kc: 256, mc: 128, nc: 2048}
	scalarKernel64 = kernel[float64]{name: "scalar-4x4", mr: 4, nr: 4, fn: scalar4x4[float64], kc: 256, mc: 128, nc: 2048}
)

// KernelName reports the micro-kernels that Gemm uses in this process for
// float32 and float64, for example "scalar-4x4" or "avx2-6x16".
func KernelName() (f32, f64 string) { return kernel32.name, kernel64.name }

// scalar4x4 is the portable micro-kernel: a 4×4 tile of accumulators held in
// registers, updated once per step of the packed panels.
func scalar4x4[F float32 | float64](kc int, a, b, ab []F) {
	var c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 F
	a = a[:4*kc]
	b = b[:4*kc]
	for len(a) >= 4 && len(b) >= 4 {
		a0, a1, a2, a3 := a[0], a[1], a[2], a[3]
		b0, b1, b2, b3 := b[0], b[1], b[2], b[3]
		c00 += a0 * b0
		c01 += a0 * b1
		c02 += a0 * b2
		c03 += a0 * b3
		c10 += a1 * b0
		c11 += a1 * b1
		c12 += a1 * b2
		c13 += a1 * b3
		c20 += a2 * b0
		c21 += a2 * b1
		c22 += a2 * b2
		c23 += a2 * b3
		c30 += a3 * b0
		c31 += a3 * b1
		c32 += a3 * b2
		c33 += a3 * b3
		a = a[4:]
		b = b[4:]
	}
	ab = ab[:16]
	ab[0], ab[1], ab[2], ab[3] = c00, c01, c02, c03
	ab[4], ab[5], ab[6], ab[7] = c10, c11, c12, c13
	ab[8], ab[9], ab[10], ab[11] = c20, c21, c22, c23
	ab[12], ab[13], ab[14], ab[15] = c30, c31, c32, c33
}
