package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/kernels/gpu"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/data/mqar"
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

// isS3 reports whether a location is in S3.
func isS3(loc string) bool { return strings.HasPrefix(strings.ToLower(loc), "s3://") }

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
	if isS3(spec.Model.InitFrom) {
		dir, err := fetchHFModel(ctx, spec.Model.InitFrom, o, log, out)
		if err != nil {
			return trainResult{}, err
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
	case isS3(spec.Data.Path):
		if ds, err = fetchDataset(ctx, spec.Data.Path, o, log, out); err != nil {
			return trainResult{}, err
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
	if isS3(loc) {
		return strings.TrimRight(loc, "/") + "/" + strings.Join(elem, "/")
	}
	return filepath.Join(append([]string{loc}, elem...)...)
}

// cacheDirFor returns the directory under the cache that mirrors a
// location: its bucket and prefix made safe for a path, and a hash of the
// store (endpoint, bucket) and prefix so that equal names on different
// servers do not share it.
func cacheDirFor(root, kind string, store checkpoint.Store, prefix string) string {
	sum := sha256.Sum256([]byte(store.String() + "\x00" + prefix))
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_' {
			return r
		}
		return '_'
	}, strings.TrimPrefix(store.String(), "s3://")+"_"+prefix)
	if len(name) > 80 {
		name = name[:80]
	}
	return filepath.Join(root, kind, name+"-"+hex.EncodeToString(sum[:6]))
}

// download copies the object key of store to the file dst through a
// temporary file in its directory, and returns the number of bytes.
// want >= 0 is the size the object must have.
func download(ctx context.Context, store checkpoint.Store, key, dst string, want int64) (int64, error) {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return 0, err
	}
	r, err := store.Open(ctx, key)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	f, err := os.CreateTemp(filepath.Dir(dst), ".download-"+filepath.Base(dst)+"-*")
	if err != nil {
		return 0, err
	}
	tmp := f.Name()
	n, err := io.Copy(f, r)
	if err == nil && want >= 0 && n != want {
		err = fmt.Errorf("%s: downloaded %d bytes, want %d", key, n, want)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		os.Remove(tmp)
		return 0, err
	}
	return n, nil
}

// safeRelPath checks that a slash-separated relative path from a manifest
// stays below its directory.
func safeRelPath(p string) error {
	c := path.Clean(p)
	if p == "" || path.IsAbs(p) || c == "." || c == ".." || strings.HasPrefix(c, "../") || strings.Contains(p, "\\") {
		return fmt.Errorf("path %q must be relative and stay below the dataset's directory", p)
	}
	return nil
}

// fetchDataset downloads the token dataset at an s3:// location into the
// cache and opens it. The location is a dataset directory (its
// manifest.json, else every *.m2tok object directly in it, by name), a
// manifest (*.json) or one shard (*.m2tok). Every shard's header is checked
// (against its manifest entry when there is one) and its size and CRC-32C
// verified before training; with a manifest, a cached shard whose size
// matches is verified and reused instead of downloaded again, and a cached
// shard that fails is downloaded again.
func fetchDataset(ctx context.Context, loc string, o trainOptions, log *slog.Logger, out io.Writer) (*data.Dataset, error) {
	store, prefix, err := openStore(ctx, "data.path", loc, o, log)
	if err != nil {
		return nil, err
	}
	defer closeStore(store)
	cache := cacheDirFor(o.CacheDir, "data", store, prefix)
	fail := func(err error) (*data.Dataset, error) { return nil, fmt.Errorf("data.path %s: %w", loc, err) }

	manifestKey, dirKey := "", prefix
	switch {
	case strings.HasSuffix(prefix, ".json"):
		manifestKey, dirKey = prefix, path.Dir(prefix)
	case strings.HasSuffix(prefix, data.ShardExt):
		dst := filepath.Join(cache, path.Base(prefix))
		if _, err := download(ctx, store, prefix, dst, -1); err != nil {
			return fail(err)
		}
		return openVerified(ctx, fail, dst)
	default:
		manifestKey = checkpoint.JoinKey(prefix, data.ManifestName)
	}
	if dirKey == "." {
		dirKey = ""
	}
	mpath := filepath.Join(cache, data.ManifestName)
	if _, err := download(ctx, store, manifestKey, mpath, -1); errors.Is(err, checkpoint.ErrNotFound) && !strings.HasSuffix(prefix, ".json") {
		return fetchShardsWithoutManifest(ctx, store, dirKey, cache, fail, out)
	} else if err != nil {
		return fail(err)
	}
	man, err := data.ReadManifest(mpath)
	if err != nil {
		return fail(err)
	}
	var fetched, reused int
	var bytes int64
	for _, e := range man.Shards {
		if err := safeRelPath(e.Path); err != nil {
			return fail(fmt.Errorf("manifest: %w", err))
		}
		key, dst := checkpoint.JoinKey(dirKey, e.Path), filepath.Join(cache, filepath.FromSlash(e.Path))
		want := int64(data.HeaderSize) + int64(e.Tokens)*int64(e.Width)
		cached := false
		if st, err := os.Stat(dst); err == nil && st.Size() == want {
			if checkShard(ctx, dst, &e) == nil {
				cached = true
			}
		}
		if cached {
			reused++
			continue
		}
		if _, err := download(ctx, store, key, dst, want); err != nil {
			return fail(err)
		}
		if err := checkShard(ctx, dst, &e); err != nil {
			os.Remove(dst)
			return fail(err)
		}
		fetched++
		bytes += want
	}
	fmt.Fprintf(out, "data: %s: %d shards verified in %s (%d downloaded, %d bytes; %d reused)\n", loc, len(man.Shards), cache, fetched, bytes, reused)
	ds, err := data.OpenManifest(mpath)
	if err != nil {
		return fail(err)
	}
	return ds, nil
}

