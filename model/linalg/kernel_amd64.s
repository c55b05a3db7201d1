//go:build amd64 && !purego

#include "textflag.h"

// func cpuid(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)
TEXT ·cpuid(SB), NOSPLIT, $0-24
	MOVL leaf+0(FP), AX
	MOVL subleaf+4(FP), CX
	CPUID
	MOVL AX, eax+8(FP)
	MOVL BX, ebx+12(FP)
	MOVL CX, ecx+16(FP)
	MOVL DX, edx+20(FP)
	RET

// func xgetbv0() (eax, edx uint32)
TEXT ·xgetbv0(SB), NOSPLIT, $0-8
	MOVL $0, CX
	XGETBV
	MOVL AX, eax+0(FP)
	MOVL DX, edx+4(FP)
	RET

// The micro-kernels keep the whole tile in Y0–Y11, two vectors per row
// (row r in Y(2r) and Y(2r+1)). Each k step loads the two B vectors of the
// packed B row into Y12 and Y13, broadcasts the six A values of the packed
// A column into Y14 and Y15 in turn, and issues twelve fused multiply-adds,
// so each element of the tile accumulates its terms in k order.
//
// Registers: CX k steps left, SI packed A, DX packed B, DI row of C,
// R8 ldc in bytes. The six rows of C are prefetched before the k loop, so
// that the merge after it does not wait on memory.

// STEP32 is one k step of the float32 kernel: A at a(SI), B at b(DX) and
// b+32(DX).
#define STEP32(a, b) \
	VMOVUPS b(DX), Y12; \
	VMOVUPS b+32(DX), Y13; \
	VBROADCASTSS a(SI), Y14; \
	VFMADD231PS Y12, Y14, Y0; \
	VFMADD231PS Y13, Y14, Y1; \
	VBROADCASTSS a+4(SI), Y15; \
	VFMADD231PS Y12, Y15, Y2; \
	VFMADD231PS Y13, Y15, Y3; \
	VBROADCASTSS a+8(SI), Y14; \
	VFMADD231PS Y12, Y14, Y4; \
	VFMADD231PS Y13, Y14, Y5; \
	VBROADCASTSS a+12(SI), Y15; \
	VFMADD231PS Y12, Y15, Y6; \
	VFMADD231PS Y13, Y15, Y7; \
	VBROADCASTSS a+16(SI), Y14; \
	VFMADD231PS Y12, Y14, Y8; \
	VFMADD231PS Y13, Y14, Y9; \
	VBROADCASTSS a+20(SI), Y15; \
	VFMADD231PS Y12, Y15, Y10; \
	VFMADD231PS Y13, Y15, Y11

// The merge macros write one row of the tile (r0, r1) into C at DI and
// advance DI by a row. Y14 holds alpha and Y15 beta; the products and the
// sum are rounded separately, as the Go merge in storeTile does.
#define SET32(r0, r1) \
	VMULPS r0, Y14, r0; \
	VMULPS r1, Y14, r1; \
	VMOVUPS r0, (DI); \
	VMOVUPS r1, 32(DI); \
	ADDQ R8, DI

#define ADD32(r0, r1) \
	VMULPS r0, Y14, r0; \
	VMULPS r1, Y14, r1; \
	VADDPS (DI), r0, r0; \
	VADDPS 32(DI), r1, r1; \
	VMOVUPS r0, (DI); \
	VMOVUPS r1, 32(DI); \
	ADDQ R8, DI

#define SCALE32(r0, r1) \
	VMULPS r0, Y14, r0; \
	VMULPS r1, Y14, r1; \
	VMULPS (DI), Y15, Y12; \
	VMULPS 32(DI), Y15, Y13; \
	VADDPS Y12, r0, r0; \
	VADDPS Y13, r1, r1; \
	VMOVUPS r0, (DI); \
	VMOVUPS r1, 32(DI); \
	ADDQ R8, DI

