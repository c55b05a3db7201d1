package metrics

import (
	"bytes"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestWriteRead(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Header{Job: "mqar-a", Labels: map[string]string{"d_state": "64"}})
	if err != nil {
		t.Fatal(err)
	}
	recs := []Record{
		{Kind: KindEval, Step: 0, Accuracy: 0, Correct: 0, Answers: 64},
		{Kind: KindTrain, Step: 1, TotalSteps: 2, Loss: 4.5, LR: 1e-3, GradNorm: 2, Tokens: 128, TokensPerSec: 1000, ElapsedSec: 0.1},
		{Kind: KindTrain, Step: 2, TotalSteps: 2, Loss: 4.25, LR: 5e-4, GradNorm: 1.5, Tokens: 128, TokensPerSec: 1100, ElapsedSec: 0.2},
		{Kind: KindEval, Step: 2, Accuracy: 0.25, Correct: 16, Answers: 64, Loss: 3.9},
	}
	for _, r := range recs {
		if err := w.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(buf.String(), "\n"); n != 5 {
		t.Errorf("%d lines, want a header and 4 records:\n%s", n, buf.String())
	}
	h, err := Read(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if h.Header.Format != Format || h.Header.Version != Version || h.Header.Job != "mqar-a" || h.Header.Labels["d_state"] != "64" {
		t.Errorf("header = %+v", h.Header)
	}
	if !reflect.DeepEqual(h.Train, recs[1:3]) || !reflect.DeepEqual(h.Eval, []Record{recs[0], recs[3]}) {
		t.Errorf("read back:\ntrain %+v\neval  %+v", h.Train, h.Eval)
	}
}

func TestWriteRefuses(t *testing.T) {
	w, err := NewWriter(&bytes.Buffer{}, Header{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []Record{
		{Kind: "debug", Step: 1},
		{Kind: KindTrain, Step: -1},
		{Kind: KindTrain, Step: 1, Loss: math.NaN()},
		{Kind: KindTrain, Step: 1, GradNorm: math.Inf(1)},
		{Kind: KindEval, Step: 1, Accuracy: 1.5},
	} {
		if err := w.Write(r); !errors.Is(err, ErrFormat) {
			t.Errorf("Write(%+v) = %v, want ErrFormat", r, err)
		}
	}
}

// TestAppendResumes: a resumed run appends to its history after a torn
// line; the steps it repeats replace the first run's.
func TestAppendResumes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.jsonl")
	w, err := Append(path, Header{Job: "a"})
	if err != nil {
		t.Fatal(err)
	}
	for s := 1; s <= 3; s++ {
		if err := w.Write(Record{Kind: KindTrain, Step: s, Loss: float64(10 - s)}); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"kind":"train","st`) // a write cut short by a crash
	f.Close()
	if h, err := ReadFile(path); err != nil || len(h.Train) != 3 {
		t.Fatalf("ReadFile with a torn last line = %+v, %v; want 3 records", h, err)
	}
	w, err = Append(path, Header{Job: "ignored"})
	if err != nil {
		t.Fatal(err)
	}
	for s := 3; s <= 4; s++ {
		if err := w.Write(Record{Kind: KindTrain, Step: s, Loss: float64(20 - s)}); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	h, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var losses []float64
	for _, r := range h.Train {
		losses = append(losses, r.Loss)
	}
	if h.Header.Job != "a" || !reflect.DeepEqual(losses, []float64{9, 8, 17, 16}) {
		t.Errorf("after resume: job %q, losses %v; want job a, losses [9 8 17 16]", h.Header.Job, losses)
	}
}

func TestReadRejects(t *testing.T) {
	hdr := `{"format":"m2train-metrics","version":1}` + "\n"
	for _, tc := range []struct{ name, doc, msg string }{
		{"empty", "", "empty file"},
		{"not a history", `{"step":1}` + "\n", "not a m2train-metrics header"},
		{"future version", `{"format":"m2train-metrics","version":2}` + "\n", "version 2"},
		{"bad middle line", hdr + "{oops\n" + `{"kind":"train","step":1}` + "\n", "line 2"},
		{"bad value", hdr + `{"kind":"eval","step":1,"accuracy":2}` + "\n", "line 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Read(strings.NewReader(tc.doc))
			if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Read = %v, want ErrFormat mentioning %q", err, tc.msg)
			}
		})
	}
	// Unknown kinds and blank lines are skipped.
	h, err := Read(strings.NewReader(hdr + "\n" + `{"kind":"profile","step":1}` + "\n" + `{"kind":"train","step":1,"loss":2}` + "\n"))
	if err != nil || len(h.Train) != 1 || h.Train[0].Loss != 2 {
		t.Errorf("Read with an unknown kind = %+v, %v", h, err)
	}
	// A header without its newline is a history without records; Append
	// ends the line before it writes.
	path := filepath.Join(t.TempDir(), "h.jsonl")
	os.WriteFile(path, []byte(strings.TrimSuffix(hdr, "\n")), 0o644)
	if h, err := ReadFile(path); err != nil || len(h.Train) != 0 {
		t.Errorf("ReadFile of a bare header = %+v, %v", h, err)
	}
	w, err := Append(path, Header{})
	if err != nil {
		t.Fatal(err)
	}
	w.Write(Record{Kind: KindTrain, Step: 1, Loss: 1})
	w.Close()
	if h, err := ReadFile(path); err != nil || len(h.Train) != 1 {
		t.Errorf("ReadFile after appending to a bare header = %+v, %v", h, err)
	}
	path = filepath.Join(t.TempDir(), "x.jsonl")
	os.WriteFile(path, []byte("step 1/2 loss 3\n"), 0o644)
	if _, err := Append(path, Header{}); !errors.Is(err, ErrFormat) {
		t.Errorf("Append to a file that is not a history = %v, want ErrFormat", err)
	}
}

// FuzzRead: Read never panics, and what it accepts holds only valid
// records, each kind in step order.
func FuzzRead(f *testing.F) {
	hdr := `{"format":"m2train-metrics","version":1,"job":"j"}` + "\n"
	f.Add([]byte(hdr + `{"kind":"train","step":1,"loss":2}` + "\n" + `{"kind":"eval","step":1,"accuracy":0.5}`))
	f.Add([]byte(hdr + "\n\n" + `{"kind":"train","step":3}` + "\n" + `{"kind":"train","step":2,"lr":1e-3}` + "\n"))
	f.Add([]byte("step 1/2 loss 3\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		h, err := Read(bytes.NewReader(doc))
		if err != nil {
			return
		}
		for _, recs := range [][]Record{h.Train, h.Eval} {
			for i, r := range recs {
				if err := r.check(); err != nil {
					t.Fatalf("accepted record %+v: %v", r, err)
				}
				if i > 0 && recs[i-1].Step >= r.Step {
					t.Fatalf("records out of step order: %d then %d", recs[i-1].Step, r.Step)
				}
			}
		}
	})
}
