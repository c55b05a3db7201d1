package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data/mqar"
)

func init() { root.AddCommand(newEvalCmd()) }

func newEvalCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "eval", Short: "Evaluate a checkpoint on a task"}
	cmd.AddCommand(newEvalMQARCmd())
	return cmd
}

// mqarEvalArgs are the inputs of `m2ctl eval mqar`.
type mqarEvalArgs struct {
	checkpoint, spec, stream, precision, output string
	samples, batch                              int
	task                                        mqar.Config
}

func newEvalMQARCmd() *cobra.Command {
	var a mqarEvalArgs
	cmd := &cobra.Command{
		Use:   "mqar --checkpoint DIR --samples N (--spec SPEC.yaml | --vocab-size V --num-pairs K --seq-len L)",
		Short: "Recall accuracy of a checkpoint on held-out MQAR sequences",
		Long: `Loads a Hugging Face Mamba-2 checkpoint into the CPU backend, runs it on N
sequences of the multi-query associative recall task (docs/mqar.md) and prints
the fraction of answers whose most likely token is the right value, with the
mean loss on the answers.

The task comes from a job spec's data.mqar (--spec) or from the flags; flags
given next to --spec override the spec's values. Sequences come from the
held-out eval stream of the seed unless --stream train is given; the training
stream of the same seed never yields the same samples as the eval stream.

--checkpoint is a Hugging Face directory (config.json + model.safetensors),
such as a step-N checkpoint of m2ctl train, or a run's LOCATION/NAME
directory, whose newest committed checkpoint is used.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := a.resolveTask(cmd); err != nil {
				return err
			}
			switch a.precision {
			case "float32":
				return runEvalMQAR[float32](cmd.Context(), a, cmd.OutOrStdout())
			case "float64":
				return runEvalMQAR[float64](cmd.Context(), a, cmd.OutOrStdout())
			}
			return usagef("--precision: must be float32 or float64, got %q", a.precision)
		},
	}
	f := cmd.Flags()
	f.StringVar(&a.checkpoint, "checkpoint", "", "Hugging Face checkpoint directory, or a run's LOCATION/NAME directory (required)")
	f.IntVar(&a.samples, "samples", 1000, "sequences to evaluate")
	f.StringVar(&a.spec, "spec", "", "job spec whose data.mqar and data.seq_len define the task")
	f.IntVar(&a.task.VocabSize, "vocab-size", 0, "the task's vocabulary (data.mqar.vocab_size)")
	f.IntVar(&a.task.NumPairs, "num-pairs", 0, "key-value pairs per sequence (data.mqar.num_pairs)")
	f.IntVar(&a.task.NumQueries, "num-queries", 0, "queries per sequence; 0 = num-pairs (data.mqar.num_queries)")
	f.IntVar(&a.task.SeqLen, "seq-len", 0, "tokens per sequence (data.seq_len)")
	f.Uint64Var(&a.task.Seed, "seed", 0, "task seed (data.mqar.seed)")
	f.Float64Var(&a.task.QueryPower, "query-power", jobspec.DefaultMQARQueryPower, "power-law exponent of the query positions (data.mqar.query_power)")
	f.StringVar(&a.stream, "stream", "eval", "eval (held out) or train")
	f.IntVar(&a.batch, "batch", 0, "sequences per forward pass; 0 = as many as keep the logits under 64 MiB")
	f.StringVar(&a.precision, "precision", "float32", "float32 or float64")
	f.StringVarP(&a.output, "output", "o", "text", "text or json")
	_ = cmd.MarkFlagRequired("checkpoint")
	return cmd
}

// resolveTask fills a.task from --spec and the flags that were given.
func (a *mqarEvalArgs) resolveTask(cmd *cobra.Command) error {
	fl := cmd.Flags()
	if a.spec != "" {
		doc, err := os.ReadFile(a.spec)
		if err != nil {
			return usageError{err}
		}
		spec, err := jobspec.Parse(doc)
		if err != nil {
			return usageError{fmt.Errorf("%s: %w", a.spec, err)}
		}
		if spec.Data.MQAR == nil {
			return usagef("--spec: %s trains on data.path, not data.mqar", a.spec)
		}
		fromSpec, err := mqar.ConfigFromSpec(spec)
		if err != nil {
			return usageError{fmt.Errorf("%s: %w", a.spec, err)}
		}
		for _, f := range []struct {
			flag string
			dst  *int
			spec int
		}{
			{"vocab-size", &a.task.VocabSize, fromSpec.VocabSize},
			{"num-pairs", &a.task.NumPairs, fromSpec.NumPairs},
			{"num-queries", &a.task.NumQueries, fromSpec.NumQueries},
			{"seq-len", &a.task.SeqLen, fromSpec.SeqLen},
		} {
			if !fl.Changed(f.flag) {
				*f.dst = f.spec
			}
		}
		if !fl.Changed("seed") {
			a.task.Seed = fromSpec.Seed
		}
		if !fl.Changed("query-power") {
			a.task.QueryPower = fromSpec.QueryPower
		}
	} else {
		for _, name := range []string{"vocab-size", "num-pairs", "seq-len"} {
			if !fl.Changed(name) {
				return usagef("--%s is required without --spec", name)
			}
		}
	}
	if a.task.NumQueries == 0 {
		a.task.NumQueries = a.task.NumPairs
	}
	if err := a.task.Validate(); err != nil {
		return usageError{err}
	}
	if a.samples < 1 {
		return usagef("--samples: must be at least 1, got %d", a.samples)
	}
	if a.batch < 0 {
		return usagef("--batch: must be at least 0, got %d", a.batch)
	}
	if a.output != "text" && a.output != "json" {
		return usagef("--output: must be text or json, got %q", a.output)
	}
	if _, err := mqar.ParseStream(a.stream); err != nil {
		return usagef("--stream: must be train or eval, got %q", a.stream)
	}
	return nil
}

// mqarEvalResult is the outcome of an evaluation; -o json prints it.
type mqarEvalResult struct {
	Checkpoint string  `json:"checkpoint"`
	Stream     string  `json:"stream"`
	Seed       uint64  `json:"seed"`
	Sequences  int     `json:"sequences"`
	Answers    int     `json:"answers"`
	Correct    int     `json:"correct"`
	Accuracy   float64 `json:"accuracy"`
	Loss       float64 `json:"loss"` // mean cross-entropy on the answers
	// ValueChance is the accuracy of a uniform guess among the value tokens.
	ValueChance float64 `json:"value_chance"`
}

func runEvalMQAR[T model.Float](ctx context.Context, a mqarEvalArgs, out io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	dir, err := resolveCheckpointDir(ctx, a.checkpoint)
	if err != nil {
		return usageError{err}
	}
	m, err := loadCheckpointModel[T](dir)
	if err != nil {
		return usageError{err}
	}
	gen, err := mqar.New(a.task)
	if err != nil {
		return usageError{err}
	}
	stream, _ := mqar.ParseStream(a.stream)
	res, err := evalMQAR(ctx, m, gen, stream, a.samples, a.batch)
	if err != nil {
		return err
	}
	res.Checkpoint = dir
	if a.output == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(out, "checkpoint %s\n", dir)
	fmt.Fprintf(out, "task: vocab %d, %d pairs, %d queries, seq_len %d; %d sequences of the %s stream, seed %d\n",
		a.task.VocabSize, a.task.NumPairs, a.task.NumQueries, a.task.SeqLen, res.Sequences, res.Stream, res.Seed)
	fmt.Fprintf(out, "accuracy %.4f (%d/%d answers), loss on the answers %.4f; a uniform guess among the values scores %.4f\n",
		res.Accuracy, res.Correct, res.Answers, res.Loss, res.ValueChance)
	return nil
}

// resolveCheckpointDir returns dir when it holds a config.json, else the
// newest committed checkpoint of the run whose LOCATION/NAME dir is.
func resolveCheckpointDir(ctx context.Context, dir string) (string, error) {
	if _, err := os.Stat(filepath.Join(dir, hf.ConfigFile)); err == nil {
		return dir, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return "", fmt.Errorf("--checkpoint: %s is not a directory", dir)
	}
	clean := filepath.Clean(dir)
	steps, err := checkpoint.Steps(ctx, checkpoint.LocalStore{Root: filepath.Dir(clean)}, filepath.Base(clean))
	if err != nil {
		return "", err
	}
	if len(steps) == 0 {
		return "", fmt.Errorf("--checkpoint: %s holds neither %s nor committed step-N checkpoints", dir, hf.ConfigFile)
	}
	return filepath.Join(clean, checkpoint.StepDir(steps[0])), nil
}

// loadCheckpointModel loads a Hugging Face checkpoint directory into the
// CPU reference backend.
func loadCheckpointModel[T model.Float](dir string) (*ref.Model[T], error) {
	cfg, _, err := hf.ReadConfigFile(filepath.Join(dir, hf.ConfigFile))
	if err != nil {
		return nil, err
	}
	m, err := ref.New[T](cfg)
	if err != nil {
		return nil, err
	}
	params, err := hf.LoadParams[T](dir, cfg, m.Layout())
	if err != nil {
		return nil, err
	}
	copy(m.Params(), params)
	return m, nil
}

// evalLogitBytes bounds the logits of one evaluation forward pass.
const evalLogitBytes = 64 << 20

// evalMQAR runs backend m on samples 0..n-1 of stream s of gen's task, batch
// sequences at a time (0: as many as keep the logits under evalLogitBytes),
// and scores the answers.
func evalMQAR[T model.Float](ctx context.Context, m model.Backend[T], gen *mqar.Generator, s mqar.Stream, n, batch int) (mqarEvalResult, error) {
	task, cfg := gen.Config(), m.Config()
	if task.VocabSize > cfg.VocabSize {
		return mqarEvalResult{}, usagef("the task's vocab_size %d exceeds the model's vocab_size %d", task.VocabSize, cfg.VocabSize)
	}
	if batch == 0 {
		batch = max(1, evalLogitBytes/(8*task.SeqLen*cfg.VocabSize))
	}
	batch = min(batch, n)
	var acc mqar.Accuracy
	var lossSum float64
	idx := make([]uint64, 0, batch)
	for first := 0; first < n; first += batch {
		idx = idx[:0]
		for i := first; i < min(first+batch, n); i++ {
			idx = append(idx, uint64(i))
		}
		b, err := gen.Batch(s, idx)
		if err != nil {
			return mqarEvalResult{}, err
		}
		r, err := m.Forward(ctx, &model.Batch{Batch: b.Rows(), SeqLen: b.SeqLen, Inputs: b.Inputs, Targets: b.Targets}, model.StepOptions{KeepLogits: true})
		if err != nil {
			return mqarEvalResult{}, err
		}
		a, err := mqar.Score(r.Logits, cfg.VocabSize, b.Targets)
		if err != nil {
			return mqarEvalResult{}, err
		}
		acc.Add(a)
		lossSum += r.LossSum
	}
	res := mqarEvalResult{Stream: s.String(), Seed: task.Seed, Sequences: n, Answers: acc.Total, Correct: acc.Correct,
		Accuracy: acc.Value(), ValueChance: task.ValueChance()}
	if acc.Total > 0 {
		res.Loss = lossSum / float64(acc.Total)
	}
	return res, nil
}
