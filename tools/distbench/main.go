// Command distbench measures distributed training: for each (dp, sp)
// layout it runs one rank per process, the ranks talking over gRPC on
// loopback, and prints the step time, the tokens per second, the speedup
// over dp = sp = 1 measured in the same run and the scaling efficiency
// (tokens/s ÷ (ranks × tokens/s of dp1×sp1)), the share of the step that
// the ranks spent waiting on communication, and the bytes each rank sent
// per step.
//
// Two backends: -backend cpu (the default) trains on model/ref in float32;
// -backend cuda trains on kernels/gpu in -precision bf16 (the default) or
// f32, rank r on GPU r mod -gpus: the parent gives every rank's process a
// CUDA_VISIBLE_DEVICES of that one GPU (an entry of the parent's own
// CUDA_VISIBLE_DEVICES list when it has one) and leaves the rest of the
// environment as it inherited it.
//
// After the layouts, the CPU backend measures the memory of one rank as a
// function of the positions it holds and prints the longest sequence that
// fits a fixed memory budget per rank as sp grows. The CUDA backend instead
// searches, for each sp of -long-sp, the longest sequence L (a multiple of
// chunk·sp) of which one sequence (micro-batch 1, global batch 1, dp 1)
// split over sp ranks on sp GPUs trains without a CUDA out-of-memory
// error: doubling from -long-start up to -long-max, then bisecting to
// -long-res, every trial a fresh set of rank processes. It reports the
// longest L, the positions per rank, the device memory in use after the
// step (the largest over the ranks; total − free, which counts every
// process on the GPU), the ratio to sp = 1 and the step time at that
// length. A trial fits unless a rank fails with a CUDA allocation error;
// any other failure (another CUDA error, a loss that is not finite) stops
// the search with its message. Each trial prints its first step's loss,
// which for a freshly initialised model on uniform random tokens is close
// to ln(vocab).
//
// CPU:
//
//	go run ./tools/distbench
//	go run ./tools/distbench -grid 1x1,2x1 -steps 5 -budget-mib 512
//
// GPU: build anywhere (no cgo, no CUDA needed), run on the GPU machine from
// the repository root:
//
//	go build -o .devbin/distbench ./tools/distbench
//	kernels/build.sh kernels/build && export M2K_LIB=$PWD/kernels/build/libm2kernels.so
//	.devbin/distbench -backend cuda -preset 130m -grid 1x1,2x1 -long-sp 1,2
//	.devbin/distbench -backend cuda -preset 130m -grid 1x1,2x1,4x1,8x1 -mem=false -json dp.json
//
// -preset 130m is the published mamba2-130m training shape: d_model 768,
// 24 layers, vocabulary 50,288, d_state 128, head dim 64, chunk 256,
// sequences of 2,048 tokens, micro-batch 8 and a global batch of 256
// sequences (524,288 tokens per optimizer step, by gradient accumulation);
// flags given explicitly override it.
//
// -json FILE writes the results for a driver script, to set beside other
// frameworks' numbers: the settings (tool, backend, precision, device,
// gpus, visible_gpus, library, cores, gomaxprocs_per_rank, model {d_model,
// n_layer, vocab_size, d_state, headdim, nheads, chunk_size, parameters},
// seq_len, micro_batch, global_batch, global_batch_tokens, sp_mode, zero1,
// bucket_mib, warmup_steps, timed_steps, rounds); layouts, one object per
// layout run (layout "DPxSP", dp, sp, ranks, pure_dp, overlap, gpus_used,
// step_s, tokens_per_s, speedup and scaling_efficiency against dp1×sp1 or
// null, comm_share as a fraction, exposed_allreduce_ms,
// mib_sent_per_rank_step, cpu_s_per_step, buckets_overlapped, buckets,
// loss, device_used_peak_bytes, backend, precision, parameters,
// global_batch_tokens, tokens_per_step); with -backend cuda, longest, one
// object per sp of the search (sp, longest_seq_len, positions_per_rank,
// device_used_peak_bytes, ratio_to_sp1 or null, step_s, loss_first,
// capped, trials [{seq_len, fits, step_s, loss_first,
// device_used_peak_bytes, oom}]); and error, when the run stopped early
// (the rows measured before are kept).
//
// Every rank runs with GOMAXPROCS = -procs (1 with the CPU backend, so that
// a layout of N ranks uses N cores when the machine has them; with the CUDA
// backend its GPU's share of the cores, at least 4, since its host side
// launches kernels while the ring's goroutines move the gradients); on a
// machine with fewer cores than ranks the ranks share them, and the table
// says so.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/kernels/gpu"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/tools/internal/flagpreset"
)

