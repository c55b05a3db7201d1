// Package model owns the Mamba-2 language model's definition: its
// configuration, the layout of the flat parameter buffer, the optimizer and
// learning-rate schedule, and the backend interface that the CPU reference
// (model/ref) and the CUDA backend (kernels) implement. It does no I/O and
// imports nothing outside the standard library.
package model

import (
	"fmt"
	"math"
)

// Float is the element type of a CPU backend: float32 for training, float64
// for the tests that check the numerics against the oracle.
type Float interface {
	~float32 | ~float64
}

// Config is the architecture of a Mamba-2 language model, in the letters of
// the SSD paper (see docs/MAMBA2_SPEC.md §0). VocabSize is the padded
// vocabulary V; the embedding and LM head have V rows.
type Config struct {
	DModel    int // D, hidden_size
	NLayer    int // num_hidden_layers
	VocabSize int // V, padded to a multiple of PadVocabMultiple
	DState    int // N, state_size
	DConv     int // W, conv_kernel
	Expand    int // E = Expand·D
	HeadDim   int // P
	NHeads    int // H = E/P
	NGroups   int // G, B/C groups; H must be a multiple of G
	ChunkSize int // Q, affects rounding only

	// GatedNorm selects the gated RMSNorm before out_proj (mamba_ssm
	// rmsnorm=True); false means out = y·silu(z) with no norm.
	GatedNorm      bool
	NormBeforeGate bool // true: norm(y)·silu(z); false (published): norm(y·silu(z))
	DHasHdim       bool // D per channel (E) instead of per head (H)
	ConvBias       bool
	Bias           bool // in_proj and out_proj biases

	// GatedNormGroups is the number of channel groups that the gated
	// RMSNorm normalises separately. Zero means NGroups, as mamba_ssm does
	// (and transformers' fused CUDA path); 1 reproduces transformers'
	// pure-PyTorch path, which normalises over all E channels whatever
	// n_groups is (MAMBA2_SPEC.md §8.1). The two agree when NGroups is 1.
	GatedNormGroups int

	NormEps      float64 // block and final RMSNorm epsilon
	GatedNormEps float64 // gated RMSNorm epsilon

	TieEmbeddings bool // LM head shares the embedding matrix

	// Initialisation and dt range (used by Init only, except DTLimit).
	DTMin, DTMax, DTInitFloor float64
	DTLimit                   [2]float64 // clamp of dt after softplus; {0, +Inf} is a no-op
	AInitRange                [2]float64
	InitializerRange          float64 // std of the embedding init

	// UnpaddedVocab is the tokenizer's vocabulary (mamba_ssm config.json
	// stores this); PadVocabMultiple is the padding rule. Zero means unknown.
	UnpaddedVocab    int
	PadVocabMultiple int
}

// DefaultConfig returns the mamba_ssm defaults (MAMBA2_SPEC.md §1.1) at the
// given width, depth and padded vocabulary.
func DefaultConfig(dModel, nLayer, vocab int) Config {
	c := Config{
		DModel:           dModel,
		NLayer:           nLayer,
		VocabSize:        vocab,
		DState:           128,
		DConv:            4,
		Expand:           2,
		HeadDim:          64,
		NGroups:          1,
		ChunkSize:        256,
		GatedNorm:        true,
		ConvBias:         true,
		NormEps:          1e-5,
		GatedNormEps:     1e-5,
		TieEmbeddings:    true,
		DTMin:            0.001,
		DTMax:            0.1,
		DTInitFloor:      1e-4,
		DTLimit:          [2]float64{0, math.Inf(1)},
		AInitRange:       [2]float64{1, 16},
		InitializerRange: 0.02,
		UnpaddedVocab:    vocab,
		PadVocabMultiple: 16,
	}
	c.NHeads = c.Expand * dModel / c.HeadDim
	return c
}

// DInner is E, the inner width.
func (c Config) DInner() int { return c.Expand * c.DModel }

// ConvDim is C_d = E + 2GN, the channels of the depthwise conv.
func (c Config) ConvDim() int { return c.DInner() + 2*c.NGroups*c.DState }

// InProjDim is the output width of in_proj: 2E + 2GN + H ([z | x | B | C | dt]).
func (c Config) InProjDim() int { return 2*c.DInner() + 2*c.NGroups*c.DState + c.NHeads }

// DSize is the length of the D skip parameter: H, or E with DHasHdim.
func (c Config) DSize() int {
	if c.DHasHdim {
		return c.DInner()
	}
	return c.NHeads
}