// fetchShardsWithoutManifest downloads every *.m2tok object directly
// under dirKey (no manifest says what to expect, so nothing is reused),
// verifies each and opens them in name order.
func fetchShardsWithoutManifest(ctx context.Context, store checkpoint.Store, dirKey, cache string, fail func(error) (*data.Dataset, error), out io.Writer) (*data.Dataset, error) {
	base := checkpoint.JoinKey(dirKey, "")
	if dirKey == "" {
		base = ""
	}
	names, err := store.List(ctx, base)
	if err != nil {
		return fail(err)
	}
	var paths []string
	var total int64
	for _, n := range names {
		rel := strings.TrimPrefix(n, base)
		if strings.Contains(rel, "/") || !strings.HasSuffix(rel, data.ShardExt) || strings.HasPrefix(rel, ".") {
			continue
		}
		dst := filepath.Join(cache, rel)
		k, err := download(ctx, store, n, dst, -1)
		if err != nil {
			return fail(err)
		}
		paths = append(paths, dst)
		total += k
	}
	if len(paths) == 0 {
		return fail(fmt.Errorf("%w: no %s and no *%s objects", data.ErrNoShards, data.ManifestName, data.ShardExt))
	}
	slices.Sort(paths)
	fmt.Fprintf(out, "data: %d shards without a manifest downloaded to %s (%d bytes)\n", len(paths), cache, total)
	return openVerified(ctx, fail, paths...)
}

// openVerified opens shard files as one dataset and verifies every one.
func openVerified(ctx context.Context, fail func(error) (*data.Dataset, error), paths ...string) (*data.Dataset, error) {
	ds, err := data.OpenShards(paths...)
	if err != nil {
		return fail(err)
	}
	if err := ds.Verify(ctx); err != nil {
		ds.Close()
		return fail(err)
	}
	return ds, nil
}

// checkShard opens a shard file, checks its header against the manifest
// entry and verifies its tokens (CRC-32C and vocabulary range).
func checkShard(ctx context.Context, file string, e *data.ManifestShard) error {
	s, err := data.OpenShard(file)
	if err != nil {
		return err
	}
	defer s.Close()
	h := s.Header()
	if h.Count != e.Tokens || h.Width != e.Width || fmt.Sprintf("%08x", h.Checksum) != e.CRC32C {
		return fmt.Errorf("%s: header says %d tokens of width %d, crc32c %08x; the manifest %d, %d, %s", e.Path, h.Count, h.Width, h.Checksum, e.Tokens, e.Width, e.CRC32C)
	}
	return s.VerifyContext(ctx)
}