// Environment variables that select a child's role.
const (
	// childEnv carries a rank's number into its process.
	childEnv = "DISTBENCH_RANK"
	// probeEnv makes the process report the GPUs it sees and exit.
	probeEnv = "DISTBENCH_PROBE"
)

// Backends.
const (
	backendCPU  = "cpu"
	backendCUDA = "cuda"
)

// Precisions.
const (
	precF32  = "f32"
	precBF16 = "bf16"
)

type layout struct {
	dp, sp    int
	noOverlap bool
}

func (l layout) String() string {
	s := fmt.Sprintf("dp%d×sp%d", l.dp, l.sp)
	if l.noOverlap {
		s += " no-overlap"
	}
	return s
}

type options struct {
	preset    string
	backend   string
	precision string // f32 or bf16; f32 with the CPU backend
	gpus      int    // 0: every visible GPU
	lib       string
	jsonPath  string
	grid      []layout
	overlap   bool // also run every dp > 1 layout without overlap
	dModel    int
	layers    int
	dState    int
	headDim   int
	chunk     int
	vocab     int
	seqLen    int
	micro     int
	global    int
	mode      string
	zero      bool
	allreduce string // parallel.allreduce_dtype
	steps     int
	warmup    int
	rounds    int
	procs     int
	bucketMiB int
	budgetMiB int
	memOnly   bool
	mem       bool
	profile   string
	timeout   time.Duration
	// The longest-sequence search of the CUDA backend.
	longSP    []int // nil: 1, 2, 4, … up to the GPU count
	longStart int
	longRes   resolution
	longMax   int
	longSteps int
	// child only
	dp, sp, noOverlap int
	addrs             string
}

// presets are the flag values of each -preset; "" leaves the flags'
// defaults (a small model that the CPU backend trains in seconds).
var presets = flagpreset.Presets{
	"": {},
	"130m": {
		"d-model": "768", "layers": "24", "vocab": "50288", "d-state": "128", "headdim": "64", "chunk": "256",
		"seq": "2048", "micro": "8", "global": "256",
	},
}

