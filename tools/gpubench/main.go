// Command gpubench times full training steps of the Mamba-2 language model
// on the CUDA backend (kernels/gpu): ZeroGrads, ForwardBackward of every
// micro-batch, GradNorm and the device AdamW step, as a training loop that
// keeps its state on the device runs them. It reports the median step time,
// tokens/s and the device memory the model used, next to the backend's own
// arithmetic (gpu.ParameterBytes, gpu.ActivationBytes).
//
// The defaults (--preset 130m) are the published mamba2-130m configuration
// (d_model 768, 24 layers, vocabulary 50,288, d_state 128, head dim 64,
// expand 2, one group, chunk 256, d_conv 4, tied embeddings) at batch 8 ×
// 2,048 tokens in bf16; --preset mqar-tiny is the MQAR sweep's small model
// (d_model 64, 2 layers, vocabulary 8192, d_state 64, head dim 32, chunk
// 64) at batch 64 × 256 in f32, where a step's fixed costs show. Flags given
// explicitly override the preset:
//
//	go build -o .devbin/gpubench ./tools/gpubench          # anywhere; no cgo, no CUDA needed
//	.devbin/gpubench --steps 10 --warmup 3 --json step.json # on the GPU machine, repository root
//	.devbin/gpubench --preset mqar-tiny --loop trainer      # the tiny model as m2ctl train runs it
//	go run ./tools/gpubench --dry-run                      # the plan and the memory arithmetic only
//
// --loop model (the default) drives the backend's calls directly on random
// tokens, every position counted; --loop trainer runs worker/train's
// TrainStep on the built-in MQAR task (seq-len/4 key-value pairs and as
// many queries, so a quarter of the positions are counted), MQAR sample
// generation and the trainer's bookkeeping included, timed as a whole.
// --dense-head and --no-prefetch switch off the LM head over the counted
// positions (gpu.Options.DenseHead) and the trainer's read-ahead of the next
// step's batches (train.Options.NoPrefetch), for comparisons;
// kernels/bench/overhead.sh runs both ways in one call.
//
// Timing: CUDA events on the default stream, on which the backend queues all
// its work, at the start of the step, after the last ForwardBackward, after
// GradNorm and after OptimizerStep (with --loop trainer at the start and the
// end of TrainStep only); the host waits for the last one before
// the next step starts, so each step is timed from idle to idle. The wall
// clock of the same interval is reported too. Medians over the timed steps,
// after the warm-up steps. Then the same number of steps runs back to back,
// with no wait for the device beyond the loop's own, and the wall clock per
// step of that run is reported as well: what a training run sustains.
//
// Memory: the device's total minus free memory (kernels.Lib.MemInfo),
// sampled after the first ForwardBackward (--loop model; the activations exist from the
// first pass) and after every optimizer step (the moments exist from the
// first), keeping the largest. The model's share is that peak minus what
// was in use after the library opened (the CUDA context); the backend
// allocates with cudaMalloc and caches nothing, so the two differ only by
// the context.
//
// The library is found as gpu.Open finds it ($M2K_LIB, next to the
// executable, kernels/build/ here or above) or named by --lib. Without it
// or without a GPU the command says so and exits with status 1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/kernels/gpu"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/tools/internal/benchio"
	"github.com/m2train/m2train/tools/internal/flagpreset"
	"github.com/m2train/m2train/worker/train"
)

// options are the command-line settings.
type options struct {
	preset                string
	dModel, nLayer, vocab int
	dState, headDim       int
	chunk                 int
	batch, seqLen         int
	microBatches          int
	steps, warmup         int
	precision             gpu.Precision
	lr, maxGradNorm       float64
	seed                  uint64
	lib                   string
	jsonPath              string
	dryRun                bool
	loop                  string
	cpuProfile            string
	denseHead, noPrefetch bool
	recomputeSSD          bool
}

