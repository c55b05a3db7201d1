// Package jobspec owns the job spec: the YAML document a user submits to the
// coordinator, its defaults and its validation. The coordinator validates a
// spec at submit and stores it; the worker decodes the same spec from its
// assignment. The package imports neither raft nor the model: shape rules of
// the model are checked here on their own so that the coordinator stays free
// of model code.
package jobspec

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"gopkg.in/yaml.v3"
)

// MaxSpecBytes is the largest spec document accepted, in bytes.
const MaxSpecBytes = 64 << 10

// Sentinel errors of the package; FieldError and parse errors wrap them.
var (
	// ErrInvalid marks a spec that breaks a validation rule.
	ErrInvalid = errors.New("jobspec: invalid spec")
	// ErrMalformed marks a document that is not a well-formed spec (YAML
	// syntax, unknown field, wrong type, too large, several documents).
	ErrMalformed = errors.New("jobspec: malformed spec")
)

// Spec is a training job. Field names in YAML are the snake_case tags; see
// docs/jobspec.md for each field's meaning, default and rule.
type Spec struct {
	Name       string     `yaml:"name" json:"name"`
	Model      Model      `yaml:"model" json:"model"`
	Data       Data       `yaml:"data" json:"data"`
	Parallel   Parallel   `yaml:"parallel" json:"parallel"`
	Batch      Batch      `yaml:"batch" json:"batch"`
	Optimizer  Optimizer  `yaml:"optimizer" json:"optimizer"`
	Schedule   Schedule   `yaml:"schedule" json:"schedule"`
	Precision  string     `yaml:"precision" json:"precision"`
	Checkpoint Checkpoint `yaml:"checkpoint" json:"checkpoint"`
	Seed       uint64     `yaml:"seed" json:"seed"`
	Backend    string     `yaml:"backend" json:"backend"`
	// MaxRestarts bounds how often a job is placed again after a worker is
	// lost or reports a retryable failure; nil means DefaultMaxRestarts.
	MaxRestarts *int `yaml:"max_restarts,omitempty" json:"max_restarts,omitempty"`
}

// Model selects the architecture: either a fresh model from Config or a
// pretrained Hugging Face checkpoint from InitFrom. Exactly one is set.
type Model struct {
	Config   *ModelConfig `yaml:"config,omitempty" json:"config,omitempty"`
	InitFrom string       `yaml:"init_from,omitempty" json:"init_from,omitempty"`
}

// ModelConfig is the Mamba-2 architecture in mamba_ssm's names. Zero fields
// take the mamba_ssm defaults at Normalize, except d_model, n_layer and
// vocab_size, which are required.
type ModelConfig struct {
	DModel    int `yaml:"d_model" json:"d_model"`
	NLayer    int `yaml:"n_layer" json:"n_layer"`
	VocabSize int `yaml:"vocab_size" json:"vocab_size"`
	DState    int `yaml:"d_state" json:"d_state"`
	HeadDim   int `yaml:"headdim" json:"headdim"`
	Expand    int `yaml:"expand" json:"expand"`
	NGroups   int `yaml:"ngroups" json:"ngroups"`
	DConv     int `yaml:"d_conv" json:"d_conv"`
	ChunkSize int `yaml:"chunk_size" json:"chunk_size"`
}

// NHeads is H = expand·d_model/headdim (valid only after Validate).
func (c ModelConfig) NHeads() int {
	if c.HeadDim == 0 {
		return 0
	}
	return c.Expand * c.DModel / c.HeadDim
}

// Data names the training data: token shards at Path, or the built-in
// multi-query associative recall task MQAR, which every worker generates
// from its seed. Exactly one of Path and MQAR is set.
type Data struct {
	// Path is a local directory or an s3://bucket/prefix of token shards.
	Path   string `yaml:"path,omitempty" json:"path,omitempty"`
	MQAR   *MQAR  `yaml:"mqar,omitempty" json:"mqar,omitempty"`
	SeqLen int    `yaml:"seq_len" json:"seq_len"`
}

