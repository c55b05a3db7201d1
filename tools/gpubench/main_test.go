package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/kernels/gpu"
)

func TestDefaultsAreMamba2_130m(t *testing.T) {
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := o.config()
	if err != nil {
		t.Fatal(err)
	}
	// mamba2-130m: d_model 768, 24 layers, vocabulary 50277 padded to
	// 50288, d_state 128, headdim 64 (24 heads), one group, chunk 256,
	// d_conv 4, tied embeddings.
	if cfg.DModel != 768 || cfg.NLayer != 24 || cfg.VocabSize != 50288 || cfg.DState != 128 || cfg.HeadDim != 64 ||
		cfg.NHeads != 24 || cfg.NGroups != 1 || cfg.ChunkSize != 256 || cfg.DConv != 4 || cfg.Expand != 2 || !cfg.TieEmbeddings {
		t.Errorf("defaults are not mamba2-130m's: %+v", cfg)
	}
	r := newReport(o, cfg)
	// Embedding 50288·768 + 24 layers of 3,765,320 + the final norm 768.
	if want := 50288*768 + 24*3765320 + 768; r.Parameters != want {
		t.Errorf("parameters = %d, want %d", r.Parameters, want)
	}
	if r.TokensPerStep != 8*2048 || o.precision != gpu.BF16 || o.microBatches != 1 {
		t.Errorf("step = %d tokens, precision %v, %d micro-batches", r.TokensPerStep, o.precision, o.microBatches)
	}
}

// The comparison switches reach the backend's options and the report.
func TestComparisonFlagsReachTheBackend(t *testing.T) {
	o, err := parseFlags([]string{"--dense-head", "--recompute-ssd"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if g := o.gpuOptions(); !g.DenseHead || !g.RecomputeSSD {
		t.Errorf("gpu options %+v: want DenseHead and RecomputeSSD", g)
	}
	cfg, err := o.config()
	if err != nil {
		t.Fatal(err)
	}
	if r := newReport(o, cfg); !r.DenseHead || !r.RecomputeSSD {
		t.Errorf("report: dense_head %v, recompute_ssd %v; want both", r.DenseHead, r.RecomputeSSD)
	}
	o, err = parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if g := o.gpuOptions(); g.DenseHead || g.RecomputeSSD {
		t.Errorf("default gpu options %+v: want neither switch", g)
	}
}

func TestFlagErrorsNameTheFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--precision", "fp16"}, "--precision"},
		{[]string{"--batch", "0"}, "--batch"},
		{[]string{"--steps", "0"}, "--steps"},
		{[]string{"--warmup", "-1"}, "--warmup"},
		{[]string{"--micro-batches", "3"}, "--micro-batches 3 must divide --batch 8"},
		{[]string{"--lr", "-1"}, "--lr"},
		{[]string{"--max-grad-norm", "NaN"}, "--max-grad-norm"},
		{[]string{"extra"}, "unexpected arguments"},
	} {
		_, err := parseFlags(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseFlags(%q) = %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
	if _, err := parseFlags([]string{"--help"}, io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("--help: %v, want flag.ErrHelp", err)
	}
}

func TestModelRulesReachTheUser(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--vocab", "50277"}, "pad_vocab_size_multiple"},
		{[]string{"--d-model", "100"}, "nheads"},
	} {
		o, err := parseFlags(tc.args, io.Discard)
		if err != nil {
			t.Fatalf("parseFlags(%q): %v", tc.args, err)
		}
		if _, err := o.config(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config of %q: %v, want an error naming %s", tc.args, err, tc.want)
		}
	}
}

func TestDryRunNeedsNoLibrary(t *testing.T) {
	path := filepath.Join(t.TempDir(), "plan.json")
	o, err := parseFlags([]string{"--dry-run", "--micro-batches", "2", "--json", path}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := run(context.Background(), o, &out); err != nil {
		t.Fatal(err)
	}
	cfg, _ := o.config()
	act := gpu.ActivationBytes(cfg, 4, 2048, false, o.gpuOptions())
	if !strings.Contains(out.String(), "activations of one micro-batch") {
		t.Errorf("dry run printed no memory arithmetic:\n%s", out.String())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`"micro_batches": 2`)) || !bytes.Contains(b, []byte(`"activation_bytes": `+strconv.FormatInt(act, 10))) {
		t.Errorf("JSON lacks the plan (micro-batches 2, activations of 4 × 2048 = %d bytes):\n%s", act, b)
	}
}

func TestMissingLibraryIsReported(t *testing.T) {
	o, err := parseFlags([]string{"--lib", filepath.Join(t.TempDir(), kernels.LibName)}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	err = run(context.Background(), o, io.Discard)
	if !errors.Is(err, errUnavailable) || !errors.Is(err, kernels.ErrNoLibrary) {
		t.Fatalf("run without a library: %v, want errUnavailable wrapping kernels.ErrNoLibrary", err)
	}
}

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		v    []float64
		want float64
	}{{[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}, {[]float64{7}, 7}} {
		if got := median(tc.v); got != tc.want {
			t.Errorf("median(%v) = %g, want %g", tc.v, got, tc.want)
		}
	}
}

func TestPresetMQARTiny(t *testing.T) {
	o, err := parseFlags([]string{"--preset", "mqar-tiny", "--d-state", "256"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := o.config()
	if err != nil {
		t.Fatal(err)
	}
	// The preset's values, except d_state, which the command line sets.
	if cfg.DModel != 64 || cfg.NLayer != 2 || cfg.VocabSize != 8192 || cfg.DState != 256 || cfg.HeadDim != 32 ||
		cfg.NHeads != 4 || cfg.ChunkSize != 64 || o.batch != 64 || o.seqLen != 256 || o.precision != gpu.F32 {
		t.Errorf("mqar-tiny with --d-state 256: %+v, batch %d × %d, %v", cfg, o.batch, o.seqLen, o.precision)
	}
	spec, err := mqarSpec(o, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if q := spec.Data.MQAR; q.VocabSize != 8192 || q.NumPairs != 64 || q.NumQueries != 64 || spec.Batch.GlobalBatch != 64 {
		t.Errorf("trainer spec: MQAR %+v, batch %+v", q, spec.Batch)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--preset", "huge"}, "--preset"},
		{[]string{"--loop", "graph"}, "--loop"},
		{[]string{"--preset", "mqar-tiny", "--chunk", "0"}, "--chunk"},
	} {
		if _, err := parseFlags(tc.args, io.Discard); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseFlags(%q) = %v, want an error naming %s", tc.args, err, tc.want)
		}
	}
}