// parseFlags reads args (without the program name). A request for help
// returns flag.ErrHelp after the usage is printed to out. The rules that
// need the GPUs (-gpus and -long-sp against the visible count) are checked
// later, by checkGPUs.
func parseFlags(args []string, out io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("distbench", flag.ContinueOnError)
	fs.SetOutput(out)
	var grid, longSP, longRes string
	fs.StringVar(&o.preset, "preset", "", "configuration the other flags start from: 130m (mamba2-130m: d_model 768, 24 layers, vocab 50288, d_state 128, headdim 64, chunk 256, seq 2048, micro 8, global 256); flags given explicitly override it")
	fs.StringVar(&o.backend, "backend", backendCPU, "cpu (model/ref, float32) or cuda (kernels/gpu, one GPU per rank)")
	fs.StringVar(&o.precision, "precision", "", "with -backend cuda: bf16 (the default) or f32")
	fs.IntVar(&o.gpus, "gpus", 0, "with -backend cuda: GPUs to use, rank r on GPU r mod N; 0 = every visible GPU")
	fs.StringVar(&o.lib, "lib", "", "with -backend cuda: path of libm2kernels.so (default: $M2K_LIB, next to the executable, or kernels/build/)")
	fs.StringVar(&o.jsonPath, "json", "", "also write the results as JSON to this file")
	fs.StringVar(&grid, "grid", "1x1,2x1,1x2,2x2", "comma-separated dp×sp layouts, e.g. 1x1,2x1")
	fs.BoolVar(&o.overlap, "overlap-baseline", true, "also run each layout with dp·sp > 1 without overlapping the all-reduce and the backward")
	fs.IntVar(&o.dModel, "d-model", 256, "d_model")
	fs.IntVar(&o.layers, "layers", 4, "n_layer")
	fs.IntVar(&o.dState, "d-state", 64, "d_state")
	fs.IntVar(&o.headDim, "headdim", 32, "head dim")
	fs.IntVar(&o.chunk, "chunk", 64, "SSD chunk size Q")
	fs.IntVar(&o.vocab, "vocab", 272, "vocabulary size")
	fs.IntVar(&o.seqLen, "seq", 1024, "sequence length L")
	fs.IntVar(&o.micro, "micro", 1, "micro-batch (sequences per rank and micro-batch)")
	fs.IntVar(&o.global, "global", 4, "global batch (sequences per step); a multiple of micro·dp for every layout")
	fs.StringVar(&o.mode, "sp-mode", jobspec.SPModeSequential, "sequence-parallel mode: sequential or prefix (the CPU backend only)")
	fs.BoolVar(&o.zero, "zero1", false, "shard the optimizer (ZeRO-1; the CPU backend only)")
	fs.StringVar(&o.allreduce, "allreduce-dtype", jobspec.AllReduceFloat32, "element type of the gradient all-reduce: float32, or bf16 (half the bytes)")
	fs.IntVar(&o.steps, "steps", 3, "timed steps per layout")
	fs.IntVar(&o.warmup, "warmup", 1, "untimed steps first")
	fs.IntVar(&o.rounds, "rounds", 2, "rounds over all layouts; each layout's fastest round counts")
	fs.IntVar(&o.procs, "procs", 0, "GOMAXPROCS of every rank; 0 = 1 with -backend cpu, with -backend cuda the cores over -gpus (at least 4)")
	fs.IntVar(&o.bucketMiB, "bucket-mib", 1, "gradient bucket size in MiB")
	fs.IntVar(&o.budgetMiB, "budget-mib", 256, "with -backend cpu: memory budget per rank for the longest-sequence table")
	fs.BoolVar(&o.memOnly, "mem-only", false, "only the memory table (cpu) or the longest-sequence search (cuda)")
	fs.BoolVar(&o.mem, "mem", true, "after the layouts, the memory table (cpu) or the longest-sequence search (cuda)")
	fs.StringVar(&longSP, "long-sp", "", "with -backend cuda: comma-separated sp values of the longest-sequence search (default 1,2,4,… up to the GPU count)")
	fs.IntVar(&o.longStart, "long-start", 16384, "with -backend cuda: the search's first length, rounded up to a multiple of chunk·sp")
	fs.StringVar(&longRes, "long-res", "1/16", "with -backend cuda: the search stops when the longest fitting and the shortest failing length differ by at most this: 1/K of the longest fitting length, or a number of positions (either rounded down to a multiple of chunk·sp, at least one)")
	fs.IntVar(&o.longMax, "long-max", 1<<21, fmt.Sprintf("with -backend cuda: the longest length the search tries (at most %d)", maxLongSeq))
	fs.IntVar(&o.longSteps, "long-steps", 2, "with -backend cuda: training steps per trial of the search; the last one is timed")
	fs.StringVar(&o.profile, "cpuprofile", "", "write each rank's CPU profile of the timed steps to this file name plus .<layout>.<rank>")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Minute, "give up after this long (with -backend cuda the default is 2h: the longest-sequence search runs many trials)")
	fs.IntVar(&o.dp, "dp", 0, "internal: dp of the child's layout")
	fs.IntVar(&o.sp, "sp", 0, "internal: sp of the child's layout")
	fs.IntVar(&o.noOverlap, "no-overlap", 0, "internal: 1 turns the overlap off")
	fs.StringVar(&o.addrs, "addrs", "", "internal: gRPC addresses of the ranks")
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: distbench [flags]\n\nMeasures data- and sequence-parallel training, one rank per process over gRPC on\nloopback, on the CPU or on GPUs (-backend cuda).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if err := presets.Apply(fs, o.preset, "-"); err != nil {
		return o, err
	}
	if err := o.checkBackend(set); err != nil {
		return o, err
	}
	var err error
	if o.grid, err = parseGrid(grid); err != nil {
		return o, err
	}
	if set["long-sp"] {
		if o.longSP, err = parseLongSP(longSP); err != nil {
			return o, err
		}
	}
	if o.longRes, err = parseResolution(longRes); err != nil {
		return o, err
	}
	return o, o.validate()
}

// cudaOnly are the flags that mean something with -backend cuda alone.
var cudaOnly = []string{"gpus", "lib", "long-sp", "long-start", "long-res", "long-max", "long-steps"}

