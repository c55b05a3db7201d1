package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/worker/metrics"
)

// noCUDA is an environment in which the CUDA backend cannot load its
// library, whatever the machine has.
var noCUDA = []string{kernels.EnvLib + "=" + filepath.Join(os.TempDir(), "no-such-dir", "libm2kernels.so")}

// mqarJob writes the spec of a one-layer model trained on a small MQAR
// task with the given backend, checkpointing every 2 steps to ckpt.
func mqarJob(t *testing.T, dir, name, backend, ckpt string, steps int) string {
	t.Helper()
	p := filepath.Join(dir, name+".yaml")
	doc := strings.NewReplacer("NAME", name, "BACKEND", backend, "CKPT", ckpt, "STEPS", strconv.Itoa(steps)).Replace(`
name: NAME
model: {config: {d_model: 16, n_layer: 1, vocab_size: 32, d_state: 8, headdim: 8, chunk_size: 8}}
data: {mqar: {vocab_size: 32, num_pairs: 2}, seq_len: 16}
batch: {micro_batch: 2, global_batch: 4}
schedule: {warmup_steps: 1, total_steps: STEPS}
checkpoint: {location: CKPT, every_steps: 2}
backend: BACKEND
`)
	if err := os.WriteFile(p, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestTrainMQARMetrics trains an MQAR spec with `m2ctl train --metrics
// --eval-every`: the history holds one train record per step and the
// evaluations every 2 steps and after the last; the last evaluation is the
// one `m2ctl eval mqar` gives for the final checkpoint; a resumed run
// appends the steps it adds.
func TestTrainMQARMetrics(t *testing.T) {
	dir := t.TempDir()
	ckpt := filepath.Join(dir, "ckpt")
	hist := filepath.Join(dir, "run.jsonl")
	out, code := m2ctlEnv(t, noCUDA, "train", mqarJob(t, dir, "m", "auto", ckpt, 5), "--metrics", hist, "--eval-every", "2", "--eval-samples", "16")
	if code != 0 {
		t.Fatalf("train: exit %d: %s", code, out)
	}
	for _, want := range []string{"backend: cpu-float32 (CUDA unavailable: ", "data: MQAR task (vocab 32, 2 pairs, 2 queries), seq_len 16", "step 5/5", "eval at step 4: accuracy"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	h, err := metrics.ReadFile(hist)
	if err != nil {
		t.Fatal(err)
	}
	if h.Header.Job != "m" || h.Header.Labels["task"] != "mqar" || h.Header.Labels["d_state"] != "8" {
		t.Errorf("header %+v", h.Header)
	}
	if len(h.Train) != 5 || h.Train[4].Step != 5 || h.Train[4].TotalSteps != 5 || !(h.Train[4].Loss > 0) || h.Train[4].Tokens != 4*2 {
		t.Fatalf("train records %+v, want steps 1..5 of 8 answers each", h.Train)
	}
	var evalSteps []int
	for _, r := range h.Eval {
		evalSteps = append(evalSteps, r.Step)
	}
	if len(evalSteps) != 3 || evalSteps[0] != 2 || evalSteps[1] != 4 || evalSteps[2] != 5 {
		t.Fatalf("evaluations at steps %v, want [2 4 5]", evalSteps)
	}
	last := h.Eval[2]
	ev := evalJSON(t, "--checkpoint", filepath.Join(ckpt, "m"), "--spec", filepath.Join(dir, "m.yaml"), "--samples", "16")
	if ev.Correct != last.Correct || ev.Answers != last.Answers || ev.Answers != 32 {
		t.Errorf("eval mqar on the final checkpoint gives %d/%d, the history %d/%d", ev.Correct, ev.Answers, last.Correct, last.Answers)
	}

	out, code = m2ctlEnv(t, noCUDA, "train", mqarJob(t, dir, "m", "cpu", ckpt, 7), "--metrics", hist)
	if code != 0 || !strings.Contains(out, "resumed from the checkpoint of step 5") || !strings.Contains(out, "backend: cpu-float32\n") {
		t.Fatalf("second train: exit %d: %s", code, out)
	}
	h, err = metrics.ReadFile(hist)
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Train) != 7 || h.Train[6].Step != 7 || len(h.Eval) != 3 {
		t.Errorf("after resuming: %d train records (last step %d), %d evaluations; want 7 and 3", len(h.Train), h.Train[len(h.Train)-1].Step, len(h.Eval))
	}
}

func TestTrainBackendAndFlagErrors(t *testing.T) {
	dir := t.TempDir()
	data := tinyJob(t, dir)("d", "", filepath.Join(dir, "ckpt"), 2)
	notHistory := filepath.Join(dir, "not-history.jsonl")
	os.WriteFile(notHistory, []byte("hello\n"), 0o644)
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"cuda without a CUDA backend", []string{mqarJob(t, dir, "c", "cuda", filepath.Join(dir, "ckpt"), 2)}, "backend: cuda: no CUDA backend can run here"},
		{"eval on a dataset spec", []string{data, "--eval-every", "1"}, "data.mqar"},
		{"negative eval-every", []string{data, "--eval-every", "-1"}, "--eval-every"},
		{"no eval samples", []string{mqarJob(t, dir, "e", "cpu", filepath.Join(dir, "ckpt"), 2), "--eval-every", "1", "--eval-samples", "0"}, "--eval-samples"},
		{"metrics file that is not a history", []string{data, "--metrics", notHistory}, "--metrics"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := m2ctlEnv(t, noCUDA, append([]string{"train"}, tc.args...)...)
			if code != exitUsage || !strings.Contains(out, tc.msg) {
				t.Errorf("exit %d, output %q; want exit %d mentioning %q", code, out, exitUsage, tc.msg)
			}
		})
	}
}

// TestOpenBackend checks the selection in this process, with the CUDA
// library out of reach.
func TestOpenBackend(t *testing.T) {
	t.Setenv(kernels.EnvLib, noCUDA[0][len(kernels.EnvLib)+1:])
	cfg := model.DefaultConfig(16, 1, 32)
	cfg.DState, cfg.HeadDim, cfg.ChunkSize = 8, 8, 8
	cfg.NHeads = cfg.Expand * cfg.DModel / cfg.HeadDim
	var out strings.Builder
	for _, kind := range []string{"cpu", "auto"} {
		m, release, err := openBackend(kind, "float32", cfg, &out)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		if m.Name() != "cpu-float32" {
			t.Errorf("%s: backend %s, want cpu-float32", kind, m.Name())
		}
		release()
	}
	if got := out.String(); !strings.HasPrefix(got, "backend: cpu-float32\nbackend: cpu-float32 (CUDA unavailable: ") || !strings.Contains(got, "no-such-dir") {
		t.Errorf("printed %q", got)
	}
	for _, tc := range []struct{ kind, precision, field string }{
		{"cuda", "float32", "backend"}, {"cuda", "bf16", "backend"}, {"tpu", "float32", "backend"}, {"", "float32", "backend"},
		{"auto", "fp8", "precision"},
	} {
		_, _, err := openBackend(tc.kind, tc.precision, cfg, io.Discard)
		var ue usageError
		if !errors.As(err, &ue) || !strings.HasPrefix(err.Error(), tc.field+": ") {
			t.Errorf("backend %q, precision %q: %v, want a usage error about %s", tc.kind, tc.precision, err, tc.field)
		}
	}
}
