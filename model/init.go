package model

import (
	"hash/fnv"
	"math"
	"math/rand/v2"
	"strings"
)

// Init fills params with mamba_ssm's initialisation for training from
// scratch (MAMBA2_SPEC.md §2.6), deterministically for a given seed. Each
// tensor draws from its own stream, seeded by (seed, tensor name), so a
// tensor's values do not depend on the rest of the layout.
func Init[T Float](cfg Config, layout *Layout, params []T, seed uint64) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := cfg.ValidateInit(); err != nil {
		return err
	}
	D, E, W := float64(cfg.DModel), float64(cfg.DInner()), float64(cfg.DConv)
	for i := range layout.Tensors {
		t := &layout.Tensors[i]
		h := fnv.New64a()
		h.Write([]byte(t.Name))
		rng := rand.New(rand.NewPCG(seed, h.Sum64()))
		p := View(params, t)
		uniform := func(bound float64) {
			for j := range p {
				p[j] = T((2*rng.Float64() - 1) * bound)
			}
		}
		fill := func(v float64) {
			for j := range p {
				p[j] = T(v)
			}
		}
		name := t.Name
		switch {
		case t.Name == NameEmbedding:
			for j := range p {
				p[j] = T(rng.NormFloat64() * cfg.InitializerRange)
			}
		case t.Name == NameLMHead:
			uniform(1 / math.Sqrt(D))
		case strings.HasSuffix(name, "in_proj.weight"):
			uniform(1 / math.Sqrt(D))
		case strings.HasSuffix(name, "conv1d.weight"), strings.HasSuffix(name, "conv1d.bias"):
			uniform(1 / math.Sqrt(W))
		case strings.HasSuffix(name, "out_proj.weight"):
			uniform(1 / math.Sqrt(E) / math.Sqrt(float64(cfg.NLayer)))
		case strings.HasSuffix(name, "dt_bias"):
			lo, hi := math.Log(cfg.DTMin), math.Log(cfg.DTMax)
			for j := range p {
				dt := math.Max(math.Exp(lo+rng.Float64()*(hi-lo)), cfg.DTInitFloor)
				// Inverse of softplus: dt + log(1 − exp(−dt)).
				p[j] = T(dt + math.Log(-math.Expm1(-dt)))
			}
		case strings.HasSuffix(name, "A_log"):
			lo, hi := cfg.AInitRange[0], cfg.AInitRange[1]
			for j := range p {
				p[j] = T(math.Log(lo + rng.Float64()*(hi-lo)))
			}
		case strings.HasSuffix(name, ".D"), strings.HasSuffix(name, "norm.weight"), t.Name == NameNormF:
			fill(1)
		default: // biases
			fill(0)
		}
	}
	return nil
}