// checkBackend checks -backend and the flags that depend on it, and fills
// in the defaults of -precision and -procs.
func (o *options) checkBackend(set map[string]bool) error {
	switch o.backend {
	case backendCPU:
		for _, f := range cudaOnly {
			if set[f] {
				return fmt.Errorf("-%s is for -backend cuda; this run uses -backend cpu", f)
			}
		}
		switch o.precision {
		case "", precF32:
			o.precision = precF32
		case precBF16:
			return fmt.Errorf("-precision bf16 needs -backend cuda; the CPU backend computes in float32")
		default:
			return fmt.Errorf("-precision must be f32 or bf16, got %q", o.precision)
		}
		if o.procs == 0 {
			o.procs = 1
		}
	case backendCUDA:
		switch o.precision {
		case "":
			o.precision = precBF16
		case precF32, precBF16:
		default:
			return fmt.Errorf("-precision must be bf16 or f32, got %q", o.precision)
		}
		// -procs 0 stays 0 until checkGPUs knows the GPU count.
		if !set["timeout"] {
			o.timeout = cudaTimeout
		}
		if set["budget-mib"] {
			return fmt.Errorf("-budget-mib is for -backend cpu; with -backend cuda the memory limit is the GPU's (see -long-sp)")
		}
		if o.mode != jobspec.SPModeSequential {
			return fmt.Errorf("-sp-mode %s: the CUDA backend implements the %s mode only", o.mode, jobspec.SPModeSequential)
		}
		if o.zero {
			return fmt.Errorf("-zero1: the CUDA backend keeps the optimizer on the GPU and has no sharded update; use -backend cpu")
		}
	default:
		return fmt.Errorf("-backend must be cpu or cuda, got %q", o.backend)
	}
	return nil
}

// parseGrid reads the -grid list.
func parseGrid(grid string) ([]layout, error) {
	var out []layout
	for _, f := range strings.Split(grid, ",") {
		dp, sp, ok := strings.Cut(strings.TrimSpace(f), "x")
		l := layout{dp: -1, sp: -1}
		if ok {
			l.dp, _ = strconv.Atoi(dp)
			l.sp, _ = strconv.Atoi(sp)
		}
		if l.dp < 1 || l.sp < 1 || l.dp*l.sp > 64 {
			return nil, fmt.Errorf("-grid: %q is not a layout dpxsp (positive integers) of at most 64 ranks", f)
		}
		out = append(out, l)
	}
	return out, nil
}

// parseLongSP reads the -long-sp list.
func parseLongSP(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		sp, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || sp < 1 {
			return nil, fmt.Errorf("-long-sp: %q is not a positive integer", f)
		}
		if slices.Contains(out, sp) {
			return nil, fmt.Errorf("-long-sp: %d is listed twice", sp)
		}
		out = append(out, sp)
	}
	return out, nil
}

// cudaTimeout is the default -timeout with -backend cuda.
const cudaTimeout = 2 * time.Hour

// maxLongSeq is the longest sequence a job spec allows (data.seq_len).
const maxLongSeq = 1 << 22

// validate names the first flag that breaks a rule.
func (o options) validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"seq", o.seqLen}, {"micro", o.micro}, {"global", o.global}, {"steps", o.steps}, {"rounds", o.rounds},
		{"bucket-mib", o.bucketMiB}, {"chunk", o.chunk}, {"headdim", o.headDim}, {"d-state", o.dState},
		{"long-start", o.longStart}, {"long-steps", o.longSteps}} {
		if f.v < 1 {
			return fmt.Errorf("-%s must be at least 1, got %d", f.name, f.v)
		}
	}
	if o.warmup < 0 {
		return fmt.Errorf("-warmup must be at least 0, got %d", o.warmup)
	}
	if o.allreduce != jobspec.AllReduceFloat32 && o.allreduce != jobspec.AllReduceBF16 {
		return fmt.Errorf("-allreduce-dtype must be %s or %s, got %q", jobspec.AllReduceFloat32, jobspec.AllReduceBF16, o.allreduce)
	}
	if o.allreduce == jobspec.AllReduceBF16 && o.zero {
		return fmt.Errorf("-allreduce-dtype bf16 is for the data-parallel all-reduce; -zero1 reduce-scatters in float32")
	}
	if o.procs < 0 {
		return fmt.Errorf("-procs must be at least 0 (0: the default), got %d", o.procs)
	}
	if o.gpus < 0 {
		return fmt.Errorf("-gpus must be at least 0 (0 = every visible GPU), got %d", o.gpus)
	}
	if o.budgetMiB < 1 {
		return fmt.Errorf("-budget-mib must be at least 1, got %d", o.budgetMiB)
	}
	for _, l := range o.grid {
		if o.seqLen%l.sp != 0 {
			return fmt.Errorf("-grid %dx%d: -seq %d must be a multiple of sp = %d", l.dp, l.sp, o.seqLen, l.sp)
		}
		if o.global%(o.micro*l.dp) != 0 {
			return fmt.Errorf("-grid %dx%d: -global %d must be a multiple of -micro·dp = %d·%d = %d", l.dp, l.sp, o.global, o.micro, l.dp, o.micro*l.dp)
		}
	}
	if o.backend == backendCUDA {
		if o.longMax < 1 || o.longMax > maxLongSeq {
			return fmt.Errorf("-long-max must be in [1, %d], got %d", maxLongSeq, o.longMax)
		}
		for _, sp := range o.longSP {
			if q := o.chunk * sp; o.longMax < q {
				return fmt.Errorf("-long-max %d is shorter than chunk·sp = %d·%d = %d, the shortest length -long-sp %d can try", o.longMax, o.chunk, sp, q, sp)
			}
		}
	}
	if _, err := o.modelConfig(); err != nil {
		return err
	}
	return nil
}

