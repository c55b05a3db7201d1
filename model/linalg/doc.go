// Package linalg owns the dense linear algebra of the CPU reference backend:
// the general matrix multiply [Gemm] that every projection (in_proj,
// out_proj, the LM head) and its backward pass goes through, and the two
// vector helpers [Axpy] and [Dot].
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
// The package is pure Go. By default the micro-kernels are scalar Go. When
// the program is built with GOEXPERIMENT=simd on amd64 and the CPU has AVX2
// and FMA, vector micro-kernels written with simd/archsimd are used instead;
// [KernelName] reports which one is active. The two kernels round
// differently (the vector ones fuse multiply and add), so results are
// bit-reproducible for a given build on a given CPU class, not across them.
//
// The package must not allocate per call beyond its pooled packing buffers,
// start long-lived goroutines, or do I/O.
package linalg