// fetchHFModel downloads the Hugging Face checkpoint directory at an s3://
// location (config.json and model.safetensors, or a sharded index and its
// shards) into the cache and returns the local directory. When the
// location is a step of a training checkpoint, its manifest's sizes and
// SHA-256 are checked.
func fetchHFModel(ctx context.Context, loc string, o trainOptions, log *slog.Logger, out io.Writer) (string, error) {
	store, prefix, err := openStore(ctx, "model.init_from", loc, o, log)
	if err != nil {
		return "", err
	}
	defer closeStore(store)
	fail := func(err error) (string, error) { return "", fmt.Errorf("model.init_from %s: %w", loc, err) }
	dir := cacheDirFor(o.CacheDir, "models", store, prefix)
	if err := os.RemoveAll(dir); err != nil {
		return fail(err)
	}
	files := []string{hf.ConfigFile, hf.WeightsFile}
	if _, err := download(ctx, store, checkpoint.JoinKey(prefix, hf.WeightsFile), filepath.Join(dir, hf.WeightsFile), -1); errors.Is(err, checkpoint.ErrNotFound) {
		// Sharded weights: the index names the shard files.
		files = []string{hf.ConfigFile, hf.WeightsIndexFile}
		if _, err := download(ctx, store, checkpoint.JoinKey(prefix, hf.WeightsIndexFile), filepath.Join(dir, hf.WeightsIndexFile), -1); err != nil {
			return fail(fmt.Errorf("neither %s nor %s: %w", hf.WeightsFile, hf.WeightsIndexFile, err))
		}
		shards, err := indexShards(filepath.Join(dir, hf.WeightsIndexFile))
		if err != nil {
			return fail(err)
		}
		for _, s := range shards {
			if err := safeRelPath(s); err != nil {
				return fail(fmt.Errorf("%s: %w", hf.WeightsIndexFile, err))
			}
			if _, err := download(ctx, store, checkpoint.JoinKey(prefix, s), filepath.Join(dir, filepath.FromSlash(s)), -1); err != nil {
				return fail(err)
			}
			files = append(files, s)
		}
	} else if err != nil {
		return fail(err)
	}
	if _, err := download(ctx, store, checkpoint.JoinKey(prefix, hf.ConfigFile), filepath.Join(dir, hf.ConfigFile), -1); err != nil {
		return fail(err)
	}
	verified := ""
	if man, err := checkAgainstManifest(ctx, store, prefix, dir, files); err != nil {
		return fail(err)
	} else if man {
		verified = ", sizes and SHA-256 checked against the checkpoint's manifest"
	}
	fmt.Fprintf(out, "model.init_from: %s downloaded to %s%s\n", loc, dir, verified)
	return dir, nil
}

// checkAgainstManifest checks the downloaded files against the manifest of
// the training checkpoint whose step directory prefix is, if it is one;
// it reports whether there was a manifest.
func checkAgainstManifest(ctx context.Context, store checkpoint.Store, prefix, dir string, files []string) (bool, error) {
	parent, stepDir := path.Split(prefix)
	if !stepDirName.MatchString(stepDir) {
		return false, nil
	}
	step, err := strconv.Atoi(strings.TrimPrefix(stepDir, "step-"))
	if err != nil {
		return false, nil
	}
	man, err := checkpoint.ReadManifest(ctx, store, strings.TrimSuffix(parent, "/"), step)
	if errors.Is(err, checkpoint.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	for _, f := range files {
		i := slices.IndexFunc(man.Objects, func(o checkpoint.Object) bool { return o.Name == f })
		if i < 0 {
			continue
		}
		want := man.Objects[i]
		fh, err := os.Open(filepath.Join(dir, f))
		if err != nil {
			return true, err
		}
		h := sha256.New()
		n, err := io.Copy(h, fh)
		fh.Close()
		if err != nil {
			return true, err
		}
		if sum := hex.EncodeToString(h.Sum(nil)); n != want.Size || sum != want.SHA256 {
			return true, fmt.Errorf("%w: %s: %d bytes sha256 %s, the manifest says %d bytes sha256 %s", checkpoint.ErrCorrupt, f, n, sum, want.Size, want.SHA256)
		}
	}
	return true, nil
}

// indexShards returns the shard files a safetensors index's weight_map
// names, sorted, each once.
func indexShards(file string) ([]string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Base(file), err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, fmt.Errorf("%s: weight_map is missing or empty", filepath.Base(file))
	}
	var shards []string
	for _, s := range idx.WeightMap {
		if !slices.Contains(shards, s) {
			shards = append(shards, s)
		}
	}
	slices.Sort(shards)
	return shards, nil
}