// parseFlags reads args (without the program name). A request for help
// returns flag.ErrHelp after the usage is printed to out.
func parseFlags(args []string, out io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("gpubench", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&o.preset, "preset", "130m", "configuration the other flags start from: 130m (mamba2-130m at batch 8 × 2048, bf16) or mqar-tiny (the MQAR sweep's small models: d_model 64, 2 layers, vocab 8192, d_state 64, headdim 32, chunk 64, batch 64 × 256, f32); flags given explicitly override it")
	fs.IntVar(&o.dModel, "d-model", 768, "model width d_model")
	fs.IntVar(&o.nLayer, "n-layer", 24, "number of layers")
	fs.IntVar(&o.vocab, "vocab", 50288, "padded vocabulary size (a multiple of 16)")
	fs.IntVar(&o.dState, "d-state", 128, "SSM state size d_state")
	fs.IntVar(&o.headDim, "headdim", 64, "head dimension (d_model·expand/headdim heads)")
	fs.IntVar(&o.chunk, "chunk", 256, "SSD chunk size")
	fs.IntVar(&o.batch, "batch", 8, "sequences per step")
	fs.IntVar(&o.seqLen, "seq-len", 2048, "tokens per sequence")
	fs.IntVar(&o.microBatches, "micro-batches", 1, "micro-batches per step (must divide --batch); gradients accumulate over them")
	fs.IntVar(&o.steps, "steps", 10, "timed training steps")
	fs.IntVar(&o.warmup, "warmup", 3, "untimed training steps before the timed ones")
	prec := fs.String("precision", "bf16", "activation precision: bf16 or f32")
	fs.Float64Var(&o.lr, "lr", 3e-4, "AdamW learning rate (constant)")
	fs.Float64Var(&o.maxGradNorm, "max-grad-norm", 1.0, "gradient clipping norm; 0 disables clipping (the norm is computed anyway)")
	fs.Uint64Var(&o.seed, "seed", 1, "seed of the initialisation and of the random tokens")
	fs.StringVar(&o.lib, "lib", "", "path of libm2kernels.so (default: $M2K_LIB, next to the executable, or kernels/build/)")
	fs.StringVar(&o.jsonPath, "json", "", "also write the results as JSON to this file")
	fs.BoolVar(&o.dryRun, "dry-run", false, "print the configuration and the memory arithmetic without opening the library")
	fs.StringVar(&o.loop, "loop", "model", "what drives a step: model (the backend's calls, timed per phase) or trainer (worker/train's TrainStep on the built-in MQAR task, as m2ctl train runs it)")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a Go CPU profile of the timed steps to this file")
	fs.BoolVar(&o.denseHead, "dense-head", false, "run the LM head over every position, counted or not (gpu.Options.DenseHead); for comparison")
	fs.BoolVar(&o.recomputeSSD, "recompute-ssd", false, "recompute the scan's forward intermediates in the backward instead of keeping them per layer (gpu.Options.RecomputeSSD); for comparison")
	fs.BoolVar(&o.noPrefetch, "no-prefetch", false, "with --loop trainer, read each step's batches when it starts (train.Options.NoPrefetch); for comparison")
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: gpubench [flags]\n\nTimes full training steps (forward, backward, gradient norm, AdamW) of the Mamba-2\nmodel on the CUDA backend; the defaults are mamba2-130m at batch 8 × 2048 tokens.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := presets.Apply(fs, o.preset, "--"); err != nil {
		return o, err
	}
	switch *prec {
	case "bf16":
		o.precision = gpu.BF16
	case "f32":
		o.precision = gpu.F32
	default:
		return o, fmt.Errorf("--precision must be bf16 or f32, got %q", *prec)
	}
	switch o.loop {
	case loopModel, loopTrainer:
	default:
		return o, fmt.Errorf("--loop must be %s or %s, got %q", loopModel, loopTrainer, o.loop)
	}
	return o, o.validate()
}

// The values of --loop.
const (
	loopModel   = "model"
	loopTrainer = "trainer"
)

// presets are the flag values of each --preset; 130m is the flags' own
// defaults.
var presets = flagpreset.Presets{
	"130m": {},
	"mqar-tiny": {
		"d-model": "64", "n-layer": "2", "vocab": "8192", "d-state": "64", "headdim": "32", "chunk": "64",
		"batch": "64", "seq-len": "256", "precision": "f32",
	},
}

