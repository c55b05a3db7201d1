//go:build amd64 && !purego

package linalg

// The AVX2 kernels, in kernel_amd64.s, keep a 6×16 (float32) or 6×8
// (float64) tile in twelve 256-bit accumulators, leaving registers for two
// B vectors and the broadcast A values; every update is one fused
// multiply-add per lane. They are assembly rather than Go so that the
// default build gets them: assembly is never preempted asynchronously, and
// each kernel ends with VZEROUPPER, so the legacy-SSE float code that the
// Go compiler emits elsewhere never runs with dirty upper register halves.
//
// The blocking keeps one 16 KiB (float32) or 16 KiB (float64) packed B
// micro-panel in L1 while the packed A block (kc·mc elements, 144 KiB or
// 192 KiB) streams from L2.
var (
	avx2Kernel32 = kernel[float32]{name: "avx2-6x16", mr: 6, nr: 16, fn: avx2Tile6x16, tile: avx2Merge6x16, kc: 256, mc: 144, nc: 2048}
	avx2Kernel64 = kernel[float64]{name: "avx2-6x8", mr: 6, nr: 8, fn: avx2Tile6x8, tile: avx2Merge6x8, kc: 256, mc: 96, nc: 2048}
)

func init() {
	if hasAVX2FMA() {
		kernel32 = &avx2Kernel32
		kernel64 = &avx2Kernel64
	}
}

// CPUID and XCR0 bits that the kernels depend on.
const (
	cpuidFMA     = 1 << 12 // leaf 1, ECX
	cpuidOSXSAVE = 1 << 27 // leaf 1, ECX: XGETBV is usable
	cpuidAVX     = 1 << 28 // leaf 1, ECX
	cpuidAVX2    = 1 << 5  // leaf 7 subleaf 0, EBX
	xcr0SSE      = 1 << 1  // the OS saves XMM state
	xcr0AVX      = 1 << 2  // the OS saves the upper halves of YMM
)

// hasAVX2FMA reports whether the CPU has AVX2 and FMA and the operating
// system saves the YMM registers across context switches.
func hasAVX2FMA() bool {
	maxLeaf, _, _, _ := cpuid(0, 0)
	if maxLeaf < 7 {
		return false
	}
	_, _, ecx1, _ := cpuid(1, 0)
	if ecx1&(cpuidFMA|cpuidOSXSAVE|cpuidAVX) != cpuidFMA|cpuidOSXSAVE|cpuidAVX {
		return false
	}
	if xcr0, _ := xgetbv0(); xcr0&(xcr0SSE|xcr0AVX) != xcr0SSE|xcr0AVX {
		return false
	}
	_, ebx7, _, _ := cpuid(7, 0)
	return ebx7&cpuidAVX2 != 0
}

// cpuid executes CPUID for the given leaf and subleaf.
//
//go:noescape
func cpuid(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)

// xgetbv0 reads the extended control register XCR0. Call it only when
// CPUID reports OSXSAVE.
//
//go:noescape
func xgetbv0() (eax, edx uint32)

// kernel6x16 computes the 6×16 tile Σ_p a[6p+i]·b[16p+j] over kc ≥ 0 steps
// of packed panels and merges it into the six rows of 16 elements at c, ldc
// elements apart: mode mergeSet writes alpha·tile, mergeAdd adds alpha·tile
// and mergeScale writes alpha·tile + beta·c. The caller guarantees that
// a, b and c hold 6·kc, 16·kc and 5·ldc+16 elements.
//
//go:noescape
func kernel6x16(kc int, a, b, c *float32, ldc int, alpha, beta float32, mode int)

// kernel6x8 is kernel6x16 for float64 with 8 columns.
//
//go:noescape
func kernel6x8(kc int, a, b, c *float64, ldc int, alpha, beta float64, mode int)

// avx2Tile6x16 is the kernel.fn form of kernel6x16: it writes the tile
// into ab unscaled (alpha = 1 is exact).
func avx2Tile6x16(kc int, a, b, ab []float32) {
	_ = ab[6*16-1]
	if kc == 0 {
		clear(ab[:6*16])
		return
	}
	_, _ = a[6*kc-1], b[16*kc-1]
	kernel6x16(kc, &a[0], &b[0], &ab[0], 16, 1, 0, mergeSet)
}

// avx2Merge6x16 is the kernel.tile form of kernel6x16.
func avx2Merge6x16(kc int, a, b, c []float32, ldc int, alpha, beta float32, first bool) {
	_, _, _ = a[6*kc-1], b[16*kc-1], c[5*ldc+16-1]
	kernel6x16(kc, &a[0], &b[0], &c[0], ldc, alpha, beta, mergeMode(beta, first))
}

// avx2Tile6x8 is the kernel.fn form of kernel6x8.
func avx2Tile6x8(kc int, a, b, ab []float64) {
	_ = ab[6*8-1]
	if kc == 0 {
		clear(ab[:6*8])
		return
	}
	_, _ = a[6*kc-1], b[8*kc-1]
	kernel6x8(kc, &a[0], &b[0], &ab[0], 8, 1, 0, mergeSet)
}

// avx2Merge6x8 is the kernel.tile form of kernel6x8.
func avx2Merge6x8(kc int, a, b, c []float64, ldc int, alpha, beta float64, first bool) {
	_, _, _ = a[6*kc-1], b[8*kc-1], c[5*ldc+8-1]
	kernel6x8(kc, &a[0], &b[0], &c[0], ldc, alpha, beta, mergeMode(beta, first))
}
