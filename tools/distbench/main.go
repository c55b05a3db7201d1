// Command distbench measures distributed training on the CPU backend: for
// each (dp, sp) layout it runs one rank per process, the ranks talking
// over gRPC on loopback, and prints the step time, the tokens per second,
// the speedup over dp = sp = 1 measured in the same run, the share of the
// step that the ranks spent waiting on communication, and the bytes each
// rank sent per step. Then it measures the memory of one rank as a
// function of the positions it holds and prints the longest sequence that
// fits a fixed memory budget per rank as sp grows.
//
//	go run ./tools/distbench
//	go run ./tools/distbench -grid 1x1,2x1 -steps 5 -budget-mib 512
//
// Every rank runs with GOMAXPROCS = -procs (1 by default), so that a
// layout of N ranks uses N cores when the machine has them; on a machine
// with fewer cores than ranks the ranks share them, and the table says so.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/train"
)

// childEnv selects the child role and carries the rank.
const childEnv = "DISTBENCH_RANK"

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
	// child only
	dp, sp, noOverlap int
	addrs             string
}

func parseFlags() (options, error) {
	var o options
	var grid string
	flag.StringVar(&grid, "grid", "1x1,2x1,1x2,2x2", "comma-separated dp×sp layouts, e.g. 1x1,2x1")
	flag.BoolVar(&o.overlap, "overlap-baseline", true, "also run each layout with dp·sp > 1 without overlapping the all-reduce and the backward")
	flag.IntVar(&o.dModel, "d-model", 256, "d_model")
	flag.IntVar(&o.layers, "layers", 4, "n_layer")
	flag.IntVar(&o.dState, "d-state", 64, "d_state")
	flag.IntVar(&o.headDim, "headdim", 32, "head dim")
	flag.IntVar(&o.chunk, "chunk", 64, "SSD chunk size Q")
	flag.IntVar(&o.vocab, "vocab", 272, "vocabulary size")
	flag.IntVar(&o.seqLen, "seq", 1024, "sequence length L")
	flag.IntVar(&o.micro, "micro", 1, "micro-batch (sequences per rank and micro-batch)")
	flag.IntVar(&o.global, "global", 4, "global batch (sequences per step); a multiple of micro·dp for every layout")
	flag.StringVar(&o.mode, "sp-mode", jobspec.SPModeSequential, "sequence-parallel mode: sequential or prefix")
	flag.BoolVar(&o.zero, "zero1", false, "shard the optimizer (ZeRO-1)")
	flag.IntVar(&o.steps, "steps", 3, "timed steps per layout")
	flag.IntVar(&o.warmup, "warmup", 1, "untimed steps first")
	flag.IntVar(&o.rounds, "rounds", 2, "rounds over all layouts; each layout's fastest round counts")
	flag.IntVar(&o.procs, "procs", 1, "GOMAXPROCS of every rank")
	flag.IntVar(&o.bucketMiB, "bucket-mib", 1, "gradient bucket size in MiB")
	flag.IntVar(&o.budgetMiB, "budget-mib", 256, "memory budget per rank for the longest-sequence table")
	flag.BoolVar(&o.memOnly, "mem-only", false, "only the memory table")
	flag.BoolVar(&o.mem, "mem", true, "the memory table after the layouts")
	flag.StringVar(&o.profile, "cpuprofile", "", "write each rank's CPU profile of the timed steps to this file name plus .<layout>.<rank>")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Minute, "give up after this long")
	flag.IntVar(&o.dp, "dp", 0, "internal: dp of the child's layout")
	flag.IntVar(&o.sp, "sp", 0, "internal: sp of the child's layout")
	flag.IntVar(&o.noOverlap, "no-overlap", 0, "internal: 1 turns the overlap off")
	flag.StringVar(&o.addrs, "addrs", "", "internal: gRPC addresses of the ranks")
	flag.Parse()
	for _, f := range strings.Split(grid, ",") {
		var l layout
		if _, err := fmt.Sscanf(strings.TrimSpace(f), "%dx%d", &l.dp, &l.sp); err != nil || l.dp < 1 || l.sp < 1 || l.dp*l.sp > 64 {
			return o, fmt.Errorf("-grid: %q is not a layout dpxsp of at most 64 ranks", f)
		}
		if o.seqLen%l.sp != 0 || o.global%(o.micro*l.dp) != 0 {
			return o, fmt.Errorf("-grid %s: -seq %d must be a multiple of sp and -global %d of micro·dp", f, o.seqLen, o.global)
		}
		o.grid = append(o.grid, l)
	}
	switch {
	case o.steps < 1 || o.warmup < 0:
		return o, fmt.Errorf("-steps %d, -warmup %d: want at least one timed step", o.steps, o.warmup)
	case o.rounds < 1:
		return o, fmt.Errorf("-rounds %d: want at least 1", o.rounds)
	case o.procs < 1:
		return o, fmt.Errorf("-procs %d: want at least 1", o.procs)
	case o.budgetMiB < 1:
		return o, fmt.Errorf("-budget-mib %d: want at least 1", o.budgetMiB)
	}
	return o, nil
}