// MQAR configures the synthetic multi-query associative recall task
// (docs/mqar.md): each sequence lists NumPairs key-value pairs, then asks
// for the values of NumQueries of its keys, and the loss counts only the
// answers. Zero NumQueries and QueryPower and a nil Seed take their
// defaults at Normalize.
type MQAR struct {
	// VocabSize is the task's vocabulary: keys come from [1, VocabSize/2),
	// values from [VocabSize/2, VocabSize). At most model.config.vocab_size.
	VocabSize int `yaml:"vocab_size" json:"vocab_size"`
	// NumPairs is the number of key-value pairs per sequence.
	NumPairs int `yaml:"num_pairs" json:"num_pairs"`
	// NumQueries is the number of keys asked for per sequence; default NumPairs.
	NumQueries int `yaml:"num_queries" json:"num_queries"`
	// Seed selects the stream of sequences; nil means the spec's seed.
	Seed *uint64 `yaml:"seed,omitempty" json:"seed,omitempty"`
	// QueryPower is the exponent a of the power law (g+1)^(a-1) that places
	// queries after the key-value section; default DefaultMQARQueryPower, 1
	// places them uniformly.
	QueryPower float64 `yaml:"query_power" json:"query_power"`
}

// Parallel is the layout of the ranks: DP data-parallel replicas, each split
// into SP sequence-parallel ranks.
type Parallel struct {
	DP     int    `yaml:"dp" json:"dp"`
	SP     int    `yaml:"sp" json:"sp"`
	SPMode string `yaml:"sp_mode" json:"sp_mode"`
	Zero1  bool   `yaml:"zero1" json:"zero1"`
	// AllReduceDType is the element type in which the gradient all-reduce
	// moves: float32 (also when empty) or bf16 (half the bytes; each rank
	// rounds the partial sums to bf16).
	AllReduceDType string `yaml:"allreduce_dtype,omitempty" json:"allreduce_dtype,omitempty"`
}

// World is the number of ranks, dp·sp.
func (p Parallel) World() int { return p.DP * p.SP }

// Batch sizes, in sequences. GlobalBatch = MicroBatch · DP · accumulation steps.
type Batch struct {
	MicroBatch  int `yaml:"micro_batch" json:"micro_batch"`
	GlobalBatch int `yaml:"global_batch" json:"global_batch"`
}

// AccumSteps is the number of micro-batches each data-parallel rank
// accumulates per optimizer step (valid only after Validate).
func (s *Spec) AccumSteps() int {
	d := s.Batch.MicroBatch * s.Parallel.DP
	if d == 0 {
		return 0
	}
	return s.Batch.GlobalBatch / d
}

// Optimizer is AdamW's settings.
type Optimizer struct {
	LR          float64    `yaml:"lr" json:"lr"`
	Betas       [2]float64 `yaml:"betas" json:"betas"`
	Eps         float64    `yaml:"eps" json:"eps"`
	WeightDecay float64    `yaml:"weight_decay" json:"weight_decay"`
	// GradClip is the max global gradient norm; 0 disables clipping.
	GradClip float64 `yaml:"grad_clip" json:"grad_clip"`
}

// Schedule is linear warmup then cosine decay to MinLR at TotalSteps.
type Schedule struct {
	WarmupSteps int     `yaml:"warmup_steps" json:"warmup_steps"`
	TotalSteps  int     `yaml:"total_steps" json:"total_steps"`
	MinLR       float64 `yaml:"min_lr" json:"min_lr"`
}

// Checkpoint says where and how often checkpoints are written. An empty
// Location disables checkpoints (a restarted job then starts over).
type Checkpoint struct {
	Location   string `yaml:"location" json:"location"`
	EverySteps int    `yaml:"every_steps" json:"every_steps"`
	Keep       int    `yaml:"keep" json:"keep"`
}

// Values of the enumerated fields.
const (
	PrecisionFloat32 = "float32"
	PrecisionBF16    = "bf16"

	BackendCPU  = "cpu"
	BackendCUDA = "cuda"
	BackendAuto = "auto"

	SPModeSequential = "sequential"
	SPModePrefix     = "prefix"

	AllReduceFloat32 = "float32"
	AllReduceBF16    = "bf16"
)

// Defaults filled in by Normalize.
const (
	DefaultMaxRestarts     = 3
	DefaultCheckpointEvery = 1000
	DefaultCheckpointKeep  = 3
	// DefaultMQARQueryPower is Zoology's power-law exponent for the gaps
	// between the key-value section and the queries: most queries come soon
	// after the pairs, a few far later.
	DefaultMQARQueryPower = 0.01
)