// validate names the first flag that breaks a rule (the model rules are
// checked by model.Config.Validate and gpu.CheckConfig).
func (o options) validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"batch", o.batch}, {"seq-len", o.seqLen}, {"micro-batches", o.microBatches}, {"steps", o.steps},
		{"d-state", o.dState}, {"headdim", o.headDim}, {"chunk", o.chunk}} {
		if f.v < 1 {
			return fmt.Errorf("--%s must be at least 1, got %d", f.name, f.v)
		}
	}
	if o.warmup < 0 {
		return fmt.Errorf("--warmup must be >= 0, got %d", o.warmup)
	}
	if o.batch%o.microBatches != 0 {
		return fmt.Errorf("--micro-batches %d must divide --batch %d", o.microBatches, o.batch)
	}
	if !(o.lr >= 0) || math.IsInf(o.lr, 0) {
		return fmt.Errorf("--lr must be finite and >= 0, got %g", o.lr)
	}
	if !(o.maxGradNorm >= 0) || math.IsInf(o.maxGradNorm, 0) {
		return fmt.Errorf("--max-grad-norm must be finite and >= 0, got %g", o.maxGradNorm)
	}
	return nil
}

// config is the model configuration: mamba_ssm's defaults (those of the
// published Mamba-2 checkpoints) at the given width, depth and vocabulary.
func (o options) config() (model.Config, error) {
	c := model.DefaultConfig(o.dModel, o.nLayer, o.vocab)
	c.DState, c.HeadDim, c.ChunkSize = o.dState, o.headDim, o.chunk
	if o.headDim > 0 {
		c.NHeads = c.Expand * c.DModel / o.headDim
	}
	if err := gpu.CheckConfig(c); err != nil {
		return c, err
	}
	return c, c.ValidateInit()
}

func (o options) gpuOptions() gpu.Options {
	return gpu.Options{Precision: o.precision, ExplicitSync: true, DenseHead: o.denseHead, RecomputeSSD: o.recomputeSSD}
}

// report is the JSON result (and the source of the printed table).
type report struct {
	Tool         string `json:"tool"`
	Preset       string `json:"preset"`
	Loop         string `json:"loop"`
	DenseHead    bool   `json:"dense_head"`
	NoPrefetch   bool   `json:"no_prefetch"`
	RecomputeSSD bool   `json:"recompute_ssd"`
	Device       string `json:"device,omitempty"`
	Library      string `json:"library,omitempty"`
	Precision    string `json:"precision"`

	DModel     int  `json:"d_model"`
	NLayer     int  `json:"n_layer"`
	Vocab      int  `json:"vocab_size"`
	DState     int  `json:"d_state"`
	HeadDim    int  `json:"headdim"`
	NHeads     int  `json:"nheads"`
	NGroups    int  `json:"ngroups"`
	Chunk      int  `json:"chunk_size"`
	DConv      int  `json:"d_conv"`
	Tied       bool `json:"tie_embeddings"`
	Parameters int  `json:"parameters"`

	Batch         int     `json:"batch"`
	SeqLen        int     `json:"seq_len"`
	MicroBatches  int     `json:"micro_batches"`
	TokensPerStep int     `json:"tokens_per_step"`
	Warmup        int     `json:"warmup_steps"`
	Steps         int     `json:"timed_steps"`
	LR            float64 `json:"lr"`
	MaxGradNorm   float64 `json:"max_grad_norm"`

	// Medians over the timed steps, milliseconds (CUDA events, except
	// StepWallMs).
	FwdBwdMs    float64   `json:"fwd_bwd_ms"` // ZeroGrads and every ForwardBackward
	GradNormMs  float64   `json:"grad_norm_ms"`
	OptimizerMs float64   `json:"optimizer_ms"`
	StepMs      float64   `json:"step_ms"`
	StepWallMs  float64   `json:"step_wall_ms"`
	StepMsAll   []float64 `json:"step_ms_all"`
	FirstWallMs float64   `json:"first_step_wall_ms"` // the first step, with the allocation of the activations and moments
	TokensPerS  float64   `json:"tokens_per_s"`       // TokensPerStep / StepMs
	TokensWallS float64   `json:"tokens_per_s_wall"`  // TokensPerStep / StepWallMs
	// BackToBackMs is the wall clock per step of --steps steps run back
	// to back (one wait for the device at the end), after the timed ones.
	BackToBackMs     float64 `json:"back_to_back_ms"`
	TokensBackToBack float64 `json:"tokens_per_s_back_to_back"`

	// Memory, bytes.
	DeviceTotal     int64 `json:"device_total_bytes,omitempty"`
	UsedAtOpen      int64 `json:"used_at_open_bytes,omitempty"` // total − free after the library opened (CUDA context)
	UsedPeak        int64 `json:"used_peak_bytes,omitempty"`    // total − free, largest sample
	ModelPeak       int64 `json:"model_peak_bytes,omitempty"`   // UsedPeak − UsedAtOpen
	ParameterBytes  int64 `json:"parameter_bytes"`              // gpu.ParameterBytes
	ActivationBytes int64 `json:"activation_bytes"`             // gpu.ActivationBytes of one micro-batch

	LossFirst float64 `json:"loss_first,omitempty"` // loss of the first step (random tokens: about ln V)
	LossLast  float64 `json:"loss_last,omitempty"`  // of the last of the warm-up and timed steps, as bench_step.py reports it
	// LossBackToBack is the loss of the last back-to-back step, after
	// as many steps more on the same batches.
	LossBackToBack float64 `json:"loss_back_to_back,omitempty"`
}