func main() {
	o, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "distbench:", err)
		os.Exit(2)
	}
	if r := os.Getenv(childEnv); r != "" {
		rank, _ := strconv.Atoi(r)
		if err := runChild(o, rank); err != nil {
			fmt.Fprintf(os.Stderr, "distbench rank %d: %v\n", rank, err)
			os.Exit(1)
		}
		return
	}
	if err := runParent(o); err != nil {
		fmt.Fprintln(os.Stderr, "distbench:", err)
		os.Exit(1)
	}
}

func (o options) modelConfig() model.Config {
	cfg := model.DefaultConfig(o.dModel, o.layers, o.vocab)
	cfg.DState, cfg.HeadDim, cfg.ChunkSize = o.dState, o.headDim, o.chunk
	cfg.NHeads = cfg.Expand * cfg.DModel / cfg.HeadDim
	return cfg
}

// spec is the job spec of one layout; the data path is never opened (the
// ranks read a synthetic source).
func (o options) spec(l layout) (*jobspec.Spec, error) {
	doc := fmt.Sprintf(`
name: distbench
model:
  config: {d_model: %d, n_layer: %d, vocab_size: %d, d_state: %d, headdim: %d, chunk_size: %d}
data: {path: /synthetic, seq_len: %d}
batch: {micro_batch: %d, global_batch: %d}
parallel: {dp: %d, sp: %d, sp_mode: %s, zero1: %v}
optimizer: {lr: 0.001, weight_decay: 0.1, grad_clip: 1.0}
schedule: {warmup_steps: 1, total_steps: 1000}
seed: 1
backend: cpu
`, o.dModel, o.layers, o.vocab, o.dState, o.headDim, o.chunk, o.seqLen, o.micro, o.global, l.dp, l.sp, o.mode, o.zero)
	return jobspec.Parse([]byte(doc))
}

// synthetic is a train.Source of pseudo-random tokens: the sequence at
// global sample position g is a function of g alone, so that every layout
// trains on the same data.
type synthetic struct {
	cfg    data.LoaderConfig
	vocab  int
	cursor uint64
}

func (s *synthetic) Next(ctx context.Context) ([]data.Batch, error) {
	pos, err := data.RankPositions(s.cursor, s.cfg.GlobalBatch, s.cfg.DPRank, s.cfg.DPSize)
	if err != nil {
		return nil, err
	}
	s.cursor += uint64(s.cfg.GlobalBatch)
	L := s.cfg.SeqLen
	var out []data.Batch
	for m := 0; m < len(pos); m += s.cfg.MicroBatch {
		p := pos[m : m+s.cfg.MicroBatch]
		b := data.Batch{Inputs: make([]int32, len(p)*L), Targets: make([]int32, len(p)*L), Positions: p, SeqLen: L}
		for r, g := range p {
			rng := rand.New(rand.NewPCG(g, 17))
			prev := int32(rng.IntN(s.vocab))
			for t := range L {
				next := int32(rng.IntN(s.vocab))
				b.Inputs[r*L+t], b.Targets[r*L+t] = prev, next
				prev = next
			}
		}
		out = append(out, b)
	}
	return out, nil
}

