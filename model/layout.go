package model

import (
	"fmt"
	"strings"
)

// Tensor is one named view of a flat buffer: Size elements starting at Offset,
// row-major with the given Shape. Names are the Hugging Face ones.
type Tensor struct {
	Name    string
	Shape   []int
	Offset  int
	Size    int
	NoDecay bool // excluded from weight decay (A_log, D, dt_bias, norms, biases)
}

// Layout is the table of named views into the flat parameter buffer; the
// gradient buffer and each optimizer moment use the same layout.
type Layout struct {
	Tensors []Tensor
	Total   int
	index   map[string]int
}

// LayerTensors are the per-layer views, resolved once so that the forward and
// backward passes index the flat buffer without map lookups.
type LayerTensors struct {
	Norm, InProj, InProjBias, Conv, ConvBias, DTBias, ALog, D, GatedNorm, OutProj, OutProjBias *Tensor
}

// Names of the non-layer tensors.
const (
	NameEmbedding = "backbone.embeddings.weight"
	NameNormF     = "backbone.norm_f.weight"
	NameLMHead    = "lm_head.weight"
)

// LayerPrefix is the name prefix of layer i's tensors.
func LayerPrefix(i int) string { return fmt.Sprintf("backbone.layers.%d.", i) }

// NewLayout builds the layout of cfg. The order (embedding, then each layer,
// then the final norm and an untied head) is the order of the Hugging Face
// state dict, and it is the order of the flat buffer.
func NewLayout(cfg Config) *Layout {
	l := &Layout{index: map[string]int{}}
	add := func(name string, noDecay bool, shape ...int) {
		n := 1
		for _, s := range shape {
			n *= s
		}
		l.index[name] = len(l.Tensors)
		l.Tensors = append(l.Tensors, Tensor{Name: name, Shape: shape, Offset: l.Total, Size: n, NoDecay: noDecay})
		l.Total += n
	}
	D, E, H, W := cfg.DModel, cfg.DInner(), cfg.NHeads, cfg.DConv
	add(NameEmbedding, false, cfg.VocabSize, D)
	for i := 0; i < cfg.NLayer; i++ {
		p := LayerPrefix(i)
		add(p+"norm.weight", true, D)
		add(p+"mixer.in_proj.weight", false, cfg.InProjDim(), D)
		if cfg.Bias {
			add(p+"mixer.in_proj.bias", true, cfg.InProjDim())
		}
		add(p+"mixer.conv1d.weight", false, cfg.ConvDim(), 1, W)
		if cfg.ConvBias {
			add(p+"mixer.conv1d.bias", true, cfg.ConvDim())
		}
		add(p+"mixer.dt_bias", true, H)
		add(p+"mixer.A_log", true, H)
		add(p+"mixer.D", true, cfg.DSize())
		if cfg.GatedNorm {
			add(p+"mixer.norm.weight", true, E)
		}
		add(p+"mixer.out_proj.weight", false, D, E)
		if cfg.Bias {
			add(p+"mixer.out_proj.bias", true, D)
		}
	}
	add(NameNormF, true, D)
	if !cfg.TieEmbeddings {
		add(NameLMHead, false, cfg.VocabSize, D)
	}
	return l
}

// Lookup returns the view with the given name.
func (l *Layout) Lookup(name string) (*Tensor, bool) {
	i, ok := l.index[name]
	if !ok {
		return nil, false
	}
	return &l.Tensors[i], true
}

// Must returns the view with the given name and panics if it is absent; for
// names the layout itself generated.
func (l *Layout) Must(name string) *Tensor {
	t, ok := l.Lookup(name)
	if !ok {
		panic("model: layout has no tensor " + name)
	}
	return t
}

// Layer resolves the views of layer i; optional tensors absent from the
// configuration are nil.
func (l *Layout) Layer(i int) LayerTensors {
	p := LayerPrefix(i)
	get := func(s string) *Tensor { t, _ := l.Lookup(p + s); return t }
	return LayerTensors{
		Norm: get("norm.weight"), InProj: get("mixer.in_proj.weight"), InProjBias: get("mixer.in_proj.bias"),
		Conv: get("mixer.conv1d.weight"), ConvBias: get("mixer.conv1d.bias"), DTBias: get("mixer.dt_bias"),
		ALog: get("mixer.A_log"), D: get("mixer.D"), GatedNorm: get("mixer.norm.weight"),
		OutProj: get("mixer.out_proj.weight"), OutProjBias: get("mixer.out_proj.bias"),
	}
}

// View returns the slice of buf that holds t.
func View[T Float](buf []T, t *Tensor) []T { return buf[t.Offset : t.Offset+t.Size : t.Offset+t.Size] }

// ShapeString formats a shape as (a, b, c).
func ShapeString(s []int) string {
	parts := make([]string, len(s))
	for i, v := range s {
		parts[i] = fmt.Sprint(v)
	}
	return "(" + strings.Join(parts, ", ") + ")"
}