func newReport(o options, cfg model.Config) *report {
	gopts := o.gpuOptions()
	return &report{
		Tool: "gpubench", Preset: o.preset, Loop: o.loop, DenseHead: o.denseHead, NoPrefetch: o.noPrefetch,
		RecomputeSSD: o.recomputeSSD,
		Precision:    o.precision.String(),
		DModel:       cfg.DModel, NLayer: cfg.NLayer, Vocab: cfg.VocabSize, DState: cfg.DState, HeadDim: cfg.HeadDim,
		NHeads: cfg.NHeads, NGroups: cfg.NGroups, Chunk: cfg.ChunkSize, DConv: cfg.DConv, Tied: cfg.TieEmbeddings,
		Parameters: model.NewLayout(cfg).Total,
		Batch:      o.batch, SeqLen: o.seqLen, MicroBatches: o.microBatches, TokensPerStep: o.batch * o.seqLen,
		Warmup: o.warmup, Steps: o.steps, LR: o.lr, MaxGradNorm: o.maxGradNorm,
		ParameterBytes:  gpu.ParameterBytes(cfg, gopts),
		ActivationBytes: gpu.ActivationBytes(cfg, o.batch/o.microBatches, o.seqLen, false, gopts),
	}
}

// errUnavailable marks a failure to open the library or the GPU: the
// command exits with status 1 and a message saying what is missing.
var errUnavailable = errors.New("no CUDA library or no GPU")

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpubench:", err)
		os.Exit(2)
	}
	if err := run(context.Background(), o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "gpubench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options, out io.Writer) error {
	cfg, err := o.config()
	if err != nil {
		return err
	}
	rep := newReport(o, cfg)
	if o.dryRun {
		printReport(out, rep, false)
		return benchio.WriteJSON(o.jsonPath, rep)
	}
	lib, err := kernels.Load(o.lib)
	if err != nil {
		return fmt.Errorf("%w: %w\n(build the library with kernels/build.sh on a machine with nvcc, then set $M2K_LIB or --lib, or run from the repository root)", errUnavailable, err)
	}
	if err := measure(ctx, lib, o, cfg, rep); err != nil {
		return err
	}
	printReport(out, rep, true)
	return benchio.WriteJSON(o.jsonPath, rep)
}

// usedBytes is the device memory in use, total − free.
func usedBytes(lib *kernels.Lib) (used, total int64, err error) {
	free, total, err := lib.MemInfo()
	return total - free, total, err
}

// batches returns the step's micro-batches of random tokens: each row is a
// window of seqLen+1 tokens, the inputs its first seqLen and the targets
// its last seqLen, as the data loader makes them.
func batches(o options, vocab int) []*model.Batch {
	rng := rand.New(rand.NewPCG(o.seed, 0x6770756265))
	rows := o.batch / o.microBatches
	out := make([]*model.Batch, o.microBatches)
	for k := range out {
		b := &model.Batch{Batch: rows, SeqLen: o.seqLen,
			Inputs: make([]int32, rows*o.seqLen), Targets: make([]int32, rows*o.seqLen)}
		for r := 0; r < rows; r++ {
			prev := int32(rng.IntN(vocab))
			for t := 0; t < o.seqLen; t++ {
				next := int32(rng.IntN(vocab))
				b.Inputs[r*o.seqLen+t], b.Targets[r*o.seqLen+t] = prev, next
				prev = next
			}
		}
		out[k] = b
	}
	return out
}

// stepTimes are one step's event intervals in milliseconds and its wall
// clock.
type stepTimes struct {
	fwdBwd, gradNorm, optimizer, total float64
	wall                               time.Duration
}

// stepper runs one training step and returns its loss and gradient norm.
// The model loop records the phase events ev[1] and ev[2] itself; first
// asks it to sample the memory after the first forward and backward.
type stepper func(ctx context.Context, first bool) (loss, norm float64, err error)