// NormGroups is the number of groups of the gated RMSNorm.
func (c Config) NormGroups() int {
	if c.GatedNormGroups > 0 {
		return c.GatedNormGroups
	}
	return c.NGroups
}

// ConfigError names the field of a Config that breaks a rule.
type ConfigError struct {
	Field string
	Rule  string
}

func (e *ConfigError) Error() string { return fmt.Sprintf("model: config %s: %s", e.Field, e.Rule) }

// Validate checks every rule the model relies on and names the first field
// that breaks one.
func (c Config) Validate() error {
	pos := []struct {
		name string
		v    int
	}{
		{"d_model", c.DModel}, {"n_layer", c.NLayer}, {"vocab_size", c.VocabSize},
		{"d_state", c.DState}, {"d_conv", c.DConv}, {"expand", c.Expand},
		{"headdim", c.HeadDim}, {"nheads", c.NHeads}, {"ngroups", c.NGroups},
		{"chunk_size", c.ChunkSize},
	}
	for _, p := range pos {
		if p.v <= 0 {
			return &ConfigError{p.name, fmt.Sprintf("must be positive, got %d", p.v)}
		}
	}
	if c.NHeads*c.HeadDim != c.DInner() {
		return &ConfigError{"nheads", fmt.Sprintf("nheads·headdim = %d·%d = %d must equal expand·d_model = %d",
			c.NHeads, c.HeadDim, c.NHeads*c.HeadDim, c.DInner())}
	}
	if c.NHeads%c.NGroups != 0 {
		return &ConfigError{"ngroups", fmt.Sprintf("nheads %d must be a multiple of ngroups %d", c.NHeads, c.NGroups)}
	}
	if c.GatedNormGroups < 0 || c.DInner()%c.NormGroups() != 0 {
		return &ConfigError{"gated_norm_groups", fmt.Sprintf("must be >= 0 and divide expand·d_model = %d, got %d", c.DInner(), c.GatedNormGroups)}
	}
	if c.PadVocabMultiple > 0 && c.VocabSize%c.PadVocabMultiple != 0 {
		return &ConfigError{"vocab_size", fmt.Sprintf("%d is not a multiple of pad_vocab_size_multiple %d", c.VocabSize, c.PadVocabMultiple)}
	}
	if c.UnpaddedVocab > c.VocabSize {
		return &ConfigError{"vocab_size", fmt.Sprintf("unpadded vocabulary %d exceeds padded size %d", c.UnpaddedVocab, c.VocabSize)}
	}
	if !(c.NormEps > 0) {
		return &ConfigError{"norm_epsilon", fmt.Sprintf("must be positive, got %g", c.NormEps)}
	}
	if c.GatedNorm && !(c.GatedNormEps > 0) {
		return &ConfigError{"gated_norm_epsilon", fmt.Sprintf("must be positive, got %g", c.GatedNormEps)}
	}
	if math.IsNaN(c.DTLimit[0]) || math.IsNaN(c.DTLimit[1]) || c.DTLimit[0] < 0 || c.DTLimit[0] > c.DTLimit[1] {
		return &ConfigError{"dt_limit", fmt.Sprintf("must satisfy 0 <= lo <= hi, got [%g, %g]", c.DTLimit[0], c.DTLimit[1])}
	}
	return nil
}

// ValidateInit checks the fields that only initialisation from scratch uses.
func (c Config) ValidateInit() error {
	if !(c.DTMin > 0 && c.DTMin <= c.DTMax) {
		return &ConfigError{"dt_min", fmt.Sprintf("must satisfy 0 < dt_min <= dt_max, got %g, %g", c.DTMin, c.DTMax)}
	}
	if !(c.DTInitFloor >= 0) {
		return &ConfigError{"dt_init_floor", fmt.Sprintf("must be >= 0, got %g", c.DTInitFloor)}
	}
	if !(c.AInitRange[0] > 0 && c.AInitRange[0] <= c.AInitRange[1]) {
		return &ConfigError{"A_init_range", fmt.Sprintf("must satisfy 0 < lo <= hi, got [%g, %g]", c.AInitRange[0], c.AInitRange[1])}
	}
	if !(c.InitializerRange > 0) {
		return &ConfigError{"initializer_range", fmt.Sprintf("must be positive, got %g", c.InitializerRange)}
	}
	return nil
}

// PadVocab rounds v up to a multiple of m (m <= 0 leaves v unchanged).
func PadVocab(v, m int) int {
	if m <= 0 {
		return v
	}
	return (v + m - 1) / m * m
}
