package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/tools/internal/benchio"
)

// report is the JSON output of -json: the run's settings, one row per
// layout run and, with -backend cuda, one row per sp of the
// longest-sequence search.
type report struct {
	Tool      string `json:"tool"` // "distbench"
	Backend   string `json:"backend"`
	Precision string `json:"precision"`
	Device    string `json:"device,omitempty"` // the GPU's name
	GPUs      int    `json:"gpus,omitempty"`   // GPUs the ranks use
	Visible   int    `json:"visible_gpus,omitempty"`
	Library   string `json:"library,omitempty"`
	Cores     int    `json:"cores"`
	Procs     int    `json:"gomaxprocs_per_rank"`

	Model             modelJSON `json:"model"`
	SeqLen            int       `json:"seq_len"`
	MicroBatch        int       `json:"micro_batch"`
	GlobalBatch       int       `json:"global_batch"` // sequences per optimizer step
	GlobalBatchTokens int       `json:"global_batch_tokens"`
	SPMode            string    `json:"sp_mode"`
	Zero1             bool      `json:"zero1"`
	AllReduceDType    string    `json:"allreduce_dtype"`
	BucketMiB         int       `json:"bucket_mib"`
	Warmup            int       `json:"warmup_steps"`
	Steps             int       `json:"timed_steps"`
	Rounds            int       `json:"rounds"`

	Layouts []layoutRow  `json:"layouts"`
	Longest []longestRow `json:"longest,omitempty"`
	// Error is why the run stopped early; the rows before it are kept.
	Error string `json:"error,omitempty"`
}

// modelJSON is the model configuration in the JSON report.
type modelJSON struct {
	DModel     int `json:"d_model"`
	NLayer     int `json:"n_layer"`
	Vocab      int `json:"vocab_size"`
	DState     int `json:"d_state"`
	HeadDim    int `json:"headdim"`
	NHeads     int `json:"nheads"`
	Chunk      int `json:"chunk_size"`
	Parameters int `json:"parameters"`
}

// layoutRow is one layout run, the best of its rounds.
type layoutRow struct {
	Layout  string `json:"layout"` // "DPxSP", as -grid writes it
	DP      int    `json:"dp"`
	SP      int    `json:"sp"`
	Ranks   int    `json:"ranks"`
	PureDP  bool   `json:"pure_dp"` // sp = 1
	Overlap bool   `json:"overlap"` // the all-reduce may overlap the backward (train.DistOptions.NoOverlap off)
	// GPUsUsed is the number of GPUs the ranks run on (ranks beyond
	// -gpus share them); 0 with the CPU backend.
	GPUsUsed   int     `json:"gpus_used,omitempty"`
	StepSec    float64 `json:"step_s"` // the slowest rank's mean step
	TokensPerS float64 `json:"tokens_per_s"`
	// Speedup is tokens/s over dp1×sp1's; Efficiency is Speedup / ranks.
	// Both null when the grid has no 1x1.
	Speedup            *float64 `json:"speedup"`
	Efficiency         *float64 `json:"scaling_efficiency"`
	CommShare          float64  `json:"comm_share"` // fraction of the step spent waiting on other ranks, mean over ranks
	ExposedAllReduceMs float64  `json:"exposed_allreduce_ms"`
	MiBSentPerRank     float64  `json:"mib_sent_per_rank_step"`
	CPUSecPerStep      float64  `json:"cpu_s_per_step"` // all ranks together
	BucketsOverlapped  int      `json:"buckets_overlapped"`
	Buckets            int      `json:"buckets"`
	Loss               float64  `json:"loss"` // the last timed step's
	// DeviceUsedPeak is the GPU's total − free memory after a step, the
	// largest over the ranks; 0 with the CPU backend.
	DeviceUsedPeak    int64  `json:"device_used_peak_bytes,omitempty"`
	Backend           string `json:"backend"`
	Precision         string `json:"precision"`
	Parameters        int    `json:"parameters"`
	GlobalBatchTokens int    `json:"global_batch_tokens"`
	TokensPerStep     int64  `json:"tokens_per_step"` // counted targets of a step, all ranks
}

func newReport(o options, cfg model.Config) *report {
	return &report{
		Tool: "distbench", Backend: o.backend, Precision: o.precision, Cores: runtime.NumCPU(), Procs: o.procs,
		Model: modelJSON{DModel: cfg.DModel, NLayer: cfg.NLayer, Vocab: cfg.VocabSize, DState: cfg.DState, HeadDim: cfg.HeadDim,
			NHeads: cfg.NHeads, Chunk: cfg.ChunkSize, Parameters: model.NewLayout(cfg).Total},
		SeqLen: o.seqLen, MicroBatch: o.micro, GlobalBatch: o.global, GlobalBatchTokens: o.global * o.seqLen,
		SPMode: o.mode, Zero1: o.zero, AllReduceDType: o.allreduce, BucketMiB: o.bucketMiB, Warmup: o.warmup, Steps: o.steps, Rounds: o.rounds,
		Layouts: []layoutRow{},
	}
}

