package model

import (
	"fmt"
	"math"
	"runtime"
	"sync"
)

// AdamWConfig holds the optimizer's hyperparameters (the learning rate comes
// from the schedule at each step).
type AdamWConfig struct {
	Beta1, Beta2 float64
	Eps          float64
	WeightDecay  float64 // decoupled; not applied to tensors marked NoDecay
}

// DefaultAdamWConfig returns the mamba_ssm training recipe's values.
func DefaultAdamWConfig() AdamWConfig {
	return AdamWConfig{Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1}
}

// Validate names the first field that breaks a rule.
func (c AdamWConfig) Validate() error {
	switch {
	case !(c.Beta1 >= 0 && c.Beta1 < 1):
		return &ConfigError{"optimizer.beta1", fmt.Sprintf("must be in [0, 1), got %g", c.Beta1)}
	case !(c.Beta2 >= 0 && c.Beta2 < 1):
		return &ConfigError{"optimizer.beta2", fmt.Sprintf("must be in [0, 1), got %g", c.Beta2)}
	case !(c.Eps > 0):
		return &ConfigError{"optimizer.eps", fmt.Sprintf("must be positive, got %g", c.Eps)}
	case !(c.WeightDecay >= 0):
		return &ConfigError{"optimizer.weight_decay", fmt.Sprintf("must be >= 0, got %g", c.WeightDecay)}
	}
	return nil
}

// AdamW is the optimizer over a flat parameter buffer, with its two moments
// in flat buffers of the same layout. It follows PyTorch's AdamW: the
// parameter is first multiplied by 1 − lr·wd (decoupled weight decay), then
// moved by lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps).
type AdamW[T Float] struct {
	Config AdamWConfig
	M, V   []T
	Step   int64 // number of updates applied
	decay  []bool
	layout *Layout
}

// NewAdamW returns an optimizer with zero moments for layout.
func NewAdamW[T Float](layout *Layout, cfg AdamWConfig) (*AdamW[T], error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	o := &AdamW[T]{Config: cfg, M: make([]T, layout.Total), V: make([]T, layout.Total), layout: layout}
	for _, t := range layout.Tensors {
		o.decay = append(o.decay, !t.NoDecay)
	}
	return o, nil
}

// Update applies one step with learning rate lr to params given grads.
func (o *AdamW[T]) Update(params, grads []T, lr float64) {
	o.Step++
	b1, b2 := o.Config.Beta1, o.Config.Beta2
	bc1 := 1 - math.Pow(b1, float64(o.Step))
	bc2 := 1 - math.Pow(b2, float64(o.Step))
	stepSize := lr / bc1
	sqrtBC2 := math.Sqrt(bc2)
	for ti, t := range o.layout.Tensors {
		shrink := T(1)
		if o.decay[ti] {
			shrink = T(1 - lr*o.Config.WeightDecay)
		}
		p, g := View(params, &t), View(grads, &t)
		m, v := View(o.M, &t), View(o.V, &t)
		parallelChunks(len(p), 1<<14, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				gi := g[i]
				m[i] = T(b1)*m[i] + T(1-b1)*gi
				v[i] = T(b2)*v[i] + T(1-b2)*gi*gi
				denom := T(math.Sqrt(float64(v[i])))/T(sqrtBC2) + T(o.Config.Eps)
				p[i] = p[i]*shrink - T(stepSize)*m[i]/denom
			}
		})
	}
}

// Schedule is linear warmup to the peak learning rate followed by cosine
// decay to MinLR at TotalSteps (and MinLR after it).
type Schedule struct {
	PeakLR      float64
	MinLR       float64
	WarmupSteps int
	TotalSteps  int
}

// Validate names the first field that breaks a rule.
func (s Schedule) Validate() error {
	switch {
	case !(s.PeakLR > 0):
		return &ConfigError{"schedule.lr", fmt.Sprintf("must be positive, got %g", s.PeakLR)}
	case !(s.MinLR >= 0 && s.MinLR <= s.PeakLR):
		return &ConfigError{"schedule.min_lr", fmt.Sprintf("must be in [0, lr], got %g", s.MinLR)}
	case s.WarmupSteps < 0:
		return &ConfigError{"schedule.warmup_steps", fmt.Sprintf("must be >= 0, got %d", s.WarmupSteps)}
	case s.TotalSteps <= 0:
		return &ConfigError{"schedule.total_steps", fmt.Sprintf("must be positive, got %d", s.TotalSteps)}
	case s.WarmupSteps > s.TotalSteps:
		return &ConfigError{"schedule.warmup_steps", fmt.Sprintf("%d exceeds total_steps %d", s.WarmupSteps, s.TotalSteps)}
	}
	return nil
}

// LR returns the learning rate of step (0-based).
func (s Schedule) LR(step int) float64 {
	if step < s.WarmupSteps {
		return s.PeakLR * float64(step+1) / float64(s.WarmupSteps)
	}
	if step >= s.TotalSteps {
		return s.MinLR
	}
	span := s.TotalSteps - s.WarmupSteps
	if span <= 0 {
		return s.PeakLR
	}
	progress := float64(step-s.WarmupSteps) / float64(span)
	return s.MinLR + 0.5*(s.PeakLR-s.MinLR)*(1+math.Cos(math.Pi*progress))
}

// normBlock fixes the grouping of the global-norm sum so that its bits do
// not depend on the number of threads.
const normBlock = 1 << 14

// GradNorm returns the L2 norm of g, summed in float64 in a fixed order.
func GradNorm[T Float](g []T) float64 {
	nb := (len(g) + normBlock - 1) / normBlock
	part := make([]float64, nb)
	parallelChunks(nb, 1, func(lo, hi int) {
		for b := lo; b < hi; b++ {
			var s float64
			for _, v := range g[b*normBlock : min((b+1)*normBlock, len(g))] {
				s += float64(v) * float64(v)
			}
			part[b] = s
		}
	})
	var s float64
	for _, v := range part {
		s += v
	}
	return math.Sqrt(s)
}

// ClipGrads scales g so that its global norm is at most maxNorm (PyTorch's
// clip_grad_norm_: coefficient maxNorm/(norm+1e-6), capped at 1) and returns
// the norm before clipping. maxNorm <= 0 disables clipping.
func ClipGrads[T Float](g []T, maxNorm float64) float64 {
	norm := GradNorm(g)
	if maxNorm <= 0 {
		return norm
	}
	coef := maxNorm / (norm + 1e-6)
	if coef < 1 {
		c := T(coef)
		parallelChunks(len(g), 1<<14, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				g[i] *= c
			}
		})
	}
	return norm
}

// parallelChunks splits [0, n) into contiguous ranges of at least grain
// items across GOMAXPROCS goroutines. fn writes only its own range.
func parallelChunks(n, grain int, fn func(lo, hi int)) {
	workers := min(runtime.GOMAXPROCS(0), (n+grain-1)/grain)
	if workers <= 1 {
		if n > 0 {
			fn(0, n)
		}
		return
	}
	var wg sync.WaitGroup
	step := (n + workers - 1) / workers
	for lo := 0; lo < n; lo += step {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			fn(lo, hi)
		}(lo, min(lo+step, n))
	}
	wg.Wait()
}
