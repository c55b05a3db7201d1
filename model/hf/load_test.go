package hf

import (
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/safetensors"
)

func oracle(t *testing.T) (model.Config, *safetensors.File) {
	t.Helper()
	cfg, _, err := ReadConfigFile(filepath.Join(oracleDir, ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.ReadFile(filepath.Join(oracleDir, WeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	return cfg, f
}

func TestLoadOracle(t *testing.T) {
	cfg, f := oracle(t)
	layout := model.NewLayout(cfg)
	p64, err := LoadParams[float64](oracleDir, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	p32, err := LoadParams[float32](oracleDir, cfg, layout)
	if err != nil {
		t.Fatal(err)
	}
	if len(p64) != layout.Total || len(p32) != layout.Total {
		t.Fatalf("buffer lengths %d, %d; layout %d", len(p64), len(p32), layout.Total)
	}
	// Spot values, read independently from the raw little-endian bytes.
	raw := func(name string, i int) float32 {
		tn, ok := f.Get(name)
		if !ok {
			t.Fatalf("oracle lacks %s", name)
		}
		var bits uint32
		for k := 3; k >= 0; k-- {
			bits = bits<<8 | uint32(tn.Data[4*i+k])
		}
		return math.Float32frombits(bits)
	}
	spots := []struct {
		name string
		idx  int
	}{
		{model.NameEmbedding, 0},
		{model.NameEmbedding, 96*32 - 1},
		{"backbone.layers.0.mixer.in_proj.weight", 168*32 - 1},
		{"backbone.layers.1.mixer.A_log", 3},
		{"backbone.layers.1.mixer.conv1d.weight", 95*4 + 3}, // channel 95, tap W-1
		{"backbone.layers.0.mixer.D", 7},
		{model.NameNormF, 31},
	}
	for _, s := range spots {
		lt := layout.Must(s.name)
		want := raw(s.name, s.idx)
		if got := p32[lt.Offset+s.idx]; got != want {
			t.Errorf("%s[%d]: float32 buffer %g, file %g", s.name, s.idx, got, want)
		}
		if got := p64[lt.Offset+s.idx]; got != float64(want) {
			t.Errorf("%s[%d]: float64 buffer %g, file %g", s.name, s.idx, got, want)
		}
	}
	// Every element of every tensor, in layout order.
	for _, lt := range layout.Tensors {
		tn, _ := f.Get(lt.Name)
		vals, err := tn.Float64s()
		if err != nil {
			t.Fatal(err)
		}
		view := model.View(p64, &lt)
		for i := range vals {
			if view[i] != vals[i] {
				t.Fatalf("%s[%d] = %g, want %g", lt.Name, i, view[i], vals[i])
			}
		}
	}
	if _, ok := layout.Lookup(model.NameLMHead); ok {
		t.Fatal("tied layout has an LM head")
	}
}

// withTensors returns a copy of f's tensors changed by edit, as a File.
func withTensors(f *safetensors.File, edit func([]safetensors.Tensor) []safetensors.Tensor) *safetensors.File {
	ts := append([]safetensors.Tensor(nil), f.Tensors...)
	return &safetensors.File{Tensors: edit(ts)}
}

func without(ts []safetensors.Tensor, name string) []safetensors.Tensor {
	out := ts[:0]
	for _, t := range ts {
		if t.Name != name {
			out = append(out, t)
		}
	}
	return out
}

func find(ts []safetensors.Tensor, name string) int {
	for i, t := range ts {
		if t.Name == name {
			return i
		}
	}
	panic(name)
}

func TestLoadRejects(t *testing.T) {
	cfg, f := oracle(t)
	conv := "backbone.layers.1.mixer.conv1d.weight"
	cases := []struct {
		name     string
		cfg      model.Config
		edit     func([]safetensors.Tensor) []safetensors.Tensor
		mentions []string
	}{
		{"missing tensor", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			return without(ts, "backbone.layers.0.mixer.A_log")
		}, []string{"backbone.layers.0.mixer.A_log", "missing", "expected shape (8)", "actual shape none"}},
		{"extra tensor", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			return append(ts, safetensors.FromInt64s("backbone.layers.0.mixer.init_states", []int{2}, []int64{1, 2}))
		}, []string{"backbone.layers.0.mixer.init_states", "unexpected", "actual shape (2)"}},
		{"conv weight without the middle axis", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			i := find(ts, conv)
			ts[i].Shape = []int{96, 4}
			return ts
		}, []string{conv, "expected shape (96, 1, 4)", "actual shape (96, 4)"}},
		{"integer dtype", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			i := find(ts, model.NameNormF)
			ts[i] = safetensors.Tensor{Name: model.NameNormF, DType: safetensors.I32, Shape: []int{32}, Data: ts[i].Data}
			return ts
		}, []string{model.NameNormF, "I32"}},
		{"untied model lacks the head", func() model.Config { c := cfg; c.TieEmbeddings = false; return c }(),
			func(ts []safetensors.Tensor) []safetensors.Tensor { return ts },
			[]string{model.NameLMHead, "missing", "expected shape (96, 32)"}},
		{"tied head differs", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			emb := ts[find(ts, model.NameEmbedding)]
			data := append([]byte(nil), emb.Data...)
			data[5] ^= 1
			return append(ts, safetensors.Tensor{Name: model.NameLMHead, DType: emb.DType, Shape: emb.Shape, Data: data})
		}, []string{model.NameLMHead, "differs from " + model.NameEmbedding}},
		{"tied head misshaped", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			emb := ts[find(ts, model.NameEmbedding)]
			return append(ts, safetensors.Tensor{Name: model.NameLMHead, DType: emb.DType, Shape: []int{32, 96}, Data: emb.Data})
		}, []string{model.NameLMHead, "expected shape (96, 32)", "actual shape (32, 96)"}},
		{"both embedding spellings", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			emb := ts[find(ts, model.NameEmbedding)]
			emb.Name = nameEmbeddingSSM
			return append(ts, emb)
		}, []string{nameEmbeddingSSM, "duplicate"}},
		{"config with more layers", func() model.Config { c := cfg; c.NLayer = 3; return c }(),
			func(ts []safetensors.Tensor) []safetensors.Tensor { return ts },
			[]string{"backbone.layers.2.mixer.in_proj.weight", "backbone.layers.2.norm.weight", "missing"}},
		{"several problems at once", cfg, func(ts []safetensors.Tensor) []safetensors.Tensor {
			ts = without(ts, "backbone.layers.1.mixer.D")
			i := find(ts, conv)
			ts[i].Shape = []int{96, 4}
			return append(ts, safetensors.FromInt64s("extra.weight", []int{1}, []int64{1}))
		}, []string{"3 problem(s)", "backbone.layers.1.mixer.D", conv, "extra.weight"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := LoadParamsFromFile[float32](withTensors(f, c.edit), c.cfg, nil)
			if !errors.Is(err, ErrCheckpoint) {
				t.Fatalf("got %v, want ErrCheckpoint", err)
			}
			var ce *CheckpointError
			if !errors.As(err, &ce) {
				t.Fatalf("%v is not a *CheckpointError", err)
			}
			for _, m := range c.mentions {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error does not mention %q:\n%v", m, err)
				}
			}
		})
	}
}

