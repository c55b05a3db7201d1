package gpu

import (
	"errors"
	"math"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/model"
)

// These tests need neither the library nor a GPU.

func smallConfig() model.Config {
	c := model.DefaultConfig(16, 2, 32)
	c.DState, c.HeadDim, c.NHeads, c.NGroups, c.ChunkSize = 8, 4, 8, 2, 4
	return c
}

func TestOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		want string // substring of the error; "" for valid
	}{
		{"zero value", Options{}, ""},
		{"f32 explicit", Options{Precision: F32, ExplicitSync: true, HeadBlock: 64}, ""},
		{"unknown precision", Options{Precision: 7}, "Precision"},
		{"negative head block", Options{HeadBlock: -1}, "HeadBlock"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.o.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("rejected: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
	if (Options{}).Precision != BF16 || (Options{}).headBlock() != DefaultHeadBlock {
		t.Error("the zero Options must mean bf16 and the default head block")
	}
}

func TestCheckConfig(t *testing.T) {
	if err := CheckConfig(smallConfig()); err != nil {
		t.Fatalf("small config rejected: %v", err)
	}
	if err := CheckConfig(model.DefaultConfig(768, 24, 50288)); err != nil {
		t.Fatalf("mamba2-130m config rejected: %v", err)
	}
	for _, tc := range []struct {
		field string
		mod   func(*model.Config)
	}{
		{"chunk_size", func(c *model.Config) { c.ChunkSize = kernels.SSDMaxChunk + 1 }},
		{"headdim", func(c *model.Config) { c.HeadDim, c.NHeads, c.NGroups, c.DModel = 512, 1, 1, 256 }},
		{"d_state", func(c *model.Config) { c.DState = 512 }},
		{"d_conv", func(c *model.Config) { c.DConv = 9 }},
	} {
		t.Run(tc.field, func(t *testing.T) {
			c := smallConfig()
			tc.mod(&c)
			if err := c.Validate(); err != nil {
				t.Fatalf("the test's config is invalid for the model itself: %v", err)
			}
			err := CheckConfig(c)
			if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("error %v, want ErrUnsupported naming %s", err, tc.field)
			}
		})
	}
	bad := smallConfig()
	bad.NGroups = 3 // H = 8 is not a multiple
	var ce *model.ConfigError
	if err := CheckConfig(bad); !errors.As(err, &ce) || ce.Field != "ngroups" {
		t.Fatalf("invalid config: error %v, want the model's ConfigError for ngroups", err)
	}
}

// activationFormula is the memory of the activations written out by hand:
// what ActivationBytes documents, independently of the slot list.
func activationFormula(c model.Config, bt, l int, o Options, boundary bool) int64 {
	a := int64(2)
	if o.Precision == F32 {
		a = 4
	}
	n := int64(bt * l)
	D, E, F, Cd := int64(c.DModel), int64(c.DInner()), int64(c.InProjDim()), int64(c.ConvDim())
	H, V, L, W := int64(c.NHeads), int64(c.VocabSize), int64(c.NLayer), int64(c.DConv)
	block := int64(min(o.headBlock(), bt*l))
	b := 4*n*5 + 4*n            // tokens, targets, rowLoss, headRows, headTargets; frstd
	b += a*n*D*4 + 4*n*D        // out, hf, dhf, du; dres
	b += a * n * (2*E + F + Cd) // do, dy, dz, dxbc
	b += a * block * V          // logits
	b += 4 * (2*H + int64(c.DSize()))
	if o.Precision == BF16 {
		b += a * n * D // dresAct
	}
	b += 4 * n * D * (L + 1) // residual stream
	perLayer := a*n*(D+F+Cd+2*E) + 4*n
	if c.GatedNorm {
		perLayer += 4 * n * int64(c.NormGroups())
	}
	b += L * perLayer
	if boundary {
		state := 4 * int64(bt) * H * int64(c.HeadDim) * int64(c.DState)
		halo := int64(bt) * (W - 1) * Cd
		b += L*(state+a*halo) + 3*state + 2*4*halo + a*((W-2)*F+Cd)
	}
	return b
}

func TestActivationBytes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mod   func(*model.Config)
		bt, l int
		o     Options
	}{
		{"small bf16", func(*model.Config) {}, 2, 10, Options{}},
		{"small f32 block 4", func(*model.Config) {}, 2, 10, Options{Precision: F32, HeadBlock: 4}},
		{"no gated norm", func(c *model.Config) { c.GatedNorm = false }, 3, 7, Options{}},
		{"groups over all E", func(c *model.Config) { c.GatedNormGroups = 1 }, 1, 33, Options{Precision: F32}},
		{"mamba2-130m", func(c *model.Config) { *c = model.DefaultConfig(768, 24, 50288) }, 8, 2048, Options{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := smallConfig()
			tc.mod(&c)
			for _, boundary := range []bool{false, true} {
				got := ActivationBytes(c, tc.bt, tc.l, boundary, tc.o)
				if want := activationFormula(c, tc.bt, tc.l, tc.o, boundary); got != want {
					t.Errorf("boundary %v: ActivationBytes = %d, the formula gives %d", boundary, got, want)
				}
			}
		})
	}
	c := smallConfig()
	if bf, f := ActivationBytes(c, 4, 64, false, Options{}), ActivationBytes(c, 4, 64, false, Options{Precision: F32}); bf >= f {
		t.Errorf("bf16 activations (%d bytes) are not smaller than f32 (%d)", bf, f)
	}
}

func TestParameterBytes(t *testing.T) {
	for _, tied := range []bool{true, false} {
		c := smallConfig()
		c.TieEmbeddings = tied
		l := model.NewLayout(c)
		f32 := ParameterBytes(c, Options{Precision: F32})
		if f32 != 16*int64(l.Total) {
			t.Errorf("tied %v: f32 parameter bytes %d, want 16·%d", tied, f32, l.Total)
		}
		head := c.VocabSize * c.DModel
		weights := c.NLayer*(c.InProjDim()*c.DModel+c.DModel*c.DInner()) + head
		if bf := ParameterBytes(c, Options{}); bf != f32+2*int64(weights) {
			t.Errorf("tied %v: bf16 parameter bytes %d, want %d + 2·%d", tied, bf, f32, weights)
		}
	}
}

func TestOpenWithoutLibrary(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing", kernels.LibName)
	m, err := Open(path, smallConfig(), Options{})
	if err == nil {
		m.Close()
		t.Fatal("Open of a missing library succeeded")
	}
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, kernels.ErrNoLibrary) {
		t.Fatalf("error %v: want ErrUnavailable wrapping kernels.ErrNoLibrary", err)
	}
	if _, err := New(nil, smallConfig(), Options{}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("New(nil lib): error %v, want ErrUnavailable", err)
	}
}

func TestClipScaleMatchesClipGrads(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	g := make([]float32, 5000)
	for i := range g {
		g[i] = float32(rng.NormFloat64())
	}
	norm := model.GradNorm(g)
	for _, maxNorm := range []float64{0, -1, norm / 3, norm * 2} {
		clipped := append([]float32(nil), g...)
		model.ClipGrads(clipped, maxNorm)
		s := float32(model.ClipScale(norm, maxNorm))
		for i := range g {
			// The device optimizer multiplies each gradient by the scale
			// in f32, as ClipGrads does when it clips.
			if want := g[i] * s; math.Float32bits(clipped[i]) != math.Float32bits(want) {
				t.Fatalf("maxNorm %g: ClipGrads gives %v at %d, gradient × ClipScale %v", maxNorm, clipped[i], i, want)
			}
		}
	}
}
