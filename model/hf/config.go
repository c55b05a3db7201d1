package hf

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"

	"github.com/m2train/m2train/model"
)

// Format is the configuration dialect of a checkpoint.
type Format int

const (
	// FormatHF is transformers' Mamba2Config (hidden_size, num_heads, ...).
	FormatHF Format = iota + 1
	// FormatMambaSSM is mamba_ssm's MambaConfig (d_model, ssm_cfg, ...).
	FormatMambaSSM
)

// String is "hf" or "mamba_ssm".
func (f Format) String() string {
	switch f {
	case FormatHF:
		return "hf"
	case FormatMambaSSM:
		return "mamba_ssm"
	}
	return fmt.Sprintf("Format(%d)", int(f))
}

// Defaults of the mamba_ssm Mamba2 mixer and MambaConfig (MAMBA2_SPEC.md §1.1).
const (
	mambaSSMEps              = 1e-5 // norm_epsilon and the gated-norm epsilon, fixed in mamba_ssm
	mambaSSMPadVocabMultiple = 8    // MambaConfig dataclass default
	mambaSSMInitRange        = 0.02 // _init_weights' initializer_range
	hfInitRange              = 0.1  // Mamba2Config default initializer_range
)

// ReadConfigFile reads a config.json in either format.
func ReadConfigFile(path string) (model.Config, Format, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return model.Config{}, 0, fmt.Errorf("hf: %w", err)
	}
	cfg, f, err := ParseConfig(data)
	if err != nil {
		return model.Config{}, 0, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, f, nil
}

// ParseConfig decodes a config.json of either format, detected by its keys:
// "hidden_size" is Hugging Face, "d_model" is mamba_ssm. Python's bare
// Infinity/NaN tokens and their string spellings are accepted wherever a
// float is expected. The result is validated (model.Config.Validate); errors
// name the field as spelled in the JSON and wrap ErrConfig, or ErrUnsupported
// for variants this project does not implement.
//
// Hugging Face: hidden_size, num_hidden_layers, vocab_size (already padded),
// state_size, num_heads, head_dim and n_groups are required (the class
// defaults of the last few are Codestral's, not those of the published
// models); model_type must be "mamba2". Other fields take Mamba2Config's
// defaults when absent: expand 2, conv_kernel 4, chunk_size 256,
// layer_norm_epsilon 1e-5 (block, final and gated norms), use_bias false,
// use_conv_bias true, time_step_min/max/floor 0.001/0.1/1e-4,
// time_step_limit [0, Infinity], initializer_range 0.1,
// tie_word_embeddings false. HF always applies the gated RMSNorm with the
// gate before the norm, so GatedNorm is true and NormBeforeGate false
// whatever norm_before_gate says; likewise its blocks always use RMSNorm, so
// rms_norm is ignored as transformers ignores it. hidden_act other than
// "silu" is unsupported. residual_in_fp32 false is accepted:
// this project always keeps the residual stream in fp32, so the flag cannot
// change results beyond rounding. pad_vocab_size_multiple, when present, sets
// PadVocabMultiple (otherwise 0, unknown); UnpaddedVocab is vocab_size.
//
// mamba_ssm: d_model, n_layer and vocab_size (unpadded) are required;
// pad_vocab_size_multiple defaults to 8 and pads the vocabulary. ssm_cfg
// must say "layer": "Mamba2"; its other keys override the §1.1 defaults.
// d_intermediate != 0, a non-empty attn_layer_idx, rms_norm false, d_ssm
// other than null or expand·d_model, and unknown ssm_cfg keys are
// unsupported. Both norm epsilons are mamba_ssm's fixed 1e-5.
func ParseConfig(data []byte) (model.Config, Format, error) {
	top, err := newObject("", quoteNonFinite(data))
	if err != nil {
		return model.Config{}, 0, err
	}
	hf, ssm := top.has("hidden_size"), top.has("d_model")
	switch {
	case hf && ssm:
		return model.Config{}, 0, fieldErr(ErrConfig, "hidden_size", "config has both hidden_size (Hugging Face) and d_model (mamba_ssm)")
	case hf:
		cfg, err := parseHF(top)
		return cfg, FormatHF, err
	case ssm:
		cfg, err := parseMambaSSM(top)
		return cfg, FormatMambaSSM, err
	}
	return model.Config{}, 0, fieldErr(ErrConfig, "hidden_size", "missing: neither hidden_size (Hugging Face) nor d_model (mamba_ssm) is present")
}

