package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/safetensors"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/checkpoint/s3gw"
)

// TestMain lets the test binary act as m2ctl when M2CTL_AS_MAIN is set, so
// the tests run the real command line, exit codes included.
// It doubles as the S3 gateway that the S3 tests start as a child process.
func TestMain(m *testing.M) {
	s3gw.RunIfChild()
	if os.Getenv("M2CTL_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// m2ctl runs the command line with args and returns its output and exit code.
func m2ctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return m2ctlEnv(t, nil, args...)
}

// s3Env are the environment variables that configure S3 access; m2ctlEnv
// replaces those of the test's environment.
var s3Env = []string{"M2_S3_ENDPOINT", "M2_S3_CREDENTIALS_FILE", "M2_CACHE_DIR", "HOME", "AWS_"}

// m2ctlEnv is m2ctl with env (KEY=VALUE entries) in place of the S3
// settings of the test's environment, when env is not nil.
func m2ctlEnv(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "M2CTL_AS_MAIN=1")
	if env != nil {
		cmd.Env = slices.DeleteFunc(cmd.Env, func(kv string) bool {
			return slices.ContainsFunc(s3Env, func(p string) bool { return strings.HasPrefix(kv, p) })
		})
		cmd.Env = append(cmd.Env, env...)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return out.String(), 0
}

const oracleDir = "../../model/testdata/oracle/tiny-mamba2"

// TestModelGradsReproducesOracle runs `m2ctl model grads` on the oracle
// checkpoint and its input ids and compares every tensor it writes with
// the oracle's.
func TestModelGradsReproducesOracle(t *testing.T) {
	for _, tc := range []struct {
		precision string
		tol       float64
	}{{"float64", 1e-9}, {"float32", 1e-4}} {
		t.Run(tc.precision, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "grads.safetensors")
			exp := filepath.Join(oracleDir, "expected.safetensors")
			msg, code := m2ctl(t, "model", "grads", "--model", oracleDir, "--tokens", exp, "--out", out, "--precision", tc.precision)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, msg)
			}
			got, err := safetensors.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			want, err := safetensors.ReadFile(exp)
			if err != nil {
				t.Fatal(err)
			}
			compared := 0
			for _, w := range want.Tensors {
				if w.Name == "input_ids" {
					continue
				}
				g, ok := got.Get(w.Name)
				if !ok {
					t.Errorf("output lacks %s", w.Name)
					continue
				}
				if wantDT := map[string]safetensors.DType{"float64": safetensors.F64, "float32": safetensors.F32}[tc.precision]; g.DType != wantDT {
					t.Errorf("%s stored as %s, want %s", w.Name, g.DType, wantDT)
				}
				gv, _ := g.Float64s()
				wv, _ := w.Float64s()
				var diff, scale float64
				for i := range wv {
					diff = math.Max(diff, math.Abs(gv[i]-wv[i]))
					scale = math.Max(scale, math.Abs(wv[i]))
				}
				if diff > tc.tol*scale {
					t.Errorf("%s: relative error %.3g > %.0e", w.Name, diff/scale, tc.tol)
				}
				compared++
			}
			if compared < 20 {
				t.Errorf("only %d tensors compared", compared)
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("name: x\nmodel: {}\nbogus: 1\n"), 0o644)
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"unknown precision", []string{"model", "grads", "--model", oracleDir, "--tokens", "x", "--out", "y", "--precision", "int8"}, exitUsage, "--precision"},
		{"missing model dir", []string{"model", "grads", "--model", dir, "--tokens", "x", "--out", "y"}, exitUsage, "config.json"},
		{"spec with unknown field", []string{"train", bad}, exitUsage, "bogus"},
		{"missing spec", []string{"train", filepath.Join(dir, "none.yaml")}, exitUsage, "none.yaml"},
		{"unknown flag", []string{"train", "--bogus", "x.yaml"}, exitUsage, "bogus"},
		{"missing required flag", []string{"model", "grads", "--model", oracleDir}, exitUsage, "required"},
		{"wrong argument count", []string{"train"}, exitUsage, "arg"},
		{"coordinator unreachable", []string{"job", "status", "j-1", "--coordinator", "127.0.0.1:1", "--timeout", "1s"}, 5, "unavailable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, code := m2ctl(t, tc.args...)
			if code != tc.code || !strings.Contains(msg, tc.msg) {
				t.Errorf("exit %d, output %q; want exit %d mentioning %q", code, msg, tc.code, tc.msg)
			}
		})
	}
}

