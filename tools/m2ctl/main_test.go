package main

import (
	"bytes"
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/m2train/m2train/model/safetensors"
)

// TestMain lets the test binary act as m2ctl when M2CTL_AS_MAIN is set, so
// the tests run the real command line, exit codes included.
func TestMain(m *testing.M) {
	if os.Getenv("M2CTL_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// m2ctl runs the command line with args and returns its output and exit code.
func m2ctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "M2CTL_AS_MAIN=1")
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

// TestTrainResumes prepares a dataset with `m2ctl data prepare`, trains with
// `m2ctl train`, and runs the same spec again with more steps: the second
// run resumes from the first one's checkpoint.
func TestTrainResumes(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.MkdirAll(src, 0o755)
	text := strings.Repeat("the quick brown fox jumps over the lazy dog. ", 200)
	os.WriteFile(filepath.Join(src, "a.txt"), []byte(text), 0o644)
	if msg, code := m2ctl(t, "data", "prepare", "--out", filepath.Join(dir, "data"), src); code != 0 {
		t.Fatalf("prepare: exit %d: %s", code, msg)
	}
	spec := func(steps int) string {
		p := filepath.Join(dir, "spec.yaml")
		doc := strings.NewReplacer("DATA", filepath.Join(dir, "data"), "CKPT", filepath.Join(dir, "ckpt"), "STEPS", string(rune('0'+steps))).Replace(`
name: t
model: {config: {d_model: 32, n_layer: 1, vocab_size: 256, d_state: 8, headdim: 8, chunk_size: 16}}
data: {path: DATA, seq_len: 32}
batch: {micro_batch: 2, global_batch: 2}
schedule: {warmup_steps: 1, total_steps: STEPS}
checkpoint: {location: CKPT, every_steps: 2}
backend: cpu
`)
		os.WriteFile(p, []byte(doc), 0o644)
		return p
	}
	msg, code := m2ctl(t, "train", spec(4))
	if code != 0 || !strings.Contains(msg, "step 4/4") {
		t.Fatalf("train: exit %d: %s", code, msg)
	}
	if _, err := os.Stat(filepath.Join(dir, "ckpt", "t", "step-00000004", "manifest.json")); err != nil {
		t.Fatalf("no committed checkpoint at LOCATION/NAME/step-N: %v", err)
	}
	msg, code = m2ctl(t, "train", spec(6))
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