// hfFieldNames maps model.ConfigError fields to Hugging Face keys.
var hfFieldNames = map[string]string{
	"d_model": "hidden_size", "n_layer": "num_hidden_layers", "vocab_size": "vocab_size",
	"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "headdim": "head_dim",
	"nheads": "num_heads", "ngroups": "n_groups", "chunk_size": "chunk_size",
	"norm_epsilon": "layer_norm_epsilon", "gated_norm_epsilon": "layer_norm_epsilon",
	"dt_limit": "time_step_limit",
}

// ssmFieldNames maps model.ConfigError fields to mamba_ssm keys.
var ssmFieldNames = map[string]string{
	"d_model": "d_model", "n_layer": "n_layer", "vocab_size": "vocab_size",
	"d_state": "ssm_cfg.d_state", "d_conv": "ssm_cfg.d_conv", "expand": "ssm_cfg.expand",
	"headdim": "ssm_cfg.headdim", "nheads": "ssm_cfg.headdim", "ngroups": "ssm_cfg.ngroups",
	"chunk_size": "ssm_cfg.chunk_size", "norm_epsilon": "norm_epsilon",
	"gated_norm_epsilon": "norm_epsilon", "dt_limit": "ssm_cfg.dt_limit",
}

// validate runs model.Config.Validate and renames the field it reports.
func validate(cfg model.Config, names map[string]string) error {
	err := cfg.Validate()
	var ce *model.ConfigError
	if errors.As(err, &ce) {
		name, ok := names[ce.Field]
		if !ok {
			name = ce.Field
		}
		return fieldErr(ErrConfig, name, "%s", ce.Rule)
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return nil
}

func parseHF(o *object) (model.Config, error) {
	var c model.Config
	if mt := o.string("model_type", true, ""); o.err == nil && mt != "mamba2" {
		o.fail(fieldErr(ErrUnsupported, "model_type", "must be \"mamba2\", got %q", mt))
	}
	c.DModel = o.int("hidden_size", true, 0)
	c.NLayer = o.int("num_hidden_layers", true, 0)
	c.VocabSize = o.int("vocab_size", true, 0)
	c.DState = o.int("state_size", true, 0)
	c.NHeads = o.int("num_heads", true, 0)
	c.HeadDim = o.int("head_dim", true, 0)
	c.NGroups = o.int("n_groups", true, 0)
	c.Expand = o.int("expand", false, 2)
	c.DConv = o.int("conv_kernel", false, 4)
	c.ChunkSize = o.int("chunk_size", false, 256)
	eps := o.float("layer_norm_epsilon", 1e-5)
	c.NormEps, c.GatedNormEps = eps, eps
	c.Bias = o.bool("use_bias", false)
	c.ConvBias = o.bool("use_conv_bias", true)
	if act := o.string("hidden_act", false, "silu"); act != "silu" {
		o.fail(fieldErr(ErrUnsupported, "hidden_act", "only \"silu\" is implemented, got %q", act))
	}
	// transformers' Mamba2 modelling code never reads rms_norm: its blocks
	// always use RMSNorm. The flag is type-checked and ignored likewise.
	o.bool("rms_norm", true)
	o.bool("residual_in_fp32", true) // type-checked only: the residual is always fp32
	c.DTMin = o.float("time_step_min", 0.001)
	c.DTMax = o.float("time_step_max", 0.1)
	c.DTInitFloor = o.float("time_step_floor", 1e-4)
	c.DTLimit = o.pair("time_step_limit", [2]float64{0, math.Inf(1)})
	c.InitializerRange = o.float("initializer_range", hfInitRange)
	c.TieEmbeddings = o.bool("tie_word_embeddings", false)
	c.PadVocabMultiple = o.int("pad_vocab_size_multiple", false, 0)
	if c.PadVocabMultiple < 0 {
		o.fail(fieldErr(ErrConfig, "pad_vocab_size_multiple", "must not be negative, got %d", c.PadVocabMultiple))
	}
	if o.err != nil {
		return model.Config{}, o.err
	}
	c.UnpaddedVocab = c.VocabSize
	c.GatedNorm = true
	c.NormBeforeGate = false
	c.AInitRange = [2]float64{1, 16}
	if err := validate(c, hfFieldNames); err != nil {
		return model.Config{}, err
	}
	return c, nil
}

// ssmCfgIgnored are Mamba2 constructor arguments that do not change the
// model's function (implementation switches, init-only settings this
// project replaces with §2.6).
var ssmCfgIgnored = map[string]bool{
	"conv_init": true, "use_mem_eff_path": true, "sequence_parallel": true, "layer_idx": true,
	"process_group": true, "device": true, "dtype": true,
}

func parseMambaSSM(o *object) (model.Config, error) {
	c := model.Config{
		NormEps:          mambaSSMEps,
		GatedNormEps:     mambaSSMEps,
		InitializerRange: mambaSSMInitRange,
	}
	c.DModel = o.int("d_model", true, 0)
	c.NLayer = o.int("n_layer", true, 0)
	vocab := o.int("vocab_size", true, 0)
	pad := o.int("pad_vocab_size_multiple", false, mambaSSMPadVocabMultiple)
	if o.err == nil && pad <= 0 {
		o.fail(fieldErr(ErrConfig, "pad_vocab_size_multiple", "must be positive, got %d", pad))
	}
	if di := o.int("d_intermediate", false, 0); o.err == nil && di != 0 {
		o.fail(fieldErr(ErrUnsupported, "d_intermediate", "must be 0 (no MLP sub-block), got %d", di))
	}
	if !o.isNull("attn_layer_idx") {
		var idx []json.RawMessage
		raw, _ := o.get("attn_layer_idx", false)
		if o.decode("attn_layer_idx", raw, &idx, "a list") && len(idx) > 0 {
			o.fail(fieldErr(ErrUnsupported, "attn_layer_idx", "attention layers are not implemented, got %s", abbreviate(raw)))
		}
	}
	if !o.bool("rms_norm", true) {
		o.fail(fieldErr(ErrUnsupported, "rms_norm", "false selects LayerNorm, which is not implemented"))
	}
	o.bool("residual_in_fp32", true) // the residual is always fp32
	o.bool("fused_add_norm", true)   // numerically the same either way
	c.TieEmbeddings = o.bool("tie_embeddings", true)
	if o.err != nil {
		return model.Config{}, o.err
	}

	raw, ok := o.get("ssm_cfg", false)
	if !ok {
		raw = []byte("{}")
	}
	s, err := newObject("ssm_cfg.", raw)
	if err != nil {
		return model.Config{}, err
	}
	if layer := s.string("layer", false, "Mamba1"); s.err == nil && layer != "Mamba2" {
		s.fail(fieldErr(ErrUnsupported, "ssm_cfg.layer", "must be \"Mamba2\", got %q (mamba_ssm's default is Mamba1)", layer))
	}
	c.DState = s.int("d_state", false, 128)
	c.DConv = s.int("d_conv", false, 4)
	c.Expand = s.int("expand", false, 2)
	c.HeadDim = s.int("headdim", false, 64)
	c.NGroups = s.int("ngroups", false, 1)
	c.ChunkSize = s.int("chunk_size", false, 256)
	c.GatedNorm = s.bool("rmsnorm", true)
	c.NormBeforeGate = s.bool("norm_before_gate", false)
	c.DTMin = s.float("dt_min", 0.001)
	c.DTMax = s.float("dt_max", 0.1)
	c.DTInitFloor = s.float("dt_init_floor", 1e-4)
	c.DTLimit = s.pair("dt_limit", [2]float64{0, math.Inf(1)})
	c.AInitRange = s.pair("A_init_range", [2]float64{1, 16})
	c.DHasHdim = s.bool("D_has_hdim", false)
	c.ConvBias = s.bool("conv_bias", true)
	c.Bias = s.bool("bias", false)
	if !s.isNull("d_ssm") {
		if d := s.int("d_ssm", false, 0); s.err == nil && d != c.Expand*c.DModel {
			s.fail(fieldErr(ErrUnsupported, "ssm_cfg.d_ssm", "must be null or expand·d_model = %d, got %d", c.Expand*c.DModel, d))
		}
	}
	if s.bool("learnable_init_states", false) {
		s.fail(fieldErr(ErrUnsupported, "ssm_cfg.learnable_init_states", "learnable initial states are not implemented"))
	}
	if act := s.string("activation", false, "swish"); act != "swish" && act != "silu" {
		s.fail(fieldErr(ErrUnsupported, "ssm_cfg.activation", "only \"swish\" (SiLU) is implemented, got %q", act))
	}
	for _, k := range sortedKeys(s.m) {
		if !s.used[k] && !ssmCfgIgnored[k] {
			s.fail(fieldErr(ErrUnsupported, "ssm_cfg."+k, "unknown Mamba2 option"))
		}
	}
	if s.err != nil {
		return model.Config{}, s.err
	}
	if c.HeadDim > 0 && c.Expand*c.DModel%c.HeadDim != 0 {
		return model.Config{}, fieldErr(ErrConfig, "ssm_cfg.headdim", "headdim %d must divide expand·d_model = %d", c.HeadDim, c.Expand*c.DModel)
	}
	if c.HeadDim > 0 {
		c.NHeads = c.Expand * c.DModel / c.HeadDim
	}
	c.VocabSize = model.PadVocab(vocab, pad)
	c.UnpaddedVocab = vocab
	c.PadVocabMultiple = pad
	if err := validate(c, ssmFieldNames); err != nil {
		return model.Config{}, err
	}
	return c, nil
}

func sortedKeys[V any](m map[string]V) []string {
	fs := make([]field, 0, len(m))
	for k := range m {
		fs = append(fs, field{key: k})
	}
	sortFields(fs)
	keys := make([]string, len(fs))
	for i, f := range fs {
		keys[i] = f.key
	}
	return keys
}

// MarshalHFConfig renders cfg as the config.json of a transformers
// Mamba2ForCausalLM (keys sorted, two-space indent, as save_pretrained
// writes it; an infinite time_step_limit is the bare token Infinity, as
// Python writes it). Configurations that transformers cannot express are an
// error naming the model.Config field: GatedNorm false, NormBeforeGate true,
// DHasHdim true, or GatedNormEps different from NormEps. With NGroups > 1,
// transformers' pure-PyTorch path normalises the gated norm over all E
// channels while this project (and HF's CUDA path) groups it; see
// MAMBA2_SPEC.md §8.1.
func MarshalHFConfig(cfg model.Config) ([]byte, error) {
	if err := validate(cfg, hfFieldNames); err != nil {
		return nil, err
	}
	switch {
	case !cfg.GatedNorm:
		return nil, fieldErr(ErrUnsupported, "GatedNorm", "transformers' Mamba2 always applies the gated RMSNorm")
	case cfg.NormBeforeGate:
		return nil, fieldErr(ErrUnsupported, "NormBeforeGate", "transformers' Mamba2 always gates before the norm")
	case cfg.DHasHdim:
		return nil, fieldErr(ErrUnsupported, "DHasHdim", "transformers' Mamba2 has one D per head")
	case cfg.GatedNormEps != cfg.NormEps:
		return nil, fieldErr(ErrUnsupported, "GatedNormEps", "transformers uses layer_norm_epsilon for every norm; %g != %g", cfg.GatedNormEps, cfg.NormEps)
	}
	fs := []field{
		{"architectures", []any{"Mamba2ForCausalLM"}},
		{"model_type", "mamba2"},
		{"hidden_size", cfg.DModel},
		{"num_hidden_layers", cfg.NLayer},
		{"vocab_size", cfg.VocabSize},
		{"state_size", cfg.DState},
		{"num_heads", cfg.NHeads},
		{"head_dim", cfg.HeadDim},
		{"expand", cfg.Expand},
		{"conv_kernel", cfg.DConv},
		{"n_groups", cfg.NGroups},
		{"chunk_size", cfg.ChunkSize},
		{"time_step_limit", cfg.DTLimit},
		{"time_step_min", cfg.DTMin},
		{"time_step_max", cfg.DTMax},
		{"time_step_floor", cfg.DTInitFloor},
		{"rms_norm", true},
		{"use_bias", cfg.Bias},
		{"use_conv_bias", cfg.ConvBias},
		{"hidden_act", "silu"},
		{"layer_norm_epsilon", cfg.NormEps},
		{"residual_in_fp32", true},
		{"tie_word_embeddings", cfg.TieEmbeddings},
		{"initializer_range", cfg.InitializerRange},
		{"rescale_prenorm_residual", false},
		{"norm_before_gate", false},
		{"use_cache", true},
		{"bos_token_id", 0},
		{"eos_token_id", 0},
		{"pad_token_id", 0},
	}
	if cfg.PadVocabMultiple > 0 {
		fs = append(fs, field{"pad_vocab_size_multiple", cfg.PadVocabMultiple})
	}
	return encodeJSON(sortFields(fs), 2), nil
}

// MarshalMambaSSMConfig renders cfg as the config.json of a mamba_ssm
// MambaLMHeadModel (four-space indent, MambaConfig's field order, every
// Mamba2 option written out in ssm_cfg). vocab_size is the unpadded
// vocabulary (VocabSize when UnpaddedVocab is 0), and padding it to
// pad_vocab_size_multiple must give VocabSize; PadVocabMultiple 0 is written
// as 1 when no padding is needed. mamba_ssm fixes both norm epsilons at
// 1e-5, so other values are an error naming the field.
func MarshalMambaSSMConfig(cfg model.Config) ([]byte, error) {
	if err := validate(cfg, ssmFieldNames); err != nil {
		return nil, err
	}
	if cfg.NormEps != mambaSSMEps {
		return nil, fieldErr(ErrUnsupported, "norm_epsilon", "mamba_ssm fixes it at 1e-05, got %g", cfg.NormEps)
	}
	if cfg.GatedNorm && cfg.GatedNormEps != mambaSSMEps {
		return nil, fieldErr(ErrUnsupported, "gated_norm_epsilon", "mamba_ssm fixes it at 1e-05, got %g", cfg.GatedNormEps)
	}
	vocab := cfg.UnpaddedVocab
	if vocab == 0 {
		vocab = cfg.VocabSize
	}
	pad := cfg.PadVocabMultiple
	if pad == 0 {
		if vocab != cfg.VocabSize {
			return nil, fieldErr(ErrConfig, "pad_vocab_size_multiple", "unknown (0) while the unpadded vocabulary %d differs from vocab_size %d", vocab, cfg.VocabSize)
		}
		pad = 1
	}
	if p := model.PadVocab(vocab, pad); p != cfg.VocabSize {
		return nil, fieldErr(ErrConfig, "vocab_size", "unpadded %d padded to a multiple of %d is %d, not the model's %d", vocab, pad, p, cfg.VocabSize)
	}
	ssm := []field{
		{"layer", "Mamba2"},
		{"d_state", cfg.DState},
		{"d_conv", cfg.DConv},
		{"expand", cfg.Expand},
		{"headdim", cfg.HeadDim},
		{"ngroups", cfg.NGroups},
		{"chunk_size", cfg.ChunkSize},
		{"rmsnorm", cfg.GatedNorm},
		{"norm_before_gate", cfg.NormBeforeGate},
		{"D_has_hdim", cfg.DHasHdim},
		{"conv_bias", cfg.ConvBias},
		{"bias", cfg.Bias},
		{"dt_min", cfg.DTMin},
		{"dt_max", cfg.DTMax},
		{"dt_init_floor", cfg.DTInitFloor},
		{"dt_limit", cfg.DTLimit},
		{"A_init_range", cfg.AInitRange},
	}
	fs := []field{
		{"d_model", cfg.DModel},
		{"d_intermediate", 0},
		{"n_layer", cfg.NLayer},
		{"vocab_size", vocab},
		{"ssm_cfg", ssm},
		{"attn_layer_idx", []any{}},
		{"attn_cfg", []field{}},
		{"rms_norm", true},
		{"residual_in_fp32", true},
		{"fused_add_norm", true},
		{"pad_vocab_size_multiple", pad},
		{"tie_embeddings", cfg.TieEmbeddings},
	}
	return encodeJSON(fs, 4), nil
}
