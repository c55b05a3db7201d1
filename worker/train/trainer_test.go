package train

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
)

// writeDataset writes a shard of pseudo-text (a repeating pattern with
// noise, so that the loss can fall) and returns its directory.
func writeDataset(t *testing.T, tokens int) string {
	t.Helper()
	dir := t.TempDir()
	w, err := data.NewShardWriter(filepath.Join(dir, "shard-000000.m2tok"), data.WriterOptions{Vocab: 32})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 1))
	buf := make([]int32, tokens)
	for i := range buf {
		buf[i] = int32(i % 7)
		if rng.IntN(10) == 0 {
			buf[i] = int32(rng.IntN(32))
		}
	}
	if err := w.Write(buf); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

func testSpec(t *testing.T, dataDir, ckpt string, steps int) *jobspec.Spec {
	t.Helper()
	doc := fmt.Sprintf(`
name: test
model:
  config: {d_model: 16, n_layer: 2, vocab_size: 32, d_state: 8, headdim: 4, ngroups: 2, chunk_size: 4}
data: {path: %s, seq_len: 12}
batch: {micro_batch: 2, global_batch: 6}
optimizer: {lr: 0.01, weight_decay: 0.1, grad_clip: 1.0}
schedule: {warmup_steps: 2, total_steps: %d, min_lr: 0.001}
checkpoint: {location: %s, every_steps: 3, keep: 2}
seed: 5
backend: cpu
`, dataDir, steps, ckpt)
	spec, err := jobspec.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

type run[T model.Float] struct {
	tr     *Trainer[T]
	m      *ref.Model[T]
	losses []float64
}

func newRun[T model.Float](t *testing.T, spec *jobspec.Spec) *run[T] {
	t.Helper()
	return newRunOn[T](t, spec, checkpoint.LocalStore{Root: spec.Checkpoint.Location}, nil)
}

// newRunOn builds a run whose checkpoints go to store under the spec's name.
func newRunOn[T model.Float](t *testing.T, spec *jobspec.Spec, store checkpoint.Store, adjust func(*Options)) *run[T] {
	t.Helper()
	cfg, err := ConfigFromSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ref.New[T](cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := LoadInit(spec, cfg, m.Layout(), m.Params()); err != nil {
		t.Fatal(err)
	}
	ds, err := data.Open(spec.Data.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ds.Close() })
	r := &run[T]{m: m}
	opts := Options{Store: store, Log: testLogger(t),
		OnProgress: func(p Progress) { r.losses = append(r.losses, p.Loss) }}
	if _, local := store.(checkpoint.LocalStore); !local {
		opts.Prefix = jobPrefix(spec.Name)
	}
	if adjust != nil {
		adjust(&opts)
	}
	if r.tr, err = New(spec, m, ds, opts); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestResumeIsBitwiseIdentical trains 9 steps straight, and separately 6
// steps, stops, and resumes from the step-6 checkpoint in a new trainer: the
// losses and the final parameters must be identical in every bit.
func TestResumeIsBitwiseIdentical(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)

	straight := newRun[float32](t, testSpec(t, dataDir, t.TempDir(), 9))
	if err := straight.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}

	ckpt := t.TempDir()
	first := newRun[float32](t, testSpec(t, dataDir, ckpt, 9))
	if err := first.tr.RunUntil(ctx, 6); err != nil {
		t.Fatal(err)
	}
	second := newRun[float32](t, testSpec(t, dataDir, ckpt, 9))
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
	got := append(first.losses, second.losses...)
	if len(got) != len(straight.losses) {
		t.Fatalf("%d losses, want %d", len(got), len(straight.losses))
	}
	for i := range got {
		if math.Float64bits(got[i]) != math.Float64bits(straight.losses[i]) {
			t.Errorf("step %d: loss %v after resume, %v straight", i+1, got[i], straight.losses[i])
		}
	}
	for i, v := range second.m.Params() {
		if math.Float32bits(v) != math.Float32bits(straight.m.Params()[i]) {
			t.Fatalf("parameter %d differs after resume: %v vs %v", i, v, straight.m.Params()[i])
		}
	}
	if !(straight.losses[len(straight.losses)-1] < straight.losses[0]) {
		t.Errorf("loss did not fall: %v", straight.losses)
	}
	steps, err := checkpoint.Steps(ctx, checkpoint.LocalStore{Root: ckpt}, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 2 || steps[0] != 9 || steps[1] != 6 {
		t.Errorf("retention kept steps %v, want [9 6]", steps)
	}
}

// TestResumeFallsBackPastCorruptCheckpoint corrupts the newest checkpoint's
// weights: resume must verify, skip it and use the previous one.
func TestResumeFallsBackPastCorruptCheckpoint(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	ckpt := t.TempDir()
	r := newRun[float64](t, testSpec(t, dataDir, ckpt, 9))
	if err := r.tr.RunUntil(ctx, 6); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(ckpt, checkpoint.StepDir(6), checkpoint.ModelObject)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 0xff
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	again := newRun[float64](t, testSpec(t, dataDir, ckpt, 9))
	ok, err := again.tr.Resume(ctx)
	if err != nil || !ok {
		t.Fatalf("resume: %v, %v", ok, err)
	}
	if again.tr.Step() != 3 {
		t.Errorf("resumed at step %d, want the previous checkpoint's 3", again.tr.Step())
	}
}

func TestNewRejectsParallelSpec(t *testing.T) {
	dataDir := writeDataset(t, 1000)
	spec := testSpec(t, dataDir, t.TempDir(), 3)
	spec.Parallel.DP = 2
	spec.Batch.GlobalBatch = 4
	cfg, _ := ConfigFromSpec(spec)
	m, _ := ref.New[float32](cfg)
	ds, err := data.Open(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	defer ds.Close()
	if _, err := New(spec, m, ds, Options{}); err == nil {
		t.Error("a single-process trainer accepted dp = 2")
	}
}