func (s *synthetic) Cursor() uint64     { return s.cursor }
func (s *synthetic) Seek(cursor uint64) { s.cursor = cursor }

// result is one rank's measurement, printed by a child as JSON.
type result struct {
	Rank       int     `json:"rank"`
	StepSec    float64 `json:"step_s"`     // mean over the timed steps
	CommSec    float64 `json:"comm_s"`     // mean time waiting on other ranks
	GradSec    float64 `json:"grad_s"`     // mean wait for the gradient reduction after the backward
	CPUSec     float64 `json:"cpu_s"`      // user+system time per step, this process
	Tokens     int64   `json:"tokens"`     // counted targets per step, all ranks
	BytesSent  float64 `json:"bytes_sent"` // per step, this rank
	Overlapped int     `json:"overlapped"` // buckets started during the backward
	Buckets    int     `json:"buckets"`
	Loss       float64 `json:"loss"`
}

func runChild(o options, rank int) error {
	runtime.GOMAXPROCS(o.procs)
	l := layout{dp: o.dp, sp: o.sp, noOverlap: o.noOverlap == 1}
	spec, err := o.spec(l)
	if err != nil {
		return err
	}
	addrs := strings.Split(o.addrs, ",")
	lis, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		return err
	}
	cc := collective.DefaultConfig()
	cc.Timeout = 5 * time.Minute
	tr, err := grpcnet.Listen(cc, rank, addrs, lis)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	comm, err := collective.New(ctx, cc, tr)
	if err != nil {
		return err
	}
	defer comm.Close()
	cfg, err := train.ConfigFromSpec(spec)
	if err != nil {
		return err
	}
	m, err := ref.New[float32](cfg)
	if err != nil {
		return err
	}
	if err := train.LoadInit(spec, cfg, m.Layout(), m.Params()); err != nil {
		return err
	}
	r := train.GridRank(comm, l.dp, l.sp)
	src := &synthetic{vocab: o.vocab, cfg: data.LoaderConfig{SeqLen: o.seqLen, MicroBatch: o.micro, GlobalBatch: o.global, DPRank: r.DPRank, DPSize: l.dp}}
	opts := train.Options{Dist: train.DistOptions{BucketBytes: o.bucketMiB << 20, NoOverlap: l.noOverlap}}
	t, err := train.NewDistributedWithInput(spec, m, train.Input{Source: src, Vocab: o.vocab, What: "synthetic tokens"}, r, opts)
	if err != nil {
		return err
	}
	for range o.warmup {
		if _, err := t.TrainStep(ctx); err != nil {
			return err
		}
	}
	res := result{Rank: rank}
	sent0 := comm.Stats().BytesSent
	if o.profile != "" {
		f, err := os.Create(fmt.Sprintf("%s.%dx%d.%d", o.profile, l.dp, l.sp, rank))
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	cpu0 := cpuTime()
	for range o.steps {
		p, err := t.TrainStep(ctx)
		if err != nil {
			return err
		}
		res.StepSec += p.StepTime.Seconds() / float64(o.steps)
		res.CommSec += p.Comm.Seconds() / float64(o.steps)
		res.GradSec += t.CommStats().GradWait.Seconds() / float64(o.steps)
		res.Tokens, res.Loss = p.Tokens, p.Loss
	}
	res.CPUSec = (cpuTime() - cpu0) / float64(o.steps)
	res.BytesSent = float64(comm.Stats().BytesSent-sent0) / float64(o.steps)
	cs := t.CommStats()
	res.Overlapped, res.Buckets = cs.Overlapped, cs.Buckets
	if err := t.Close(); err != nil {
		return err
	}
	// Leave together, so that no rank's goodbye fails a peer still working.
	if err := comm.Barrier(ctx); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func runParent(o options) error {
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	cfg := o.modelConfig()
	if err := cfg.Validate(); err != nil {
		return err
	}
	nparams := model.NewLayout(cfg).Total
	fmt.Printf("# distbench: CPU backend (model/ref), float32; ranks as processes over gRPC on loopback\n")
	fmt.Printf("# model: d_model %d, %d layers, d_state %d, headdim %d (%d heads), chunk %d, vocab %d: %d parameters\n",
		cfg.DModel, cfg.NLayer, cfg.DState, cfg.HeadDim, cfg.NHeads, cfg.ChunkSize, cfg.VocabSize, nparams)
	fmt.Printf("# step: global batch %d × %d tokens, micro-batch %d; sp mode %s; zero1 %v; bucket %d MiB\n",
		o.global, o.seqLen, o.micro, o.mode, o.zero, o.bucketMiB)
	fmt.Printf("# machine: %d cores, load %s; GOMAXPROCS %d per rank; %d warm-up and %d timed steps, best of %d rounds\n",
		runtime.NumCPU(), loadAvg(), o.procs, o.warmup, o.steps, o.rounds)
	if !o.memOnly {
		if err := runGrid(ctx, o); err != nil {
			return err
		}
	}
	if !o.mem && !o.memOnly {
		return nil
	}
	return memoryTable(o, cfg)
}

func runGrid(ctx context.Context, o options) error {
	var runs []layout
	for _, l := range o.grid {
		runs = append(runs, l)
		if o.overlap && l.dp*l.sp > 1 && !o.zero {
			runs = append(runs, layout{dp: l.dp, sp: l.sp, noOverlap: true})
		}
	}
	// Rounds alternate the layouts, so that a burst of load on the machine
	// does not fall on one layout alone; the fastest round counts.
	best := make([][]result, len(runs))
	stepOf := func(res []result) float64 {
		var step float64
		for _, r := range res {
			step = max(step, r.StepSec)
		}
		return step
	}
	for range o.rounds {
		for i, l := range runs {
			res, err := runLayout(ctx, o, l)
			if err != nil {
				return fmt.Errorf("%v: %w", l, err)
			}
			if best[i] == nil || stepOf(res) < stepOf(best[i]) {
				best[i] = res
			}
		}
	}
	fmt.Println()
	fmt.Printf("| layout | ranks | cores used | step (s) | tokens/s | speedup vs dp1×sp1 | CPU s per step, all ranks | comm share | exposed all-reduce (ms) | MiB sent per rank·step | buckets overlapped |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|---|---|\n")
	var base float64
	for i, l := range runs {
		res := best[i]
		step := stepOf(res)
		// The last rank to finish its backward waits only for the bytes to
		// move; the others also wait for it. So the smallest gradient wait
		// is the exposed all-reduce, free of imbalance between the ranks.
		var comm, sent, cpu float64
		grad := res[0].GradSec
		for _, r := range res {
			comm += r.CommSec / r.StepSec / float64(len(res))
			grad = min(grad, r.GradSec)
			sent += r.BytesSent / float64(len(res))
			cpu += r.CPUSec
		}
		tps := float64(res[0].Tokens) / step
		if l.dp == 1 && l.sp == 1 {
			base = tps
		}
		speed := "-"
		if base > 0 {
			speed = fmt.Sprintf("%.2f", tps/base)
		}
		n := l.dp * l.sp
		fmt.Printf("| %v | %d | %d | %.3f | %.0f | %s | %.2f | %.1f%% | %.1f | %.2f | %d/%d |\n",
			l, n, min(n*o.procs, runtime.NumCPU()), step, tps, speed, cpu, 100*comm, 1000*grad, sent/(1<<20), res[0].Overlapped, res[0].Buckets)
	}
	return nil
}

// runLayout starts the ranks of l as child processes with their listeners
// already open (passed as files, so that no port is taken in between) and
// returns their results by rank.
func runLayout(ctx context.Context, o options, l layout) ([]result, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	n := l.dp * l.sp
	var files []*os.File
	var addrs []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			return nil, err
		}
		_ = ln.Close()
		files = append(files, f)
		addrs = append(addrs, ln.Addr().String())
	}
	noOverlap := 0
	if l.noOverlap {
		noOverlap = 1
	}
	args := []string{"-d-model", fmt.Sprint(o.dModel), "-layers", fmt.Sprint(o.layers), "-d-state", fmt.Sprint(o.dState),
		"-headdim", fmt.Sprint(o.headDim), "-chunk", fmt.Sprint(o.chunk), "-vocab", fmt.Sprint(o.vocab), "-seq", fmt.Sprint(o.seqLen),
		"-micro", fmt.Sprint(o.micro), "-global", fmt.Sprint(o.global), "-sp-mode", o.mode, "-zero1=" + strconv.FormatBool(o.zero),
		"-steps", fmt.Sprint(o.steps), "-warmup", fmt.Sprint(o.warmup), "-procs", fmt.Sprint(o.procs), "-bucket-mib", fmt.Sprint(o.bucketMiB),
		"-timeout", o.timeout.String(), "-grid", fmt.Sprintf("%dx%d", l.dp, l.sp), "-cpuprofile", o.profile,
		"-dp", fmt.Sprint(l.dp), "-sp", fmt.Sprint(l.sp), "-no-overlap", fmt.Sprint(noOverlap), "-addrs", strings.Join(addrs, ",")}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu   sync.Mutex
		out  = make([]result, n)
		seen = make([]bool, n)
		wg   sync.WaitGroup
	)
	errs := make([]error, n)
	for r := range n {
		cmd := exec.CommandContext(ctx, self, args...)
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", childEnv, r))
		cmd.ExtraFiles = []*os.File{files[r]}
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		wg.Go(func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				var res result
				if json.Unmarshal(sc.Bytes(), &res) == nil {
					mu.Lock()
					out[r], seen[r] = res, true
					mu.Unlock()
				}
			}
			if errs[r] = cmd.Wait(); errs[r] != nil {
				cancel() // one rank failing takes the others down
			}
		})
	}
	for _, f := range files {
		_ = f.Close()
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("rank %d of %d: %w", r, n, err)
		}
		if !seen[r] {
			return nil, fmt.Errorf("rank %d of %d printed no result", r, n)
		}
	}
	return out, nil
}

