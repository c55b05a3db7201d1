package hf

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m2train/m2train/model"
)

const oracleDir = "../testdata/oracle/tiny-mamba2"

func TestQuoteNonFinite(t *testing.T) {
	cases := []struct{ in, want string }{
		{`[0.0, Infinity]`, `[0.0, "Infinity"]`},
		{`[-Infinity,NaN]`, `["-Infinity","NaN"]`},
		{`{"Infinity": "NaN Infinity"}`, `{"Infinity": "NaN Infinity"}`},
		{`{"a\"Infinity": Infinity}`, `{"a\"Infinity": "Infinity"}`},
		{`{"a\\": NaN}`, `{"a\\": "NaN"}`},
		{`"unterminated \`, `"unterminated \`},
		{`1e-05`, `1e-05`},
	}
	for _, c := range cases {
		t.Run(c.in, func(t *testing.T) {
			if got := string(quoteNonFinite([]byte(c.in))); got != c.want {
				t.Fatalf("got %s want %s", got, c.want)
			}
		})
	}
}

func TestOracleConfig(t *testing.T) {
	cfg, f, err := ReadConfigFile(filepath.Join(oracleDir, ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	if f != FormatHF || f.String() != "hf" {
		t.Fatalf("format %v", f)
	}
	want := model.Config{
		DModel: 32, NLayer: 2, VocabSize: 96, DState: 16, DConv: 4, Expand: 2, HeadDim: 8, NHeads: 8,
		NGroups: 1, ChunkSize: 8, GatedNorm: true, ConvBias: true, NormEps: 1e-5, GatedNormEps: 1e-5,
		TieEmbeddings: true, DTMin: 0.001, DTMax: 0.1, DTInitFloor: 1e-4, DTLimit: [2]float64{0, math.Inf(1)},
		AInitRange: [2]float64{1, 16}, InitializerRange: 0.1, UnpaddedVocab: 96,
	}
	if fmt.Sprintf("%+v", cfg) != fmt.Sprintf("%+v", want) {
		t.Fatalf("config\n got %+v\nwant %+v", cfg, want)
	}
}

// publishedSSM is the config.json of state-spaces/mamba2-130m.
const publishedSSM = `{"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
 "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true,
 "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 16, "tie_embeddings": true}`

func TestPublishedMambaSSMConfig(t *testing.T) {
	cfg, f, err := ParseConfig([]byte(publishedSSM))
	if err != nil {
		t.Fatal(err)
	}
	if f != FormatMambaSSM {
		t.Fatalf("format %v", f)
	}
	want := model.DefaultConfig(768, 24, 50288)
	want.UnpaddedVocab = 50277
	if fmt.Sprintf("%+v", cfg) != fmt.Sprintf("%+v", want) {
		t.Fatalf("config\n got %+v\nwant %+v", cfg, want)
	}
	if cfg.NHeads != 24 || cfg.InProjDim() != 3352 || cfg.ConvDim() != 1792 {
		t.Fatalf("H %d in_proj %d C_d %d", cfg.NHeads, cfg.InProjDim(), cfg.ConvDim())
	}
	// The HF export of it is what the published -hf conversion says.
	b, err := MarshalHFConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(quoteNonFinite(b), &m); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]any{"hidden_size": 768.0, "num_heads": 24.0, "head_dim": 64.0, "vocab_size": 50288.0,
		"n_groups": 1.0, "state_size": 128.0, "tie_word_embeddings": true, "model_type": "mamba2", "pad_vocab_size_multiple": 16.0} {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
}

func TestNonFiniteSpellings(t *testing.T) {
	base := readOracleConfig(t)
	for _, lim := range []string{`[0.0, Infinity]`, `[0, "Infinity"]`, `[0.0, "inf"]`, `[0, "+Infinity"]`} {
		t.Run(lim, func(t *testing.T) {
			cfg, _, err := ParseConfig(setField(t, base, "time_step_limit", lim))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.DTLimit != [2]float64{0, math.Inf(1)} {
				t.Fatalf("DTLimit %v", cfg.DTLimit)
			}
		})
	}
	cfg, _, err := ParseConfig(setField(t, base, "time_step_limit", ""))
	if err != nil || cfg.DTLimit != [2]float64{0, math.Inf(1)} {
		t.Fatalf("absent time_step_limit: %v %v", cfg.DTLimit, err)
	}
	cfg, _, err = ParseConfig(setField(t, base, "time_step_limit", `[0.0, 0.5]`))
	if err != nil || cfg.DTLimit != [2]float64{0, 0.5} {
		t.Fatalf("finite time_step_limit: %v %v", cfg.DTLimit, err)
	}
	cfg, _, err = ParseConfig(setField(t, base, "time_step_min", `NaN`))
	if err != nil || !math.IsNaN(cfg.DTMin) {
		t.Fatalf("NaN time_step_min: %v %v", cfg.DTMin, err)
	}
}

func readOracleConfig(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(oracleDir, ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// setField replaces (or, with value "", deletes) a top-level key of a JSON
// object, or a key of ssm_cfg when key starts with "ssm_cfg.". The value is
// raw JSON text and may use Infinity.
func setField(t *testing.T, doc []byte, key, value string) []byte {
	t.Helper()
	set := func(m map[string]json.RawMessage, k string) {
		if value == "" {
			delete(m, k)
		} else {
			m[k] = json.RawMessage(quoteNonFinite([]byte(value)))
		}
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(quoteNonFinite(doc), &m); err != nil {
		t.Fatal(err)
	}
	if sub, ok := strings.CutPrefix(key, "ssm_cfg."); ok {
		inner := map[string]json.RawMessage{}
		if raw, ok := m["ssm_cfg"]; ok {
			if err := json.Unmarshal(raw, &inner); err != nil {
				t.Fatal(err)
			}
		}
		set(inner, sub)
		raw, err := json.Marshal(inner)
		if err != nil {
			t.Fatal(err)
		}
		m["ssm_cfg"] = raw
	} else {
		set(m, key)
	}
	out, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestParseConfigRejects(t *testing.T) {
	hfBase := readOracleConfig(t)
	ssmBase := []byte(publishedSSM)
	cases := []struct {
		name    string
		doc     []byte
		key     string // "" leaves the document as is
		value   string // "" deletes the key
		err     error
		mention string
	}{
		{"not an object", []byte(`[1]`), "", "", ErrConfig, "config"},
		{"trailing data", []byte(`{"hidden_size": 1} {}`), "", "", ErrConfig, "after the JSON object"},
		{"neither format", []byte(`{"foo": 1}`), "", "", ErrConfig, "hidden_size"},
		{"both formats", hfBase, "d_model", "32", ErrConfig, "d_model"},

		{"hf missing num_hidden_layers", hfBase, "num_hidden_layers", "", ErrConfig, "num_hidden_layers"},
		{"hf missing vocab_size", hfBase, "vocab_size", "", ErrConfig, "vocab_size"},
		{"hf missing state_size", hfBase, "state_size", "", ErrConfig, "state_size"},
		{"hf missing num_heads", hfBase, "num_heads", "", ErrConfig, "num_heads"},
		{"hf missing head_dim", hfBase, "head_dim", "", ErrConfig, "head_dim"},
		{"hf missing n_groups", hfBase, "n_groups", "", ErrConfig, "n_groups"},
		{"hf missing model_type", hfBase, "model_type", "", ErrConfig, "model_type"},
		{"hf model_type mamba", hfBase, "model_type", `"mamba"`, ErrUnsupported, "model_type"},
		{"hf hidden_act gelu", hfBase, "hidden_act", `"gelu"`, ErrUnsupported, "hidden_act"},
		{"hf heads·headdim mismatch", hfBase, "num_heads", "7", ErrConfig, "num_heads"},
		{"hf expand mismatch", hfBase, "expand", "3", ErrConfig, "num_heads"},
		{"hf hidden_size string", hfBase, "hidden_size", `"32"`, ErrConfig, "hidden_size"},
		{"hf hidden_size float", hfBase, "hidden_size", `32.5`, ErrConfig, "hidden_size"},
		{"hf hidden_size null", hfBase, "hidden_size", `null`, ErrConfig, "hidden_size"},
		{"hf hidden_size zero", hfBase, "hidden_size", `0`, ErrConfig, "hidden_size"},
		{"hf n_groups not dividing", hfBase, "n_groups", "3", ErrConfig, "n_groups"},
		{"hf conv_kernel negative", hfBase, "conv_kernel", "-4", ErrConfig, "conv_kernel"},
		{"hf limit one element", hfBase, "time_step_limit", "[0.0]", ErrConfig, "time_step_limit"},
		{"hf limit reversed", hfBase, "time_step_limit", "[1.0, 0.5]", ErrConfig, "time_step_limit"},
		{"hf limit bad string", hfBase, "time_step_limit", `[0.0, "big"]`, ErrConfig, "time_step_limit[1]"},
		{"hf epsilon zero", hfBase, "layer_norm_epsilon", "0", ErrConfig, "layer_norm_epsilon"},
		{"hf epsilon string", hfBase, "layer_norm_epsilon", `"1e-5"`, ErrConfig, "layer_norm_epsilon"},
		{"hf tie not bool", hfBase, "tie_word_embeddings", `1`, ErrConfig, "tie_word_embeddings"},
		{"hf pad multiple breaks vocab", hfBase, "pad_vocab_size_multiple", "64", ErrConfig, "vocab_size"},

		{"ssm missing n_layer", ssmBase, "n_layer", "", ErrConfig, "n_layer"},
		{"ssm missing vocab_size", ssmBase, "vocab_size", "", ErrConfig, "vocab_size"},
		{"ssm missing ssm_cfg", ssmBase, "ssm_cfg", "", ErrUnsupported, "ssm_cfg.layer"},
		{"ssm ssm_cfg null", ssmBase, "ssm_cfg", "null", ErrConfig, "ssm_cfg"},
		{"ssm layer Mamba1", ssmBase, "ssm_cfg.layer", `"Mamba1"`, ErrUnsupported, "ssm_cfg.layer"},
		{"ssm d_intermediate", ssmBase, "d_intermediate", "3072", ErrUnsupported, "d_intermediate"},
		{"ssm attention layers", ssmBase, "attn_layer_idx", "[3, 9]", ErrUnsupported, "attn_layer_idx"},
		{"ssm rms_norm false", ssmBase, "rms_norm", "false", ErrUnsupported, "rms_norm"},
		{"ssm d_ssm smaller", ssmBase, "ssm_cfg.d_ssm", "1024", ErrUnsupported, "ssm_cfg.d_ssm"},
		{"ssm unknown option", ssmBase, "ssm_cfg.fancy", "1", ErrUnsupported, "ssm_cfg.fancy"},
		{"ssm headdim not dividing", ssmBase, "ssm_cfg.headdim", "100", ErrConfig, "ssm_cfg.headdim"},
		{"ssm ngroups not dividing", ssmBase, "ssm_cfg.ngroups", "5", ErrConfig, "ssm_cfg.ngroups"},
		{"ssm d_state zero", ssmBase, "ssm_cfg.d_state", "0", ErrConfig, "ssm_cfg.d_state"},
		{"ssm dt_limit reversed", ssmBase, "ssm_cfg.dt_limit", "[Infinity, 0.0]", ErrConfig, "ssm_cfg.dt_limit"},
		{"ssm A_init_range short", ssmBase, "ssm_cfg.A_init_range", "[1]", ErrConfig, "ssm_cfg.A_init_range"},
		{"ssm pad multiple zero", ssmBase, "pad_vocab_size_multiple", "0", ErrConfig, "pad_vocab_size_multiple"},
		{"ssm learnable init states", ssmBase, "ssm_cfg.learnable_init_states", "true", ErrUnsupported, "ssm_cfg.learnable_init_states"},
		{"ssm activation relu", ssmBase, "ssm_cfg.activation", `"relu"`, ErrUnsupported, "ssm_cfg.activation"},
		{"ssm rmsnorm not bool", ssmBase, "ssm_cfg.rmsnorm", `"yes"`, ErrConfig, "ssm_cfg.rmsnorm"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			doc := c.doc
			if c.key != "" {
				doc = setField(t, doc, c.key, c.value)
			}
			cfg, _, err := ParseConfig(doc)
			if err == nil {
				t.Fatalf("accepted: %+v", cfg)
			}
			if !errors.Is(err, c.err) {
				t.Fatalf("error %q does not wrap %v", err, c.err)
			}
			if !strings.Contains(err.Error(), c.mention) {
				t.Fatalf("error %q does not name %q", err, c.mention)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %q is not a *FieldError", err)
			}
		})
	}
}

func TestParseConfigAccepts(t *testing.T) {
	hfBase := readOracleConfig(t)
	ssmBase := []byte(publishedSSM)
	cases := []struct {
		name, key, value string
		doc              []byte
		check            func(model.Config) bool
	}{
		{"hf residual_in_fp32 false", "residual_in_fp32", "false", hfBase, func(c model.Config) bool { return true }},
		{"hf norm_before_gate ignored", "norm_before_gate", "true", hfBase, func(c model.Config) bool { return !c.NormBeforeGate }},
		{"hf rms_norm ignored, as transformers does", "rms_norm", "false", hfBase, func(c model.Config) bool { return c.GatedNorm }},
		{"hf tie default false", "tie_word_embeddings", "", hfBase, func(c model.Config) bool { return !c.TieEmbeddings }},
		{"hf expand default", "expand", "", hfBase, func(c model.Config) bool { return c.Expand == 2 }},
		{"hf bias", "use_bias", "true", hfBase, func(c model.Config) bool { return c.Bias }},
		{"hf pad multiple", "pad_vocab_size_multiple", "16", hfBase, func(c model.Config) bool { return c.PadVocabMultiple == 16 }},
		{"hf time_step_rank ignored", "time_step_rank", `"auto"`, hfBase, func(c model.Config) bool { return true }},
		{"ssm residual_in_fp32 false", "residual_in_fp32", "false", ssmBase, func(c model.Config) bool { return true }},
		{"ssm d_ssm null", "ssm_cfg.d_ssm", "null", ssmBase, func(c model.Config) bool { return true }},
		{"ssm d_ssm equal", "ssm_cfg.d_ssm", "1536", ssmBase, func(c model.Config) bool { return true }},
		{"ssm attn null", "attn_layer_idx", "null", ssmBase, func(c model.Config) bool { return true }},
		{"ssm pad default 8", "pad_vocab_size_multiple", "", ssmBase, func(c model.Config) bool {
			return c.VocabSize == 50280 && c.PadVocabMultiple == 8
		}},
		{"ssm overrides", "ssm_cfg", `{"layer":"Mamba2","d_state":64,"headdim":32,"ngroups":2,"rmsnorm":false,
			"norm_before_gate":true,"D_has_hdim":true,"bias":true,"conv_bias":false,"dt_limit":[0.001, 0.2],
			"A_init_range":[1, 8],"chunk_size":64,"d_conv":3,"expand":2,"dt_min":0.01,"dt_max":0.2,"dt_init_floor":0.001,
			"conv_init":null,"use_mem_eff_path":false}`, ssmBase,
			func(c model.Config) bool {
				return c.DState == 64 && c.HeadDim == 32 && c.NHeads == 48 && c.NGroups == 2 && !c.GatedNorm &&
					c.NormBeforeGate && c.DHasHdim && c.Bias && !c.ConvBias && c.DTLimit == [2]float64{0.001, 0.2} &&
					c.AInitRange == [2]float64{1, 8} && c.ChunkSize == 64 && c.DConv == 3 && c.DTMin == 0.01 &&
					c.DTMax == 0.2 && c.DTInitFloor == 0.001
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, _, err := ParseConfig(setField(t, c.doc, c.key, c.value))
			if err != nil {
				t.Fatal(err)
			}
			if !c.check(cfg) {
				t.Fatalf("unexpected config %+v", cfg)
			}
		})
	}
}

func TestConfigRoundTrip(t *testing.T) {
	tiny := model.DefaultConfig(32, 2, 96)
	tiny.DState, tiny.HeadDim, tiny.NHeads, tiny.NGroups, tiny.ChunkSize = 16, 8, 8, 2, 8
	tiny.UnpaddedVocab = 90
	untied := tiny
	untied.TieEmbeddings, untied.Bias, untied.ConvBias = false, true, false
	untied.DTLimit = [2]float64{0.0001, 0.5}
	untied.NormEps, untied.GatedNormEps = 1e-6, 1e-6
	untied.PadVocabMultiple = 0
	untied.UnpaddedVocab = 96
	ssmOnly := tiny
	ssmOnly.GatedNorm, ssmOnly.NormBeforeGate, ssmOnly.DHasHdim = true, true, true

	cases := []struct {
		name   string
		cfg    model.Config
		hfOK   bool
		ssmOK  bool
		adjust func(f Format, c *model.Config)
	}{
		{"published 130m", func() model.Config { c := model.DefaultConfig(768, 24, 50288); c.UnpaddedVocab = 50277; return c }(), true, true, nil},
		{"tiny grouped", tiny, true, true, nil},
		{"untied biased", untied, true, false, nil},
		{"norm before gate, D per channel", ssmOnly, false, true, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, f := range []Format{FormatHF, FormatMambaSSM} {
				marshal, ok := MarshalHFConfig, c.hfOK
				if f == FormatMambaSSM {
					marshal, ok = MarshalMambaSSMConfig, c.ssmOK
				}
				b, err := marshal(c.cfg)
				if !ok {
					if !errors.Is(err, ErrUnsupported) {
						t.Fatalf("%v: expected ErrUnsupported, got %v", f, err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("%v: %v", f, err)
				}
				got, gotF, err := ParseConfig(b)
				if err != nil {
					t.Fatalf("%v: reparse: %v\n%s", f, err, b)
				}
				if gotF != f {
					t.Fatalf("format %v, want %v", gotF, f)
				}
				want := c.cfg
				if f == FormatHF {
					want.UnpaddedVocab = want.VocabSize // HF stores only the padded size
				} else {
					want.InitializerRange = mambaSSMInitRange // not part of mamba_ssm's config
					if want.PadVocabMultiple == 0 {
						want.PadVocabMultiple = 1
					}
				}
				if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
					t.Fatalf("%v round trip\n got %+v\nwant %+v\n%s", f, got, want, b)
				}
			}
		})
	}
}

func TestMarshalRejects(t *testing.T) {
	base := model.DefaultConfig(64, 2, 96)
	cases := []struct {
		name    string
		mutate  func(*model.Config)
		hf      bool
		err     error
		mention string
	}{
		{"hf invalid", func(c *model.Config) { c.NHeads = 3 }, true, ErrConfig, "num_heads"},
		{"hf ungated", func(c *model.Config) { c.GatedNorm = false }, true, ErrUnsupported, "GatedNorm"},
		{"hf norm before gate", func(c *model.Config) { c.NormBeforeGate = true }, true, ErrUnsupported, "NormBeforeGate"},
		{"hf D per channel", func(c *model.Config) { c.DHasHdim = true }, true, ErrUnsupported, "DHasHdim"},
		{"hf two epsilons", func(c *model.Config) { c.GatedNormEps = 1e-6 }, true, ErrUnsupported, "GatedNormEps"},
		{"ssm invalid", func(c *model.Config) { c.NGroups = 3 }, false, ErrConfig, "ssm_cfg.ngroups"},
		{"ssm epsilon", func(c *model.Config) { c.NormEps = 1e-6 }, false, ErrUnsupported, "norm_epsilon"},
		{"ssm unknown padding", func(c *model.Config) { c.PadVocabMultiple = 0; c.UnpaddedVocab = 90 }, false, ErrConfig, "pad_vocab_size_multiple"},
		{"ssm padding mismatch", func(c *model.Config) { c.PadVocabMultiple = 8; c.UnpaddedVocab = 80 }, false, ErrConfig, "vocab_size"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := base
			c.mutate(&cfg)
			var err error
			if c.hf {
				_, err = MarshalHFConfig(cfg)
			} else {
				_, err = MarshalMambaSSMConfig(cfg)
			}
			if !errors.Is(err, c.err) || !strings.Contains(err.Error(), c.mention) {
				t.Fatalf("got %v, want %v naming %q", err, c.err, c.mention)
			}
		})
	}
}

func TestPyFloat(t *testing.T) {
	cases := map[float64]string{
		0: "0.0", 1: "1.0", 0.1: "0.1", 1e-5: "1e-05", 1e-4: "0.0001", 0.001: "0.001", 16: "16.0",
		1e16: "1e+16", 123456.5: "123456.5", math.Inf(1): "Infinity", math.Inf(-1): "-Infinity", -2.5e-7: "-2.5e-07",
	}
	for v, want := range cases {
		if got := pyFloat(v); got != want {
			t.Errorf("pyFloat(%g) = %s, want %s", v, got, want)
		}
	}
	if got := pyFloat(math.NaN()); got != "NaN" {
		t.Errorf("NaN = %s", got)
	}
}

func FuzzParseConfig(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join(oracleDir, ConfigFile)); err == nil {
		f.Add(b)
	}
	f.Add([]byte(publishedSSM))
	f.Add([]byte(`{"d_model": 64, "n_layer": 1, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2", "headdim": 16, "d_state": 8, "dt_limit": [0.0, Infinity]}}`))
	f.Add([]byte(`{"hidden_size": "Infinity"}`))
	f.Add([]byte(`[NaN, -Infinity, "\"Infinity"]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, format, err := ParseConfig(data)
		if err != nil {
			if !errors.Is(err, ErrConfig) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("accepted an invalid config: %v", err)
		}
		// Whatever parses writes back in its own format and reparses equal.
		marshal := MarshalHFConfig
		if format == FormatMambaSSM {
			marshal = MarshalMambaSSMConfig
		}
		b, err := marshal(cfg)
		if err != nil {
			t.Fatalf("marshal %v: %v", format, err)
		}
		again, f2, err := ParseConfig(b)
		if err != nil || f2 != format {
			t.Fatalf("reparse: %v %v\n%s", f2, err, b)
		}
		if fmt.Sprintf("%+v", again) != fmt.Sprintf("%+v", cfg) {
			t.Fatalf("round trip changed the config\n got %+v\nwant %+v", again, cfg)
		}
	})
}
