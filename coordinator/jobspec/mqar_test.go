package jobspec

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
)

func loadMQAR(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/mqar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseMQARDefaults(t *testing.T) {
	s, err := Parse(loadMQAR(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	q := s.Data.MQAR
	if q == nil || s.Data.Path != "" {
		t.Fatalf("data = %+v, want mqar without a path", s.Data)
	}
	if q.VocabSize != 8192 || q.NumPairs != 64 || q.NumQueries != 64 || q.QueryPower != DefaultMQARQueryPower {
		t.Errorf("mqar after defaults = %+v", q)
	}
	if q.Seed == nil || *q.Seed != 7 {
		t.Errorf("mqar seed = %v, want the spec's seed 7", q.Seed)
	}

	// An explicit seed, 0 included, is kept rather than replaced.
	doc := strings.Replace(string(loadMQAR(t)), "    num_pairs: 64\n", "    num_pairs: 64\n    num_queries: 16\n    seed: 0\n    query_power: 1\n", 1)
	s, err = Parse([]byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if q := s.Data.MQAR; q.Seed == nil || *q.Seed != 0 || q.NumQueries != 16 || q.QueryPower != 1 {
		t.Errorf("explicit mqar fields = %+v (seed %v)", q, q.Seed)
	}
}

func TestMQARRoundTripAndClone(t *testing.T) {
	s, err := Parse(loadMQAR(t))
	if err != nil {
		t.Fatal(err)
	}
	out, err := s.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "path:") {
		t.Errorf("an mqar spec marshals an empty data.path:\n%s", out)
	}
	back, err := Parse(out)
	if err != nil {
		t.Fatalf("Parse(Marshal): %v\n%s", err, out)
	}
	if !reflect.DeepEqual(s, back) {
		t.Errorf("round trip differs:\n%+v\n%+v", s.Data.MQAR, back.Data.MQAR)
	}
	c := s.Clone()
	if !reflect.DeepEqual(c, s) || c.Data.MQAR == s.Data.MQAR || c.Data.MQAR.Seed == s.Data.MQAR.Seed {
		t.Errorf("Clone does not copy data.mqar deeply")
	}
}

// TestValidateMQARRules changes one field of the MQAR spec per case and
// checks that the error names that field and states the rule.
func TestValidateMQARRules(t *testing.T) {
	cases := []struct {
		name   string
		edit   func(*Spec)
		field  string
		inRule string
	}{
		{"path and mqar", func(s *Spec) { s.Data.Path = "/data" }, "data", "got both"},
		{"vocab too small", func(s *Spec) { s.Data.MQAR.VocabSize = 3 }, "data.mqar.vocab_size", "at least 4"},
		{"vocab above the model's", func(s *Spec) { s.Data.MQAR.VocabSize = 8194 }, "data.mqar.vocab_size", "model.config.vocab_size = 8192"},
		{"no pairs", func(s *Spec) { s.Data.MQAR.NumPairs = 0 }, "data.mqar.num_pairs", "at least 1"},
		{"more pairs than keys", func(s *Spec) { s.Data.MQAR.VocabSize = 16; s.Data.MQAR.NumPairs = 8; s.Data.MQAR.NumQueries = 1 }, "data.mqar.num_pairs", "vocab_size/2 - 1 = 7"},
		{"negative queries", func(s *Spec) { s.Data.MQAR.NumQueries = -1 }, "data.mqar.num_queries", "at least 1"},
		{"more queries than pairs", func(s *Spec) { s.Data.MQAR.NumQueries = 65 }, "data.mqar.num_queries", "at most num_pairs = 64"},
		{"power zero", func(s *Spec) { s.Data.MQAR.QueryPower = 0 }, "data.mqar.query_power", "(0, 1]"},
		{"power above one", func(s *Spec) { s.Data.MQAR.QueryPower = 1.5 }, "data.mqar.query_power", "(0, 1]"},
		{"sequence too short", func(s *Spec) { s.Data.SeqLen = 255 }, "data.seq_len", "2·num_pairs + 2·num_queries = 256"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Parse(loadMQAR(t))
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

// TestMQARWithInitFrom: a pretrained model's vocabulary is not known to the
// spec, so only the task's own rules apply.
func TestMQARWithInitFrom(t *testing.T) {
	doc := "name: a\nmodel: {init_from: /m}\ndata: {mqar: {vocab_size: 64, num_pairs: 8}, seq_len: 32}\nschedule: {total_steps: 1}\n"
	s, err := Parse([]byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if s.Data.MQAR.NumQueries != 8 || *s.Data.MQAR.Seed != 0 {
		t.Errorf("mqar = %+v", s.Data.MQAR)
	}
}