// rankMemory measures one rank holding micro sequences of lk positions,
// with AdamW's moments for 1/shards of the parameters (ZeRO-1 over shards
// ranks; 1 keeps them whole): the live heap after a warm step (parameters,
// gradients, moments, the backend's activation workspace) plus every byte
// allocated during one more step, an upper bound of the step's peak heap.
func rankMemory(cfg model.Config, micro, lk, shards int) (int64, error) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	m, err := ref.New[float32](cfg)
	if err != nil {
		return 0, err
	}
	if err := model.Init(cfg, m.Layout(), m.Params(), 1); err != nil {
		return 0, err
	}
	n := (m.Layout().Total + shards - 1) / shards
	moments := [2][]float32{make([]float32, n), make([]float32, n)}
	rng := rand.New(rand.NewPCG(uint64(lk), 3))
	b := &model.Batch{Batch: micro, SeqLen: lk, Inputs: make([]int32, micro*lk), Targets: make([]int32, micro*lk)}
	for i := range b.Inputs {
		b.Inputs[i], b.Targets[i] = int32(rng.IntN(cfg.VocabSize)), int32(rng.IntN(cfg.VocabSize))
	}
	ctx := context.Background()
	if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err != nil {
		return 0, err
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	live, total0 := ms.HeapAlloc, ms.TotalAlloc
	if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err != nil {
		return 0, err
	}
	runtime.ReadMemStats(&ms)
	runtime.KeepAlive(moments)
	runtime.KeepAlive(m)
	return int64(live-base) + int64(ms.TotalAlloc-total0), nil
}