// runParent runs the layouts and then the memory table or the
// longest-sequence search, printing to out, and writes the JSON report,
// also when a measurement fails (with the error in it).
func runParent(ctx context.Context, o options, out io.Writer) (err error) {
	cfg, err := o.modelConfig()
	if err != nil {
		return err
	}
	var g gpuPlan
	var info probeInfo
	if o.backend == backendCUDA {
		if info, err = runProbe(ctx, o); err != nil {
			return err
		}
		if err := o.checkGPUs(info.Count); err != nil {
			return err
		}
		g = gpuPlan{count: o.gpus}
		g.visible, g.visibleSet = visibleList()
	}
	rep := newReport(o, cfg)
	if o.backend == backendCUDA {
		rep.Device, rep.GPUs, rep.Visible, rep.Library = info.Name, o.gpus, info.Count, info.Library
	}
	defer func() {
		if err != nil {
			rep.Error = err.Error()
		}
		if jerr := benchio.WriteJSON(o.jsonPath, rep); jerr != nil && err == nil {
			err = fmt.Errorf("-json: %w", jerr)
		}
	}()
	if o.backend == backendCUDA {
		devs := make([]string, g.count)
		for i := range devs {
			devs[i], _ = gpuOf(i, g.count, g.visible, g.visibleSet)
		}
		fmt.Fprintf(out, "# distbench: CUDA backend (kernels/gpu), %s activations, fp32 parameters and optimizer; %d × %s (%.0f GiB each; %s %s of %d visible)\n",
			o.precision, o.gpus, info.Name, gib(info.TotalMem), visibleEnv, strings.Join(devs, ","), info.Count)
		fmt.Fprintf(out, "# ranks as processes over gRPC on loopback, rank r on GPU r mod %d; kernels %s\n", o.gpus, info.Library)
	} else {
		fmt.Fprintf(out, "# distbench: CPU backend (model/ref), float32; ranks as processes over gRPC on loopback\n")
	}
	fmt.Fprintf(out, "# model: d_model %d, %d layers, d_state %d, headdim %d (%d heads), chunk %d, vocab %d: %d parameters\n",
		cfg.DModel, cfg.NLayer, cfg.DState, cfg.HeadDim, cfg.NHeads, cfg.ChunkSize, cfg.VocabSize, rep.Model.Parameters)
	fmt.Fprintf(out, "# step: global batch %d × %d tokens (%d), micro-batch %d; sp mode %s; zero1 %v; bucket %d MiB; all-reduce in %s\n",
		o.global, o.seqLen, o.global*o.seqLen, o.micro, o.mode, o.zero, o.bucketMiB, o.allreduce)
	fmt.Fprintf(out, "# machine: %d cores, load %s; GOMAXPROCS %d per rank; %d warm-up and %d timed steps, best of %d rounds\n",
		runtime.NumCPU(), loadAvg(), o.procs, o.warmup, o.steps, o.rounds)
	if !o.memOnly {
		if rep.Layouts, err = runGrid(ctx, o, g, out); err != nil {
			return err
		}
	}
	if !o.mem && !o.memOnly {
		return nil
	}
	if o.backend == backendCUDA {
		rep.Longest, err = longestTable(ctx, o, g, out)
		return err
	}
	return memoryTable(o, cfg, out)
}

// runGrid runs every layout of the grid (and its no-overlap twin) -rounds
// times, prints the table of the fastest rounds and returns its rows.
func runGrid(ctx context.Context, o options, g gpuPlan, out io.Writer) ([]layoutRow, error) {
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
	for range o.rounds {
		for i, l := range runs {
			res, err := runRanks(ctx, o, o.layoutJob(l, g))
			if err != nil {
				return nil, fmt.Errorf("%v: %w", l, err)
			}
			if best[i] == nil || stepOf(res) < stepOf(best[i]) {
				best[i] = res
			}
		}
	}
	rows := layoutRows(o, g, runs, best)
	printGrid(o, g, rows, out)
	return rows, nil
}

// stepOf is a layout's step time: its slowest rank's.
func stepOf(res []result) float64 {
	var step float64
	for _, r := range res {
		step = max(step, r.StepSec)
	}
	return step
}

