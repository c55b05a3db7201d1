package model

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestPublishedLayoutSizes(t *testing.T) {
	// Parameter counts of the published checkpoints (tied embeddings,
	// V = 50288): in_proj, conv, dt_bias, A_log, D, norms, out_proj.
	for _, tc := range []struct {
		name           string
		d, layers      int
		inProj, convCh int
	}{
		{"mamba2-130m", 768, 24, 3352, 1792},
		{"mamba2-370m", 1024, 48, 4384, 2304},
		{"mamba2-2.7b", 2560, 64, 10576, 5376},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig(tc.d, tc.layers, 50288)
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			if c.InProjDim() != tc.inProj || c.ConvDim() != tc.convCh {
				t.Fatalf("in_proj %d conv %d, want %d %d", c.InProjDim(), c.ConvDim(), tc.inProj, tc.convCh)
			}
			l := NewLayout(c)
			E, H := c.DInner(), c.NHeads
			perLayer := tc.d + tc.inProj*tc.d + tc.convCh*4 + tc.convCh + 3*H + E + tc.d*E
			want := 50288*tc.d + tc.layers*perLayer + tc.d
			if l.Total != want {
				t.Errorf("layout has %d parameters, want %d", l.Total, want)
			}
			in := l.Must("backbone.layers.3.mixer.in_proj.weight")
			if in.Shape[0] != tc.inProj || in.Shape[1] != tc.d {
				t.Errorf("in_proj shape %v", in.Shape)
			}
			if _, ok := l.Lookup(NameLMHead); ok {
				t.Error("tied layout has a separate lm_head.weight")
			}
		})
	}
}

func TestLayoutViewsTileTheBuffer(t *testing.T) {
	c := DefaultConfig(64, 3, 96)
	c.Bias, c.TieEmbeddings, c.HeadDim = true, false, 16
	c.NHeads = 8
	l := NewLayout(c)
	off := 0
	for _, tn := range l.Tensors {
		if tn.Offset != off {
			t.Fatalf("%s starts at %d, want %d", tn.Name, tn.Offset, off)
		}
		n := 1
		for _, s := range tn.Shape {
			n *= s
		}
		if n != tn.Size {
			t.Fatalf("%s: size %d but shape %v", tn.Name, tn.Size, tn.Shape)
		}
		off += tn.Size
		decays := strings.HasSuffix(tn.Name, "proj.weight") || strings.HasSuffix(tn.Name, "conv1d.weight") ||
			tn.Name == NameEmbedding || tn.Name == NameLMHead
		if decays == tn.NoDecay {
			t.Errorf("%s: NoDecay = %v", tn.Name, tn.NoDecay)
		}
	}
	if off != l.Total {
		t.Fatalf("views end at %d, total %d", off, l.Total)
	}
	lt := l.Layer(1)
	if lt.InProjBias == nil || lt.OutProjBias == nil || lt.GatedNorm == nil {
		t.Error("layer views miss optional tensors that the config enables")
	}
}

func TestConfigValidateNamesField(t *testing.T) {
	for field, mod := range map[string]func(*Config){
		"d_model":           func(c *Config) { c.DModel = 0 },
		"nheads":            func(c *Config) { c.NHeads = 5 },
		"ngroups":           func(c *Config) { c.NGroups = 5 },
		"vocab_size":        func(c *Config) { c.VocabSize = 100 },
		"dt_limit":          func(c *Config) { c.DTLimit = [2]float64{0.5, 0.1} },
		"norm_epsilon":      func(c *Config) { c.NormEps = 0 },
		"chunk_size":        func(c *Config) { c.ChunkSize = -1 },
		"gated_norm_groups": func(c *Config) { c.GatedNormGroups = 7 },
	} {
		c := DefaultConfig(256, 2, 512)
		mod(&c)
		err := c.Validate()
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != field {
			t.Errorf("%s: got %v, want a ConfigError naming %s", field, err, field)
		}
	}
}