func TestLoadAccepts(t *testing.T) {
	cfg, f := oracle(t)
	want, err := LoadParamsFromFile[float64](f, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	recode := func(dt safetensors.DType) func([]safetensors.Tensor) []safetensors.Tensor {
		return func(ts []safetensors.Tensor) []safetensors.Tensor {
			for i, tn := range ts {
				v, err := tn.Float32s()
				if err != nil {
					t.Fatal(err)
				}
				if ts[i], err = safetensors.FromFloat32s(tn.Name, tn.Shape, v, dt); err != nil {
					t.Fatal(err)
				}
			}
			return ts
		}
	}
	cases := []struct {
		name  string
		edit  func([]safetensors.Tensor) []safetensors.Tensor
		exact bool // values equal the float32 originals
		round func(float32) float64
	}{
		{"mamba_ssm embedding name", func(ts []safetensors.Tensor) []safetensors.Tensor {
			ts[find(ts, model.NameEmbedding)].Name = nameEmbeddingSSM
			return ts
		}, true, nil},
		{"tied head present and equal", func(ts []safetensors.Tensor) []safetensors.Tensor {
			emb := ts[find(ts, model.NameEmbedding)]
			emb.Name = model.NameLMHead
			return append(ts, emb)
		}, true, nil},
		{"tied head equal in another dtype", func(ts []safetensors.Tensor) []safetensors.Tensor {
			emb := ts[find(ts, model.NameEmbedding)]
			v, _ := emb.Float64s()
			head, _ := safetensors.FromFloat64s(model.NameLMHead, emb.Shape, v, safetensors.F64)
			return append(ts, head)
		}, true, nil},
		{"F64 storage", recode(safetensors.F64), true, nil},
		{"F16 storage", recode(safetensors.F16), false, func(v float32) float64 {
			return float64(safetensors.Float32FromF16(safetensors.F16FromFloat32(v)))
		}},
		{"BF16 storage", recode(safetensors.BF16), false, func(v float32) float64 {
			return float64(safetensors.Float32FromBF16(safetensors.BF16FromFloat32(v)))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := LoadParamsFromFile[float64](withTensors(f, c.edit), cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			for i := range want {
				w := want[i]
				if !c.exact {
					w = c.round(float32(want[i]))
				}
				if got[i] != w {
					t.Fatalf("element %d = %g, want %g", i, got[i], w)
				}
			}
		})
	}
}

func randomParams(cfg model.Config, seed uint64) ([]float32, *model.Layout) {
	layout := model.NewLayout(cfg)
	rng := rand.New(rand.NewPCG(seed, 1))
	p := make([]float32, layout.Total)
	for i := range p {
		p[i] = float32(rng.NormFloat64())
	}
	return p, layout
}

func TestSaveReload(t *testing.T) {
	tied := model.DefaultConfig(32, 2, 48)
	tied.DState, tied.HeadDim, tied.NHeads, tied.NGroups, tied.ChunkSize = 8, 8, 8, 2, 8
	untied := tied
	untied.TieEmbeddings, untied.Bias = false, true
	for _, c := range []struct {
		name  string
		cfg   model.Config
		dtype safetensors.DType
	}{
		{"tied F32", tied, safetensors.F32},
		{"untied with biases F32", untied, safetensors.F32},
		{"tied BF16", tied, safetensors.BF16},
		{"untied F16", untied, safetensors.F16},
		{"tied F64", tied, safetensors.F64},
	} {
		t.Run(c.name, func(t *testing.T) {
			params, layout := randomParams(c.cfg, 3)
			dir := filepath.Join(t.TempDir(), "ckpt")
			if err := SaveCheckpoint(dir, c.cfg, layout, params, c.dtype); err != nil {
				t.Fatal(err)
			}
			cfg, format, err := ReadConfigFile(filepath.Join(dir, ConfigFile))
			if err != nil || format != FormatHF {
				t.Fatalf("config: %v %v", format, err)
			}
			wantCfg := c.cfg
			wantCfg.UnpaddedVocab = wantCfg.VocabSize
			if cfg != wantCfg {
				t.Fatalf("config\n got %+v\nwant %+v", cfg, wantCfg)
			}
			f, err := safetensors.ReadFile(filepath.Join(dir, WeightsFile))
			if err != nil {
				t.Fatal(err)
			}
			if f.Metadata["format"] != "pt" {
				t.Fatalf("metadata %v", f.Metadata)
			}
			_, hasHead := f.Get(model.NameLMHead)
			if hasHead == c.cfg.TieEmbeddings {
				t.Fatalf("lm_head present = %v with tie = %v", hasHead, c.cfg.TieEmbeddings)
			}
			if len(f.Tensors) != len(layout.Tensors) {
				t.Fatalf("%d tensors, layout %d", len(f.Tensors), len(layout.Tensors))
			}
			for i, tn := range f.Tensors { // file order is layout order
				if tn.Name != layout.Tensors[i].Name || tn.DType != c.dtype {
					t.Fatalf("tensor %d is %s %s, want %s %s", i, tn.Name, tn.DType, layout.Tensors[i].Name, c.dtype)
				}
			}
			got, err := LoadParams[float32](dir, cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			for i, v := range params {
				want := v
				switch c.dtype {
				case safetensors.BF16:
					want = safetensors.Float32FromBF16(safetensors.BF16FromFloat32(v))
				case safetensors.F16:
					want = safetensors.Float32FromF16(safetensors.F16FromFloat32(v))
				}
				if got[i] != want {
					t.Fatalf("element %d = %g, want %g", i, got[i], want)
				}
			}
			// ParamTensors produces the same bytes as the streamed file.
			ts, err := ParamTensors(layout, params, c.dtype)
			if err != nil {
				t.Fatal(err)
			}
			for i, tn := range ts {
				if string(tn.Data) != string(f.Tensors[i].Data) {
					t.Fatalf("ParamTensors %s differs from the saved tensor", tn.Name)
				}
			}
		})
	}
}

func TestSaveMambaSSMConfigReload(t *testing.T) {
	// A checkpoint directory with a mamba_ssm config and mamba_ssm names
	// loads like the HF one.
	cfg := model.DefaultConfig(64, 1, 32)
	cfg.DState, cfg.HeadDim, cfg.NHeads, cfg.ChunkSize = 16, 16, 8, 16
	cfg.UnpaddedVocab = 30
	params, layout := randomParams(cfg, 5)
	ts, err := ParamTensors(layout, params, safetensors.F32)
	if err != nil {
		t.Fatal(err)
	}
	ts[0].Name = nameEmbeddingSSM
	emb := ts[0]
	emb.Name = model.NameLMHead // mamba_ssm state dicts carry the tied head
	ts = append(ts, emb)
	dir := t.TempDir()
	if err := safetensors.WriteFile(filepath.Join(dir, WeightsFile), ts, nil); err != nil {
		t.Fatal(err)
	}
	b, err := MarshalMambaSSMConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, ConfigFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	got, format, err := ReadConfigFile(filepath.Join(dir, ConfigFile))
	if err != nil || format != FormatMambaSSM {
		t.Fatalf("%v %v", format, err)
	}
	if got.VocabSize != 32 || got.UnpaddedVocab != 30 || got.PadVocabMultiple != 16 {
		t.Fatalf("vocab %d/%d/%d", got.VocabSize, got.UnpaddedVocab, got.PadVocabMultiple)
	}
	loaded, err := LoadParams[float32](dir, got, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range params {
		if loaded[i] != params[i] {
			t.Fatalf("element %d differs", i)
		}
	}
}

func TestSaveRejects(t *testing.T) {
	cfg := model.DefaultConfig(64, 1, 32)
	params, layout := randomParams(cfg, 1)
	dir := t.TempDir()
	cases := []struct {
		name   string
		run    func() error
		err    error
		substr string
	}{
		{"int dtype", func() error { return SaveCheckpoint(dir, cfg, layout, params, safetensors.I32) }, ErrUnsupported, "dtype"},
		{"short buffer", func() error { return SaveCheckpoint(dir, cfg, layout, params[1:], safetensors.F32) }, ErrCheckpoint, "elements"},
		{"unexportable config", func() error {
			c := cfg
			c.NormBeforeGate = true
			return SaveCheckpoint(dir, c, nil, params, safetensors.F32)
		}, ErrUnsupported, "NormBeforeGate"},
		{"ParamTensors short buffer", func() error { _, err := ParamTensors(layout, params[:3], safetensors.F32); return err }, ErrCheckpoint, "elements"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.run()
			if !errors.Is(err, c.err) || !strings.Contains(err.Error(), c.substr) {
				t.Fatalf("got %v, want %v mentioning %q", err, c.err, c.substr)
			}
		})
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("failed saves left %d files", len(entries))
	}
}

// writeSharded splits the tensors of f over two shard files and an index.
func writeSharded(t *testing.T, f *safetensors.File, dir string, weightMap map[string]string) {
	t.Helper()
	shards := map[string][]safetensors.Tensor{}
	for i, tn := range f.Tensors {
		name := "model-00001-of-00002.safetensors"
		if i >= len(f.Tensors)/2 {
			name = "model-00002-of-00002.safetensors"
		}
		shards[name] = append(shards[name], tn)
		if _, set := weightMap[tn.Name]; !set {
			weightMap[tn.Name] = name
		}
	}
	for name, ts := range shards {
		if err := safetensors.WriteFile(filepath.Join(dir, name), ts, map[string]string{"format": "pt"}); err != nil {
			t.Fatal(err)
		}
	}
	idx, err := json.Marshal(map[string]any{"metadata": map[string]any{"total_size": 1}, "weight_map": weightMap})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, WeightsIndexFile), idx, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadSharded(t *testing.T) {
	cfg, f := oracle(t)
	want, err := LoadParamsFromFile[float32](f, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeSharded(t, f, dir, map[string]string{})
	got, err := LoadParams[float32](dir, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("element %d differs", i)
		}
	}

	cases := []struct {
		name     string
		wm       map[string]string
		mentions []string
	}{
		{"listed but absent", map[string]string{"backbone.ghost.weight": "model-00001-of-00002.safetensors"},
			[]string{"backbone.ghost.weight", "absent"}},
		{"mapped to the other shard", map[string]string{model.NameEmbedding: "model-00002-of-00002.safetensors"},
			[]string{model.NameEmbedding, "index maps it"}},
		{"path escapes the directory", map[string]string{"backbone.x": "../model.safetensors"},
			[]string{"backbone.x", "not a file name"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			writeSharded(t, f, dir, c.wm)
			_, err := LoadParams[float32](dir, cfg, nil)
			if !errors.Is(err, ErrCheckpoint) {
				t.Fatalf("got %v, want ErrCheckpoint", err)
			}
			for _, m := range c.mentions {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error does not mention %q: %v", m, err)
				}
			}
		})
	}
	if _, err := LoadParams[float32](t.TempDir(), cfg, nil); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("empty directory: %v", err)
	}
}

func TestLoadErrorNamesFile(t *testing.T) {
	cfg, _ := oracle(t)
	cfg.NLayer = 1
	_, err := LoadParams[float32](oracleDir, cfg, nil)
	var ce *CheckpointError
	if !errors.As(err, &ce) || !strings.Contains(ce.Source, WeightsFile) {
		t.Fatalf("got %v", err)
	}
	if !strings.Contains(err.Error(), "backbone.layers.1.mixer.in_proj.weight") || !strings.Contains(err.Error(), "unexpected") {
		t.Fatalf("extra layer not reported: %v", err)
	}
}
