package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/kernels/gpu"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/data/mqar"
	"github.com/m2train/m2train/worker/fetch"
	"github.com/m2train/m2train/worker/metrics"
	"github.com/m2train/m2train/worker/train"
)

func init() { root.AddCommand(newTrainCmd()) }

// envCacheDir overrides the default cache directory of downloaded inputs.
const envCacheDir = "M2_CACHE_DIR"

func newTrainCmd() *cobra.Command {
	var (
		noResume    bool
		cacheDir    string
		metricsPath string
		evalEvery   int
		evalSamples int
	)
	cmd := &cobra.Command{
		Use:   "train SPEC.yaml [--metrics FILE] [--eval-every N]",
		Short: "Train a model in this process on the CPU or CUDA backend",
		Long: `Trains the model of a job spec (docs/jobspec.md) in this process, with a
progress bar (step, loss, tokens/s, ETA). The data is the spec's data.path
dataset or its built-in MQAR task (data.mqar, docs/mqar.md).

The spec's backend picks the device: cpu trains on the CPU reference in
float32; cuda on the GPU in the spec's precision (float32, or bf16
activations and products over fp32 parameters and optimizer state), failing
when no CUDA backend can run here; auto (the default) on the GPU when one
can run, else on the CPU, saying why. The backend that runs is printed
first.

--metrics FILE appends a metrics history (JSON Lines, docs/mqar.md §5): one
record per step and, with --eval-every N on an MQAR spec, the held-out
accuracy on --eval-samples sequences every N steps and after the last. A
resumed run appends to the same file.

Checkpoints go to
checkpoint.location/NAME/step-N/ every checkpoint.every_steps steps and at the
end, uploading in the background while training goes on; each is a Hugging
Face directory (config.json + model.safetensors) plus the optimizer and
trainer state. A run started again with the same spec resumes from the newest
checkpoint that verifies. The spec must have parallel.dp = parallel.sp = 1.

checkpoint.location, data.path and model.init_from may be s3://BUCKET/PREFIX
(docs/checkpoints.md). The endpoint and credentials come from the environment:
M2_S3_ENDPOINT (or AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL; AWS S3 when unset),
AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the credentials
file named by M2_S3_CREDENTIALS_FILE or AWS_SHARED_CREDENTIALS_FILE
(~/.aws/credentials). A dataset in S3 is downloaded to --cache-dir first and
every shard's size and CRC-32C are verified before training starts; cached
shards whose manifest entry is unchanged are verified and reused.
A model.init_from in S3 is downloaded there on every start.`,
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
			o := trainOptions{Resume: !noResume, CacheDir: cacheDir}
			switch {
			case evalEvery < 0:
				return usagef("--eval-every: must be at least 0 (0: no evaluation), got %d", evalEvery)
			case evalEvery > 0 && evalSamples < 1:
				return usagef("--eval-samples: must be at least 1, got %d", evalSamples)
			case evalEvery > 0 && spec.Data.MQAR == nil:
				return usagef("--eval-every: held-out evaluation needs a spec with data.mqar; %s trains on data.path", args[0])
			case evalEvery > 0:
				o.EvalEvery, o.EvalSamples = evalEvery, evalSamples
			}
			if metricsPath != "" {
				w, err := metrics.Append(metricsPath, metricsHeader(spec))
				if err != nil {
					return usagef("--metrics: %v", err)
				}
				defer w.Close()
				o.Metrics = w
			}
			_, err = runTraining(cmd.Context(), spec, o, cmd.ErrOrStderr())
			return err
		},
	}
	f := cmd.Flags()
	f.BoolVar(&noResume, "no-resume", false, "start from scratch even if checkpoints exist")
	f.StringVar(&cacheDir, "cache-dir", "", "where s3:// datasets and init_from checkpoints are downloaded (default $"+envCacheDir+", else the user cache directory's m2train/)")
	f.StringVar(&metricsPath, "metrics", "", "append the run's metrics history (JSON Lines) to this file")
	f.IntVar(&evalEvery, "eval-every", 0, "MQAR specs: held-out accuracy every N steps and after the last (0: none)")
	f.IntVar(&evalSamples, "eval-samples", 128, "held-out sequences per evaluation")
	return cmd
}