// layoutRows summarises each run's ranks; the speedup and the scaling
// efficiency are relative to the first dp1×sp1 run of the grid.
func layoutRows(o options, g gpuPlan, runs []layout, best [][]result) []layoutRow {
	nparams := model.NewLayout(mustConfig(o)).Total
	var base float64
	for i, l := range runs {
		if l.dp == 1 && l.sp == 1 && base == 0 {
			base = float64(best[i][0].Tokens) / stepOf(best[i])
		}
	}
	rows := make([]layoutRow, len(runs))
	for i, l := range runs {
		res := best[i]
		step := stepOf(res)
		n := l.dp * l.sp
		row := layoutRow{Layout: fmt.Sprintf("%dx%d", l.dp, l.sp), DP: l.dp, SP: l.sp, Ranks: n, PureDP: l.sp == 1, Overlap: !l.noOverlap,
			StepSec: step, Backend: o.backend, Precision: o.precision, Parameters: nparams, GlobalBatchTokens: o.global * o.seqLen,
			TokensPerStep: res[0].Tokens, Loss: res[0].Loss, BucketsOverlapped: res[0].Overlapped, Buckets: res[0].Buckets}
		if g.count > 0 {
			row.GPUsUsed = min(n, g.count)
		}
		// The last rank to finish its backward waits only for the bytes to
		// move; the others also wait for it. So the smallest gradient wait
		// is the exposed all-reduce, free of imbalance between the ranks.
		grad := res[0].GradSec
		var sent float64
		for _, r := range res {
			row.CommShare += r.CommSec / r.StepSec / float64(len(res))
			grad = min(grad, r.GradSec)
			sent += r.BytesSent / float64(len(res))
			row.CPUSecPerStep += r.CPUSec
			row.DeviceUsedPeak = max(row.DeviceUsedPeak, r.DeviceUsed)
		}
		row.ExposedAllReduceMs = 1000 * grad
		row.MiBSentPerRank = sent / (1 << 20)
		row.TokensPerS = float64(res[0].Tokens) / step
		if base > 0 {
			s := row.TokensPerS / base
			e := s / float64(n)
			row.Speedup, row.Efficiency = &s, &e
		}
		rows[i] = row
	}
	return rows
}

// mustConfig is the model of options already validated by parseFlags.
func mustConfig(o options) model.Config {
	cfg, err := o.modelConfig()
	if err != nil {
		panic(fmt.Sprintf("distbench: the validated model config fails: %v", err))
	}
	return cfg
}

// printGrid prints the layout table.
func printGrid(o options, g gpuPlan, rows []layoutRow, out io.Writer) {
	used, extra, extraSep := "cores used", "", ""
	if g.count > 0 {
		used, extra, extraSep = "GPUs used", " GPU GiB in use (max over ranks) |", "---|"
	}
	fmt.Fprintln(out)
	fmt.Fprintf(out, "| layout | ranks | %s | step (s) | tokens/s | speedup vs dp1×sp1 | scaling efficiency | CPU s per step, all ranks | comm share | exposed all-reduce (ms) | MiB sent per rank·step | buckets overlapped |%s loss |\n", used, extra)
	fmt.Fprintf(out, "|---|---|---|---|---|---|---|---|---|---|---|---|%s---|\n", extraSep)
	shared := false
	for _, r := range rows {
		l := layout{dp: r.DP, sp: r.SP, noOverlap: !r.Overlap}
		speed, eff := "-", "-"
		if r.Speedup != nil {
			speed = fmt.Sprintf("%.2f", *r.Speedup)
			eff = fmt.Sprintf("%.0f%%", 100**r.Efficiency)
			if !r.PureDP {
				eff += " (sp)"
			}
		}
		nused := min(r.Ranks*o.procs, runtime.NumCPU())
		if g.count > 0 {
			nused = r.GPUsUsed
			shared = shared || r.Ranks > g.count
		}
		dev := ""
		if g.count > 0 {
			dev = fmt.Sprintf(" %.2f |", gib(r.DeviceUsedPeak))
		}
		fmt.Fprintf(out, "| %v | %d | %d | %.3f | %.0f | %s | %s | %.2f | %.1f%% | %.1f | %.2f | %d/%d |%s %.4f |\n",
			l, r.Ranks, nused, r.StepSec, r.TokensPerS, speed, eff, r.CPUSecPerStep, 100*r.CommShare, r.ExposedAllReduceMs,
			r.MiBSentPerRank, r.BucketsOverlapped, r.Buckets, dev, r.Loss)
	}
	fmt.Fprintf(out, "\n# scaling efficiency = tokens/s ÷ (ranks × tokens/s of dp1×sp1); 100%% is linear. Marked (sp): a layout with sp > 1,\n")
	fmt.Fprintf(out, "# where it compares throughput alone (sequence parallelism exists to fit longer sequences, not to speed up short ones).\n")
	if shared {
		fmt.Fprintf(out, "# layouts with more ranks than the %d GPU(s) share them (rank r on GPU r mod %d); their GPU memory counts every rank on the GPU.\n", g.count, g.count)
	}
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