// func kernel6x16(kc int, a, b, c *float32, ldc int, alpha, beta float32, mode int)
TEXT ·kernel6x16(SB), NOSPLIT, $0-56
	MOVQ kc+0(FP), CX
	MOVQ a+8(FP), SI
	MOVQ b+16(FP), DX
	MOVQ c+24(FP), DI
	MOVQ ldc+32(FP), R8
	SHLQ $2, R8
	PREFETCHT0 (DI)
	PREFETCHT0 63(DI)
	PREFETCHT0 (DI)(R8*1)
	PREFETCHT0 63(DI)(R8*1)
	PREFETCHT0 (DI)(R8*2)
	PREFETCHT0 63(DI)(R8*2)
	LEAQ (DI)(R8*2), R9
	PREFETCHT0 (R9)(R8*1)
	PREFETCHT0 63(R9)(R8*1)
	PREFETCHT0 (R9)(R8*2)
	PREFETCHT0 63(R9)(R8*2)
	LEAQ (R9)(R8*2), R9
	PREFETCHT0 (R9)(R8*1)
	PREFETCHT0 63(R9)(R8*1)
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	VXORPS Y8, Y8, Y8
	VXORPS Y9, Y9, Y9
	VXORPS Y10, Y10, Y10
	VXORPS Y11, Y11, Y11
	CMPQ CX, $4
	JLT  tail32

loop32:
	STEP32(0, 0)
	STEP32(24, 64)
	STEP32(48, 128)
	STEP32(72, 192)
	ADDQ $96, SI
	ADDQ $256, DX
	SUBQ $4, CX
	CMPQ CX, $4
	JGE  loop32

tail32:
	TESTQ CX, CX
	JLE   merge32

tailloop32:
	STEP32(0, 0)
	ADDQ $24, SI
	ADDQ $64, DX
	DECQ CX
	JNZ  tailloop32

merge32:
	VBROADCASTSS alpha+40(FP), Y14
	VBROADCASTSS beta+44(FP), Y15
	MOVQ         mode+48(FP), AX
	CMPQ         AX, $1
	JEQ          add32
	JGT          scale32
	SET32(Y0, Y1)
	SET32(Y2, Y3)
	SET32(Y4, Y5)
	SET32(Y6, Y7)
	SET32(Y8, Y9)
	SET32(Y10, Y11)
	VZEROUPPER
	RET

add32:
	ADD32(Y0, Y1)
	ADD32(Y2, Y3)
	ADD32(Y4, Y5)
	ADD32(Y6, Y7)
	ADD32(Y8, Y9)
	ADD32(Y10, Y11)
	VZEROUPPER
	RET

scale32:
	SCALE32(Y0, Y1)
	SCALE32(Y2, Y3)
	SCALE32(Y4, Y5)
	SCALE32(Y6, Y7)
	SCALE32(Y8, Y9)
	SCALE32(Y10, Y11)
	VZEROUPPER
	RET

// STEP64 is one k step of the float64 kernel: A at a(SI), B at b(DX) and
// b+32(DX).
#define STEP64(a, b) \
	VMOVUPD b(DX), Y12; \
	VMOVUPD b+32(DX), Y13; \
	VBROADCASTSD a(SI), Y14; \
	VFMADD231PD Y12, Y14, Y0; \
	VFMADD231PD Y13, Y14, Y1; \
	VBROADCASTSD a+8(SI), Y15; \
	VFMADD231PD Y12, Y15, Y2; \
	VFMADD231PD Y13, Y15, Y3; \
	VBROADCASTSD a+16(SI), Y14; \
	VFMADD231PD Y12, Y14, Y4; \
	VFMADD231PD Y13, Y14, Y5; \
	VBROADCASTSD a+24(SI), Y15; \
	VFMADD231PD Y12, Y15, Y6; \
	VFMADD231PD Y13, Y15, Y7; \
	VBROADCASTSD a+32(SI), Y14; \
	VFMADD231PD Y12, Y14, Y8; \
	VFMADD231PD Y13, Y14, Y9; \
	VBROADCASTSD a+40(SI), Y15; \
	VFMADD231PD Y12, Y15, Y10; \
	VFMADD231PD Y13, Y15, Y11

#define SET64(r0, r1) \
	VMULPD r0, Y14, r0; \
	VMULPD r1, Y14, r1; \
	VMOVUPD r0, (DI); \
	VMOVUPD r1, 32(DI); \
	ADDQ R8, DI