// metricsHeader describes a run in its metrics history.
func metricsHeader(spec *jobspec.Spec) metrics.Header {
	h := metrics.Header{Job: spec.Name, Labels: map[string]string{"seq_len": strconv.Itoa(spec.Data.SeqLen), "task": "tokens"}}
	if c := spec.Model.Config; c != nil {
		h.Labels["d_model"] = strconv.Itoa(c.DModel)
		h.Labels["n_layer"] = strconv.Itoa(c.NLayer)
		if c.DState > 0 {
			h.Labels["d_state"] = strconv.Itoa(c.DState)
		}
	}
	if spec.Data.MQAR != nil {
		h.Labels["task"] = "mqar"
	}
	h.Labels["lr"] = strconv.FormatFloat(spec.Optimizer.LR, 'g', -1, 64)
	return h
}

// trainOptions configure runTraining beyond the spec.
type trainOptions struct {
	// Resume continues from the newest checkpoint that verifies.
	Resume bool
	// CacheDir receives downloaded inputs; empty means defaultCacheDir().
	CacheDir string
	// S3 replaces the endpoint and credentials that s3:// locations
	// otherwise take from the environment (the demo's own gateway).
	S3 *checkpoint.S3Config
	// Metrics, when set, receives a train record after every step and the
	// eval records of the evaluations below.
	Metrics *metrics.Writer
	// EvalSamples > 0 evaluates the model of an MQAR spec on that many
	// sequences of the task's held-out stream after the last step and
	// every EvalEvery steps (EvalEvery 0: after the last step only).
	EvalSamples, EvalEvery int
}

// trainResult is what a finished local run reports.
type trainResult struct {
	FinalLoss float64
	Steps     int
	// Backend names the backend that trained (cpu-float32, cuda-bf16).
	Backend string
	// Checkpoint is the newest checkpoint's directory, as a path or an
	// s3:// URL, if any.
	Checkpoint string
}

// defaultCacheDir is $M2_CACHE_DIR, else m2train/ in the user's cache
// directory, else in the temporary directory.
func defaultCacheDir() string {
	if d := os.Getenv(envCacheDir); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "m2train")
	}
	return filepath.Join(os.TempDir(), "m2train-cache")
}

// openStore opens a location through checkpoint.OpenStore with the run's
// S3 settings. Errors of the location or the credentials are usage errors;
// network failures are not.
func openStore(ctx context.Context, field, loc string, o trainOptions, log *slog.Logger) (checkpoint.Store, string, error) {
	s, prefix, err := checkpoint.OpenStore(ctx, loc, checkpoint.OpenOptions{S3: o.S3, Log: log})
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) || ctx.Err() != nil {
			return nil, "", fmt.Errorf("%s: %w", field, err)
		}
		return nil, "", usagef("%s: %v", field, err)
	}
	return s, prefix, nil
}

// fetchOptions are the settings with which a run downloads its s3://
// dataset and init_from: the run's cache and S3 settings, summary lines
// to out.
func fetchOptions(o trainOptions, log *slog.Logger, out io.Writer) fetch.Options {
	return fetch.Options{CacheDir: o.CacheDir, S3: o.S3, Log: log, Out: out}
}

// fetchError makes a failure to open an input's store a usage error, as
// openStore does, unless the network or the context caused it.
func fetchError(ctx context.Context, err error) error {
	var oe *fetch.OpenError
	var ne net.Error
	if errors.As(err, &oe) && !errors.As(err, &ne) && ctx.Err() == nil {
		return usageError{err}
	}
	return err
}

func closeStore(s checkpoint.Store) {
	if c, ok := s.(io.Closer); ok {
		c.Close()
	}
}

