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
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/cli"
	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/worker/checkpoint"
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

	// cluster holds the flags of the cluster mode (--coordinator).
	cluster sweepCluster
	// changed reports whether a flag was given on the command line.
	changed func(name string) bool
}

// sweepCluster is the cluster mode's connection and scheduling settings:
// with coordinators set, the points run as jobs on that cluster.
type sweepCluster struct {
	coordinators     []string
	token, tokenFile string
	tls              security.Files
	tlsServer        string
	timeout          time.Duration
	checkpoints      string
	parallel         int
}

// on reports whether the sweep runs its points on a cluster.
func (c *sweepCluster) on() bool { return len(c.coordinators) > 0 }

// clusterFlags are the flags that only the cluster mode reads.
var clusterFlags = []string{"checkpoints", "parallel", "token", "token-file", "tls-cert", "tls-key", "tls-ca", "tls-server-name", "timeout"}

func newSweepMQARCmd() *cobra.Command {
	s := &mqarSweep{}
	cmd := &cobra.Command{
		Use:   "mqar --out DIR [--steps N] [--backend auto|cpu|cuda] [--coordinator ADDR] [--dry-run]",
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
key-value pairs, each point trained for 20,000 steps of 64 sequences at peak
learning rates 1e-2, 2e-2 and 4e-2 (docs/mqar.md §8 says why). Points whose
result exists for the same spec are not trained again, so an interrupted sweep
continues where it stopped. --dry-run writes the specs and lists the grid
without training.

Without --coordinator every point trains in this process, one after the
other. With --coordinator the points run as jobs on that cluster (on its GPU
workers when it has free ones, for --backend auto), --parallel at a time,
writing their checkpoints under --checkpoints/NAME/JOB-ID/ (an s3:// prefix or
a directory that the workers share with this machine); the sweep follows the
jobs, then loads each final checkpoint from there and scores it here. A job of
the same spec that is queued or running is waited on, not submitted again. A
failed job is reported and the others go on; the exit status is then 1.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s.changed = cmd.Flags().Changed
			return s.run(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&s.out, "out", "", "output directory (required)")
	f.IntSliceVar(&s.seqLens, "seq-lens", []int{256, 512}, "sequence lengths")
	f.IntSliceVar(&s.dModels, "d-models", []int{64, 128}, "model widths d_model")
	f.IntSliceVar(&s.dStates, "d-states", []int{16, 64, 256}, "state sizes d_state")
	f.Float64SliceVar(&s.lrs, "lrs", []float64{1e-2, 2e-2, 4e-2}, "peak learning rates; the plot takes each point's best (docs/mqar.md §8)")
	f.IntVar(&s.nLayer, "n-layer", 2, "layers")
	f.IntVar(&s.headDim, "headdim", 32, "head dimension P")
	f.IntVar(&s.chunk, "chunk-size", 64, "SSD chunk length Q")
	f.IntVar(&s.vocab, "vocab-size", 8192, "MQAR vocabulary")
	f.IntVar(&s.pairs, "num-pairs", 0, "key-value pairs per sequence; 0 = seq_len/4")
	f.IntVar(&s.queries, "num-queries", 0, "queries per sequence; 0 = num-pairs")
	f.IntVar(&s.steps, "steps", 20000, "optimizer steps per point")
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

	c := &s.cluster
	f.StringSliceVar(&c.coordinators, "coordinator", nil, "coordinator API addresses, any replica (comma-separated): run the points as jobs on that cluster")
	f.StringVar(&c.checkpoints, "checkpoints", "", "with --coordinator: where the jobs write checkpoints, an s3:// prefix or a directory the workers share (default: DIR/checkpoints, absolute)")
	f.IntVar(&c.parallel, "parallel", 4, "with --coordinator: jobs submitted and followed at once")
	f.StringVar(&c.token, "token", "", "with --coordinator: bearer token of the job API (default: env "+cli.EnvToken+")")
	f.StringVar(&c.tokenFile, "token-file", "", "with --coordinator: file holding the bearer token")
	f.StringVar(&c.tls.Cert, "tls-cert", "", "with --coordinator: client certificate (PEM) for mutual TLS")
	f.StringVar(&c.tls.Key, "tls-key", "", "with --coordinator: client key (PEM) for mutual TLS")
	f.StringVar(&c.tls.CA, "tls-ca", "", "with --coordinator: CA certificate (PEM) that signs the coordinator's certificate")
	f.StringVar(&c.tlsServer, "tls-server-name", "", "with --coordinator: expected server name in the coordinator's certificate (default: the dialed host)")
	f.DurationVar(&c.timeout, "timeout", 30*time.Second, "with --coordinator: how long each call keeps trying to reach the coordinator leader")
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
	switch s.backend {
	case jobspec.BackendCPU, jobspec.BackendAuto, jobspec.BackendCUDA:
	default:
		return usagef("--backend: must be auto, cpu or cuda, got %q", s.backend)
	}
	return s.validateCluster()
}

// validateCluster checks the cluster mode's flags, and that none of them
// is given without --coordinator.
func (s *mqarSweep) validateCluster() error {
	c := &s.cluster
	changed := s.changed
	if changed == nil {
		changed = func(string) bool { return false }
	}
	if !c.on() {
		if changed("coordinator") {
			return usagef("--coordinator: needs at least one address")
		}
		for _, name := range clusterFlags {
			if changed(name) {
				return usagef("--%s: only applies with --coordinator", name)
			}
		}
		return nil
	}
	for i, a := range c.coordinators {
		if strings.TrimSpace(a) == "" {
			return usagef("--coordinator: address %d is empty", i+1)
		}
	}
	if changed("eval-every") {
		return usagef("--eval-every: the workers do not evaluate during training; with --coordinator only the final checkpoint is scored (--eval-samples)")
	}
	if c.parallel < 1 {
		return usagef("--parallel: must be at least 1, got %d", c.parallel)
	}
	if c.timeout <= 0 {
		return usagef("--timeout: must be positive, got %v", c.timeout)
	}
	return nil
}

// checkpointLocation is where the cluster's jobs write their checkpoints:
// --checkpoints, a path made absolute (the workers run elsewhere), or
// DIR/checkpoints.
func (s *mqarSweep) checkpointLocation() (string, error) {
	loc := s.cluster.checkpoints
	if loc == "" {
		loc = filepath.Join(s.out, "checkpoints")
	}
	if strings.Contains(loc, "://") {
		return loc, nil
	}
	abs, err := filepath.Abs(loc)
	if err != nil {
		return "", usagef("--checkpoints: %v", err)
	}
	return abs, nil
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
	var loc string
	if s.cluster.on() {
		var err error
		if loc, err = s.checkpointLocation(); err != nil {
			return nil, err
		}
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
					spec, doc, err := s.pointSpec(name, L, D, N, lr, loc)
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

// pointSpec builds the spec of one point. clusterLoc is empty for the
// local mode, whose runs write DIR/checkpoints/NAME/step-N/; a job writes
// under clusterLoc/NAME/JOB-ID/, with a checkpoint every tenth of the
// steps so that a job restarted on another worker resumes instead of
// starting over.
func (s *mqarSweep) pointSpec(name string, L, D, N int, lr float64, clusterLoc string) (*jobspec.Spec, []byte, error) {
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
	if clusterLoc != "" {
		spec.Checkpoint.Location = locationJoin(clusterLoc, name)
		spec.Checkpoint.EverySteps = max(1, (s.steps+9)/10)
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
	// Job and Workers name the cluster job that trained the point and the
	// workers it ran on (cluster mode only).
	Job     string   `json:"job,omitempty"`
	Workers []string `json:"workers,omitempty"`
}

func (s *mqarSweep) run(ctx context.Context, stdout, log io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
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
	results := make([]*sweepResult, len(pts))
	digests := make([]string, len(pts))
	var todo []int
	for i, p := range pts {
		sum := sha256.Sum256(p.SpecYAML)
		digests[i] = hex.EncodeToString(sum[:])
		r, err := readSweepResult(s.resultPath(p))
		switch {
		case err == nil && r.SpecSHA256 == digests[i]:
			fmt.Fprintf(log, "[%d/%d] %s: done before, accuracy %.4f\n", i+1, len(pts), p.Name, r.Accuracy)
			results[i] = &r
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return err
		default:
			todo = append(todo, i)
		}
	}
	var failed []string
	if s.cluster.on() {
		failed, err = s.runCluster(ctx, pts, todo, digests, results, log)
	} else {
		err = s.runLocal(ctx, pts, todo, digests, results, log)
	}
	if err != nil {
		// What finished is kept, so that the next run continues from it.
		if terr := s.writeTables(results); terr != nil {
			err = errors.Join(err, terr)
		}
		return err
	}
	if err := s.writeTables(results); err != nil {
		return err
	}
	var rows []sweepPoint
	for _, r := range results {
		if r != nil {
			rows = append(rows, sweepPoint{SeqLen: r.SeqLen, DModel: r.DModel, DState: r.DState, Accuracy: r.Accuracy})
		}
	}
	files := []string{filepath.Join(s.out, "results.csv"), filepath.Join(s.out, "results.md")}
	if len(rows) > 0 {
		plots, err := saveSweepPlot(rows, filepath.Join(s.out, "sweep"))
		if err != nil {
			return err
		}
		files = append(files, plots...)
	}
	fmt.Fprintln(stdout, strings.Join(files, "\n"))
	if len(failed) > 0 {
		fmt.Fprintf(log, "%d of %d grid points failed:\n", len(failed), len(pts))
		for _, f := range failed {
			fmt.Fprintf(log, "  %s\n", f)
		}
		return fmt.Errorf("%d of %d grid points failed", len(failed), len(pts))
	}
	return nil
}

// runLocal trains the points of todo one after the other in this process
// and fills their results.
func (s *mqarSweep) runLocal(ctx context.Context, pts []sweepPointSpec, todo []int, digests []string, results []*sweepResult, log io.Writer) error {
	for _, i := range todo {
		p := pts[i]
		fmt.Fprintf(log, "[%d/%d] %s: seq_len %d, d_model %d, d_state %d, lr %g, %d steps\n", i+1, len(pts), p.Name, p.SeqLen, p.DModel, p.DState, p.LR, s.steps)
		r, err := s.runPoint(ctx, p, log)
		if err != nil {
			return fmt.Errorf("%s: %w", p.Name, err)
		}
		r.SpecSHA256 = digests[i]
		if err := writeJSONFile(s.resultPath(p), r); err != nil {
			return err
		}
		fmt.Fprintf(log, "[%d/%d] %s: accuracy %.4f (%d/%d), final loss %.4f, %.1fs\n", i+1, len(pts), p.Name, r.Accuracy, r.Correct, r.Answers, r.FinalLoss, r.Seconds)
		results[i] = &r
		if err := s.writeTables(results); err != nil {
			return err
		}
	}
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
	hdr := metrics.Header{Job: p.Name, Labels: p.labels()}
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
	r, _, err := s.score(ctx, p, m)
	if err != nil {
		return sweepResult{}, err
	}
	r.Steps, r.FinalLoss, r.Backend, r.Checkpoint = tr.Steps, tr.FinalLoss, tr.Backend, tr.Checkpoint
	r.Seconds = math.Round(time.Since(start).Seconds()*10) / 10
	return r, nil
}

// score evaluates a point's trained model on --eval-samples sequences of
// the held-out stream, with the code of `m2ctl eval mqar`, and returns the
// result with the point's and the score's fields filled in.
func (s *mqarSweep) score(ctx context.Context, p sweepPointSpec, m *ref.Model[float32]) (sweepResult, mqarEvalResult, error) {
	task, err := mqar.ConfigFromSpec(p.Spec)
	if err != nil {
		return sweepResult{}, mqarEvalResult{}, err
	}
	gen, err := mqar.New(task)
	if err != nil {
		return sweepResult{}, mqarEvalResult{}, err
	}
	ev, err := evalMQAR(ctx, m, gen, mqar.Eval, s.evalSamples, 0)
	if err != nil {
		return sweepResult{}, mqarEvalResult{}, err
	}
	c := p.Spec.Model.Config
	return sweepResult{
		Name: p.Name, SeqLen: p.SeqLen, DModel: p.DModel, DState: p.DState, NLayer: c.NLayer,
		VocabSize: task.VocabSize, NumPairs: task.NumPairs, NumQueries: task.NumQueries, LR: p.LR,
		Params: m.Layout().Total, EvalLoss: ev.Loss, Accuracy: ev.Accuracy, Correct: ev.Correct, Answers: ev.Answers,
	}, ev, nil
}

// labels are the point's labels in its metrics history.
func (p sweepPointSpec) labels() map[string]string {
	return map[string]string{
		"seq_len": strconv.Itoa(p.SeqLen), "d_model": strconv.Itoa(p.DModel), "d_state": strconv.Itoa(p.DState),
		"lr": strconv.FormatFloat(p.LR, 'g', -1, 64), "task": "mqar",
	}
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
func (s *mqarSweep) writeTables(all []*sweepResult) error {
	var results []sweepResult
	for _, r := range all {
		if r != nil {
			results = append(results, *r)
		}
	}
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

// client connects to the coordinators of --coordinator with the token and
// TLS settings of the flags, as `m2ctl job` does.
func (c *sweepCluster) client() (*client.Client, error) {
	tok := c.token
	if tok == "" {
		tok = os.Getenv(cli.EnvToken)
	}
	tok, err := security.ReadToken(tok, c.tokenFile)
	if err != nil {
		return nil, usagef("--token-file: %v", err)
	}
	creds, err := c.tls.ClientCredentials(c.tlsServer)
	if err != nil {
		return nil, usagef("--tls-cert, --tls-key, --tls-ca: %v", err)
	}
	addrs := make([]string, len(c.coordinators))
	for i, a := range c.coordinators {
		addrs[i] = strings.TrimSpace(a)
	}
	cl, err := client.New(client.Config{Addrs: addrs, Creds: creds, Token: tok})
	if err != nil {
		return nil, usagef("--coordinator: %v", err)
	}
	return cl, nil
}

// clusterError turns an error of a call to the coordinator into one that
// carries the exit code of the job commands (5 unreachable, 6 not
// authenticated, 2 a spec it refuses, else 1).
func clusterError(what string, err error) error {
	code := cli.ExitFailure
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = st.Message()
		switch st.Code() {
		case codes.Unavailable, codes.DeadlineExceeded:
			code = cli.ExitUnavailable
		case codes.Unauthenticated, codes.PermissionDenied:
			code = cli.ExitUnauthenticated
			msg += " (set --token, --token-file or " + cli.EnvToken + ")"
		case codes.InvalidArgument:
			code = cli.ExitUsage
		}
	} else if errors.Is(err, context.DeadlineExceeded) {
		code = cli.ExitUnavailable
	}
	return &cli.ExitError{Code: code, Err: fmt.Errorf("%s: %s", what, msg)}
}

// sweepJobs runs points of a sweep as jobs on a coordinator cluster.
type sweepJobs struct {
	s     *mqarSweep
	cl    *client.Client
	total int // points in the grid

	logMu sync.Mutex
	log   io.Writer
	// scoreMu lets one point at a time be scored: the scoring runs on this
	// machine's CPU and holds the model and its optimizer state.
	scoreMu sync.Mutex
}

// printf writes one line about point i of the grid.
func (j *sweepJobs) printf(i int, p sweepPointSpec, format string, args ...any) {
	j.logMu.Lock()
	defer j.logMu.Unlock()
	fmt.Fprintf(j.log, "[%d/%d] %s: %s\n", i+1, j.total, p.Name, fmt.Sprintf(format, args...))
}

// runCluster runs the points of todo as jobs, --parallel at a time, and
// fills their results. It returns the failed points, each with its error;
// the error is for what stops the whole sweep (no coordinator, an
// interruption, a result that cannot be written).
func (s *mqarSweep) runCluster(ctx context.Context, pts []sweepPointSpec, todo []int, digests []string, results []*sweepResult, log io.Writer) ([]string, error) {
	if len(todo) == 0 {
		return nil, nil
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cl, err := s.cluster.client()
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	lctx, lcancel := context.WithTimeout(ctx, s.cluster.timeout)
	jobs, err := cl.List(lctx)
	lcancel()
	if err != nil {
		return nil, clusterError("list the cluster's jobs", err)
	}
	j := &sweepJobs{s: s, cl: cl, total: len(pts), log: log}

	// A point whose spec was submitted before is followed instead of
	// submitted again. Those with a live job go first: they hold slots of
	// the cluster already.
	found := map[int]*pb.Job{}
	var order, rest []int
	for _, i := range todo {
		job, err := matchJob(jobs, pts[i])
		if err != nil {
			return nil, err
		}
		switch {
		case job == nil:
			rest = append(rest, i)
		case client.Terminal(job.GetState()):
			found[i] = job
			rest = append(rest, i)
		default:
			found[i] = job
			order = append(order, i)
		}
	}
	order = append(order, rest...)

	type outcome struct {
		i   int
		r   sweepResult
		err error
	}
	outs := make(chan outcome)
	go func() {
		sem := make(chan struct{}, s.cluster.parallel)
		var wg sync.WaitGroup
		defer func() {
			wg.Wait()
			close(outs)
		}()
		for _, i := range order {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := j.point(ctx, i, pts[i], found[i])
				<-sem
				outs <- outcome{i, r, err}
			}()
		}
	}()

	var failed []string
	var fatal error
	for o := range outs {
		p := pts[o.i]
		switch {
		case fatal != nil:
		case o.err != nil && ctx.Err() != nil:
			// Interrupted: reported once below.
		case o.err != nil:
			j.printf(o.i, p, "FAILED: %v", o.err)
			failed = append(failed, fmt.Sprintf("%s: %v", p.Name, o.err))
		default:
			o.r.SpecSHA256 = digests[o.i]
			if err := writeJSONFile(s.resultPath(p), o.r); err != nil {
				fatal = err
				cancel()
				continue
			}
			results[o.i] = &o.r
			j.printf(o.i, p, "accuracy %.4f (%d/%d), final loss %.4f, %.1fs", o.r.Accuracy, o.r.Correct, o.r.Answers, o.r.FinalLoss, o.r.Seconds)
			if err := s.writeTables(results); err != nil {
				fatal = err
				cancel()
			}
		}
	}
	if fatal != nil {
		return failed, fatal
	}
	if err := ctx.Err(); err != nil {
		return failed, fmt.Errorf("interrupted; the submitted jobs go on on the cluster, and the same sweep run again follows them: %w", err)
	}
	return failed, nil
}

// matchJob returns the job of the cluster that trains p's spec: the newest
// queued or running one, else the newest that succeeded, else nil.
// Failed and cancelled jobs are not taken.
func matchJob(jobs []*pb.Job, p sweepPointSpec) (*pb.Job, error) {
	want, err := p.Spec.Marshal()
	if err != nil {
		return nil, err
	}
	var live, done *pb.Job
	for _, job := range jobs {
		if job.GetName() != p.Name {
			continue
		}
		spec, err := jobspec.Parse([]byte(job.GetSpecYaml()))
		if err != nil {
			continue
		}
		if got, err := spec.Marshal(); err != nil || !bytes.Equal(got, want) {
			continue
		}
		switch job.GetState() {
		case pb.JobState_JOB_STATE_QUEUED, pb.JobState_JOB_STATE_RUNNING:
			live = job
		case pb.JobState_JOB_STATE_SUCCEEDED:
			done = job
		}
	}
	if live != nil {
		return live, nil
	}
	return done, nil
}

// point runs one point: it submits the spec unless job (found on the
// cluster) trains it already, follows the job and scores its final
// checkpoint. A job that had succeeded before but whose checkpoints are no
// longer in the store is submitted again.
func (j *sweepJobs) point(ctx context.Context, i int, p sweepPointSpec, job *pb.Job) (sweepResult, error) {
	succeededBefore := job != nil && job.GetState() == pb.JobState_JOB_STATE_SUCCEEDED
	if job != nil {
		j.printf(i, p, "job %s of the same spec is %s: following it instead of submitting the point again", job.GetId(), jobStateName(job.GetState()))
	} else {
		var err error
		if job, err = j.submit(ctx, i, p); err != nil {
			return sweepResult{}, err
		}
	}
	r, err := j.follow(ctx, i, p, job.GetId())
	if succeededBefore && errors.Is(err, checkpoint.ErrNone) {
		j.printf(i, p, "%v; submitting the point again", err)
		if job, err = j.submit(ctx, i, p); err != nil {
			return sweepResult{}, err
		}
		r, err = j.follow(ctx, i, p, job.GetId())
	}
	return r, err
}

func (j *sweepJobs) submit(ctx context.Context, i int, p sweepPointSpec) (*pb.Job, error) {
	cctx, cancel := context.WithTimeout(ctx, j.s.cluster.timeout)
	defer cancel()
	job, err := j.cl.Submit(cctx, p.SpecYAML)
	if err != nil {
		return nil, clusterError("submit", err)
	}
	j.printf(i, p, "submitted as job %s: seq_len %d, d_model %d, d_state %d, lr %g, %d steps",
		job.GetId(), p.SeqLen, p.DModel, p.DState, p.LR, p.Spec.Schedule.TotalSteps)
	return job, nil
}

// follow watches job id until it ends, writing the progress it reports
// into DIR/metrics/NAME.jsonl and a line every tenth of the steps to the
// log, then scores its final checkpoint.
func (j *sweepJobs) follow(ctx context.Context, i int, p sweepPointSpec, id string) (sweepResult, error) {
	mpath := filepath.Join(j.s.out, "metrics", p.Name+".jsonl")
	mf, err := os.Create(mpath)
	if err != nil {
		return sweepResult{}, err
	}
	defer mf.Close()
	labels := p.labels()
	labels["job"] = id
	mw, err := metrics.NewWriter(mf, metrics.Header{Job: p.Name, Labels: labels})
	if err != nil {
		return sweepResult{}, err
	}
	tokens := int64(p.Spec.Batch.GlobalBatch * p.Spec.Data.MQAR.NumQueries)
	total := int64(p.Spec.Schedule.TotalSteps)
	every := max(1, total/10)
	var (
		lastStep   int64 = -1
		nextReport int64
		lastState  pb.JobState
		lastGen    uint64
		workers    []string
	)
	final, err := j.cl.Watch(ctx, id, func(job *pb.Job) error {
		st, gen := job.GetState(), job.GetGeneration()
		if st != lastState || gen != lastGen {
			lastState, lastGen = st, gen
			switch st {
			case pb.JobState_JOB_STATE_QUEUED:
				j.printf(i, p, "job %s queued", id)
			case pb.JobState_JOB_STATE_RUNNING:
				ws := jobWorkers(job)
				workers = mergeSorted(workers, ws)
				j.printf(i, p, "job %s running: generation %d on %s", id, gen, strings.Join(ws, ", "))
			}
		}
		pr := job.GetProgress()
		if pr.GetUpdatedAt() == nil || pr.GetStep() == lastStep {
			return nil
		}
		lastStep = pr.GetStep()
		if rec, ok := progressRecord(job, tokens); ok {
			if err := mw.Write(rec); err != nil {
				return err
			}
		}
		if st == pb.JobState_JOB_STATE_RUNNING && lastStep >= nextReport {
			j.printf(i, p, "job %s step %d/%d, loss %.4f", id, lastStep, total, pr.GetLoss())
			nextReport = (lastStep/every + 1) * every
		}
		return nil
	})
	if err != nil {
		if ctx.Err() != nil {
			return sweepResult{}, ctx.Err()
		}
		return sweepResult{}, clusterError("follow job "+id, err)
	}
	if final.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		return sweepResult{}, fmt.Errorf("job %s %s at step %d: %s", id, jobStateName(final.GetState()), final.GetProgress().GetStep(), final.GetMessage())
	}
	if len(workers) == 0 {
		workers = jobWorkers(final)
	}
	j.printf(i, p, "job %s succeeded; scoring its final checkpoint on %d held-out sequences", id, j.s.evalSamples)
	start := time.Now()
	r, ev, err := j.scoreJob(ctx, p, id)
	if err != nil {
		return sweepResult{}, err
	}
	if err := mw.Write(metrics.Record{Kind: metrics.KindEval, Step: r.Steps, Loss: ev.Loss, Accuracy: ev.Accuracy, Correct: ev.Correct, Answers: ev.Answers}); err != nil {
		return sweepResult{}, err
	}
	if err := mf.Close(); err != nil {
		return sweepResult{}, err
	}
	if _, err := saveCurvesFrom(mpath, filepath.Join(j.s.out, "plots", p.Name)); err != nil {
		return sweepResult{}, err
	}
	ran := time.Duration(0)
	if s, f := final.GetStartedAt(), final.GetFinishedAt(); s != nil && f != nil {
		ran = f.AsTime().Sub(s.AsTime())
	}
	r.Seconds = math.Round((ran+time.Since(start)).Seconds()*10) / 10
	r.Job, r.Workers = id, workers
	return r, nil
}

// scoreJob loads the newest checkpoint of job id that verifies from the
// store of the point's checkpoint.location, checks that it is of the last
// step, and scores it as `m2ctl eval mqar` does.
func (j *sweepJobs) scoreJob(ctx context.Context, p sweepPointSpec, id string) (sweepResult, mqarEvalResult, error) {
	loc := p.Spec.Checkpoint.Location
	store, prefix, err := openStore(ctx, "checkpoint.location", loc, trainOptions{}, nil)
	if err != nil {
		return sweepResult{}, mqarEvalResult{}, err
	}
	defer closeStore(store)
	dir := locationJoin(loc, id)
	st, err := checkpoint.LoadLatest[float32](ctx, store, checkpoint.JoinKey(prefix, id), nil)
	if err != nil {
		hint := ""
		if !strings.Contains(loc, "://") {
			hint = " (is --checkpoints a directory that the workers share with this machine?)"
		}
		return sweepResult{}, mqarEvalResult{}, fmt.Errorf("job %s: %s: %w%s", id, dir, err, hint)
	}
	if total := p.Spec.Schedule.TotalSteps; st.Trainer.Step != total {
		return sweepResult{}, mqarEvalResult{}, fmt.Errorf("job %s: the newest checkpoint in %s that verifies is of step %d, not of the last step %d", id, dir, st.Trainer.Step, total)
	}
	m, err := ref.New[float32](st.Config)
	if err != nil {
		return sweepResult{}, mqarEvalResult{}, err
	}
	copy(m.Params(), st.Params)
	j.scoreMu.Lock()
	r, ev, err := j.s.score(ctx, p, m)
	j.scoreMu.Unlock()
	if err != nil {
		return sweepResult{}, mqarEvalResult{}, err
	}
	r.Steps, r.FinalLoss = st.Trainer.Step, st.Trainer.Loss
	r.Checkpoint = locationJoin(loc, id, checkpoint.StepDir(st.Trainer.Step))
	r.Backend = clusterBackend(p.Spec)
	return r, ev, nil
}

// clusterBackend names the backend of a job as far as its spec decides
// it: the job API does not say which kind of worker an auto job ran on.
func clusterBackend(spec *jobspec.Spec) string {
	switch {
	case spec.Backend == jobspec.BackendCPU:
		return "cpu-float32"
	case spec.Precision == jobspec.PrecisionBF16:
		// Only the CUDA backend trains in bf16; a CPU worker fails such a job.
		return "cuda-bf16"
	case spec.Backend == jobspec.BackendCUDA:
		return "cuda-f32"
	}
	return "auto-float32"
}

// progressRecord is the train record of a job's newest progress; false
// when a value is not finite (the history refuses it).
func progressRecord(job *pb.Job, tokens int64) (metrics.Record, bool) {
	pr := job.GetProgress()
	r := metrics.Record{Kind: metrics.KindTrain, Step: int(pr.GetStep()), Loss: pr.GetLoss(), TotalSteps: int(pr.GetTotalSteps()),
		LR: pr.GetLr(), GradNorm: pr.GetGradNorm(), Tokens: tokens, TokensPerSec: pr.GetTokensPerSec()}
	if s, u := job.GetStartedAt(), pr.GetUpdatedAt(); s != nil && u != nil {
		if d := u.AsTime().Sub(s.AsTime()); d > 0 {
			r.ElapsedSec = math.Round(d.Seconds()*1000) / 1000
		}
	}
	for _, v := range []float64{r.Loss, r.LR, r.GradNorm, r.TokensPerSec} {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return r, false
		}
	}
	return r, true
}

// jobWorkers lists the workers of a job's current placement.
func jobWorkers(job *pb.Job) []string {
	var ws []string
	for _, a := range job.GetAssignments() {
		ws = append(ws, a.GetWorkerId())
	}
	return mergeSorted(nil, ws)
}

// mergeSorted returns the sorted union of a (sorted, distinct) and b.
func mergeSorted(a, b []string) []string {
	out := append(slices.Clone(a), b...)
	slices.Sort(out)
	return slices.Compact(out)
}

// jobStateName is a job state as people read it: queued, running, ...
func jobStateName(s pb.JobState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "JOB_STATE_"))
}
