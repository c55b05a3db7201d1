package jobspec

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"strings"
)

// FieldError names the field of a spec that breaks a rule. Field is the YAML
// path, e.g. "parallel.dp".
type FieldError struct {
	Field string
	Rule  string
}

func (e *FieldError) Error() string { return fmt.Sprintf("jobspec: %s: %s", e.Field, e.Rule) }

// Unwrap makes every FieldError match ErrInvalid.
func (e *FieldError) Unwrap() error { return ErrInvalid }

// Upper bounds that catch typos and hostile specs before they reach a worker.
const (
	maxDModel    = 1 << 16
	maxLayers    = 1 << 10
	maxVocab     = 1 << 24
	maxDState    = 1 << 12
	maxDConv     = 64
	maxChunk     = 1 << 14
	maxSeqLen    = 1 << 22
	maxWorld     = 1 << 14
	maxBatch     = 1 << 24
	maxSteps     = 1 << 40
	maxRestarts  = 1000
	maxPathBytes = 1024
	padVocab     = 16
)

var nameRE = regexp.MustCompile(`^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Validate checks every rule of docs/jobspec.md on a normalized spec and
// returns all violations joined; each is a *FieldError wrapping ErrInvalid.
func (s *Spec) Validate() error {
	v := &validator{}
	if !nameRE.MatchString(s.Name) {
		v.add("name", "must be 1-63 characters of lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, got %q", s.Name)
	}
	s.validateModel(v)

	switch {
	case s.Data.MQAR != nil && s.Data.Path != "":
		v.add("data", "exactly one of data.path and data.mqar is allowed, got both")
	case s.Data.MQAR != nil:
		s.validateMQAR(v)
	case s.Data.Path == "":
		v.add("data.path", "is required (a local path or s3://bucket/prefix), unless data.mqar is set")
	default:
		v.location("data.path", s.Data.Path, true)
	}
	v.intRange("data.seq_len", s.Data.SeqLen, 1, maxSeqLen)

	p := s.Parallel
	v.intRange("parallel.dp", p.DP, 1, maxWorld)
	v.intRange("parallel.sp", p.SP, 1, maxWorld)
	if p.DP >= 1 && p.SP >= 1 && p.DP <= maxWorld && p.SP <= maxWorld && p.World() > maxWorld {
		v.add("parallel", "dp·sp = %d exceeds the limit of %d ranks", p.World(), maxWorld)
	}
	v.oneOf("parallel.sp_mode", p.SPMode, SPModeSequential, SPModePrefix)
	if p.AllReduceDType != "" {
		v.oneOf("parallel.allreduce_dtype", p.AllReduceDType, AllReduceFloat32, AllReduceBF16)
		if p.AllReduceDType == AllReduceBF16 && p.Zero1 {
			v.add("parallel.allreduce_dtype", "bf16 is for the all-reduce of data parallelism; zero1 reduce-scatters the gradients in float32 (set one or the other)")
		}
	}
	if p.SP >= 1 && s.Data.SeqLen >= 1 {
		if s.Data.SeqLen%p.SP != 0 {
			v.add("data.seq_len", "must be a multiple of parallel.sp = %d, got %d", p.SP, s.Data.SeqLen)
		} else if c := s.Model.Config; c != nil && c.DConv >= 1 && s.Data.SeqLen/p.SP < c.DConv-1 {
			v.add("data.seq_len", "each sequence-parallel slice (seq_len/sp = %d) must hold at least d_conv-1 = %d positions", s.Data.SeqLen/p.SP, c.DConv-1)
		}
	}

	b := s.Batch
	v.intRange("batch.micro_batch", b.MicroBatch, 1, maxBatch)
	v.intRange("batch.global_batch", b.GlobalBatch, 1, maxBatch)
	if b.MicroBatch >= 1 && p.DP >= 1 && b.GlobalBatch >= 1 && b.MicroBatch <= maxBatch && p.DP <= maxWorld {
		per := b.MicroBatch * p.DP
		if b.GlobalBatch%per != 0 {
			v.add("batch.global_batch", "must be a multiple of micro_batch·dp = %d·%d = %d, got %d", b.MicroBatch, p.DP, per, b.GlobalBatch)
		}
	}

	o := s.Optimizer
	v.floatRange("optimizer.lr", o.LR, 0, false, 10)
	for i, beta := range o.Betas {
		if !(beta >= 0 && beta < 1) {
			v.add(fmt.Sprintf("optimizer.betas[%d]", i), "must be in [0, 1), got %g", beta)
		}
	}
	v.floatRange("optimizer.eps", o.Eps, 0, false, 1)
	v.floatRange("optimizer.weight_decay", o.WeightDecay, 0, true, 10)
	v.floatRange("optimizer.grad_clip", o.GradClip, 0, true, math.MaxFloat64)

	sc := s.Schedule
	v.intRange("schedule.total_steps", sc.TotalSteps, 1, maxSteps)
	v.intRange("schedule.warmup_steps", sc.WarmupSteps, 0, maxSteps)
	if sc.WarmupSteps > sc.TotalSteps && sc.TotalSteps >= 1 {
		v.add("schedule.warmup_steps", "must not exceed total_steps = %d, got %d", sc.TotalSteps, sc.WarmupSteps)
	}
	if !(sc.MinLR >= 0) || sc.MinLR > o.LR || math.IsInf(sc.MinLR, 0) {
		v.add("schedule.min_lr", "must be in [0, optimizer.lr = %g], got %g", o.LR, sc.MinLR)
	}

	v.oneOf("precision", s.Precision, PrecisionFloat32, PrecisionBF16)
	v.oneOf("backend", s.Backend, BackendCPU, BackendCUDA, BackendAuto)
	if s.Precision == PrecisionBF16 && s.Backend == BackendCPU {
		v.add("precision", "bf16 needs backend cuda or auto; the cpu backend trains in float32")
	}

	ck := s.Checkpoint
	if ck.Location == "" {
		if ck.EverySteps != 0 || ck.Keep != 0 {
			v.add("checkpoint.location", "is required when checkpoint.every_steps or checkpoint.keep is set")
		}
	} else {
		v.location("checkpoint.location", ck.Location, false)
		v.intRange("checkpoint.every_steps", ck.EverySteps, 1, maxSteps)
		v.intRange("checkpoint.keep", ck.Keep, 1, 1000)
	}
	if s.MaxRestarts != nil {
		v.intRange("max_restarts", *s.MaxRestarts, 0, maxRestarts)
	}
	return v.err()
}

func (s *Spec) validateModel(v *validator) {
	m := s.Model
	switch {
	case m.Config == nil && m.InitFrom == "":
		v.add("model", "exactly one of model.config and model.init_from is required, got neither")
		return
	case m.Config != nil && m.InitFrom != "":
		v.add("model", "exactly one of model.config and model.init_from is required, got both")
		return
	case m.InitFrom != "":
		v.location("model.init_from", m.InitFrom, true)
		return
	}
	c := m.Config
	v.intRange("model.config.d_model", c.DModel, 1, maxDModel)
	v.intRange("model.config.n_layer", c.NLayer, 1, maxLayers)
	v.intRange("model.config.vocab_size", c.VocabSize, 1, maxVocab)
	v.intRange("model.config.d_state", c.DState, 1, maxDState)
	v.intRange("model.config.headdim", c.HeadDim, 1, maxDModel)
	v.intRange("model.config.expand", c.Expand, 1, 16)
	v.intRange("model.config.ngroups", c.NGroups, 1, maxDModel)
	v.intRange("model.config.d_conv", c.DConv, 1, maxDConv)
	v.intRange("model.config.chunk_size", c.ChunkSize, 1, maxChunk)
	if c.VocabSize >= 1 && c.VocabSize%padVocab != 0 {
		v.add("model.config.vocab_size", "must be a multiple of %d (pad the tokenizer's vocabulary), got %d", padVocab, c.VocabSize)
	}
	if v.failedUnder("model.config.") {
		return
	}
	inner := c.Expand * c.DModel
	if inner%c.HeadDim != 0 {
		v.add("model.config.headdim", "must divide expand·d_model = %d·%d = %d so that the head count is integral, got %d", c.Expand, c.DModel, inner, c.HeadDim)
		return
	}
	if h := inner / c.HeadDim; h%c.NGroups != 0 {
		v.add("model.config.ngroups", "must divide the head count expand·d_model/headdim = %d, got %d", h, c.NGroups)
	}
}

// validateMQAR checks data.mqar (normalized): the key and value halves of
// its vocabulary must hold num_pairs distinct tokens each, the sequence must
// hold the key-value section and a two-position slot per query, and the
// model must embed every token of the task.
func (s *Spec) validateMQAR(v *validator) {
	q := s.Data.MQAR
	v.intRange("data.mqar.vocab_size", q.VocabSize, 4, maxVocab)
	v.intRange("data.mqar.num_pairs", q.NumPairs, 1, maxSeqLen/4)
	v.intRange("data.mqar.num_queries", q.NumQueries, 1, maxSeqLen/4)
	if !(q.QueryPower > 0 && q.QueryPower <= 1) {
		v.add("data.mqar.query_power", "must be a number in (0, 1], got %g", q.QueryPower)
	}
	if v.failedUnder("data.mqar.") {
		return
	}
	if keys := q.VocabSize/2 - 1; q.NumPairs > keys {
		v.add("data.mqar.num_pairs", "must be at most vocab_size/2 - 1 = %d, the distinct keys in [1, %d), got %d", keys, q.VocabSize/2, q.NumPairs)
	}
	if q.NumQueries > q.NumPairs {
		v.add("data.mqar.num_queries", "must be at most num_pairs = %d (each query asks for a different key), got %d", q.NumPairs, q.NumQueries)
	}
	if need := 2*q.NumPairs + 2*q.NumQueries; s.Data.SeqLen >= 1 && s.Data.SeqLen < need {
		v.add("data.seq_len", "must be at least 2·num_pairs + 2·num_queries = %d for data.mqar (the key-value section and a two-position slot per query), got %d", need, s.Data.SeqLen)
	}
	if c := s.Model.Config; c != nil && c.VocabSize >= 1 && q.VocabSize > c.VocabSize {
		v.add("data.mqar.vocab_size", "must not exceed model.config.vocab_size = %d, got %d", c.VocabSize, q.VocabSize)
	}
}

type validator struct{ errs []error }

func (v *validator) add(field, format string, args ...any) {
	v.errs = append(v.errs, &FieldError{Field: field, Rule: fmt.Sprintf(format, args...)})
}

func (v *validator) err() error { return errors.Join(v.errs...) }

func (v *validator) failedUnder(prefix string) bool {
	for _, e := range v.errs {
		if fe, ok := e.(*FieldError); ok && strings.HasPrefix(fe.Field, prefix) {
			return true
		}
	}
	return false
}

func (v *validator) intRange(field string, x, lo, hi int) {
	switch {
	case x < lo && lo == 1:
		v.add(field, "must be at least 1, got %d", x)
	case x < lo:
		v.add(field, "must be at least %d, got %d", lo, x)
	case x > hi:
		v.add(field, "must be at most %d, got %d", hi, x)
	}
}

// floatRange requires lo < x (or lo <= x when closed) and x <= hi, finite.
func (v *validator) floatRange(field string, x, lo float64, closed bool, hi float64) {
	ok := !math.IsNaN(x) && !math.IsInf(x, 0) && x <= hi && (x > lo || closed && x == lo)
	if ok {
		return
	}
	if closed {
		v.add(field, "must be a finite number in [%g, %g], got %g", lo, hi, x)
	} else {
		v.add(field, "must be a finite number in (%g, %g], got %g", lo, hi, x)
	}
}

func (v *validator) oneOf(field, x string, allowed ...string) {
	for _, a := range allowed {
		if x == a {
			return
		}
	}
	v.add(field, "must be one of %s, got %q", strings.Join(allowed, ", "), x)
}

// location accepts an s3://bucket[/prefix] URL or a local path; an empty one
// is an error only when required.
func (v *validator) location(field, loc string, required bool) {
	if loc == "" {
		if required {
			v.add(field, "is required (a local path or s3://bucket/prefix)")
		}
		return
	}
	if len(loc) > maxPathBytes {
		v.add(field, "must be at most %d bytes, got %d", maxPathBytes, len(loc))
		return
	}
	for _, r := range loc {
		if r < 0x20 || r == 0x7f {
			v.add(field, "must not contain control characters")
			return
		}
	}
	if rest, ok := strings.CutPrefix(loc, "s3://"); ok {
		bucket, _, _ := strings.Cut(rest, "/")
		if !validBucket(bucket) {
			v.add(field, "s3 URL needs a bucket of 3-63 lowercase letters, digits, '.' or '-', got %q", bucket)
		}
		return
	}
	if strings.Contains(loc, "://") {
		v.add(field, "must be a local path or an s3:// URL, got scheme %q", loc[:strings.Index(loc, "://")])
	}
}

func validBucket(b string) bool {
	if len(b) < 3 || len(b) > 63 {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}