// runTraining trains spec in this process on the backend that spec.backend
// selects (openBackend).
func runTraining(ctx context.Context, spec *jobspec.Spec, o trainOptions, out io.Writer) (trainResult, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if o.EvalSamples > 0 && spec.Data.MQAR == nil {
		return trainResult{}, usagef("held-out evaluation needs a spec with data.mqar; %s trains on data.path", spec.Name)
	}
	if o.CacheDir == "" {
		o.CacheDir = defaultCacheDir()
	}
	log := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelWarn}))

	// The model is built from a local copy of an s3:// init_from; the spec
	// that checkpoints record keeps the location as written.
	local := *spec
	if fetch.IsRemote(spec.Model.InitFrom) {
		dir, err := fetch.Model(ctx, spec.Model.InitFrom, fetchOptions(o, log, out))
		if err != nil {
			return trainResult{}, fetchError(ctx, err)
		}
		local.Model.InitFrom = dir
	}
	cfg, err := train.ConfigFromSpec(&local)
	if err != nil {
		return trainResult{}, usageError{err}
	}
	m, closeBackend, err := openBackend(spec.Backend, spec.Precision, cfg, out)
	if err != nil {
		return trainResult{}, err
	}
	defer closeBackend()
	if err := train.LoadInit(&local, cfg, m.Layout(), m.Params()); err != nil {
		return trainResult{}, err
	}
	var ds *data.Dataset
	dataLine := ""
	switch {
	case spec.Data.MQAR != nil:
		q := spec.Data.MQAR
		dataLine = fmt.Sprintf("MQAR task (vocab %d, %d pairs, %d queries)", q.VocabSize, q.NumPairs, q.NumQueries)
	case fetch.IsRemote(spec.Data.Path):
		if ds, err = fetch.Dataset(ctx, spec.Data.Path, fetchOptions(o, log, out)); err != nil {
			return trainResult{}, fetchError(ctx, err)
		}
	default:
		if ds, err = data.Open(spec.Data.Path); err != nil {
			return trainResult{}, usageError{err}
		}
	}
	if ds != nil {
		defer ds.Close()
		dataLine = fmt.Sprintf("%d tokens", ds.Tokens())
	}
	in, err := train.NewInput(spec, ds)
	if err != nil {
		return trainResult{}, usageError{err}
	}

	// A hook that fails (a metrics write, an evaluation) stops the run
	// through its context, with its error as the cause.
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	onProgress, err := progressHooks(runCtx, spec, m, o, out, cancel)
	if err != nil {
		return trainResult{}, err
	}
	// Checkpoints go to LOCATION/NAME/step-N/, as a job's do (docs/jobspec.md).
	opts := train.Options{Log: log, OnProgress: onProgress}
	if spec.Checkpoint.Location != "" {
		store, prefix, err := openStore(ctx, "checkpoint.location", spec.Checkpoint.Location, o, log)
		if err != nil {
			return trainResult{}, err
		}
		defer closeStore(store)
		opts.Store, opts.Prefix = store, checkpoint.JoinKey(prefix, spec.Name)
	}
	tr, err := train.NewWithInput(spec, m, in, opts)
	if err != nil {
		return trainResult{}, usageError{err}
	}
	if o.Resume {
		ok, err := tr.Resume(ctx)
		if err != nil {
			return trainResult{}, err
		}
		if ok {
			fmt.Fprintf(out, "resumed from the checkpoint of step %d in %s\n", tr.Step(), spec.Checkpoint.Location)
		}
	}
	fmt.Fprintf(out, "model: %d parameters (d_model %d, %d layers, d_state %d, %d heads × %d); data: %s, seq_len %d; %s\n",
		m.Layout().Total, cfg.DModel, cfg.NLayer, cfg.DState, cfg.NHeads, cfg.HeadDim, dataLine, spec.Data.SeqLen, m.Name())
	if err := tr.Run(runCtx); err != nil {
		if cause := context.Cause(runCtx); cause != nil && ctx.Err() == nil && !errors.Is(cause, context.Canceled) {
			return trainResult{}, fmt.Errorf("step %d: %w", tr.Step(), cause)
		}
		if errors.Is(err, context.Canceled) {
			return trainResult{}, fmt.Errorf("interrupted at step %d: %w", tr.Step(), err)
		}
		return trainResult{}, err
	}
	res := trainResult{FinalLoss: tr.Loss(), Steps: tr.Step(), Backend: m.Name()}
	if opts.Store != nil {
		steps, err := checkpoint.Steps(ctx, opts.Store, opts.Prefix)
		if err == nil && len(steps) > 0 {
			res.Checkpoint = locationJoin(spec.Checkpoint.Location, spec.Name, checkpoint.StepDir(steps[0]))
		}
	}
	return res, nil
}