// tinyJob prepares a small byte-level dataset with `m2ctl data prepare`
// (once per directory) and returns a function that writes the spec of a
// tiny model trained for steps steps, checkpointing every 2 steps to
// location, with data from dataPath ("" for the prepared one).
func tinyJob(t *testing.T, dir string) func(name, dataPath, location string, steps int) string {
	t.Helper()
	src := filepath.Join(dir, "src")
	os.MkdirAll(src, 0o755)
	text := strings.Repeat("the quick brown fox jumps over the lazy dog. ", 200)
	os.WriteFile(filepath.Join(src, "a.txt"), []byte(text), 0o644)
	if msg, code := m2ctl(t, "data", "prepare", "--out", filepath.Join(dir, "data"), src); code != 0 {
		t.Fatalf("prepare: exit %d: %s", code, msg)
	}
	return func(name, dataPath, location string, steps int) string {
		if dataPath == "" {
			dataPath = filepath.Join(dir, "data")
		}
		p := filepath.Join(dir, name+".yaml")
		doc := strings.NewReplacer("NAME", name, "DATA", dataPath, "CKPT", location, "STEPS", strconv.Itoa(steps)).Replace(`
name: NAME
model: {config: {d_model: 32, n_layer: 1, vocab_size: 256, d_state: 8, headdim: 8, chunk_size: 16}}
data: {path: DATA, seq_len: 32}
batch: {micro_batch: 2, global_batch: 2}
schedule: {warmup_steps: 1, total_steps: STEPS}
checkpoint: {location: CKPT, every_steps: 2}
backend: cpu
`)
		if err := os.WriteFile(p, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
}

// TestTrainResumes prepares a dataset with `m2ctl data prepare`, trains with
// `m2ctl train`, and runs the same spec again with more steps: the second
// run resumes from the first one's checkpoint.
func TestTrainResumes(t *testing.T) {
	dir := t.TempDir()
	spec := tinyJob(t, dir)
	ckpt := filepath.Join(dir, "ckpt")
	msg, code := m2ctl(t, "train", spec("t", "", ckpt, 4))
	if code != 0 || !strings.Contains(msg, "step 4/4") {
		t.Fatalf("train: exit %d: %s", code, msg)
	}
	if _, err := os.Stat(filepath.Join(dir, "ckpt", "t", "step-00000004", "manifest.json")); err != nil {
		t.Fatalf("no committed checkpoint at LOCATION/NAME/step-N: %v", err)
	}
	msg, code = m2ctl(t, "train", spec("t", "", ckpt, 6))
	if code != 0 || !strings.Contains(msg, "resumed from the checkpoint of step 4") || !strings.Contains(msg, "step 6/6") {
		t.Fatalf("second train did not resume: exit %d: %s", code, msg)
	}
}

// TestModelLogits runs `m2ctl model logits` on the oracle checkpoint: on
// the oracle's input ids its logits and loss match the oracle's, and the
// output carries those ids; with --random-tokens the ids are in the
// vocabulary, fixed by the seed, and the logits are the ones the same ids
// given through a file produce.
func TestModelLogits(t *testing.T) {
	dir := t.TempDir()
	exp := filepath.Join(oracleDir, "expected.safetensors")
	want, err := safetensors.ReadFile(exp)
	if err != nil {
		t.Fatal(err)
	}
	read := func(args ...string) *safetensors.File {
		t.Helper()
		out := filepath.Join(dir, "out.safetensors")
		msg, code := m2ctl(t, append([]string{"model", "logits", "--model", oracleDir, "--out", out}, args...)...)
		if code != 0 {
			t.Fatalf("model logits %v: exit %d: %s", args, code, msg)
		}
		f, err := safetensors.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	floats := func(f *safetensors.File, name string) []float64 {
		t.Helper()
		tn, ok := f.Get(name)
		if !ok {
			t.Fatalf("no tensor %s", name)
		}
		v, err := tn.Float64s()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	ints := func(f *safetensors.File) ([]int64, []int) {
		t.Helper()
		tn, ok := f.Get("input_ids")
		if !ok {
			t.Fatal("no tensor input_ids")
		}
		v, err := tn.Int64s()
		if err != nil {
			t.Fatal(err)
		}
		return v, tn.Shape
	}
	got := read("--tokens", exp)
	for _, name := range []string{"logits", "loss"} {
		g, w := floats(got, name), floats(want, name)
		if len(g) != len(w) {
			t.Fatalf("%s: %d values, the oracle %d", name, len(g), len(w))
		}
		var diff, scale float64
		for i := range w {
			diff = math.Max(diff, math.Abs(g[i]-w[i]))
			scale = math.Max(scale, math.Abs(w[i]))
		}
		if diff > 1e-9*scale {
			t.Errorf("%s: relative error %.3g > 1e-9", name, diff/scale)
		}
	}
	gi, _ := ints(got)
	wi, _ := ints(want)
	if !slices.Equal(gi, wi) {
		t.Errorf("output input_ids %v, given %v", gi, wi)
	}

	r1 := read("--random-tokens", "3x17", "--seed", "9", "--precision", "float32")
	ids1, shape := ints(r1)
	if !slices.Equal(shape, []int{3, 17}) {
		t.Fatalf("random input_ids shape %v, want [3 17]", shape)
	}
	for _, v := range ids1 {
		if v < 0 || v >= 96 {
			t.Fatalf("random token %d outside the oracle's vocabulary of 96", v)
		}
	}
	if lt, _ := r1.Get("logits"); lt.DType != safetensors.F32 || !slices.Equal(lt.Shape, []int{3, 17, 96}) {
		t.Fatalf("float32 logits stored as %s %v", lt.DType, lt.Shape)
	}
	if again, _ := ints(read("--random-tokens", "3x17", "--seed", "9")); !slices.Equal(again, ids1) {
		t.Error("the same seed drew other tokens")
	}
	if other, _ := ints(read("--random-tokens", "3x17", "--seed", "10")); slices.Equal(other, ids1) {
		t.Error("seeds 9 and 10 drew the same tokens")
	}
	// The ids of a random draw, given back through a file, give the same
	// logits: the output file is a complete description of the inputs.
	idsFile := filepath.Join(dir, "ids.safetensors")
	if err := safetensors.WriteFile(idsFile, []safetensors.Tensor{safetensors.FromInt64s("input_ids", []int{3, 17}, ids1)}, nil); err != nil {
		t.Fatal(err)
	}
	r64 := read("--random-tokens", "3x17", "--seed", "9")
	f64 := read("--tokens", idsFile)
	if a, b := floats(r64, "logits"), floats(f64, "logits"); !slices.Equal(a, b) {
		t.Error("logits of --random-tokens differ from those of the same ids read from a file")
	}

	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--out", "x"}, "give exactly one"},
		{[]string{"--out", "x", "--tokens", exp, "--random-tokens", "1x2"}, "give exactly one"},
		{[]string{"--out", "x", "--random-tokens", "2by3"}, "BATCHxL"},
		{[]string{"--out", "x", "--random-tokens", "0x3"}, "BATCHxL"},
		{[]string{"--out", "x", "--random-tokens", "1x3", "--precision", "f16"}, "--precision"},
	} {
		msg, code := m2ctl(t, append([]string{"model", "logits", "--model", oracleDir}, tc.args...)...)
		if code != exitUsage || !strings.Contains(msg, tc.msg) {
			t.Errorf("model logits %v: exit %d, %q; want exit %d mentioning %q", tc.args, code, msg, exitUsage, tc.msg)
		}
	}
}

// inspectJSON runs `m2ctl checkpoint inspect -o json` and decodes it.
func inspectJSON(t *testing.T, args ...string) (ckptInspectReport, string, int) {
	t.Helper()
	msg, code := m2ctl(t, append([]string{"checkpoint", "inspect", "-o", "json"}, args...)...)
	var rep ckptInspectReport
	if i := strings.Index(msg, "{"); i >= 0 {
		dec := json.NewDecoder(strings.NewReader(msg[i:]))
		if err := dec.Decode(&rep); err != nil {
			t.Fatalf("inspect %v: output is not a report: %v\n%s", args, err, msg)
		}
	}
	return rep, msg, code
}

// loadExported loads the weights of a Hugging Face directory in float64,
// with the dtype its first tensor is stored in.
func loadExported(t *testing.T, dir string) ([]float64, safetensors.DType) {
	t.Helper()
	cfg, _, err := hf.ReadConfigFile(filepath.Join(dir, hf.ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	layout := model.NewLayout(cfg)
	p, err := hf.LoadParams[float64](dir, cfg, layout)
	if err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.ReadFile(filepath.Join(dir, hf.WeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	first, _ := f.Get(layout.Tensors[0].Name)
	return p, first.DType
}

// TestCheckpointInspectAndExport trains a tiny job to local checkpoints
// and checks `m2ctl checkpoint inspect` and `export` on them: the listing,
// the manifest, the trainer state, each object's verdict once objects are
// damaged or gone, exit codes, and exported weights equal to the
// checkpoint's (rounded to nearest even for bfloat16).
func TestCheckpointInspectAndExport(t *testing.T) {
	dir := t.TempDir()
	spec := tinyJob(t, dir)
	ckpt := filepath.Join(dir, "ckpt")
	if msg, code := m2ctl(t, "train", spec("t", "", ckpt, 4)); code != 0 {
		t.Fatalf("train: exit %d: %s", code, msg)
	}
	job := filepath.Join(ckpt, "t")
	step4, step2 := filepath.Join(job, "step-00000004"), filepath.Join(job, "step-00000002")

	msg, code := m2ctl(t, "checkpoint", "inspect", job)
	for _, want := range []string{"step 4, 2 (newest first)", "step-00000004: manifest m2train-checkpoint/v2, step 4, 4 objects",
		"trainer: job t, step 4, data cursor 8, seed 0, optimizer step 4", "precision float32", "d_model 32, 1 layers", "verified: 4 of 4 objects OK"} {
		if code != 0 || !strings.Contains(msg, want) {
			t.Fatalf("inspect: exit %d, output lacks %q:\n%s", code, want, msg)
		}
	}
	rep, msg, code := inspectJSON(t, ckpt) // LOCATION with one job: its job is taken
	if code != 0 || !rep.Verified || rep.Step != 4 || !slices.Equal(rep.Steps, []int{4, 2}) || len(rep.Objects) != 4 || rep.Trainer == nil || rep.Trainer.Cursor != 8 || rep.Location != job {
		t.Fatalf("inspect -o json LOCATION: exit %d: %+v\n%s", code, rep, msg)
	}
	for _, o := range rep.Objects {
		b, err := os.ReadFile(filepath.Join(step4, o.Name))
		if err != nil {
			t.Fatal(err)
		}
		if o.Status != objOK || o.Size != int64(len(b)) || len(o.SHA256) != 64 {
			t.Errorf("object %+v; the file has %d bytes", o, len(b))
		}
	}
	for _, args := range [][]string{{job, "--step", "2"}, {step2}, {step2 + "/"}} {
		if rep, msg, code := inspectJSON(t, args...); code != 0 || rep.Step != 2 || rep.Trainer == nil || rep.Trainer.Cursor != 4 {
			t.Errorf("inspect %v: exit %d, step %d:\n%s", args, code, rep.Step, msg)
		}
	}

	// Exports of the intact newest checkpoint.
	out32, outBF := filepath.Join(dir, "hf32"), filepath.Join(dir, "hfbf16")
	if msg, code := m2ctl(t, "checkpoint", "export", job, out32); code != 0 || !strings.Contains(msg, "exported step 4") {
		t.Fatalf("export: exit %d: %s", code, msg)
	}
	if msg, code := m2ctl(t, "checkpoint", "export", job, outBF, "--dtype", "bfloat16"); code != 0 {
		t.Fatalf("export bfloat16: exit %d: %s", code, msg)
	}
	want, _ := loadExported(t, step4) // a step's directory is itself a Hugging Face directory
	got32, dt32 := loadExported(t, out32)
	gotBF, dtBF := loadExported(t, outBF)
	if dt32 != safetensors.F32 || dtBF != safetensors.BF16 {
		t.Fatalf("exported dtypes %s and %s, want F32 and BF16", dt32, dtBF)
	}
	for i, v := range want {
		if got32[i] != v {
			t.Fatalf("float32 export: parameter %d is %v, the checkpoint's %v", i, got32[i], v)
		}
		if r := float64(safetensors.Float32FromBF16(safetensors.BF16FromFloat32(float32(v)))); gotBF[i] != r {
			t.Fatalf("bfloat16 export: parameter %d is %v, want %v rounded to %v", i, gotBF[i], v, r)
		}
	}
	entries, _ := os.ReadDir(out32)
	if len(entries) != 2 {
		t.Errorf("export wrote %d files, want config.json and model.safetensors", len(entries))
	}
	msg, code = m2ctl(t, "checkpoint", "export", job, out32, "--step", "2")
	if code != exitUsage || !strings.Contains(msg, "not empty") {
		t.Errorf("export into a non-empty OUTDIR: exit %d: %s", code, msg)
	}
	if msg, code := m2ctl(t, "checkpoint", "export", job, out32, "--step", "2", "--force"); code != 0 || !strings.Contains(msg, "exported step 2") {
		t.Errorf("export --force: exit %d: %s", code, msg)
	}

	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"step not committed", []string{"inspect", job, "--step", "3"}, exitUsage, "committed steps: 4, 2"},
		{"step flag against a step location", []string{"inspect", step2, "--step", "4"}, exitUsage, "names step 2"},
		{"no checkpoint", []string{"inspect", filepath.Join(dir, "none")}, exitUsage, "no committed checkpoint"},
		{"bad output", []string{"inspect", job, "-o", "yaml"}, exitUsage, "--output"},
		{"bad dtype", []string{"export", job, filepath.Join(dir, "x"), "--dtype", "float16"}, exitUsage, "float32 or bfloat16"},
		{"OUTDIR is a file", []string{"export", job, filepath.Join(step4, "config.json")}, exitUsage, "not a directory"},
		{"unsupported scheme", []string{"inspect", "gs://bucket/x"}, exitUsage, "scheme"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, code := m2ctl(t, append([]string{"checkpoint"}, tc.args...)...)
			if code != tc.code || !strings.Contains(msg, tc.msg) {
				t.Errorf("exit %d, output %q; want exit %d mentioning %q", code, msg, tc.code, tc.msg)
			}
		})
	}

	// A second job under the same LOCATION makes LOCATION ambiguous.
	if msg, code := m2ctl(t, "train", spec("u", "", ckpt, 2)); code != 0 {
		t.Fatalf("train u: exit %d: %s", code, msg)
	}
	if msg, code := m2ctl(t, "checkpoint", "inspect", ckpt); code != exitUsage || !strings.Contains(msg, "2 jobs (t, u)") {
		t.Errorf("inspect of a LOCATION with two jobs: exit %d: %s", code, msg)
	}

	// Damage the newest checkpoint: a flipped byte, a truncated object, a
	// deleted one. Each is reported, and the exit status is 1.
	weights := filepath.Join(step4, "model.safetensors")
	b, _ := os.ReadFile(weights)
	b[len(b)/2] ^= 0x40
	os.WriteFile(weights, b, 0o644)
	opt := filepath.Join(step4, "optimizer.safetensors")
	ob, _ := os.ReadFile(opt)
	os.WriteFile(opt, ob[:len(ob)-10], 0o644)
	os.Remove(filepath.Join(step4, "trainer.json"))
	rep, msg, code = inspectJSON(t, job)
	if code != exitFailure || rep.Verified {
		t.Fatalf("inspect of a damaged checkpoint: exit %d, verified %v:\n%s", code, rep.Verified, msg)
	}
	wantStatus := map[string]string{"config.json": objOK, "model.safetensors": objMismatch, "optimizer.safetensors": objMismatch, "trainer.json": objMissing}
	for _, o := range rep.Objects {
		if o.Status != wantStatus[o.Name] {
			t.Errorf("%s: %s (%s), want %s", o.Name, o.Status, o.Detail, wantStatus[o.Name])
		}
	}
	if !strings.Contains(msg, "--step 2") || !strings.Contains(msg, fmt.Sprintf("%d bytes, the manifest says %d", len(ob)-10, len(ob))) {
		t.Errorf("damaged inspect output lacks the fallback hint or the size detail:\n%s", msg)
	}
	msg, code = m2ctl(t, "checkpoint", "inspect", job)
	if code != exitFailure || !strings.Contains(msg, "MISMATCH") || !strings.Contains(msg, "MISSING") || !strings.Contains(msg, "FAILED: 1 of 4 objects OK") {
		t.Errorf("text inspect of a damaged checkpoint: exit %d:\n%s", code, msg)
	}
	outBad := filepath.Join(dir, "hfbad")
	if msg, code := m2ctl(t, "checkpoint", "export", job, outBad); code != exitFailure || !strings.Contains(msg, "nothing exported") || !strings.Contains(msg, "--step 2") {
		t.Errorf("export of a damaged checkpoint: exit %d: %s", code, msg)
	}
	if _, err := os.Stat(outBad); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("export of a damaged checkpoint created OUTDIR: %v", err)
	}
	// A manifest that does not parse is reported, with status 1.
	os.WriteFile(filepath.Join(step2, "manifest.json"), []byte("{"), 0o644)
	if msg, code := m2ctl(t, "checkpoint", "inspect", step2); code != exitFailure || !strings.Contains(msg, "manifest") {
		t.Errorf("inspect of a corrupt manifest: exit %d: %s", code, msg)
	}
}

// testLog sends a child's log lines to the test log.
type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestTrainS3 runs `m2ctl train` against an S3 gateway in a child process:
// the dataset comes from the bucket through the download cache (reused
// when intact, fetched again when a cached shard is damaged), checkpoints
// go to the bucket and resume from it, init_from reads a checkpoint's step
// directory checked against its manifest, inspect and export read s3://
// locations, and bad buckets and missing credentials are usage errors.
// The secret key never appears in the output.
func TestTrainS3(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	gwDir := filepath.Join(dir, "gw")
	gw, err := s3gw.StartProcess(ctx, s3gw.Options{Dir: gwDir, Buckets: []string{"m2test"}}, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Stop(30 * time.Second) })
	cache := filepath.Join(dir, "cache")
	env := []string{"M2_S3_ENDPOINT=" + gw.Endpoint, "AWS_ACCESS_KEY_ID=" + gw.AccessKey, "AWS_SECRET_ACCESS_KEY=" + gw.SecretKey,
		"M2_CACHE_DIR=" + cache, "HOME=" + dir}
	run := func(args ...string) (string, int) {
		t.Helper()
		msg, code := m2ctlEnv(t, env, args...)
		if strings.Contains(msg, gw.SecretKey) {
			t.Fatalf("m2ctl %v printed the secret key:\n%s", args, msg)
		}
		return msg, code
	}

	spec := tinyJob(t, dir)
	store, err := checkpoint.NewS3Store(ctx, checkpoint.S3Config{Endpoint: gw.Endpoint, Bucket: "m2test", AccessKey: gw.AccessKey, SecretKey: gw.SecretKey})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	files, _ := os.ReadDir(filepath.Join(dir, "data"))
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, "data", f.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := checkpoint.PutBytes(ctx, store, "datasets/tiny/"+f.Name(), b); err != nil {
			t.Fatal(err)
		}
	}

	const data, loc = "s3://m2test/datasets/tiny", "s3://m2test/ckpt"
	msg, code := run("train", spec("t", data, loc, 4))
	if code != 0 || !strings.Contains(msg, "1 shards verified") || !strings.Contains(msg, "(1 downloaded") || !strings.Contains(msg, "step 4/4") {
		t.Fatalf("train from and to S3: exit %d:\n%s", code, msg)
	}
	if _, err := os.Stat(filepath.Join(gwDir, "m2test", "ckpt", "t", "step-00000004", "manifest.json")); err != nil {
		t.Fatalf("no committed checkpoint in the bucket: %v", err)
	}
	msg, code = run("train", spec("t", data, loc, 6))
	if code != 0 || !strings.Contains(msg, "resumed from the checkpoint of step 4") || !strings.Contains(msg, "(0 downloaded, 0 bytes; 1 reused)") {
		t.Fatalf("second run did not resume from S3 or did not reuse the cache: exit %d:\n%s", code, msg)
	}
	// A damaged cached shard is downloaded again.
	shards, _ := filepath.Glob(filepath.Join(cache, "data", "*", "*.m2tok"))
	if len(shards) != 1 {
		t.Fatalf("cached shards %v, want one", shards)
	}
	b, _ := os.ReadFile(shards[0])
	b[len(b)-1] ^= 1
	os.WriteFile(shards[0], b, 0o644)
	msg, code = run("train", spec("t", data, loc, 8))
	if code != 0 || !strings.Contains(msg, "resumed from the checkpoint of step 6") || !strings.Contains(msg, "(1 downloaded") {
		t.Fatalf("third run did not fetch the damaged shard again: exit %d:\n%s", code, msg)
	}

	msg, code = run("checkpoint", "inspect", "s3://m2test/ckpt/t")
	if code != 0 || !strings.Contains(msg, "checkpoints in s3://m2test/ckpt/t: step 8, 6, 4") || !strings.Contains(msg, "verified: 4 of 4 objects OK") {
		t.Fatalf("inspect s3://: exit %d:\n%s", code, msg)
	}
	out := filepath.Join(dir, "hf")
	if msg, code := run("checkpoint", "export", "s3://m2test/ckpt/t", out, "--dtype", "bfloat16"); code != 0 || !strings.Contains(msg, "exported step 8") {
		t.Fatalf("export s3://: exit %d:\n%s", code, msg)
	}
	if _, dt := loadExported(t, out); dt != safetensors.BF16 {
		t.Errorf("exported dtype %s, want BF16", dt)
	}

	// init_from a step of the S3 checkpoint, checked against its manifest.
	initSpec := func(from string) string {
		p := filepath.Join(dir, "init.yaml")
		doc := "name: v\nmodel: {init_from: " + from + "}\ndata: {path: " + data + ", seq_len: 32}\nbatch: {micro_batch: 2}\nschedule: {total_steps: 2}\nbackend: cpu\n"
		os.WriteFile(p, []byte(doc), 0o644)
		return p
	}
	msg, code = run("train", initSpec("s3://m2test/ckpt/t/step-00000008"))
	if code != 0 || !strings.Contains(msg, "checked against the checkpoint's manifest") || !strings.Contains(msg, "step 2/2") {
		t.Fatalf("train from an S3 init_from: exit %d:\n%s", code, msg)
	}
	obj := filepath.Join(gwDir, "m2test", "ckpt", "t", "step-00000006", "model.safetensors")
	mb, err := os.ReadFile(obj)
	if err != nil {
		t.Fatal(err)
	}
	mb[len(mb)-1] ^= 1
	os.WriteFile(obj, mb, 0o644)
	if msg, code := run("train", initSpec("s3://m2test/ckpt/t/step-00000006")); code == 0 || !strings.Contains(msg, "corrupt") {
		t.Errorf("train from a damaged S3 init_from: exit %d:\n%s", code, msg)
	}

	for _, tc := range []struct {
		name string
		env  []string
		args []string
		msg  string
	}{
		{"missing bucket", env, []string{"train", spec("w", data, "s3://nobucket/ckpt", 2)}, "does not exist"},
		{"missing data bucket", env, []string{"train", spec("w", "s3://nobucket/x", filepath.Join(dir, "c"), 2)}, "data.path"},
		{"no credentials", []string{"M2_S3_ENDPOINT=" + gw.Endpoint, "HOME=" + dir}, []string{"checkpoint", "inspect", "s3://m2test/ckpt/t"}, "credentials"},
		{"bad bucket name", env, []string{"checkpoint", "inspect", "s3://No_Such/x"}, "bucket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, code := m2ctlEnv(t, tc.env, tc.args...)
			if code != exitUsage || !strings.Contains(msg, tc.msg) {
				t.Errorf("exit %d, output %q; want exit %d mentioning %q", code, msg, exitUsage, tc.msg)
			}
		})
	}
}