func measure(ctx context.Context, lib *kernels.Lib, o options, cfg model.Config, rep *report) error {
	usedOpen, total, err := usedBytes(lib)
	if err != nil {
		return err
	}
	rep.Library, rep.DeviceTotal, rep.UsedAtOpen = lib.Path(), total, usedOpen

	m, err := gpu.New(lib, cfg, o.gpuOptions())
	if err != nil {
		return err
	}
	defer m.Close()
	rep.Device = m.Device()
	if err := model.Init(cfg, m.Layout(), m.Params(), o.seed); err != nil {
		return err
	}

	var ev [4]kernels.Event
	for i := range ev {
		if ev[i], err = lib.NewEvent(); err != nil {
			return err
		}
		defer lib.DestroyEvent(ev[i])
	}
	peak := usedOpen
	sample := func() error {
		u, _, err := usedBytes(lib)
		peak = max(peak, u)
		return err
	}
	var run stepper
	if o.loop == loopTrainer {
		run, err = trainerStepper(m, o, cfg)
	} else {
		run, err = modelStepper(m, lib, o, cfg, &ev, sample)
	}
	if err != nil {
		return err
	}
	phases := o.loop == loopModel

	// step runs one training step and times it from idle to idle.
	step := func(first bool) (stepTimes, float64, error) {
		var st stepTimes
		start := time.Now()
		if err := lib.Record(ev[0], 0); err != nil {
			return st, 0, err
		}
		loss, norm, err := run(ctx, first)
		if err != nil {
			return st, 0, err
		}
		if err := lib.Record(ev[3], 0); err != nil {
			return st, 0, err
		}
		if err := lib.Sync(0); err != nil {
			return st, 0, fmt.Errorf("optimizer step: %w", err)
		}
		st.wall = time.Since(start)
		if math.IsNaN(loss) || math.IsInf(loss, 0) || math.IsNaN(norm) || math.IsInf(norm, 0) {
			return st, loss, fmt.Errorf("training diverged: loss %v, gradient norm %v", loss, norm)
		}
		if phases {
			for i, dst := range []*float64{&st.fwdBwd, &st.gradNorm, &st.optimizer} {
				ms, err := lib.ElapsedMs(ev[i], ev[i+1])
				if err != nil {
					return st, 0, err
				}
				*dst = float64(ms)
			}
		}
		ms, err := lib.ElapsedMs(ev[0], ev[3])
		if err != nil {
			return st, 0, err
		}
		st.total = float64(ms)
		return st, loss, sample()
	}

	var timed []stepTimes
	for i := 0; i < o.warmup+o.steps; i++ {
		if i == o.warmup && o.cpuProfile != "" {
			stopProfile, err := benchio.StartCPUProfile(o.cpuProfile)
			if err != nil {
				return err
			}
			defer stopProfile()
		}
		st, loss, err := step(i == 0)
		if err != nil {
			return fmt.Errorf("step %d: %w", i+1, err)
		}
		if i == 0 {
			rep.LossFirst, rep.FirstWallMs = loss, float64(st.wall)/1e6
		}
		rep.LossLast = loss
		if i >= o.warmup {
			timed = append(timed, st)
		}
	}

	// The same number of steps back to back, waiting for the device only
	// where the loop itself does: what a training run sustains.
	start := time.Now()
	for i := 0; i < o.steps; i++ {
		loss, _, err := run(ctx, false)
		if err != nil {
			return fmt.Errorf("back-to-back step %d: %w", i+1, err)
		}
		rep.LossBackToBack = loss
	}
	if err := lib.Sync(0); err != nil {
		return fmt.Errorf("back-to-back steps: %w", err)
	}
	rep.BackToBackMs = float64(time.Since(start)) / 1e6 / float64(o.steps)
	rep.TokensBackToBack = float64(rep.TokensPerStep) / (rep.BackToBackMs / 1e3)

	pick := func(f func(stepTimes) float64) float64 {
		v := make([]float64, len(timed))
		for i, st := range timed {
			v[i] = f(st)
		}
		return median(v)
	}
	if phases {
		rep.FwdBwdMs = pick(func(s stepTimes) float64 { return s.fwdBwd })
		rep.GradNormMs = pick(func(s stepTimes) float64 { return s.gradNorm })
		rep.OptimizerMs = pick(func(s stepTimes) float64 { return s.optimizer })
	}
	rep.StepMs = pick(func(s stepTimes) float64 { return s.total })
	rep.StepWallMs = pick(func(s stepTimes) float64 { return float64(s.wall) / 1e6 })
	for _, st := range timed {
		rep.StepMsAll = append(rep.StepMsAll, math.Round(st.total*1000)/1000)
	}
	rep.TokensPerS = float64(rep.TokensPerStep) / (rep.StepMs / 1e3)
	rep.TokensWallS = float64(rep.TokensPerStep) / (rep.StepWallMs / 1e3)
	rep.UsedPeak = peak
	rep.ModelPeak = peak - usedOpen
	return nil
}

