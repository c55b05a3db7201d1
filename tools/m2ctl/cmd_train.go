package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/train"
)

func init() { root.AddCommand(newTrainCmd()) }

func newTrainCmd() *cobra.Command {
	var noResume bool
	cmd := &cobra.Command{
		Use:   "train SPEC.yaml",
		Short: "Train a model in this process on the CPU backend",
		Long: `Trains the model of a job spec (docs/jobspec.md) in this process, with a
progress bar (step, loss, tokens/s, ETA). Checkpoints go to
checkpoint.location/NAME/step-N/ every checkpoint.every_steps steps and at the
end; each is a Hugging Face
directory (config.json + model.safetensors) plus the optimizer and trainer
state. A run started again with the same spec resumes from the newest
checkpoint that verifies. The spec must have parallel.dp = parallel.sp = 1.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			doc, err := os.ReadFile(args[0])
			if err != nil {
				return usageError{err}
			}
			spec, err := jobspec.Parse(doc)
			if err != nil {
				return usageError{fmt.Errorf("%s: %w", args[0], err)}
			}
			_, err = runTraining(cmd.Context(), spec, !noResume, cmd.ErrOrStderr())
			return err
		},
	}
	cmd.Flags().BoolVar(&noResume, "no-resume", false, "start from scratch even if checkpoints exist")
	return cmd
}

// trainResult is what a finished local run reports.
type trainResult struct {
	FinalLoss  float64
	Steps      int
	Checkpoint string // the newest checkpoint directory, if any
}

// runTraining trains spec in this process on the CPU backend.
func runTraining(ctx context.Context, spec *jobspec.Spec, resume bool, out io.Writer) (trainResult, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch spec.Backend {
	case jobspec.BackendCUDA:
		return trainResult{}, usagef("backend: cuda is not available in m2ctl train; use cpu or auto")
	case jobspec.BackendAuto:
		fmt.Fprintln(out, "backend: cpu-float32 (no CUDA backend in this process)")
	}
	for field, loc := range map[string]string{"data.path": spec.Data.Path, "checkpoint.location": spec.Checkpoint.Location, "model.init_from": spec.Model.InitFrom} {
		if strings.HasPrefix(loc, "s3://") {
			return trainResult{}, usagef("%s: s3:// locations are served by the cluster's workers; m2ctl train reads local paths", field)
		}
	}
	cfg, err := train.ConfigFromSpec(spec)
	if err != nil {
		return trainResult{}, usageError{err}
	}
	m, err := ref.New[float32](cfg)
	if err != nil {
		return trainResult{}, usageError{err}
	}
	if err := train.LoadInit(spec, cfg, m.Layout(), m.Params()); err != nil {
		return trainResult{}, err
	}
	ds, err := data.Open(spec.Data.Path)
	if err != nil {
		return trainResult{}, usageError{err}
	}
	defer ds.Close()
	log := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelWarn}))
	bar := newProgressBar(out)
	// Checkpoints go to LOCATION/NAME/step-N/, as a job's do (docs/jobspec.md).
	opts := train.Options{Log: log, OnProgress: bar.Update, Prefix: spec.Name}
	if spec.Checkpoint.Location != "" {
		opts.Store = checkpoint.LocalStore{Root: spec.Checkpoint.Location}
	}
	tr, err := train.New(spec, m, ds, opts)
	if err != nil {
		return trainResult{}, usageError{err}
	}
	if resume {
		ok, err := tr.Resume(ctx)
		if err != nil {
			return trainResult{}, err
		}
		if ok {
			fmt.Fprintf(out, "resumed from the checkpoint of step %d in %s\n", tr.Step(), spec.Checkpoint.Location)
		}
	}
	fmt.Fprintf(out, "model: %d parameters (d_model %d, %d layers, d_state %d, %d heads × %d); data: %d tokens, seq_len %d; %s\n",
		m.Layout().Total, cfg.DModel, cfg.NLayer, cfg.DState, cfg.NHeads, cfg.HeadDim, ds.Tokens(), spec.Data.SeqLen, m.Name())
	if err := tr.Run(ctx); err != nil {
		if errors.Is(err, context.Canceled) {
			return trainResult{}, fmt.Errorf("interrupted at step %d: %w", tr.Step(), err)
		}
		return trainResult{}, err
	}
	res := trainResult{FinalLoss: tr.Loss(), Steps: tr.Step()}
	if opts.Store != nil {
		steps, err := checkpoint.Steps(ctx, opts.Store, opts.Prefix)
		if err == nil && len(steps) > 0 {
			res.Checkpoint = filepath.Join(spec.Checkpoint.Location, opts.Prefix, checkpoint.StepDir(steps[0]))
		}
	}
	return res, nil
}