// memoryTable measures the memory of one rank as a function of the
// positions lk it holds, fits a + b·lk to three lengths, and prints, for
// sp = 1, 2, 4, 8, the longest sequence L = sp·lk (lk a multiple of the
// chunk) whose rank fits the budget, without and with ZeRO-1 over the sp
// ranks (which keeps 1/sp of AdamW's moments per rank). Each lk is the
// fit's estimate checked by measurement and lowered by a chunk at a time
// until the measurement fits.
func memoryTable(o options, cfg model.Config) error {
	debug.SetGCPercent(100)
	q := cfg.ChunkSize
	lens := []int{4 * q, 8 * q, 16 * q}
	var mems []int64
	for _, lk := range lens {
		mem, err := rankMemory(cfg, o.micro, lk, 1)
		if err != nil {
			return err
		}
		mems = append(mems, mem)
	}
	b := float64(mems[2]-mems[0]) / float64(lens[2]-lens[0])
	a := float64(mems[0]) - b*float64(lens[0])
	mid := a + b*float64(lens[1])
	nparams := float64(model.NewLayout(cfg).Total)
	budget := int64(o.budgetMiB) << 20
	fmt.Println()
	fmt.Printf("# memory of one rank, micro-batch %d: live heap after a warm step + bytes allocated in one step\n", o.micro)
	for i, lk := range lens {
		fmt.Printf("#   %5d positions: %7.1f MiB\n", lk, float64(mems[i])/(1<<20))
	}
	fmt.Printf("# fit: %.1f MiB + %.1f KiB per position (the middle point is %.1f%% off the line)\n",
		a/(1<<20), b/(1<<10), 100*(float64(mems[1])-mid)/mid)
	fmt.Printf("# budget %d MiB per rank; each length below is checked by measurement (MiB in brackets)\n\n", o.budgetMiB)
	// longest returns the largest measured lk that fits, starting from the
	// fit's estimate for moments sharded over shards ranks.
	longest := func(shards int) (int, int64, error) {
		fixed := a - 8*nparams*(1-1/float64(shards))
		lk := max(q, int((float64(budget)-fixed)/b)/q*q)
		for ; lk >= q; lk -= q {
			mem, err := rankMemory(cfg, o.micro, lk, shards)
			if err != nil {
				return 0, 0, err
			}
			if mem <= budget {
				return lk, mem, nil
			}
		}
		return 0, 0, fmt.Errorf("the budget of %d MiB does not hold one chunk of %d positions per rank", o.budgetMiB, q)
	}
	plain, plainMem, err := longest(1)
	if err != nil {
		return err
	}
	fmt.Printf("| sp | longest sequence | positions per rank | with ZeRO-1 over the sp ranks | positions per rank |\n|---|---|---|---|---|\n")
	for _, sp := range []int{1, 2, 4, 8} {
		zlk, zmem := plain, plainMem
		if sp > 1 {
			if zlk, zmem, err = longest(sp); err != nil {
				return err
			}
		}
		fmt.Printf("| %d | %d | %d (%.1f MiB) | %d | %d (%.1f MiB) |\n", sp, sp*plain, plain, float64(plainMem)/(1<<20), sp*zlk, zlk, float64(zmem)/(1<<20))
	}
	return nil
}

// cpuTime returns the user and system time of this process in seconds.
func cpuTime() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "unknown"
	}
	return f[0]
}
