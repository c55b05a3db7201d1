package safetensors

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkDecodeFloats measures conversion of stored tensors into a float32
// buffer, the inner loop of checkpoint loading; bytes are the stored bytes.
func BenchmarkDecodeFloats(b *testing.B) {
	const n = 1 << 20
	rng := rand.New(rand.NewPCG(1, 1))
	vals := make([]float32, n)
	for i := range vals {
		vals[i] = float32(rng.NormFloat64())
	}
	dst := make([]float32, n)
	for _, dt := range []DType{F32, BF16, F16, F64} {
		t, err := FromFloat32s("x", []int{n}, vals, dt)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprint(dt), func(b *testing.B) {
			b.SetBytes(int64(len(t.Data)))
			for b.Loop() {
				if err := DecodeFloats(&t, dst); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkAppendFloats measures encoding a float32 buffer, the inner loop
// of checkpoint saving; bytes are the produced bytes.
func BenchmarkAppendFloats(b *testing.B) {
	const n = 1 << 20
	rng := rand.New(rand.NewPCG(2, 2))
	vals := make([]float32, n)
	for i := range vals {
		vals[i] = float32(rng.NormFloat64())
	}
	buf := make([]byte, 0, 8*n)
	for _, dt := range []DType{F32, BF16, F16, F64} {
		b.Run(fmt.Sprint(dt), func(b *testing.B) {
			b.SetBytes(int64(n * dt.Size()))
			for b.Loop() {
				var err error
				if buf, err = AppendFloats(buf[:0], vals, dt); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