// TestDemo runs a short `m2ctl demo`: it trains with its checkpoints in
// s3://demo through its in-process gateway, prints where they are and the
// commands that inspect and export them, and those commands work on the
// files the gateway left behind. A second run resumes from S3.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("trains the demo model for 22 steps")
	}
	dir := t.TempDir()
	msg, code := m2ctl(t, "demo", "--dir", dir, "--steps", "22")
	local := filepath.Join(dir, "s3", "demo", "checkpoints", "demo")
	for _, want := range []string{"S3 gateway: http://127.0.0.1:", "checkpoints go to s3://demo/checkpoints/demo/", "step 22/22", "final loss",
		"checkpoint: s3://demo/checkpoints/demo/step-00000022", "m2ctl checkpoint inspect " + local, "m2ctl checkpoint export " + local} {
		if code != 0 || !strings.Contains(msg, want) {
			t.Fatalf("demo: exit %d, output lacks %q:\n%s", code, want, msg)
		}
	}
	if msg, code := m2ctl(t, "checkpoint", "inspect", local); code != 0 || !strings.Contains(msg, "verified: 4 of 4 objects OK") || !strings.Contains(msg, "job demo, step 22") {
		t.Fatalf("inspect of the demo's checkpoint: exit %d:\n%s", code, msg)
	}
	if msg, code := m2ctl(t, "checkpoint", "export", local, filepath.Join(dir, "hf"), "--dtype", "bfloat16"); code != 0 {
		t.Fatalf("export of the demo's checkpoint: exit %d:\n%s", code, msg)
	}
	msg, code = m2ctl(t, "demo", "--dir", dir, "--steps", "23")
	if code != 0 || !strings.Contains(msg, "resumed from the checkpoint of step 22 in s3://demo/checkpoints") || !strings.Contains(msg, "step 23/23") {
		t.Fatalf("second demo did not resume: exit %d:\n%s", code, msg)
	}
}
