package train

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/data/mqar"
)

// mqarSpec is testSpec's model trained on the MQAR task: 2 pairs and 2
// queries in 12 tokens of a vocabulary of 32.
func mqarSpec(t *testing.T, ckpt string, steps int) *jobspec.Spec {
	t.Helper()
	doc := fmt.Sprintf(`
name: mqar-test
model:
  config: {d_model: 16, n_layer: 2, vocab_size: 32, d_state: 8, headdim: 4, ngroups: 2, chunk_size: 4}
data: {mqar: {vocab_size: 32, num_pairs: 2}, seq_len: 12}
batch: {micro_batch: 2, global_batch: 6}
optimizer: {lr: 0.01, weight_decay: 0.1, grad_clip: 1.0}
schedule: {warmup_steps: 2, total_steps: %d, min_lr: 0.001}
checkpoint: {location: %s, every_steps: 3, keep: 2}
seed: 5
backend: cpu
`, steps, ckpt)
	spec, err := jobspec.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

// TestMQARResumeIsBitwiseIdentical is TestResumeIsBitwiseIdentical on the
// MQAR task: the trainer reads the task's loader, whose cursor the
// checkpoint keeps, so 6 steps, a resumption in a new trainer and 3 more
// give the losses and parameters of 9 straight steps in every bit.
func TestMQARResumeIsBitwiseIdentical(t *testing.T) {
	ctx := context.Background()
	spec := mqarSpec(t, t.TempDir(), 9)
	straight := newBackendRun[float32](t, spec, refBackend[float32](t, spec), nil)
	if err := straight.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}

	ckpt := t.TempDir()
	spec = mqarSpec(t, ckpt, 9)
	first := newBackendRun[float32](t, spec, refBackend[float32](t, spec), nil)
	if err := first.tr.RunUntil(ctx, 6); err != nil {
		t.Fatal(err)
	}
	second := newBackendRun[float32](t, spec, refBackend[float32](t, spec), nil)
	ok, err := second.tr.Resume(ctx)
	if err != nil || !ok {
		t.Fatalf("resume: %v, %v", ok, err)
	}
	if second.tr.Step() != 6 {
		t.Fatalf("resumed at step %d, want 6", second.tr.Step())
	}
	if err := second.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}
	sameLosses(t, append(first.losses, second.losses...), straight.losses)
	sameBits(t, "parameters after resuming", second.b.Params(), straight.b.Params())

	// The checkpoint's cursor counts the samples of the steps done.
	s, err := checkpoint.LoadLatest[float32](ctx, checkpoint.LocalStore{Root: ckpt}, "", testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if s.Trainer.Step != 9 || s.Trainer.Cursor != 9*6 {
		t.Errorf("last checkpoint at step %d, cursor %d; want step 9, cursor 54", s.Trainer.Step, s.Trainer.Cursor)
	}
}

// TestMQARTrainsOnTheTaskStream checks that the trainer's first step reads
// samples 0..5 of the task's training stream: its loss is that of a
// forward pass over exactly those sequences.
func TestMQARTrainsOnTheTaskStream(t *testing.T) {
	ctx := context.Background()
	spec := mqarSpec(t, t.TempDir(), 3)
	spec.Checkpoint.Location = ""
	m := refBackend[float64](t, spec)
	r := newBackendRun[float64](t, spec, m, nil)
	task, err := mqar.ConfigFromSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	gen, err := mqar.New(task)
	if err != nil {
		t.Fatal(err)
	}
	b, err := gen.Batch(mqar.Train, []uint64{0, 1, 2, 3, 4, 5})
	if err != nil {
		t.Fatal(err)
	}
	mb := &model.Batch{Batch: b.Rows(), SeqLen: b.SeqLen, Inputs: b.Inputs, Targets: b.Targets}
	want, err := m.Forward(ctx, mb, model.StepOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := r.tr.TrainStep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := p.Loss - want.Loss; diff > 1e-12*want.Loss || diff < -1e-12*want.Loss {
		t.Errorf("first step's loss %v, the forward pass over samples 0..5 gives %v", p.Loss, want.Loss)
	}
	if p.Tokens != int64(6*task.NumQueries) {
		t.Errorf("step counted %d targets, want %d answers", p.Tokens, 6*task.NumQueries)
	}
}

// blankSource yields steps of one micro-batch without a counted target.
type blankSource struct{ cursor uint64 }

func (s *blankSource) Next(context.Context) ([]data.Batch, error) {
	b := data.Batch{Inputs: make([]int32, 12), Targets: make([]int32, 12), Positions: []uint64{s.cursor}, SeqLen: 12}
	for i := range b.Targets {
		b.Targets[i] = -1
	}
	s.cursor++
	return []data.Batch{b}, nil
}
func (s *blankSource) Cursor() uint64     { return s.cursor }
func (s *blankSource) Seek(cursor uint64) { s.cursor = cursor }

func TestNewWithInputRules(t *testing.T) {
	spec := mqarSpec(t, t.TempDir(), 3)
	m := refBackend[float32](t, spec)

	// A step without targets is an error that says so, not a NaN loss.
	tr, err := NewWithInput(spec, m, Input{Source: &blankSource{}, Vocab: 32, What: "blank batches"}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.TrainStep(context.Background()); !errors.Is(err, ErrNoTargets) || !strings.Contains(err.Error(), "step 0") {
		t.Errorf("step without targets: %v, want ErrNoTargets naming step 0", err)
	}

	if _, err := NewWithInput(spec, m, Input{Source: &blankSource{}, Vocab: 64, What: "the wide task"}, Options{}); err == nil ||
		!strings.Contains(err.Error(), "the wide task") || !strings.Contains(err.Error(), "vocab_size 32") {
		t.Errorf("a vocabulary of 64 for a model of 32: %v", err)
	}
	if _, err := NewWithInput(spec, m, Input{Vocab: 32}, Options{}); err == nil {
		t.Error("an input without a source was accepted")
	}

	// A data.path spec needs its dataset.
	path := testSpec(t, t.TempDir(), t.TempDir(), 3)
	if _, err := New(path, refBackend[float32](t, path), nil, Options{}); err == nil || !strings.Contains(err.Error(), "data.path") {
		t.Errorf("data.path spec without a dataset: %v", err)
	}
}