// modelStepper drives the backend as a training loop that keeps its state
// on the device does: ZeroGrads, ForwardBackward of every micro-batch,
// GradNorm and OptimizerStep, recording ev[1] after the last
// ForwardBackward and ev[2] after GradNorm.
func modelStepper(m *gpu.Model, lib *kernels.Lib, o options, cfg model.Config, ev *[4]kernels.Event, sample func() error) (stepper, error) {
	if err := m.SyncFromHost(model.SyncParams, nil); err != nil {
		return nil, err
	}
	opt, err := model.NewAdamW[float32](m.Layout(), model.DefaultAdamWConfig())
	if err != nil {
		return nil, err
	}
	mbs := batches(o, cfg.VocabSize)
	count := o.batch * o.seqLen
	return func(ctx context.Context, first bool) (float64, float64, error) {
		m.ZeroGrads()
		var lossSum float64
		for _, b := range mbs {
			r, err := m.ForwardBackward(ctx, b, model.StepOptions{Count: count})
			if err != nil {
				return 0, 0, err
			}
			lossSum += r.LossSum
		}
		if err := lib.Record(ev[1], 0); err != nil {
			return 0, 0, err
		}
		if first {
			if err := sample(); err != nil {
				return 0, 0, err
			}
		}
		norm, err := m.GradNorm()
		if err != nil {
			return 0, 0, err
		}
		if err := lib.Record(ev[2], 0); err != nil {
			return 0, 0, err
		}
		if err := m.OptimizerStep(opt, o.lr, model.ClipScale(norm, o.maxGradNorm)); err != nil {
			return 0, 0, err
		}
		return lossSum / float64(count), norm, nil
	}, nil
}

// trainerStepper drives worker/train's Trainer on the built-in MQAR task
// (mqarSpec), each step its TrainStep: the loop of m2ctl train and
// m2ctl sweep mqar, MQAR sample generation included.
func trainerStepper(m *gpu.Model, o options, cfg model.Config) (stepper, error) {
	spec, err := mqarSpec(o, cfg)
	if err != nil {
		return nil, err
	}
	in, err := train.NewInput(spec, nil)
	if err != nil {
		return nil, err
	}
	tr, err := train.NewWithInput[float32](spec, m, in, train.Options{NoPrefetch: o.noPrefetch})
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, _ bool) (float64, float64, error) {
		p, err := tr.TrainStep(ctx)
		return p.Loss, p.GradNorm, err
	}, nil
}

// mqarSpec is the job spec of the trainer loop: the model of cfg trained on
// the MQAR task with the model's vocabulary, seq-len/4 key-value pairs and
// as many queries (m2ctl sweep mqar's points), batch and optimizer from the
// flags, a constant learning rate long enough for every step gpubench runs.
func mqarSpec(o options, cfg model.Config) (*jobspec.Spec, error) {
	prec := jobspec.PrecisionFloat32
	if o.precision == gpu.BF16 {
		prec = jobspec.PrecisionBF16
	}
	spec := &jobspec.Spec{
		Name: "gpubench",
		Model: jobspec.Model{Config: &jobspec.ModelConfig{
			DModel: cfg.DModel, NLayer: cfg.NLayer, VocabSize: cfg.VocabSize, DState: cfg.DState,
			HeadDim: cfg.HeadDim, ChunkSize: cfg.ChunkSize,
		}},
		Data:      jobspec.Data{MQAR: &jobspec.MQAR{VocabSize: cfg.VocabSize, NumPairs: o.seqLen / 4}, SeqLen: o.seqLen},
		Batch:     jobspec.Batch{MicroBatch: o.batch / o.microBatches, GlobalBatch: o.batch},
		Optimizer: jobspec.Optimizer{LR: o.lr, WeightDecay: 0.1, GradClip: o.maxGradNorm},
		Schedule:  jobspec.Schedule{TotalSteps: o.warmup + 2*o.steps, MinLR: o.lr},
		Seed:      o.seed,
		Backend:   jobspec.BackendCUDA,
		Precision: prec,
	}
	spec.Normalize()
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("the MQAR spec of --loop trainer: %w", err)
	}
	return spec, nil
}

