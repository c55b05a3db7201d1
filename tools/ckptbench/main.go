// Command ckptbench measures checkpoints in S3-compatible storage against
// the S3 client's own PutObject and GetObject of the same bytes, to the
// same server, in the same run, and the training-step stall of an
// asynchronous save.
//
// The server is the Versity S3 gateway over a temporary directory, run as
// a child process (this binary, started again), so that requests take the
// loopback network path and the server's CPU is not the benchmark's.
//
// Save and load: a model sized so that its checkpoint (fp32 weights plus
// the two AdamW moments) is -size-mib MiB is saved with checkpoint.SaveWith
// (encoding from the float buffers, SHA-256 of every object whole and per
// segment, multipart upload, manifest) and loaded with
// checkpoint.LoadWith (segments fetched with concurrent range requests,
// each verified against its SHA-256, decoded into new float buffers). The
// save's baseline uploads the very bytes of that checkpoint's objects with
// the client's PutObject (its own multipart upload, same part size and
// concurrency). The load has two baselines reading those bytes back into
// memory: the client's GetObject of each whole object, one stream at a
// time, and GetObject of ranges of the segment size, as many at once as
// the load, with no hashing. Each repeat times ours and the baselines back
// to back; the median repeat is reported, with ratio = baseline time / our
// time (1 means as fast as the raw client).
//
// Stall: a small model trains on the CPU backend; the time the training
// loop spends in Trainer.Checkpoint (waiting for nothing in flight, then
// copying the buffers) is compared with the median step time. The step
// time while a save uploads is reported too: on a machine with few cores
// the upload competes with training for the CPU.
//
//	go run ./tools/ckptbench                # 1 GiB, 3 repeats
//	go run ./tools/ckptbench -size-mib 256 -repeats 1
//	go run ./tools/ckptbench -no-stall -load-concurrency 8 -segment-mib 16
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/tools/internal/benchio"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/checkpoint/s3gw"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/train"
)

type options struct {
	sizeMiB     int
	repeats     int
	partMiB     int
	concurrency int
	segmentMiB  int
	loadConc    int
	stallSteps  int
	every       int
	dir         string
	skipIO      bool
	skipStall   bool
	cpuprofile  string
}

