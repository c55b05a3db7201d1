package ops

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/m2train/m2train/kernels"
)

// The argument checks run before any C call, so an Ops without a library
// exercises them: every case must fail with ErrInvalidArg naming the
// argument, and none may reach the (nil) bound functions.
func TestArgumentChecks(t *testing.T) {
	o := &Ops{f: &funcs{}}
	buf := func(dt kernels.DType, n int) *kernels.Buffer { return &kernels.Buffer{Ptr: 1 << 20, Len: n, DType: dt} }
	f32, bf16 := kernels.F32, kernels.BF16
	normArgs := func() *AddRMSNormArgs {
		return &AddRMSNormArgs{Out: buf(bf16, 12), ResOut: buf(f32, 12), Rstd: buf(f32, 3), W: buf(f32, 4), N: 3, D: 4, Eps: 1e-5}
	}
	conv := ConvShape{Batch: 2, L: 5, Channels: 3, Width: 4, LD: 8, Off: 2, LDAct: 3}
	for _, tc := range []struct {
		name, want string
		call       func() error
	}{
		{"embedding dtype", "dtype", func() error {
			return o.EmbeddingForward(kernels.DType(7), buf(f32, 8), buf(f32, 8), buf(f32, 2), 2, 4, 2, 0)
		}},
		{"embedding short out", "out has 7 elements", func() error {
			return o.EmbeddingForward(f32, buf(f32, 7), buf(f32, 8), buf(f32, 2), 2, 4, 2, 0)
		}},
		{"embedding tokens dtype", "tokens holds bf16", func() error {
			return o.EmbeddingForward(f32, buf(f32, 8), buf(f32, 8), buf(bf16, 2), 2, 4, 2, 0)
		}},
		{"embedding emb dtype", "emb holds bf16", func() error {
			return o.EmbeddingForward(bf16, buf(bf16, 8), buf(bf16, 8), buf(f32, 2), 2, 4, 2, 0)
		}},
		{"norm eps", "Eps", func() error {
			a := normArgs()
			a.Eps = 0
			return o.AddRMSNormForward(bf16, a, 0)
		}},
		{"norm x aliases", "X and ResOut", func() error {
			a := normArgs()
			a.X = &kernels.Buffer{Ptr: a.ResOut.Ptr, Len: 12, DType: bf16}
			return o.AddRMSNormForward(bf16, a, 0)
		}},
		{"norm nil W", "W is nil", func() error {
			a := normArgs()
			a.W = nil
			return o.AddRMSNormForward(bf16, a, 0)
		}},
		{"norm freed", "Out has a null device pointer", func() error {
			a := normArgs()
			a.Out = &kernels.Buffer{Len: 12, DType: bf16}
			return o.AddRMSNormForward(bf16, a, 0)
		}},
		{"norm bwd rows", "N = 0", func() error {
			return o.RMSNormBackward(f32, &RMSNormBackwardArgs{D: 4}, 0)
		}},
		{"bias ldx", "ldx = 3", func() error { return o.AddBias(f32, buf(f32, 20), buf(f32, 4), 5, 4, 3, 0) }},
		{"conv width", "Width = 9", func() error {
			s := conv
			s.Width = 9
			return o.ConvForward(f32, s, &ConvForwardArgs{}, 0)
		}},
		{"conv ld", "LD = 4", func() error {
			s := conv
			s.LD = 4
			return o.ConvForward(f32, s, &ConvForwardArgs{}, 0)
		}},
		{"conv src short", "Src has 10 elements", func() error {
			return o.ConvForward(f32, conv, &ConvForwardArgs{Act: buf(f32, 30), Src: buf(f32, 10), Weight: buf(f32, 12)}, 0)
		}},
		{"conv halo dtype", "Halo holds f32", func() error {
			return o.ConvForward(bf16, conv, &ConvForwardArgs{Act: buf(bf16, 30), Src: buf(bf16, 77), Halo: buf(f32, 18), Weight: buf(f32, 12)}, 0)
		}},
		{"gated groups", "Groups = 3", func() error {
			return o.GatedNormForward(f32, GatedNormShape{N: 2, E: 8, Groups: 3, LDZ: 8, Eps: 1e-5, Enabled: true}, &GatedNormForwardArgs{}, 0)
		}},
		{"gated ldz", "LDZ = 4", func() error {
			return o.GatedNormForward(f32, GatedNormShape{N: 2, E: 8, Groups: 1, LDZ: 4, Eps: 1e-5, Enabled: true}, &GatedNormForwardArgs{}, 0)
		}},
		{"gated rstd", "Rstd is nil", func() error {
			g := GatedNormShape{N: 2, E: 8, Groups: 2, LDZ: 8, Eps: 1e-5, Enabled: true}
			return o.GatedNormForward(f32, g, &GatedNormForwardArgs{Out: buf(f32, 16), Y: buf(f32, 16), Z: buf(f32, 16), W: buf(f32, 8)}, 0)
		}},
		{"ce ld", "LD = 9", func() error {
			return o.CrossEntropy(f32, &CrossEntropyArgs{LD: 9, N: 2, Vocab: 10}, 0)
		}},
		{"ce targets", "Targets is nil", func() error {
			return o.CrossEntropy(f32, &CrossEntropyArgs{Logits: buf(f32, 20), LD: 10, N: 2, Vocab: 10, RowLoss: buf(f32, 2)}, 0)
		}},
		{"lm head count", "Count = 0", func() error {
			return o.LMHeadLoss(&Gemm{o: o}, f32, &LMHeadArgs{N: 2, D: 2, Vocab: 3, Block: 2, DHidden: buf(f32, 4), DHead: buf(f32, 6)}, 0)
		}},
		{"adamw beta", "Beta2 = 1", func() error {
			return o.AdamW(&AdamWArgs{Params: buf(f32, 4), Grads: buf(f32, 4), M: buf(f32, 4), V: buf(f32, 4), N: 4,
				Beta1: 0.9, Beta2: 1, Eps: 1e-8, Step: 1, GradScale: 1}, 0)
		}},
		{"adamw step", "Step = 0", func() error {
			return o.AdamW(&AdamWArgs{Params: buf(f32, 4), Grads: buf(f32, 4), M: buf(f32, 4), V: buf(f32, 4), N: 4,
				Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, GradScale: 1}, 0)
		}},
		{"adamw ranges", "NoDecay has 2 elements", func() error {
			return o.AdamW(&AdamWArgs{Params: buf(f32, 4), Grads: buf(f32, 4), M: buf(f32, 4), V: buf(f32, 4), N: 4,
				NoDecay: buf(f32, 2), NRanges: 1, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, Step: 1, GradScale: 1}, 0)
		}},
		{"gemm out dtype", "Out = BF16 with In = F32", func() error {
			g := &Gemm{o: o, handle: 1}
			return g.Run(&GemmArgs{In: f32, Out: bf16, M: 1, N: 1, K: 1}, 0)
		}},
		{"gemm lda", "LDA = 2", func() error {
			g := &Gemm{o: o, handle: 1}
			return g.Run(&GemmArgs{In: f32, Out: f32, TransA: true, M: 3, N: 2, K: 4, LDA: 2, LDB: 2, LDC: 2}, 0)
		}},
		{"gemm short C", "C has 5 elements", func() error {
			g := &Gemm{o: o, handle: 1}
			return g.Run(&GemmArgs{In: bf16, Out: f32, M: 3, N: 2, K: 4, A: buf(bf16, 12), B: buf(bf16, 8), C: buf(f32, 5),
				LDA: 4, LDB: 2, LDC: 2}, 0)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if !errors.Is(err, kernels.ErrInvalidArg) {
				t.Fatalf("error %v does not wrap kernels.ErrInvalidArg", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func TestPackRanges(t *testing.T) {
	got, err := PackRanges([]Range{{0, 5}, {5, 7}, {10, 12}, {12, 13}, {20, 21}})
	if err != nil {
		t.Fatal(err)
	}
	if want := []int64{0, 7, 10, 13, 20, 21}; !slices.Equal(got, want) {
		t.Fatalf("PackRanges = %v, want %v", got, want)
	}
	for _, bad := range [][]Range{{{3, 3}}, {{0, 5}, {4, 6}}, {{-1, 2}}} {
		if _, err := PackRanges(bad); !errors.Is(err, kernels.ErrInvalidArg) {
			t.Errorf("PackRanges(%v) = %v, want ErrInvalidArg", bad, err)
		}
	}
}

func TestStrided(t *testing.T) {
	for _, tc := range []struct{ rows, cols, ld, off, want int }{
		{3, 4, 4, 0, 12}, {3, 4, 10, 2, 26}, {1, 5, 100, 0, 5}, {0, 5, 5, 0, 0},
	} {
		if got := strided(tc.rows, tc.cols, tc.ld, tc.off); got != tc.want {
			t.Errorf("strided(%d, %d, %d, %d) = %d, want %d", tc.rows, tc.cols, tc.ld, tc.off, got, tc.want)
		}
	}
}

func TestNewWithoutLibrary(t *testing.T) {
	if _, err := New(nil); !errors.Is(err, kernels.ErrInvalidArg) {
		t.Fatalf("New(nil) = %v, want ErrInvalidArg", err)
	}
}
