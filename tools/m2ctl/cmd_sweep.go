package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/worker/data/mqar"
	"github.com/m2train/m2train/worker/metrics"
	"github.com/m2train/m2train/worker/train"
)

func init() { root.AddCommand(newSweepCmd()) }

func newSweepCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "sweep", Short: "Run a grid of training jobs and tabulate the results"}
	cmd.AddCommand(newSweepMQARCmd())
	return cmd
}

// mqarSweep is the grid and the fixed settings of `m2ctl sweep mqar`.
type mqarSweep struct {
	out                       string
	seqLens, dModels, dStates []int
	lrs                       []float64
	nLayer, headDim, chunk    int
	vocab, pairs, queries     int
	steps, warmup, batch      int
	evalSamples, evalEvery    int
	weightDecay, gradClip     float64
	seed                      uint64
	backend, precision        string
	dryRun                    bool
}

func newSweepMQARCmd() *cobra.Command {
	s := &mqarSweep{}
	cmd := &cobra.Command{
		Use:   "mqar --out DIR [--steps N] [--backend auto|cpu|cuda] [--dry-run]",
		Short: "Train the MQAR grid of the Mamba-2 paper: accuracy against width for several state sizes",
		Long: `Writes one job spec per point of a grid (sequence lengths × d_model × d_state ×
learning rates, all on the built-in MQAR task, docs/mqar.md), trains each point
for a fixed number of steps, evaluates its final checkpoint on held-out
sequences, and collects the results:

  DIR/specs/NAME.yaml         the job spec of each point (m2ctl job submit takes it)
  DIR/metrics/NAME.jsonl      its metrics history; DIR/plots/NAME.{png,svg} its curves
  DIR/checkpoints/NAME/       its checkpoints (step-N, Hugging Face directories)
  DIR/results/NAME.json       its result
  DIR/results.csv, .md        one row per point
  DIR/sweep.{png,svg}         accuracy against d_model, one line per d_state,
                              one panel per sequence length (best learning rate)

The default grid is the paper's: sequence lengths 256 and 512, d_model 64 and
128, d_state 16, 64 and 256, two layers, vocabulary 8192 and seq_len/4
key-value pairs. Points whose result exists for the same spec are not trained
again, so an interrupted sweep continues where it stopped. --dry-run writes the
specs and lists the grid without training.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return s.run(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&s.out, "out", "", "output directory (required)")
	f.IntSliceVar(&s.seqLens, "seq-lens", []int{256, 512}, "sequence lengths")
	f.IntSliceVar(&s.dModels, "d-models", []int{64, 128}, "model widths d_model")
	f.IntSliceVar(&s.dStates, "d-states", []int{16, 64, 256}, "state sizes d_state")
	f.Float64SliceVar(&s.lrs, "lrs", []float64{1e-3}, "peak learning rates; the plot takes each point's best")
	f.IntVar(&s.nLayer, "n-layer", 2, "layers")
	f.IntVar(&s.headDim, "headdim", 32, "head dimension P")
	f.IntVar(&s.chunk, "chunk-size", 64, "SSD chunk length Q")
	f.IntVar(&s.vocab, "vocab-size", 8192, "MQAR vocabulary")
	f.IntVar(&s.pairs, "num-pairs", 0, "key-value pairs per sequence; 0 = seq_len/4")
	f.IntVar(&s.queries, "num-queries", 0, "queries per sequence; 0 = num-pairs")
	f.IntVar(&s.steps, "steps", 2000, "optimizer steps per point")
	f.IntVar(&s.warmup, "warmup-steps", -1, "linear warmup steps; -1 = steps/10")
	f.IntVar(&s.batch, "batch", 64, "sequences per step")
	f.Float64Var(&s.weightDecay, "weight-decay", 0.1, "AdamW weight decay")
	f.Float64Var(&s.gradClip, "grad-clip", 1, "max gradient norm; 0 = off")
	f.IntVar(&s.evalSamples, "eval-samples", 1000, "held-out sequences for each point's final accuracy")
	f.IntVar(&s.evalEvery, "eval-every", 200, "steps between held-out accuracy checks during training (on at most 128 sequences); 0 = only at the end")
	f.Uint64Var(&s.seed, "seed", 1, "initialisation and task seed")
	f.StringVar(&s.backend, "backend", jobspec.BackendAuto, "auto, cpu or cuda")
	f.StringVar(&s.precision, "precision", jobspec.PrecisionFloat32, "float32, or bf16 (activations and products on the GPU; needs --backend cuda or auto)")
	f.BoolVar(&s.dryRun, "dry-run", false, "write the specs and list the grid without training")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

// sweepPointSpec is one point of the grid.
type sweepPointSpec struct {
	Name                   string
	SeqLen, DModel, DState int
	LR                     float64
	Spec                   *jobspec.Spec
	SpecYAML               []byte
}

// validate checks the flags that the job spec does not check itself.
func (s *mqarSweep) validate() error {
	for _, l := range []struct {
		flag string
		v    []int
	}{{"--seq-lens", s.seqLens}, {"--d-models", s.dModels}, {"--d-states", s.dStates}} {
		if len(l.v) == 0 {
			return usagef("%s: needs at least one value", l.flag)
		}
		seen := map[int]bool{}
		for _, x := range l.v {
			if x < 1 || seen[x] {
				return usagef("%s: values must be positive and distinct, got %v", l.flag, l.v)
			}
			seen[x] = true
		}
	}
	if len(s.lrs) == 0 {
		return usagef("--lrs: needs at least one value")
	}
	if s.warmup < -1 {
		return usagef("--warmup-steps: must be -1 (steps/10) or at least 0, got %d", s.warmup)
	}
	if s.evalSamples < 1 {
		return usagef("--eval-samples: must be at least 1, got %d", s.evalSamples)
	}
	if s.evalEvery < 0 {
		return usagef("--eval-every: must be at least 0, got %d", s.evalEvery)
	}
	if s.pairs < 0 || s.queries < 0 {
		return usagef("--num-pairs and --num-queries: must be at least 0 (0 = the default), got %d and %d", s.pairs, s.queries)
	}
	return nil
}

// lrName renders a learning rate for a DNS-label job name: 0.001 -> 1e-03,
// 0.0015 -> 1p5e-03.
func lrName(lr float64) string {
	return strings.ReplaceAll(strconv.FormatFloat(lr, 'e', -1, 64), ".", "p")
}

// points builds and validates the spec of every grid point.
func (s *mqarSweep) points() ([]sweepPointSpec, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	var out []sweepPointSpec
	for _, L := range s.seqLens {
		for _, D := range s.dModels {
			for _, N := range s.dStates {
				for _, lr := range s.lrs {
					name := fmt.Sprintf("mqar-l%d-d%d-n%d", L, D, N)
					if len(s.lrs) > 1 {
						name += "-lr" + lrName(lr)
					}
					spec, doc, err := s.pointSpec(name, L, D, N, lr)
					if err != nil {
						return nil, err
					}
					out = append(out, sweepPointSpec{Name: name, SeqLen: L, DModel: D, DState: N, LR: lr, Spec: spec, SpecYAML: doc})
				}
			}
		}
	}
	return out, nil
}

func (s *mqarSweep) pointSpec(name string, L, D, N int, lr float64) (*jobspec.Spec, []byte, error) {
	pairs := s.pairs
	if pairs == 0 {
		pairs = L / 4
	}
	warmup := s.warmup
	if warmup < 0 {
		warmup = s.steps / 10
	}
	spec := &jobspec.Spec{
		Name: name,
		Model: jobspec.Model{Config: &jobspec.ModelConfig{
			DModel: D, NLayer: s.nLayer, VocabSize: model.PadVocab(s.vocab, 16), DState: N,
			HeadDim: s.headDim, ChunkSize: s.chunk,
		}},
		Data:      jobspec.Data{MQAR: &jobspec.MQAR{VocabSize: s.vocab, NumPairs: pairs, NumQueries: s.queries}, SeqLen: L},
		Batch:     jobspec.Batch{MicroBatch: s.batch, GlobalBatch: s.batch},
		Optimizer: jobspec.Optimizer{LR: lr, WeightDecay: s.weightDecay, GradClip: s.gradClip},
		Schedule:  jobspec.Schedule{WarmupSteps: warmup, TotalSteps: s.steps, MinLR: lr / 10},
		Checkpoint: jobspec.Checkpoint{
			Location: filepath.Join(s.out, "checkpoints"), EverySteps: max(1, s.steps), Keep: 1,
		},
		Seed:      s.seed,
		Backend:   s.backend,
		Precision: s.precision,
	}
	spec.Normalize()
	if err := spec.Validate(); err != nil {
		return nil, nil, usageError{fmt.Errorf("grid point %s: %w", name, err)}
	}
	doc, err := spec.Marshal()
	if err != nil {
		return nil, nil, err
	}
	header := fmt.Sprintf("# MQAR sweep point: seq_len %d, d_model %d, d_state %d, lr %g (m2ctl sweep mqar).\n", L, D, N, lr)
	return spec, append([]byte(header), doc...), nil
}

// sweepResult is the outcome of one point: DIR/results/NAME.json and one
// row of the tables.
type sweepResult struct {
	Name       string  `json:"name"`
	SpecSHA256 string  `json:"spec_sha256"`
	SeqLen     int     `json:"seq_len"`
	DModel     int     `json:"d_model"`
	DState     int     `json:"d_state"`
	NLayer     int     `json:"n_layer"`
	VocabSize  int     `json:"vocab_size"`
	NumPairs   int     `json:"num_pairs"`
	NumQueries int     `json:"num_queries"`
	LR         float64 `json:"lr"`
	Steps      int     `json:"steps"`
	Params     int     `json:"params"`
	FinalLoss  float64 `json:"final_loss"`
	EvalLoss   float64 `json:"eval_loss"`
	Accuracy   float64 `json:"accuracy"`
	Correct    int     `json:"correct"`
	Answers    int     `json:"answers"`
	Seconds    float64 `json:"seconds"`
	Backend    string  `json:"backend"`
	Checkpoint string  `json:"checkpoint"`
}

func (s *mqarSweep) run(ctx context.Context, stdout, log io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	switch s.backend {
	case jobspec.BackendCPU, jobspec.BackendAuto, jobspec.BackendCUDA:
	default:
		return usagef("--backend: must be auto, cpu or cuda, got %q", s.backend)
	}
	pts, err := s.points()
	if err != nil {
		return err
	}
	for _, d := range []string{"specs", "metrics", "results", "plots", "checkpoints"} {
		if err := os.MkdirAll(filepath.Join(s.out, d), 0o755); err != nil {
			return err
		}
	}
	for _, p := range pts {
		if err := writeFileAtomic(s.specPath(p), bytes.NewReader(p.SpecYAML)); err != nil {
			return err
		}
	}
	if s.dryRun {
		fmt.Fprintf(stdout, "%d grid points; specs in %s\n", len(pts), filepath.Join(s.out, "specs"))
		for _, p := range pts {
			cfg := train.ModelConfig(p.Spec.Model.Config)
			fmt.Fprintf(stdout, "%-32s seq_len %-5d d_model %-4d d_state %-4d lr %-7g %d parameters\n",
				p.Name, p.SeqLen, p.DModel, p.DState, p.LR, model.NewLayout(cfg).Total)
		}
		return nil
	}
	var results []sweepResult
	for i, p := range pts {
		sum := sha256.Sum256(p.SpecYAML)
		digest := hex.EncodeToString(sum[:])
		if r, err := readSweepResult(s.resultPath(p)); err == nil && r.SpecSHA256 == digest {
			fmt.Fprintf(log, "[%d/%d] %s: done before, accuracy %.4f\n", i+1, len(pts), p.Name, r.Accuracy)
			results = append(results, r)
			continue
		} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		fmt.Fprintf(log, "[%d/%d] %s: seq_len %d, d_model %d, d_state %d, lr %g, %d steps\n", i+1, len(pts), p.Name, p.SeqLen, p.DModel, p.DState, p.LR, s.steps)
		r, err := s.runPoint(ctx, p, log)
		if err != nil {
			return fmt.Errorf("%s: %w", p.Name, err)
		}
		r.SpecSHA256 = digest
		if err := writeJSONFile(s.resultPath(p), r); err != nil {
			return err
		}
		fmt.Fprintf(log, "[%d/%d] %s: accuracy %.4f (%d/%d), final loss %.4f, %.1fs\n", i+1, len(pts), p.Name, r.Accuracy, r.Correct, r.Answers, r.FinalLoss, r.Seconds)
		results = append(results, r)
		if err := s.writeTables(results); err != nil {
			return err
		}
	}
	if err := s.writeTables(results); err != nil {
		return err
	}
	rows := make([]sweepPoint, len(results))
	for i, r := range results {
		rows[i] = sweepPoint{SeqLen: r.SeqLen, DModel: r.DModel, DState: r.DState, Accuracy: r.Accuracy}
	}
	files, err := saveSweepPlot(rows, filepath.Join(s.out, "sweep"))
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s\n%s\n%s\n", filepath.Join(s.out, "results.csv"), filepath.Join(s.out, "results.md"), strings.Join(files, "\n"))
	return nil
}

func (s *mqarSweep) specPath(p sweepPointSpec) string {
	return filepath.Join(s.out, "specs", p.Name+".yaml")
}

func (s *mqarSweep) resultPath(p sweepPointSpec) string {
	return filepath.Join(s.out, "results", p.Name+".json")
}

// runPoint trains one point from scratch through runTraining (the code of
// `m2ctl train`, on the backend of --backend), then scores its final
// checkpoint on the held-out stream on the CPU through the code of
// `m2ctl eval mqar`.
func (s *mqarSweep) runPoint(ctx context.Context, p sweepPointSpec, log io.Writer) (sweepResult, error) {
	start := time.Now()
	task, err := mqar.ConfigFromSpec(p.Spec)
	if err != nil {
		return sweepResult{}, err
	}
	hdr := metrics.Header{Job: p.Name, Labels: map[string]string{
		"seq_len": strconv.Itoa(p.SeqLen), "d_model": strconv.Itoa(p.DModel), "d_state": strconv.Itoa(p.DState),
		"lr": strconv.FormatFloat(p.LR, 'g', -1, 64), "task": "mqar",
	}}
	mpath := filepath.Join(s.out, "metrics", p.Name+".jsonl")
	mf, err := os.Create(mpath)
	if err != nil {
		return sweepResult{}, err
	}
	defer mf.Close()
	mw, err := metrics.NewWriter(mf, hdr)
	if err != nil {
		return sweepResult{}, err
	}
	// A point without a result starts over: checkpoints left by an
	// interrupted run, or by a run of another spec under the same name,
	// must neither be resumed nor outrank the new run's.
	if err := os.RemoveAll(filepath.Join(s.out, "checkpoints", p.Name)); err != nil {
		return sweepResult{}, err
	}
	tr, err := runTraining(ctx, p.Spec, trainOptions{Metrics: mw, EvalEvery: s.evalEvery, EvalSamples: min(s.evalSamples, 128)}, log)
	if err != nil {
		return sweepResult{}, err
	}
	if tr.Checkpoint == "" {
		return sweepResult{}, fmt.Errorf("training left no checkpoint in %s", p.Spec.Checkpoint.Location)
	}
	if err := mf.Close(); err != nil {
		return sweepResult{}, err
	}
	if _, err := saveCurvesFrom(mpath, filepath.Join(s.out, "plots", p.Name)); err != nil {
		return sweepResult{}, err
	}
	m, err := loadCheckpointModel[float32](tr.Checkpoint)
	if err != nil {
		return sweepResult{}, err
	}
	gen, err := mqar.New(task)
	if err != nil {
		return sweepResult{}, err
	}
	ev, err := evalMQAR(ctx, m, gen, mqar.Eval, s.evalSamples, 0)
	if err != nil {
		return sweepResult{}, err
	}
	c := p.Spec.Model.Config
	return sweepResult{
		Name: p.Name, SeqLen: p.SeqLen, DModel: p.DModel, DState: p.DState, NLayer: c.NLayer,
		VocabSize: task.VocabSize, NumPairs: task.NumPairs, NumQueries: task.NumQueries, LR: p.LR,
		Steps: tr.Steps, Params: m.Layout().Total, FinalLoss: tr.FinalLoss, EvalLoss: ev.Loss,
		Accuracy: ev.Accuracy, Correct: ev.Correct, Answers: ev.Answers,
		Seconds: math.Round(time.Since(start).Seconds()*10) / 10, Backend: tr.Backend, Checkpoint: tr.Checkpoint,
	}, nil
}

func saveCurvesFrom(metricsPath, prefix string) ([]string, error) {
	h, err := metrics.ReadFile(metricsPath)
	if err != nil {
		return nil, err
	}
	return saveCurves(h, h.Header.Job, prefix)
}

func readSweepResult(path string) (sweepResult, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return sweepResult{}, err
	}
	var r sweepResult
	if err := json.Unmarshal(b, &r); err != nil {
		return sweepResult{}, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

func writeJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(path, bytes.NewReader(append(b, '\n')))
}

// sweepColumns are the columns of results.csv.
var sweepColumns = []string{"name", "seq_len", "d_model", "d_state", "n_layer", "vocab_size", "num_pairs", "num_queries",
	"lr", "steps", "params", "final_loss", "eval_loss", "accuracy", "correct", "answers", "seconds", "backend"}

// writeTables writes results.csv (every column) and results.md (the
// columns a reader compares) for the results so far.
func (s *mqarSweep) writeTables(results []sweepResult) error {
	var cb bytes.Buffer
	w := csv.NewWriter(&cb)
	_ = w.Write(sweepColumns)
	g := func(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }
	for _, r := range results {
		_ = w.Write([]string{r.Name, strconv.Itoa(r.SeqLen), strconv.Itoa(r.DModel), strconv.Itoa(r.DState), strconv.Itoa(r.NLayer),
			strconv.Itoa(r.VocabSize), strconv.Itoa(r.NumPairs), strconv.Itoa(r.NumQueries), g(r.LR), strconv.Itoa(r.Steps),
			strconv.Itoa(r.Params), strconv.FormatFloat(r.FinalLoss, 'f', 4, 64), strconv.FormatFloat(r.EvalLoss, 'f', 4, 64),
			strconv.FormatFloat(r.Accuracy, 'f', 4, 64), strconv.Itoa(r.Correct), strconv.Itoa(r.Answers), g(r.Seconds), r.Backend})
	}
	w.Flush()
	if err := w.Error(); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(s.out, "results.csv"), &cb); err != nil {
		return err
	}
	var mb bytes.Buffer
	fmt.Fprintf(&mb, "| seq_len | d_model | d_state | lr | accuracy | held-out loss | final training loss | steps | parameters |\n")
	fmt.Fprintf(&mb, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range results {
		fmt.Fprintf(&mb, "| %d | %d | %d | %g | %.4f | %.4f | %.4f | %d | %d |\n",
			r.SeqLen, r.DModel, r.DState, r.LR, r.Accuracy, r.EvalLoss, r.FinalLoss, r.Steps, r.Params)
	}
	return writeFileAtomic(filepath.Join(s.out, "results.md"), &mb)
}