func main() {
	s3gw.RunIfChild()
	var o options
	flag.IntVar(&o.sizeMiB, "size-mib", 1024, "checkpoint size in MiB (weights, exp_avg and exp_avg_sq, fp32)")
	flag.IntVar(&o.repeats, "repeats", 3, "repeats of save, load and their baselines; the median counts")
	flag.IntVar(&o.partMiB, "part-mib", checkpoint.DefaultPartSize>>20, "multipart part size in MiB, for both")
	flag.IntVar(&o.concurrency, "concurrency", checkpoint.DefaultConcurrency, "parts in flight, for both")
	flag.IntVar(&o.segmentMiB, "segment-mib", checkpoint.DefaultSegmentSize>>20, "segment size of the manifest in MiB, and range size of the ranged baseline")
	flag.IntVar(&o.loadConc, "load-concurrency", 0, "segments in flight of the load and ranges of its baseline (0: checkpoint.DefaultLoadConcurrency)")
	flag.IntVar(&o.stallSteps, "stall-steps", 18, "training steps of the stall measurement")
	flag.IntVar(&o.every, "stall-every", 6, "checkpoint every this many steps in the stall measurement")
	flag.StringVar(&o.dir, "dir", "", "directory for the gateway's buckets (default: a temporary one, removed afterwards)")
	flag.BoolVar(&o.skipIO, "no-io", false, "skip the save and load throughput")
	flag.BoolVar(&o.skipStall, "no-stall", false, "skip the stall measurement")
	flag.StringVar(&o.cpuprofile, "cpuprofile", "", "write a CPU profile of this process (not the gateway's) to this file")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "ckptbench:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	if o.sizeMiB < 16 || o.repeats < 1 || o.stallSteps < 2*o.every || o.every < 1 {
		return fmt.Errorf("flags: need -size-mib >= 16, -repeats >= 1, -stall-every >= 1 and -stall-steps >= 2 × -stall-every")
	}
	if o.loadConc == 0 {
		o.loadConc = checkpoint.DefaultLoadConcurrency()
	}
	if err := (checkpoint.SaveOptions{SegmentSize: int64(o.segmentMiB) << 20}).Validate(); err != nil {
		return fmt.Errorf("flags: -segment-mib: %w", err)
	}
	if err := (checkpoint.LoadOptions{Concurrency: o.loadConc}).Validate(); err != nil {
		return fmt.Errorf("flags: -load-concurrency: %w", err)
	}
	ctx := context.Background()
	stop, err := benchio.StartCPUProfile(o.cpuprofile)
	if err != nil {
		return err
	}
	defer stop()
	dir := o.dir
	if dir == "" {
		d, err := os.MkdirTemp("", "ckptbench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	gw, err := s3gw.StartProcess(ctx, s3gw.Options{Dir: filepath.Join(dir, "gw"), Buckets: []string{"bench"}}, nil)
	if err != nil {
		return err
	}
	defer gw.Stop(time.Minute)
	cfg := checkpoint.S3Config{Endpoint: gw.Endpoint, Bucket: "bench", AccessKey: gw.AccessKey, SecretKey: gw.SecretKey,
		PartSize: int64(o.partMiB) << 20, Concurrency: o.concurrency}
	store, err := checkpoint.NewS3Store(ctx, cfg)
	if err != nil {
		return err
	}
	defer store.Close()
	fmt.Printf("ckptbench: %s, %d CPUs, GOMAXPROCS %d, load average %s, gateway %s (child process)\n",
		runtime.GOARCH, runtime.NumCPU(), runtime.GOMAXPROCS(0), loadAverage(), gw.Endpoint)
	fmt.Printf("save: part %d MiB, %d parts in flight; load: segment %d MiB, %d segments in flight\n",
		o.partMiB, o.concurrency, o.segmentMiB, o.loadConc)
	if !o.skipIO {
		if err := benchIO(ctx, o, store, filepath.Join(gw.Dir, "bench")); err != nil {
			return err
		}
	}
	if !o.skipStall {
		if err := benchStall(ctx, o, store, dir); err != nil {
			return err
		}
	}
	return nil
}

// sizedConfig returns a model whose fp32 weights and two moments take
// about mib MiB (at most that): vocab 32000, the widest d_model whose
// embedding takes at most a third of the parameters, then as many layers
// as fit.
func sizedConfig(mib int) model.Config {
	want := int64(mib) << 20 / 12
	dm := 128
	for _, d := range []int{1024, 768, 512, 256} {
		if int64(d*32000) <= want/3 {
			dm = d
			break
		}
	}
	best := model.DefaultConfig(dm, 1, 32000)
	for nl := 1; nl <= 512; nl++ {
		c := model.DefaultConfig(dm, nl, 32000)
		if int64(model.NewLayout(c).Total) > want {
			break
		}
		best = c
	}
	return best
}

func benchIO(ctx context.Context, o options, store *checkpoint.S3Store, bucketDir string) error {
	cfg := sizedConfig(o.sizeMiB)
	layout := model.NewLayout(cfg)
	s := &checkpoint.State[float32]{Config: cfg, Layout: layout, Params: make([]float32, layout.Total),
		M: make([]float32, layout.Total), V: make([]float32, layout.Total),
		Trainer: checkpoint.TrainerState{Step: 1000, Cursor: 123456, Seed: 1, OptimizerStep: 1000, Precision: "float32"}}
	r := rand.New(rand.NewPCG(1, 2))
	for i := range s.Params {
		s.Params[i] = float32(r.NormFloat64() * 0.02)
		s.M[i] = float32(r.NormFloat64() * 1e-3)
		s.V[i] = float32(r.Float64() * 1e-6)
	}
	fmt.Printf("model: d_model %d, n_layer %d, vocab %d: %d parameters; checkpoint = weights + exp_avg + exp_avg_sq in fp32\n",
		cfg.DModel, cfg.NLayer, cfg.VocabSize, layout.Total)

	segSize := int64(o.segmentMiB) << 20
	var saves, puts, loads, gets, ranged []time.Duration
	var man *checkpoint.Manifest
	var raw map[string][]byte
	for rep := range o.repeats {
		// Ours: encode, hash, upload, commit.
		start := time.Now()
		m, err := checkpoint.SaveWith(ctx, store, "ours", s, checkpoint.SaveOptions{SegmentSize: segSize})
		if err != nil {
			return err
		}
		saves = append(saves, time.Since(start))
		if man == nil {
			man = m
			// The baseline sends the very bytes of this checkpoint; the
			// gateway stores objects as files.
			raw = map[string][]byte{}
			for _, obj := range m.Objects {
				b, err := os.ReadFile(filepath.Join(bucketDir, "ours", checkpoint.StepDir(1000), obj.Name))
				if err != nil {
					return err
				}
				raw[obj.Name] = b
			}
		}
		// Baseline: the client's PutObject of the same bytes.
		for _, obj := range man.Objects {
			store.Delete(ctx, "raw/"+obj.Name)
		}
		start = time.Now()
		for _, obj := range man.Objects {
			if err := store.PutObjectBaseline(ctx, "raw/"+obj.Name, raw[obj.Name]); err != nil {
				return err
			}
		}
		puts = append(puts, time.Since(start))

		// Ours: download, verify, decode into new float buffers.
		runtime.GC()
		start = time.Now()
		got, _, err := checkpoint.LoadWith[float32](ctx, store, "ours", 1000, checkpoint.LoadOptions{Concurrency: o.loadConc})
		if err != nil {
			return err
		}
		loads = append(loads, time.Since(start))
		if got.Params[len(got.Params)-1] != s.Params[len(s.Params)-1] || got.V[7] != s.V[7] {
			return fmt.Errorf("the loaded checkpoint differs from the saved one")
		}
		got = nil
		// Baseline: the client's GetObject into new memory, as Load
		// delivers into new buffers.
		runtime.GC()
		bufs := map[string][]byte{}
		start = time.Now()
		for _, obj := range man.Objects {
			bufs[obj.Name] = make([]byte, obj.Size)
			if err := store.GetObjectBaseline(ctx, "raw/"+obj.Name, bufs[obj.Name]); err != nil {
				return err
			}
		}
		gets = append(gets, time.Since(start))
		bufs = nil
		// Baseline: the client's GetObject of ranges of the segment size,
		// as many in flight as the load, over all objects, no hashing.
		runtime.GC()
		names := make([]string, len(man.Objects))
		rbufs := make([][]byte, len(man.Objects))
		start = time.Now()
		for i, obj := range man.Objects {
			names[i], rbufs[i] = "raw/"+obj.Name, make([]byte, obj.Size)
		}
		if err := store.GetRangesBaseline(ctx, names, rbufs, segSize, o.loadConc); err != nil {
			return err
		}
		ranged = append(ranged, time.Since(start))
		rbufs = nil
		runtime.GC()
		fmt.Printf("repeat %d: save %v, put %v, load %v, get %v, ranged get %v\n", rep+1, saves[rep].Round(time.Millisecond),
			puts[rep].Round(time.Millisecond), loads[rep].Round(time.Millisecond), gets[rep].Round(time.Millisecond), ranged[rep].Round(time.Millisecond))
	}
	size := float64(man.Size())
	mibps := func(d time.Duration) float64 { return size / (1 << 20) / d.Seconds() }
	fmt.Printf("checkpoint: %.1f MiB in %d objects (%s %.1f MiB, %s %.1f MiB)\n", size/(1<<20), len(man.Objects),
		checkpoint.ModelObject, float64(objSize(man, checkpoint.ModelObject))/(1<<20),
		checkpoint.OptimizerObject, float64(objSize(man, checkpoint.OptimizerObject))/(1<<20))
	fmt.Printf("%-6s %10s %10s | %-24s %10s %10s %6s\n", "", "ours", "MiB/s", "baseline", "time", "MiB/s", "ratio")
	for _, row := range []struct {
		name  string
		ours  []time.Duration
		label string
		base  []time.Duration
	}{{"save", saves, "PutObject (multipart)", puts}, {"load", loads, "GetObject, one stream", gets},
		{"", nil, fmt.Sprintf("GetObject, %d ranges", o.loadConc), ranged}} {
		b := median(row.base)
		if row.ours == nil {
			a := median(loads)
			fmt.Printf("%-6s %10s %10s | %-24s %10v %10.0f %6.2f\n", "", "", "", row.label, b.Round(time.Millisecond), mibps(b), b.Seconds()/a.Seconds())
			continue
		}
		a := median(row.ours)
		fmt.Printf("%-6s %10v %10.0f | %-24s %10v %10.0f %6.2f\n", row.name, a.Round(time.Millisecond), mibps(a), row.label, b.Round(time.Millisecond), mibps(b), b.Seconds()/a.Seconds())
	}
	fmt.Printf("load average %s at the end\n", loadAverage())
	return nil
}

// loadAverage returns the 1, 5 and 15 minute load averages, or "unknown"
// where /proc/loadavg is not there.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "unknown"
}