// median of v (v is reordered).
func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

func gib(b int64) float64 { return float64(b) / (1 << 30) }

// printReport prints the configuration, and with measured the timing and
// memory table.
func printReport(out io.Writer, r *report, measured bool) {
	if r.Device != "" {
		fmt.Fprintf(out, "device: %s\nlibrary: %s\n", r.Device, r.Library)
	}
	tied := "untied"
	if r.Tied {
		tied = "tied"
	}
	fmt.Fprintf(out, "model: d_model %d, %d layers, vocab %d, d_state %d, headdim %d (%d heads), %d group(s), chunk %d, d_conv %d, %s embeddings; %d parameters\n",
		r.DModel, r.NLayer, r.Vocab, r.DState, r.HeadDim, r.NHeads, r.NGroups, r.Chunk, r.DConv, tied, r.Parameters)
	fmt.Fprintf(out, "step: batch %d × %d tokens (%d), %d micro-batch(es), %s activations, fp32 parameters/gradients/moments; AdamW lr %g, clip %g\n",
		r.Batch, r.SeqLen, r.TokensPerStep, r.MicroBatches, r.Precision, r.LR, r.MaxGradNorm)
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	if measured {
		fmt.Fprintf(out, "timing: %s loop, median of %d steps after %d warm-up, CUDA events on the default stream\n\n", r.Loop, r.Steps, r.Warmup)
		fmt.Fprintln(w, "phase\tms\tshare\t")
		if r.Loop == loopModel {
			for _, p := range []struct {
				name string
				ms   float64
			}{{"zero grads + forward + backward", r.FwdBwdMs}, {"gradient norm", r.GradNormMs}, {"optimizer (AdamW)", r.OptimizerMs}} {
				fmt.Fprintf(w, "%s\t%.2f\t%.1f%%\t\n", p.name, p.ms, 100*p.ms/r.StepMs)
			}
		}
		fmt.Fprintf(w, "step (events)\t%.2f\t\t\n", r.StepMs)
		fmt.Fprintf(w, "step (wall clock)\t%.2f\t\t\n", r.StepWallMs)
		fmt.Fprintf(w, "tokens/s (events)\t%.0f\t\t\n", r.TokensPerS)
		fmt.Fprintf(w, "tokens/s (wall clock)\t%.0f\t\t\n", r.TokensWallS)
		fmt.Fprintf(w, "step (%d back to back, wall clock)\t%.2f\t\t\n", r.Steps, r.BackToBackMs)
		fmt.Fprintf(w, "tokens/s (back to back)\t%.0f\t\t\n", r.TokensBackToBack)
		w.Flush()
		fmt.Fprintf(out, "\nall timed steps (ms): %v\nfirst step (wall clock, allocations included): %.1f ms\nloss: first step %.4f, last step %.4f (after the back-to-back steps: %.4f)\n\n",
			r.StepMsAll, r.FirstWallMs, r.LossFirst, r.LossLast, r.LossBackToBack)
	} else {
		fmt.Fprintln(out)
	}
	fmt.Fprintln(w, "memory\tGiB\t")
	if measured {
		fmt.Fprintf(w, "device in use at peak (total − free)\t%.2f\t\n", gib(r.UsedPeak))
		fmt.Fprintf(w, "  in use when the library opened (context)\t%.2f\t\n", gib(r.UsedAtOpen))
		fmt.Fprintf(w, "  the model's peak (difference)\t%.2f\t\n", gib(r.ModelPeak))
	}
	fmt.Fprintf(w, "arithmetic: parameters, gradients, moments, bf16 copies\t%.2f\t\n", gib(r.ParameterBytes))
	fmt.Fprintf(w, "arithmetic: activations of one micro-batch\t%.2f\t\n", gib(r.ActivationBytes))
	fmt.Fprintf(w, "arithmetic: sum (kernel scratch, the scan's kept forward workspaces and cuBLASLt not included)\t%.2f\t\n", gib(r.ParameterBytes+r.ActivationBytes))
	w.Flush()
}