#define ADD64(r0, r1) \
	VMULPD r0, Y14, r0; \
	VMULPD r1, Y14, r1; \
	VADDPD (DI), r0, r0; \
	VADDPD 32(DI), r1, r1; \
	VMOVUPD r0, (DI); \
	VMOVUPD r1, 32(DI); \
	ADDQ R8, DI

#define SCALE64(r0, r1) \
	VMULPD r0, Y14, r0; \
	VMULPD r1, Y14, r1; \
	VMULPD (DI), Y15, Y12; \
	VMULPD 32(DI), Y15, Y13; \
	VADDPD Y12, r0, r0; \
	VADDPD Y13, r1, r1; \
	VMOVUPD r0, (DI); \
	VMOVUPD r1, 32(DI); \
	ADDQ R8, DI

// func kernel6x8(kc int, a, b, c *float64, ldc int, alpha, beta float64, mode int)
TEXT ·kernel6x8(SB), NOSPLIT, $0-64
	MOVQ kc+0(FP), CX
	MOVQ a+8(FP), SI
	MOVQ b+16(FP), DX
	MOVQ c+24(FP), DI
	MOVQ ldc+32(FP), R8
	SHLQ $3, R8
	PREFETCHT0 (DI)
	PREFETCHT0 63(DI)
	PREFETCHT0 (DI)(R8*1)
	PREFETCHT0 63(DI)(R8*1)
	PREFETCHT0 (DI)(R8*2)
	PREFETCHT0 63(DI)(R8*2)
	LEAQ (DI)(R8*2), R9
	PREFETCHT0 (R9)(R8*1)
	PREFETCHT0 63(R9)(R8*1)
	PREFETCHT0 (R9)(R8*2)
	PREFETCHT0 63(R9)(R8*2)
	LEAQ (R9)(R8*2), R9
	PREFETCHT0 (R9)(R8*1)
	PREFETCHT0 63(R9)(R8*1)
	VXORPD Y0, Y0, Y0
	VXORPD Y1, Y1, Y1
	VXORPD Y2, Y2, Y2
	VXORPD Y3, Y3, Y3
	VXORPD Y4, Y4, Y4
	VXORPD Y5, Y5, Y5
	VXORPD Y6, Y6, Y6
	VXORPD Y7, Y7, Y7
	VXORPD Y8, Y8, Y8
	VXORPD Y9, Y9, Y9
	VXORPD Y10, Y10, Y10
	VXORPD Y11, Y11, Y11
	CMPQ CX, $4
	JLT  tail64

loop64:
	STEP64(0, 0)
	STEP64(48, 64)
	STEP64(96, 128)
	STEP64(144, 192)
	ADDQ $192, SI
	ADDQ $256, DX
	SUBQ $4, CX
	CMPQ CX, $4
	JGE  loop64

tail64:
	TESTQ CX, CX
	JLE   merge64

tailloop64:
	STEP64(0, 0)
	ADDQ $48, SI
	ADDQ $64, DX
	DECQ CX
	JNZ  tailloop64

merge64:
	VBROADCASTSD alpha+40(FP), Y14
	VBROADCASTSD beta+48(FP), Y15
	MOVQ         mode+56(FP), AX
	CMPQ         AX, $1
	JEQ          add64
	JGT          scale64
	SET64(Y0, Y1)
	SET64(Y2, Y3)
	SET64(Y4, Y5)
	SET64(Y6, Y7)
	SET64(Y8, Y9)
	SET64(Y10, Y11)
	VZEROUPPER
	RET

add64:
	ADD64(Y0, Y1)
	ADD64(Y2, Y3)
	ADD64(Y4, Y5)
	ADD64(Y6, Y7)
	ADD64(Y8, Y9)
	ADD64(Y10, Y11)
	VZEROUPPER
	RET

scale64:
	SCALE64(Y0, Y1)
	SCALE64(Y2, Y3)
	SCALE64(Y4, Y5)
	SCALE64(Y6, Y7)
	SCALE64(Y8, Y9)
	SCALE64(Y10, Y11)
	VZEROUPPER
	RET