func objSize(m *checkpoint.Manifest, name string) int64 {
	for _, o := range m.Objects {
		if o.Name == name {
			return o.Size
		}
	}
	return 0
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// benchStall trains a small model on the CPU backend with a checkpoint
// every o.every steps, timing every step and every Checkpoint call.
func benchStall(ctx context.Context, o options, store *checkpoint.S3Store, dir string) error {
	dataDir := filepath.Join(dir, "data")
	if err := writeDataset(dataDir, 200_000); err != nil {
		return err
	}
	doc := fmt.Sprintf(`
name: stall
model:
  config: {d_model: 256, n_layer: 4, vocab_size: 4096, d_state: 64, headdim: 64, chunk_size: 64}
data: {path: %s, seq_len: 256}
batch: {micro_batch: 4, global_batch: 4}
optimizer: {lr: 0.001}
schedule: {warmup_steps: 2, total_steps: %d}
checkpoint: {location: s3://bench/stall, every_steps: %d, keep: 2}
seed: 1
backend: cpu
`, dataDir, o.stallSteps, o.every)
	spec, err := jobspec.Parse([]byte(doc))
	if err != nil {
		return err
	}
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
	ds, err := data.Open(dataDir)
	if err != nil {
		return err
	}
	defer ds.Close()
	tr, err := train.New(spec, m, ds, train.Options{Store: store, Prefix: "stall", Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	var quiet, busy, stalls []time.Duration
	for step := 1; step <= o.stallSteps; step++ {
		_, inflight := tr.CheckpointInFlight()
		start := time.Now()
		if _, err := tr.TrainStep(ctx); err != nil {
			return err
		}
		d := time.Since(start)
		if step > 1 { // the first step warms caches and allocates
			if inflight {
				busy = append(busy, d)
			} else {
				quiet = append(quiet, d)
			}
		}
		if step%o.every == 0 {
			start := time.Now()
			if err := tr.Checkpoint(ctx); err != nil {
				return err
			}
			stalls = append(stalls, time.Since(start))
		}
	}
	if err := tr.Close(); err != nil {
		return err
	}
	if len(quiet) == 0 {
		return fmt.Errorf("every step ran with a save in flight; raise -stall-every")
	}
	step := median(quiet)
	fmt.Printf("stall: model %d parameters (checkpoint %.1f MiB), %d steps, checkpoint every %d\n",
		m.Layout().Total, float64(12*m.Layout().Total)/(1<<20), o.stallSteps, o.every)
	fmt.Printf("stall: median step %v with no save in flight (%d steps)", step.Round(time.Microsecond), len(quiet))
	if len(busy) > 0 {
		fmt.Printf(", %v while a save uploads (%d steps, ratio %.2f)", median(busy).Round(time.Microsecond), len(busy), median(busy).Seconds()/step.Seconds())
	}
	fmt.Println()
	fmt.Printf("stall: Checkpoint() blocked the loop for median %v, max %v over %d saves = %.2f%% (max %.2f%%) of a step\n",
		median(stalls).Round(time.Microsecond), slices.Max(stalls).Round(time.Microsecond), len(stalls),
		100*median(stalls).Seconds()/step.Seconds(), 100*slices.Max(stalls).Seconds()/step.Seconds())
	return nil
}

// writeDataset writes a shard of pseudo-text for the stall measurement.
func writeDataset(dir string, tokens int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	w, err := data.NewShardWriter(filepath.Join(dir, "shard-000000.m2tok"), data.WriterOptions{Vocab: 4096})
	if err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(3, 4))
	buf := make([]int32, tokens)
	for i := range buf {
		buf[i] = int32(r.IntN(4096))
	}
	if err := w.Write(buf); err != nil {
		return err
	}
	return w.Close()
}
