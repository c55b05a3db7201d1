// Package metrics owns the metrics history of a training run: a JSON Lines
// file whose first line is a Header and whose every later line is one
// Record, a training step's progress or an evaluation. Writers append and
// never rewrite, so a history survives a crash up to its last whole line and
// a resumed run extends the file it left; readers keep, per kind and step,
// the last record, so the steps a resumed run repeats replace the old ones.
// The format is specified in docs/mqar.md. The package depends on nothing
// but the standard library.
package metrics

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"sync"
)

// Format and Version identify a metrics history in its header.
const (
	Format  = "m2train-metrics"
	Version = 1
)

// Record kinds.
const (
	KindTrain = "train" // one optimizer step's progress
	KindEval  = "eval"  // one evaluation of the model after a step
)

// ErrFormat marks a file that is not a metrics history or breaks its rules.
var ErrFormat = errors.New("metrics: bad history")

// Header is the first line of a history.
type Header struct {
	Format  string `json:"format"`  // always Format
	Version int    `json:"version"` // always Version
	// Job names the run; Labels describe it (e.g. the model's width and
	// state size of a sweep point). Both are informative.
	Job    string            `json:"job,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Record is one line after the header. Fields that do not apply to the
// kind are left out of the line and read back as zero.
type Record struct {
	Kind string `json:"kind"` // KindTrain or KindEval
	Step int    `json:"step"` // optimizer steps done when the record was made

	// Loss is the mean training loss of the step (train) or the mean loss
	// over the evaluated answers (eval; 0 when not measured).
	Loss float64 `json:"loss,omitempty"`

	// Training progress.
	TotalSteps   int     `json:"total_steps,omitempty"`
	LR           float64 `json:"lr,omitempty"`
	GradNorm     float64 `json:"grad_norm,omitempty"`
	Tokens       int64   `json:"tokens,omitempty"` // counted target tokens of the step
	TokensPerSec float64 `json:"tokens_per_sec,omitempty"`
	ElapsedSec   float64 `json:"elapsed_s,omitempty"` // since the run (or its resumption) started

	// Evaluation: Correct of Answers answers right, Accuracy their ratio.
	Accuracy float64 `json:"accuracy,omitempty"`
	Correct  int     `json:"correct,omitempty"`
	Answers  int     `json:"answers,omitempty"`
}

// check returns an error naming the first rule r breaks.
func (r Record) check() error {
	if r.Kind != KindTrain && r.Kind != KindEval {
		return fmt.Errorf("%w: kind %q must be %q or %q", ErrFormat, r.Kind, KindTrain, KindEval)
	}
	if r.Step < 0 {
		return fmt.Errorf("%w: step %d must be >= 0", ErrFormat, r.Step)
	}
	for _, f := range []struct {
		name string
		v    float64
	}{{"loss", r.Loss}, {"lr", r.LR}, {"grad_norm", r.GradNorm}, {"tokens_per_sec", r.TokensPerSec}, {"elapsed_s", r.ElapsedSec}, {"accuracy", r.Accuracy}} {
		if math.IsNaN(f.v) || math.IsInf(f.v, 0) {
			return fmt.Errorf("%w: %s %s at step %d is not finite", ErrFormat, r.Kind, f.name, r.Step)
		}
	}
	if r.Accuracy < 0 || r.Accuracy > 1 {
		return fmt.Errorf("%w: accuracy %g at step %d must be in [0, 1]", ErrFormat, r.Accuracy, r.Step)
	}
	return nil
}

// Writer appends records to a history, one whole line per Write. It is
// safe for concurrent use.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
	c  io.Closer
}

// NewWriter writes h as the header of a new history on w and returns a
// writer for its records. Format and Version are filled in.
func NewWriter(w io.Writer, h Header) (*Writer, error) {
	h.Format, h.Version = Format, Version
	line, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("metrics: encode header: %w", err)
	}
	if _, err := w.Write(append(line, '\n')); err != nil {
		return nil, fmt.Errorf("metrics: write header: %w", err)
	}
	return &Writer{w: w}, nil
}

// Append opens the history at path for appending: a missing or empty file
// gets h as its header; an existing one must be a history (its header is
// kept, h is not written). A torn last line (one without its newline, as
// a crash mid-write leaves it) is cut off first.
func Append(path string, h Header) (*Writer, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("metrics: %w", err)
	}
	if st.Size() == 0 {
		w, err := NewWriter(f, h)
		if err != nil {
			f.Close()
			return nil, err
		}
		w.c = f
		return w, nil
	}
	if _, err := readHeader(bufio.NewReader(io.NewSectionReader(f, 0, st.Size()))); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := dropTornLine(f, st.Size()); err != nil {
		f.Close()
		return nil, fmt.Errorf("metrics: %s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		f.Close()
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return &Writer{w: f, c: f}, nil
}

// Write appends r as one line. A record that breaks a rule (an unknown
// kind, a negative step, a value that is not finite) is refused.
func (w *Writer) Write(r Record) error {
	if err := r.check(); err != nil {
		return err
	}
	line, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("metrics: encode record: %w", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.w.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("metrics: write record: %w", err)
	}
	return nil
}

// Close closes the file that Append opened; for NewWriter's writer it does
// nothing.
func (w *Writer) Close() error {
	if w.c == nil {
		return nil
	}
	return w.c.Close()
}

// History is a read history: its header and, per kind, the last record of
// every step in step order.
type History struct {
	Header Header
	Train  []Record
	Eval   []Record
}

// maxLine bounds one line of a history.
const maxLine = 1 << 20

func readHeader(br *bufio.Reader) (Header, error) {
	line, err := readLine(br)
	switch {
	case err == io.EOF:
		return Header{}, fmt.Errorf("%w: empty file", ErrFormat)
	case err != nil && err != io.ErrUnexpectedEOF: // a header without its newline still counts
		return Header{}, err
	}
	var h Header
	if err := json.Unmarshal(line, &h); err != nil || h.Format != Format {
		return Header{}, fmt.Errorf("%w: line 1 is not a %s header", ErrFormat, Format)
	}
	if h.Version != Version {
		return Header{}, fmt.Errorf("%w: version %d, this reader reads %d", ErrFormat, h.Version, Version)
	}
	return h, nil
}

// readLine returns the next line without its newline; a last line without
// one is returned with io.ErrUnexpectedEOF.
func readLine(br *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := br.ReadSlice('\n')
		buf = append(buf, chunk...)
		if len(buf) > maxLine {
			return nil, fmt.Errorf("%w: a line exceeds %d bytes", ErrFormat, maxLine)
		}
		switch {
		case err == nil:
			return bytes.TrimSuffix(buf, []byte{'\n'}), nil
		case err == bufio.ErrBufferFull:
			continue
		case err == io.EOF && len(buf) > 0:
			return buf, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

// Read reads a history. Blank lines and records of unknown kinds are
// skipped; a last line that is not whole (a write cut short) is ignored;
// any other line that is not a valid record is an error naming its number.
func Read(r io.Reader) (*History, error) {
	br := bufio.NewReader(r)
	h, err := readHeader(br)
	if err != nil {
		return nil, err
	}
	byStep := map[string]map[int]Record{KindTrain: {}, KindEval: {}}
	for n := 2; ; n++ {
		line, err := readLine(br)
		if err == io.EOF {
			break
		}
		torn := err == io.ErrUnexpectedEOF
		if err != nil && !torn {
			return nil, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var rec Record
		if jerr := json.Unmarshal(line, &rec); jerr != nil {
			if torn {
				break
			}
			return nil, fmt.Errorf("%w: line %d: %v", ErrFormat, n, jerr)
		}
		if _, known := byStep[rec.Kind]; !known {
			continue
		}
		if cerr := rec.check(); cerr != nil {
			return nil, fmt.Errorf("line %d: %w", n, cerr)
		}
		byStep[rec.Kind][rec.Step] = rec
		if torn {
			break
		}
	}
	sorted := func(m map[int]Record) []Record {
		out := make([]Record, 0, len(m))
		for _, r := range m {
			out = append(out, r)
		}
		slices.SortFunc(out, func(a, b Record) int { return a.Step - b.Step })
		return out
	}
	return &History{Header: h, Train: sorted(byStep[KindTrain]), Eval: sorted(byStep[KindEval])}, nil
}

// dropTornLine truncates f, of the given size, after its last newline.
func dropTornLine(f *os.File, size int64) error {
	const chunk = 4096
	end := size
	for end > 0 {
		start := max(0, end-chunk)
		buf := make([]byte, end-start)
		if _, err := f.ReadAt(buf, start); err != nil {
			return err
		}
		if i := bytes.LastIndexByte(buf, '\n'); i >= 0 {
			if keep := start + int64(i) + 1; keep != size {
				return f.Truncate(keep)
			}
			return nil
		}
		end = start
	}
	// No newline at all: the file is a whole header (Append has read it)
	// without its newline.
	_, err := f.WriteAt([]byte{'\n'}, size)
	return err
}

// ReadFile reads the history at path.
func ReadFile(path string) (*History, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	defer f.Close()
	h, err := Read(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}