// progressHooks returns what runs after every step: the progress bar, the
// metrics record and, on the steps o asks for, an evaluation on the MQAR
// task's held-out stream with the trained backend m. A hook that fails
// cancels the run with its error.
func progressHooks(ctx context.Context, spec *jobspec.Spec, m model.Backend[float32], o trainOptions, out io.Writer, fail context.CancelCauseFunc) (func(train.Progress), error) {
	bar := newProgressBar(out)
	var gen *mqar.Generator
	if o.EvalSamples > 0 {
		task, err := mqar.ConfigFromSpec(spec)
		if err != nil {
			return nil, usageError{err}
		}
		if gen, err = mqar.New(task); err != nil {
			return nil, usageError{err}
		}
	}
	evaluate := func(step int) error {
		ev, err := evalMQAR(ctx, m, gen, mqar.Eval, o.EvalSamples, 0)
		if err != nil {
			return fmt.Errorf("evaluation at step %d: %w", step, err)
		}
		fmt.Fprintf(out, "eval at step %d: accuracy %.4f (%d/%d answers), loss on the answers %.4f\n", step, ev.Accuracy, ev.Correct, ev.Answers, ev.Loss)
		if o.Metrics == nil {
			return nil
		}
		return o.Metrics.Write(metrics.Record{Kind: metrics.KindEval, Step: step, Loss: ev.Loss, Accuracy: ev.Accuracy, Correct: ev.Correct, Answers: ev.Answers})
	}
	return func(p train.Progress) {
		if ctx.Err() != nil {
			return
		}
		bar.Update(p)
		if o.Metrics != nil {
			if err := o.Metrics.Write(metrics.Record{Kind: metrics.KindTrain, Step: p.Step, TotalSteps: p.TotalSteps, Loss: p.Loss, LR: p.LR,
				GradNorm: p.GradNorm, Tokens: p.Tokens, TokensPerSec: p.TokensPerSec, ElapsedSec: p.Elapsed.Seconds()}); err != nil {
				fail(err)
				return
			}
		}
		if gen != nil && (p.Step == p.TotalSteps || o.EvalEvery > 0 && p.Step%o.EvalEvery == 0) {
			if err := evaluate(p.Step); err != nil {
				fail(err)
			}
		}
	}, nil
}

// openBackend returns the backend that kind and precision (a spec's
// backend and precision) select for cfg, and a function that releases it.
// cpu is the CPU reference in float32. cuda is the CUDA backend in the
// spec's precision (float32: fp32 throughout; bf16: bf16 activations and
// products over fp32 parameters and optimizer state), with explicit
// synchronisation (the trainer moves the state between host and device
// itself); an error says why it cannot run here. auto is the CUDA backend
// when it can run and supports cfg, else the CPU reference, with the
// reason printed. The backend that runs is printed to out.
func openBackend(kind, precision string, cfg model.Config, out io.Writer) (model.Backend[float32], func(), error) {
	cpu := func(why string) (model.Backend[float32], func(), error) {
		m, err := ref.New[float32](cfg)
		if err != nil {
			return nil, nil, usageError{err}
		}
		fmt.Fprintf(out, "backend: %s%s\n", m.Name(), why)
		return m, func() {}, nil
	}
	switch kind {
	case jobspec.BackendCPU:
		return cpu("")
	case jobspec.BackendCUDA, jobspec.BackendAuto:
	default:
		return nil, nil, usagef("backend: must be cpu, cuda or auto, got %q", kind)
	}
	var prec gpu.Precision
	switch precision {
	case jobspec.PrecisionFloat32, "":
		prec = gpu.F32
	case jobspec.PrecisionBF16:
		prec = gpu.BF16
	default:
		return nil, nil, usagef("precision: must be float32 or bf16, got %q", precision)
	}
	g, err := gpu.Open("", cfg, gpu.Options{Precision: prec, ExplicitSync: true})
	switch {
	case err == nil:
		fmt.Fprintf(out, "backend: %s (%s)\n", g.Name(), g.Device())
		return g, func() { g.Close() }, nil
	case kind == jobspec.BackendCUDA && errors.Is(err, gpu.ErrUnavailable):
		return nil, nil, usagef("backend: cuda: no CUDA backend can run here (%s); use backend cpu or auto", unavailableReason(err))
	case kind == jobspec.BackendCUDA && errors.Is(err, gpu.ErrUnsupported):
		return nil, nil, usagef("backend: cuda: %v; use backend cpu or auto", err)
	case errors.Is(err, gpu.ErrUnavailable):
		return cpu(fmt.Sprintf(" (CUDA unavailable: %s)", unavailableReason(err)))
	case errors.Is(err, gpu.ErrUnsupported):
		return cpu(fmt.Sprintf(" (the CUDA kernels do not support this model: %v)", err))
	}
	return nil, nil, fmt.Errorf("backend: %s: starting the CUDA backend: %w", kind, err)
}

// unavailableReason is the reason in an error wrapping gpu.ErrUnavailable,
// without the sentinel's own words.
func unavailableReason(err error) string {
	return strings.TrimPrefix(err.Error(), gpu.ErrUnavailable.Error()+": ")
}

// locationJoin appends path elements to a location: with slashes to an
// s3:// URL, with the separator to a local path.
func locationJoin(loc string, elem ...string) string {
	if fetch.IsRemote(loc) {
		return strings.TrimRight(loc, "/") + "/" + strings.Join(elem, "/")
	}
	return filepath.Join(append([]string{loc}, elem...)...)
}