// Parse decodes one YAML document into a Spec, rejecting unknown fields,
// fills in defaults and validates it. Errors wrap ErrMalformed or ErrInvalid.
func Parse(doc []byte) (*Spec, error) {
	s, err := Decode(doc)
	if err != nil {
		return nil, err
	}
	s.Normalize()
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return s, nil
}

// Decode decodes one YAML document into a Spec without defaults or
// validation. It never panics, whatever the input.
func Decode(doc []byte) (s *Spec, err error) {
	if len(doc) > MaxSpecBytes {
		return nil, fmt.Errorf("%w: %d bytes exceeds the limit of %d", ErrMalformed, len(doc), MaxSpecBytes)
	}
	if len(bytes.TrimSpace(doc)) == 0 {
		return nil, fmt.Errorf("%w: empty document", ErrMalformed)
	}
	defer func() {
		// The YAML decoder is third-party code; a panic on hostile input
		// must not take the coordinator down.
		if r := recover(); r != nil {
			s, err = nil, fmt.Errorf("%w: %v", ErrMalformed, r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var out Spec
	if err := dec.Decode(&out); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrMalformed, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, fmt.Errorf("%w: more than one YAML document", ErrMalformed)
	}
	return &out, nil
}

// Marshal renders the spec as YAML.
func (s *Spec) Marshal() ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(s); err != nil {
		return nil, fmt.Errorf("jobspec: marshal: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("jobspec: marshal: %w", err)
	}
	return buf.Bytes(), nil
}

// Clone returns a deep copy.
func (s *Spec) Clone() *Spec {
	c := *s
	if s.Model.Config != nil {
		mc := *s.Model.Config
		c.Model.Config = &mc
	}
	if s.MaxRestarts != nil {
		m := *s.MaxRestarts
		c.MaxRestarts = &m
	}
	if s.Data.MQAR != nil {
		q := *s.Data.MQAR
		if q.Seed != nil {
			seed := *q.Seed
			q.Seed = &seed
		}
		c.Data.MQAR = &q
	}
	return &c
}

// Restarts is the effective max_restarts.
func (s *Spec) Restarts() int {
	if s.MaxRestarts == nil {
		return DefaultMaxRestarts
	}
	return *s.MaxRestarts
}

// Normalize fills the zero values that have defaults (docs/jobspec.md lists
// them). It is idempotent.
func (s *Spec) Normalize() {
	if c := s.Model.Config; c != nil {
		setDefault(&c.DState, 128)
		setDefault(&c.HeadDim, 64)
		setDefault(&c.Expand, 2)
		setDefault(&c.NGroups, 1)
		setDefault(&c.DConv, 4)
		setDefault(&c.ChunkSize, 256)
	}
	if q := s.Data.MQAR; q != nil {
		setDefault(&q.NumQueries, q.NumPairs)
		if q.QueryPower == 0 {
			q.QueryPower = DefaultMQARQueryPower
		}
		if q.Seed == nil {
			seed := s.Seed
			q.Seed = &seed
		}
	}
	setDefault(&s.Parallel.DP, 1)
	setDefault(&s.Parallel.SP, 1)
	if s.Parallel.SPMode == "" {
		s.Parallel.SPMode = SPModeSequential
	}
	setDefault(&s.Batch.MicroBatch, 1)
	if s.Batch.GlobalBatch == 0 {
		s.Batch.GlobalBatch = s.Batch.MicroBatch * s.Parallel.DP
	}
	if s.Optimizer.LR == 0 {
		s.Optimizer.LR = 3e-4
	}
	if s.Optimizer.Betas == [2]float64{} {
		s.Optimizer.Betas = [2]float64{0.9, 0.95}
	}
	if s.Optimizer.Eps == 0 {
		s.Optimizer.Eps = 1e-8
	}
	if s.Precision == "" {
		s.Precision = PrecisionFloat32
	}
	if s.Backend == "" {
		s.Backend = BackendAuto
	}
	if s.Checkpoint.Location != "" {
		setDefault(&s.Checkpoint.EverySteps, DefaultCheckpointEvery)
		setDefault(&s.Checkpoint.Keep, DefaultCheckpointKeep)
	}
}

func setDefault(p *int, v int) {
	if *p == 0 {
		*p = v
	}
}