func TestInit(t *testing.T) {
	c := DefaultConfig(64, 2, 96)
	c.HeadDim, c.NHeads, c.DState = 16, 8, 16
	l := NewLayout(c)
	p := make([]float64, l.Total)
	if err := Init(c, l, p, 7); err != nil {
		t.Fatal(err)
	}
	q := make([]float64, l.Total)
	if err := Init(c, l, q, 7); err != nil {
		t.Fatal(err)
	}
	r := make([]float64, l.Total)
	if err := Init(c, l, r, 8); err != nil {
		t.Fatal(err)
	}
	same, diff := true, false
	for i := range p {
		same = same && p[i] == q[i]
		diff = diff || p[i] != r[i]
	}
	if !same || !diff {
		t.Fatalf("init must be a function of the seed: same seed equal %v, other seed differs %v", same, diff)
	}
	check := func(name string, ok func(v float64) bool, what string) {
		t.Helper()
		for _, v := range View(p, l.Must(name)) {
			if !ok(v) {
				t.Fatalf("%s: value %v is not %s", name, v, what)
			}
		}
	}
	check("backbone.layers.0.mixer.in_proj.weight", func(v float64) bool { return math.Abs(v) <= 1/math.Sqrt(64) }, "within 1/√D")
	check("backbone.layers.1.mixer.out_proj.weight", func(v float64) bool { return math.Abs(v) <= 1/math.Sqrt(128)/math.Sqrt(2) }, "within 1/√E/√n_layer")
	check("backbone.layers.0.mixer.conv1d.bias", func(v float64) bool { return math.Abs(v) <= 0.5 && v != 0 }, "nonzero within 1/√W")
	check("backbone.layers.0.mixer.A_log", func(v float64) bool { return v >= 0 && v <= math.Log(16) }, "in [0, log 16]")
	check("backbone.layers.0.mixer.dt_bias", func(v float64) bool {
		dt := math.Log1p(math.Exp(v)) // softplus recovers the drawn dt
		return dt >= 0.001*(1-1e-9) && dt <= 0.1*(1+1e-9)
	}, "softplus⁻¹ of a dt in [dt_min, dt_max]")
	check("backbone.layers.0.mixer.D", func(v float64) bool { return v == 1 }, "one")
	check("backbone.layers.0.mixer.norm.weight", func(v float64) bool { return v == 1 }, "one")
	check(NameNormF, func(v float64) bool { return v == 1 }, "one")
	var ss float64
	emb := View(p, l.Must(NameEmbedding))
	for _, v := range emb {
		ss += v * v
	}
	if std := math.Sqrt(ss / float64(len(emb))); math.Abs(std-0.02) > 0.002 {
		t.Errorf("embedding std %.4f, want about 0.02", std)
	}
}

func TestAdamWMatchesPyTorchFormula(t *testing.T) {
	c := DefaultConfig(32, 1, 16)
	c.HeadDim, c.NHeads, c.DState = 16, 4, 4
	l := NewLayout(c)
	cfg := AdamWConfig{Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1}
	o, err := NewAdamW[float64](l, cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]float64, l.Total)
	g := make([]float64, l.Total)
	for i := range p {
		p[i] = math.Sin(float64(i))
	}
	want := append([]float64(nil), p...)
	m := make([]float64, l.Total)
	v := make([]float64, l.Total)
	for step := 1; step <= 3; step++ {
		for i := range g {
			g[i] = math.Cos(float64(i * step))
		}
		lr := 0.01 * float64(step)
		o.Update(p, g, lr)
		for _, tn := range l.Tensors {
			for i := tn.Offset; i < tn.Offset+tn.Size; i++ {
				if !tn.NoDecay {
					want[i] *= 1 - lr*cfg.WeightDecay
				}
				m[i] = 0.9*m[i] + 0.1*g[i]
				v[i] = 0.95*v[i] + 0.05*g[i]*g[i]
				mh := m[i] / (1 - math.Pow(0.9, float64(step)))
				denom := math.Sqrt(v[i])/math.Sqrt(1-math.Pow(0.95, float64(step))) + 1e-8
				want[i] -= lr * mh / denom
			}
		}
	}
	for i := range p {
		if math.Abs(p[i]-want[i]) > 1e-14 {
			t.Fatalf("param %d: %v, want %v", i, p[i], want[i])
		}
	}
	if o.Step != 3 {
		t.Errorf("step %d, want 3", o.Step)
	}
	// Parameters without decay moved only by the Adam term.
	a := l.Must("backbone.layers.0.mixer.A_log")
	if !a.NoDecay {
		t.Fatal("A_log must be excluded from weight decay")
	}
}

func TestSchedule(t *testing.T) {
	s := Schedule{PeakLR: 1, MinLR: 0.1, WarmupSteps: 10, TotalSteps: 110}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		step int
		want float64
	}{{0, 0.1}, {4, 0.5}, {9, 1}, {10, 1}, {60, 0.55}, {110, 0.1}, {500, 0.1}} {
		if got := s.LR(tc.step); math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("LR(%d) = %v, want %v", tc.step, got, tc.want)
		}
	}
	for field, bad := range map[string]Schedule{
		"schedule.lr":           {PeakLR: 0, TotalSteps: 1},
		"schedule.min_lr":       {PeakLR: 1, MinLR: 2, TotalSteps: 1},
		"schedule.total_steps":  {PeakLR: 1},
		"schedule.warmup_steps": {PeakLR: 1, WarmupSteps: 5, TotalSteps: 2},
	} {
		var ce *ConfigError
		if err := bad.Validate(); !errors.As(err, &ce) || ce.Field != field {
			t.Errorf("%s: got %v", field, err)
		}
	}
}

func TestClipGrads(t *testing.T) {
	g := []float32{3, 4}
	if n := ClipGrads(g, 10); n != 5 || g[0] != 3 {
		t.Fatalf("norm %v, grads %v: a norm under the limit must not clip", n, g)
	}
	if n := ClipGrads(g, 1); n != 5 {
		t.Fatalf("norm %v, want 5", n)
	}
	if got := GradNorm(g); math.Abs(got-1) > 1e-6 {
		t.Errorf("clipped norm %v, want 1", got)
	}
	big := make([]float64, 100_001)
	for i := range big {
		big[i] = 1
	}
	if got := GradNorm(big); math.Abs(got-math.Sqrt(100_001)) > 1e-9 {
		t.Errorf("norm of ones %v", got)
	}
}
