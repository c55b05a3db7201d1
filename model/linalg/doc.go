// Package linalg owns the dense linear algebra of the CPU reference backend:
// the general matrix multiply [Gemm] that every projection (in_proj,
// out_proj, the LM head) and its backward pass goes through; its
// single-goroutine forms [GemmSerial] and [GemmStructured] (causal,
// triangular operands and results) for callers that parallelise themselves,
// such as the SSD scan's per-chunk products; and the two vector helpers
// [Axpy] and [Dot].
//
// Matrices are row-major slices with an explicit row stride. Gemm is a
// blocked, packed algorithm: op(A) and op(B) are copied into contiguous
// micro-panels sized for the L1 and L2 caches, and a register-blocked
// micro-kernel computes one MR×NR tile of C at a time. Output tiles are
// spread over runtime.GOMAXPROCS(0) goroutines; the k dimension is never
// split between goroutines, and every element of C accumulates its k terms
// in the same fixed order, so the bits of C do not depend on the number of
// goroutines or on scheduling.
//
// The micro-kernels come in two kinds. The portable one is scalar Go and
// runs everywhere. On amd64 CPUs with AVX2 and FMA, kernels written in Go
// assembly (kernel_amd64.s) are selected during package initialisation;
// building with -tags purego keeps the scalar kernel. The assembly kernels
// end with VZEROUPPER and, being assembly, are never preempted
// asynchronously, so they leave no dirty upper vector state behind to slow
// the legacy-SSE float code of the rest of the program. [KernelName] reports
// which kernels are active. The two kinds round differently (the vector ones
// fuse multiply and add), so results are bit-reproducible for a given build
// on a given CPU class, not across them.
//
// The package must not allocate per call beyond its pooled packing buffers,
// start long-lived goroutines, or do I/O.
package linalg