// checkGPUs checks the flags that depend on the number of GPUs visible to
// this process and fills in the defaults of -gpus and -long-sp.
func (o *options) checkGPUs(visible int) error {
	if visible < 1 {
		return errors.New("-backend cuda: CUDA sees no GPU (check CUDA_VISIBLE_DEVICES)")
	}
	switch {
	case o.gpus == 0:
		o.gpus = visible
	case o.gpus > visible:
		return fmt.Errorf("-gpus %d: only %d GPU(s) are visible", o.gpus, visible)
	}
	if o.procs == 0 {
		o.procs = cudaProcs(runtime.NumCPU(), o.gpus)
	}
	if o.longSP == nil {
		for sp := 1; sp <= o.gpus; sp *= 2 {
			o.longSP = append(o.longSP, sp)
		}
	}
	for _, sp := range o.longSP {
		if sp > o.gpus {
			return fmt.Errorf("-long-sp %d: the search puts each of the sp ranks on its own GPU, and -gpus is %d", sp, o.gpus)
		}
	}
	return nil
}

// cudaProcs is the default GOMAXPROCS of a rank on a GPU: its GPU's share
// of the host's cores, as a worker of one GPU gets, and at least 4. A rank
// launches kernels from one goroutine while the ring's goroutines reduce
// and move the gradient buckets; with fewer Ps than runnable goroutines the
// launching one waits for a P (the scheduler's time slice is 10 ms) and the
// GPU idles.
func cudaProcs(cores, gpus int) int {
	return max(4, cores/max(1, gpus))
}

// modelConfig is the model of the flags: mamba_ssm's defaults at the given
// width, depth, vocabulary, state, head dimension and chunk, checked against
// the CUDA kernels' limits with -backend cuda.
func (o options) modelConfig() (model.Config, error) {
	cfg := model.DefaultConfig(o.dModel, o.layers, o.vocab)
	cfg.DState, cfg.HeadDim, cfg.ChunkSize = o.dState, o.headDim, o.chunk
	if o.headDim > 0 {
		cfg.NHeads = cfg.Expand * cfg.DModel / cfg.HeadDim
	}
	if o.backend == backendCUDA {
		return cfg, gpu.CheckConfig(cfg)
	}
	return cfg, cfg.Validate()
}

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "distbench:", err)
		os.Exit(2)
	}
	if os.Getenv(probeEnv) != "" {
		runProbeChild(o)
		return
	}
	if r := os.Getenv(childEnv); r != "" {
		rank, err := strconv.Atoi(r)
		if err != nil {
			fmt.Fprintf(os.Stderr, "distbench: %s=%q is not a rank\n", childEnv, r)
			os.Exit(2)
		}
		if err := runChild(o, rank); err != nil {
			fmt.Fprintf(os.Stderr, "distbench rank %d: %v\n", rank, err)
			if isOOM(err) {
				os.Exit(exitOOM)
			}
			os.Exit(1)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	if err := runParent(ctx, o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "distbench:", err)
		os.Exit(1)
	}
}
