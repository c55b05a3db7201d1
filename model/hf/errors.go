package hf

import (
	"errors"
	"fmt"
	"strings"

	"github.com/m2train/m2train/model"
)

// Sentinel errors; every error the package returns for bad input wraps one.
var (
	// ErrConfig: a configuration field is missing, mistyped or breaks a rule.
	ErrConfig = errors.New("hf: invalid config")
	// ErrUnsupported: a configuration asks for a variant this project does
	// not implement (LayerNorm, an activation other than SiLU, attention
	// layers, an MLP sub-block, ...).
	ErrUnsupported = errors.New("hf: unsupported config")
	// ErrCheckpoint: the tensors of a checkpoint do not match the model.
	ErrCheckpoint = errors.New("hf: checkpoint does not match the model")
)

// FieldError names the configuration field (as spelled in the JSON, nested
// fields as "ssm_cfg.d_state") and the rule it breaks. Err is ErrConfig or
// ErrUnsupported.
type FieldError struct {
	Field string
	Rule  string
	Err   error
}

// Error formats the sentinel, the field and the rule.
func (e *FieldError) Error() string { return fmt.Sprintf("%v: %s: %s", e.Err, e.Field, e.Rule) }

// Unwrap returns the sentinel error.
func (e *FieldError) Unwrap() error { return e.Err }

func fieldErr(sentinel error, field, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Rule: fmt.Sprintf(format, args...), Err: sentinel}
}

// TensorProblem is one way a checkpoint tensor fails to match the model.
// Expected is nil for a tensor the model does not have; Actual is nil for a
// tensor the checkpoint lacks.
type TensorProblem struct {
	Name     string
	Expected []int
	Actual   []int
	Problem  string
}

// String formats the problem with the tensor name and both shapes.
func (p TensorProblem) String() string {
	exp, act := "none (not part of the model)", "none (missing)"
	if p.Expected != nil {
		exp = model.ShapeString(p.Expected)
	}
	if p.Actual != nil {
		act = model.ShapeString(p.Actual)
	}
	return fmt.Sprintf("tensor %s: %s: expected shape %s, actual shape %s", p.Name, p.Problem, exp, act)
}

// CheckpointError lists every tensor of a checkpoint that does not match the
// model: missing, unexpected, mis-shaped, of a non-float dtype, or an lm_head
// that should be tied but differs from the embedding.
type CheckpointError struct {
	Source   string // file or directory
	Problems []TensorProblem
}

// Error lists every problem, one per line.
func (e *CheckpointError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%v", ErrCheckpoint)
	if e.Source != "" {
		fmt.Fprintf(&b, " (%s)", e.Source)
	}
	fmt.Fprintf(&b, ": %d problem(s)", len(e.Problems))
	for _, p := range e.Problems {
		b.WriteString("\n  ")
		b.WriteString(p.String())
	}
	return b.String()
}

// Unwrap returns ErrCheckpoint.
func (e *CheckpointError) Unwrap() error { return ErrCheckpoint }
