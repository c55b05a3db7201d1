package jobspec

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
)

func loadDemo(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/demo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseDemo(t *testing.T) {
	s, err := Parse(loadDemo(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	c := s.Model.Config
	if c == nil || c.DModel != 64 || c.NHeads() != 8 || c.Expand != 2 || c.NGroups != 1 || c.DConv != 4 {
		t.Errorf("model config after defaults = %+v", c)
	}
	if s.Parallel.World() != 4 || s.Parallel.SPMode != SPModeSequential {
		t.Errorf("parallel = %+v", s.Parallel)
	}
	if got := s.AccumSteps(); got != 2 {
		t.Errorf("AccumSteps = %d, want 2", got)
	}
	if s.Optimizer.Betas != [2]float64{0.9, 0.95} || s.Optimizer.Eps != 1e-8 {
		t.Errorf("optimizer defaults = %+v", s.Optimizer)
	}
	if s.Checkpoint.Keep != DefaultCheckpointKeep || s.Restarts() != DefaultMaxRestarts {
		t.Errorf("checkpoint keep %d, restarts %d", s.Checkpoint.Keep, s.Restarts())
	}
	if s.Precision != PrecisionFloat32 || s.Backend != BackendCPU {
		t.Errorf("precision %q backend %q", s.Precision, s.Backend)
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	s, err := Parse(loadDemo(t))
	if err != nil {
		t.Fatal(err)
	}
	out, err := s.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(out)
	if err != nil {
		t.Fatalf("Parse(Marshal): %v\n%s", err, out)
	}
	if !reflect.DeepEqual(s, back) {
		t.Errorf("round trip differs:\n%+v\n%+v", s, back)
	}
	if c := s.Clone(); !reflect.DeepEqual(c, s) || c.Model.Config == s.Model.Config {
		t.Errorf("Clone is not a deep copy")
	}
}

// TestValidateRules changes one field of the demo spec per case and checks
// that the error names that field and states the rule.
func TestValidateRules(t *testing.T) {
	cases := []struct {
		name   string
		edit   func(*Spec)
		field  string
		inRule string
	}{
		{"name uppercase", func(s *Spec) { s.Name = "Demo" }, "name", "lowercase"},
		{"name empty", func(s *Spec) { s.Name = "" }, "name", "1-63"},
		{"no model", func(s *Spec) { s.Model = Model{} }, "model", "got neither"},
		{"both models", func(s *Spec) { s.Model.InitFrom = "s3://bkt/m" }, "model", "got both"},
		{"heads not integral", func(s *Spec) { s.Model.Config.HeadDim = 24 }, "model.config.headdim", "head count is integral"},
		{"groups do not divide heads", func(s *Spec) { s.Model.Config.NGroups = 3 }, "model.config.ngroups", "must divide the head count"},
		{"negative layers", func(s *Spec) { s.Model.Config.NLayer = -1 }, "model.config.n_layer", "at least 1"},
		{"vocab not padded", func(s *Spec) { s.Model.Config.VocabSize = 250 }, "model.config.vocab_size", "multiple of 16"},
		{"huge d_model", func(s *Spec) { s.Model.Config.DModel = 1 << 20 }, "model.config.d_model", "at most"},
		{"bad init_from scheme", func(s *Spec) { s.Model = Model{InitFrom: "http://x/y"} }, "model.init_from", "scheme"},
		{"bad bucket", func(s *Spec) { s.Data.Path = "s3://A_B/x" }, "data.path", "bucket"},
		{"no data", func(s *Spec) { s.Data.Path = "" }, "data.path", "required"},
		{"seq_len zero", func(s *Spec) { s.Data.SeqLen = 0 }, "data.seq_len", "at least 1"},
		{"seq_len not split by sp", func(s *Spec) { s.Data.SeqLen = 127 }, "data.seq_len", "multiple of parallel.sp"},
		{"slice shorter than halo", func(s *Spec) { s.Data.SeqLen = 4; s.Parallel.SP = 4 }, "data.seq_len", "d_conv-1"},
		{"dp zero", func(s *Spec) { s.Parallel.DP = 0 }, "parallel.dp", "at least 1"},
		{"world too big", func(s *Spec) { s.Parallel.DP = 1 << 10; s.Parallel.SP = 1 << 10 }, "parallel", "exceeds"},
		{"sp mode", func(s *Spec) { s.Parallel.SPMode = "ring" }, "parallel.sp_mode", "sequential, prefix"},
		{"allreduce dtype", func(s *Spec) { s.Parallel.AllReduceDType = "fp8" }, "parallel.allreduce_dtype", "float32, bf16"},
		{"bf16 all-reduce with zero1", func(s *Spec) { s.Parallel.AllReduceDType = AllReduceBF16; s.Parallel.Zero1 = true }, "parallel.allreduce_dtype", "zero1"},
		{"global batch", func(s *Spec) { s.Batch.GlobalBatch = 12 }, "batch.global_batch", "multiple of micro_batch·dp"},
		{"lr zero", func(s *Spec) { s.Optimizer.LR = 0 }, "optimizer.lr", "(0, 10]"},
		{"beta one", func(s *Spec) { s.Optimizer.Betas[1] = 1 }, "optimizer.betas[1]", "[0, 1)"},
		{"eps negative", func(s *Spec) { s.Optimizer.Eps = -1 }, "optimizer.eps", "finite"},
		{"weight decay", func(s *Spec) { s.Optimizer.WeightDecay = -0.1 }, "optimizer.weight_decay", "[0, 10]"},
		{"total steps", func(s *Spec) { s.Schedule.TotalSteps = 0 }, "schedule.total_steps", "at least 1"},
		{"warmup beyond total", func(s *Spec) { s.Schedule.WarmupSteps = 500 }, "schedule.warmup_steps", "must not exceed total_steps"},
		{"min_lr above lr", func(s *Spec) { s.Schedule.MinLR = 1 }, "schedule.min_lr", "[0, optimizer.lr"},
		{"precision", func(s *Spec) { s.Precision = "fp16" }, "precision", "float32, bf16"},
		{"bf16 on cpu", func(s *Spec) { s.Precision = PrecisionBF16 }, "precision", "bf16 needs backend"},
		{"backend", func(s *Spec) { s.Backend = "tpu" }, "backend", "cpu, cuda, auto"},
		{"keep without location", func(s *Spec) { s.Checkpoint.Location = "" }, "checkpoint.location", "required"},
		{"keep zero", func(s *Spec) { s.Checkpoint.Keep = -1 }, "checkpoint.keep", "at least 1"},
		{"restarts", func(s *Spec) { n := -1; s.MaxRestarts = &n }, "max_restarts", "at least 0"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Parse(loadDemo(t))
			if err != nil {
				t.Fatal(err)
			}
			tc.edit(s)
			err = s.Validate()
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Validate = %v, want ErrInvalid", err)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("no FieldError in %v", err)
			}
			if fe.Field != tc.field || !strings.Contains(fe.Rule, tc.inRule) {
				t.Errorf("first error = %q (field %q), want field %q with rule containing %q", err, fe.Field, tc.field, tc.inRule)
			}
		})
	}
}

func TestDecodeRejects(t *testing.T) {
	demo := string(loadDemo(t))
	cases := []struct {
		name string
		doc  string
		want string
	}{
		{"empty", "  \n", "empty document"},
		{"unknown top-level field", demo + "colour: red\n", "field colour not found"},
		{"unknown nested field", strings.Replace(demo, "  seq_len: 128", "  seq_len: 128\n  shuffle: true", 1), "field shuffle not found"},
		{"wrong type", strings.Replace(demo, "seed: 42", "seed: many", 1), "cannot unmarshal"},
		{"two documents", demo + "---\nname: other\n", "more than one YAML document"},
		{"too large", demo + "#" + strings.Repeat("x", MaxSpecBytes) + "\n", "exceeds the limit"},
		{"not a mapping", "- a\n- b\n", "cannot unmarshal"},
		{"syntax", "name: [unclosed\n", "malformed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc))
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Parse = %v, want ErrMalformed", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestValidateReportsEveryViolation(t *testing.T) {
	s, err := Parse(loadDemo(t))
	if err != nil {
		t.Fatal(err)
	}
	s.Name = "X"
	s.Backend = "tpu"
	s.Schedule.TotalSteps = 0
	err = s.Validate()
	for _, f := range []string{"jobspec: name:", "jobspec: backend:", "jobspec: schedule.total_steps:"} {
		if err == nil || !strings.Contains(err.Error(), f) {
			t.Errorf("error %v does not name %q", err, f)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add(loadDemo(f))
	f.Add(loadMQAR(f))
	f.Add([]byte("name: a\nmodel: {init_from: s3://bkt/x}\ndata: {path: /d, seq_len: 8}\nschedule: {total_steps: 1}\n"))
	f.Add([]byte("&a [*a, *a]"))
	f.Add([]byte("name: !!binary AAAA\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		s, err := Parse(doc)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v wraps neither ErrMalformed nor ErrInvalid", err)
			}
			return
		}
		// An accepted spec survives a round trip unchanged.
		out, err := s.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		back, err := Parse(out)
		if err != nil {
			t.Fatalf("accepted spec does not re-parse: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(s, back) {
			t.Fatalf("round trip differs:\n%+v\n%+v", s, back)
		}
	})
}
