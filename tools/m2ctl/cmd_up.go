package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/m2train/m2train/coordinator/cli"
	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/etcdembed"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/coordinator/membership"
	"github.com/m2train/m2train/coordinator/node"
	"github.com/m2train/m2train/coordinator/server"
	"github.com/m2train/m2train/model/safetensors"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/checkpoint/s3gw"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/gpuinfo"
	"github.com/m2train/m2train/worker/m2worker/app"
)

func init() { root.AddCommand(newUpCmd(), newUpCoordinatorCmd(), newUpWorkerCmd()) }

// The local cluster's files under --dir.
const (
	upStateFile = "cluster.json"
	// upParentEnv names the environment variable that gives the children
	// of `m2ctl up` its process ID; a child whose parent is gone stops.
	upParentEnv = "M2_UP_PARENT"
	// upLeaseTTL is the worker lease TTL of the local cluster, in seconds.
	upLeaseTTL = 5
	// upRestarts is the demo job's max_restarts.
	upRestarts = 10
)

// upState describes a running local cluster; `m2ctl up` rewrites it in
// DIR/cluster.json whenever a process starts, so that scripts and tests
// find the addresses and process IDs. The coordinators' addresses are kept
// from one run to the next: their raft state names them.
type upState struct {
	Pid          int      `json:"pid"`
	Ready        bool     `json:"ready"`
	Etcd         string   `json:"etcd,omitempty"`
	S3Endpoint   string   `json:"s3_endpoint,omitempty"`
	Coordinators []upProc `json:"coordinators"`
	Workers      []upProc `json:"workers"`
}

// upProc is one child process.
type upProc struct {
	ID   string `json:"id"`
	API  string `json:"api,omitempty"`
	Raft string `json:"raft,omitempty"`
	Pid  int    `json:"pid"`
	Log  string `json:"log"`
	// GPU is the CUDA_VISIBLE_DEVICES entry a worker was started with.
	GPU string `json:"gpu,omitempty"`
}

// coordinatorAddrs returns the coordinators' API addresses.
func (s *upState) coordinatorAddrs() []string {
	var out []string
	for _, c := range s.Coordinators {
		out = append(out, c.API)
	}
	return out
}

func newUpCmd() *cobra.Command {
	var o upOptions
	cmd := &cobra.Command{
		Use:   "up [--dir DIR] [--steps N] [--stay | --no-demo]",
		Short: "Run the whole system on this machine and train the demo job on it",
		Long: `Starts the distributed system locally, each part as its own process except
the stores: an embedded etcd and an embedded S3 gateway (serving DIR/s3),
three coordinator replicas (raft), and four workers on the CPU backend
(--backend cuda: on the GPUs, one process per GPU in turn, several sharing
one when there are more workers than GPUs). It
then submits the demo job (the model and data of m2ctl demo) with dp 2 × sp 2,
shows its live progress, and prints where its checkpoints are and where it
exported the trained model (a Hugging Face directory).

A process that dies is started again, as Kubernetes would: kill a worker
(kill -9 PID; DIR/cluster.json lists them) and the job resumes from its last
committed checkpoint in a new generation; kill the coordinators' leader and
another replica takes over while training goes on.

The cluster's state (raft logs, etcd, the S3 objects) stays in DIR, so a
second run continues where the first stopped: job IDs go on, and a job left
running resumes. --fresh starts from an empty cluster. --no-demo only brings
the cluster up; --stay keeps it up after the demo. Both run until Ctrl-C,
while m2ctl job commands (with the printed --coordinator addresses) and
m2worker processes can use it. Logs go to DIR/logs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			return runUp(cmd.Context(), o, cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.dir, "dir", filepath.Join(os.TempDir(), "m2train-up"), "directory of the cluster's state, logs, data and exported models")
	f.IntVar(&o.steps, "steps", 300, "optimizer steps of the demo job")
	f.IntVar(&o.workers, "workers", 4, "worker processes")
	f.IntVar(&o.dp, "dp", 2, "data-parallel degree of the demo job")
	f.IntVar(&o.sp, "sp", 2, "sequence-parallel degree of the demo job")
	f.BoolVar(&o.stay, "stay", false, "keep the cluster up after the demo job, until Ctrl-C")
	f.BoolVar(&o.noDemo, "no-demo", false, "bring the cluster up without the demo job and keep it up until Ctrl-C")
	f.BoolVar(&o.fresh, "fresh", false, "remove the cluster state of an earlier run in --dir first (the prepared data stays)")
	f.StringVar(&o.backend, "backend", "cpu", "the workers' training backend: cpu, cuda (on the GPUs, each worker with its own CUDA context) or auto")
	f.StringVar(&o.gpus, "gpus", "", "with --backend cuda or auto: comma-separated GPUs (indices or UUIDs) to spread the workers over, worker i on the (i mod n)-th; default: CUDA_VISIBLE_DEVICES, else every GPU that NVML reports")
	return cmd
}

type upOptions struct {
	dir                 string
	steps, workers      int
	dp, sp              int
	stay, noDemo, fresh bool
	backend             string
	gpus                string
}

func (o *upOptions) validate() error {
	switch {
	case o.workers < 1 || o.workers > 64:
		return usagef("--workers: must be 1 to 64, got %d", o.workers)
	case o.dp < 1 || o.sp < 1:
		return usagef("--dp and --sp: must be at least 1, got %d and %d", o.dp, o.sp)
	case !o.noDemo && o.dp*o.sp > o.workers:
		return usagef("--dp × --sp = %d ranks need as many workers, --workers is %d", o.dp*o.sp, o.workers)
	case o.backend != "cpu" && o.backend != "cuda" && o.backend != "auto":
		return usagef("--backend: must be cpu, cuda or auto, got %q", o.backend)
	case !o.noDemo && o.steps <= 20:
		return usagef("--steps: must be more than the demo's 20 warmup steps, got %d", o.steps)
	}
	return nil
}

// runUp brings the cluster up, runs the demo job and takes it down again.
func runUp(ctx context.Context, o upOptions, out io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// The in-process S3 gateway changes the working directory: every path
	// is absolute from here on.
	dir, err := filepath.Abs(o.dir)
	if err != nil {
		return usageError{err}
	}
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		return err
	}
	st, err := prepareUpState(dir, o)
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}

	dataDir := filepath.Join(dir, "data")
	if !o.noDemo {
		if err := prepareDemoData(ctx, dataDir, out); err != nil {
			return err
		}
	}
	etcd, err := etcdembed.Start(ctx, filepath.Join(dir, "etcd"), "127.0.0.1")
	if err != nil {
		return err
	}
	defer etcd.Close()
	gw, err := s3gw.Start(ctx, s3gw.Options{Dir: filepath.Join(dir, "s3"), Buckets: []string{demoBucket}})
	if err != nil {
		return fmt.Errorf("start the S3 gateway on %s: %w", filepath.Join(dir, "s3"), err)
	}
	defer gw.Stop()
	st.Etcd, st.S3Endpoint = etcd.Endpoint(), gw.Endpoint

	sup := &supervisor{exe: exe, dir: dir, out: out, state: st, procs: map[string]*child{}}
	defer sup.stopAll()
	base := []string{upParentEnv + "=" + strconv.Itoa(os.Getpid())}
	peers := make([]string, len(st.Coordinators))
	for i, c := range st.Coordinators {
		peers[i] = c.ID + "=" + c.Raft
	}
	for _, c := range st.Coordinators {
		args := []string{"up-coordinator", "--id", c.ID, "--data-dir", filepath.Join(dir, "coord", c.ID),
			"--raft-addr", c.Raft, "--api-addr", c.API, "--peers", strings.Join(peers, ","),
			"--etcd-endpoints", etcd.Endpoint(), "--lease-ttl", strconv.Itoa(upLeaseTTL)}
		if err := sup.start(c.ID, args, base); err != nil {
			return err
		}
	}
	cl, err := client.New(client.Config{Addrs: st.coordinatorAddrs()})
	if err != nil {
		return err
	}
	defer cl.Close()
	if err := waitLeader(ctx, cl, sup); err != nil {
		return err
	}

	// Workers share the cores: each gets its part of them unless
	// GOMAXPROCS says otherwise (results do not depend on it).
	wenv := append(append([]string{}, base...),
		checkpoint.EnvEndpoint+"="+gw.Endpoint, "AWS_ACCESS_KEY_ID="+gw.AccessKey,
		"AWS_SECRET_ACCESS_KEY="+gw.SecretKey, "AWS_REGION="+gw.Region, "M2_CACHE_DIR="+filepath.Join(dir, "cache"))
	if os.Getenv("GOMAXPROCS") == "" {
		wenv = append(wenv, "GOMAXPROCS="+strconv.Itoa(max(1, runtime.NumCPU()/o.workers)))
	}
	var gpus []string
	if o.backend != "cpu" {
		gpus = upGPUs(o.gpus, os.Getenv("CUDA_VISIBLE_DEVICES"), discoverGPUs)
	}
	for i := range st.Workers {
		w := &st.Workers[i]
		args := []string{"up-worker", "--id", w.ID, "--coordinator", strings.Join(st.coordinatorAddrs(), ","),
			"--advertise-host", "127.0.0.1", "--backend", o.backend, "--log-format", "text"}
		env := wenv
		if len(gpus) > 0 {
			gpu := gpus[i%len(gpus)]
			sup.mu.Lock() // the supervisor writes the state file from other goroutines
			w.GPU = gpu
			sup.mu.Unlock()
			env = append(append([]string{}, wenv...), "CUDA_VISIBLE_DEVICES="+gpu)
		}
		if err := sup.start(w.ID, args, env); err != nil {
			return err
		}
	}
	sup.setReady()
	coord := strings.Join(st.coordinatorAddrs(), ",")
	fmt.Fprintf(out, "cluster up in %s: %d coordinators, %d workers (backend %s), etcd %s, S3 gateway %s (objects in %s)\n",
		dir, len(st.Coordinators), len(st.Workers), o.backend, etcd.Endpoint(), gw.Endpoint, filepath.Join(dir, "s3"))
	if len(gpus) > 0 {
		fmt.Fprintf(out, "  workers on GPUs %s (CUDA_VISIBLE_DEVICES of each, in turn)\n", strings.Join(gpus, ","))
	}
	fmt.Fprintf(out, "  processes and addresses: %s; logs: %s\n", filepath.Join(dir, upStateFile), filepath.Join(dir, "logs"))
	fmt.Fprintf(out, "  job commands: m2ctl job ls --coordinator %s\n", coord)

	if !o.noDemo {
		if err := runUpDemo(ctx, cl, o, dir, dataDir, gw.Dir, out); err != nil {
			if ctx.Err() != nil {
				fmt.Fprintln(out, "\nstopping the cluster; m2ctl up --dir "+dir+" continues the job")
				return fmt.Errorf("interrupted")
			}
			return err
		}
	}
	if o.noDemo || o.stay {
		fmt.Fprintf(out, "the cluster stays up; Ctrl-C stops it (export M2_COORDINATOR=%s for the job commands)\n", coord)
		<-ctx.Done()
	}
	fmt.Fprintln(out, "stopping the cluster")
	return nil
}

// prepareUpState reads the cluster description of an earlier run in dir,
// or lays out a new one (with --fresh, after removing the old state), and
// checks that its addresses are free.
func prepareUpState(dir string, o upOptions) (*upState, error) {
	path := filepath.Join(dir, upStateFile)
	var old upState
	if b, err := os.ReadFile(path); err == nil && !o.fresh {
		if err := json.Unmarshal(b, &old); err != nil {
			return nil, fmt.Errorf("%s: %w (use --fresh to start over)", path, err)
		}
		if old.Pid != os.Getpid() && processAlive(old.Pid) {
			return nil, usagef("m2ctl up already runs in %s (pid %d)", dir, old.Pid)
		}
	}
	if o.fresh {
		for _, d := range []string{"coord", "etcd", "s3", "s3.meta", "cache", "export", upStateFile} {
			if err := os.RemoveAll(filepath.Join(dir, d)); err != nil {
				return nil, err
			}
		}
	}
	st := &upState{Pid: os.Getpid()}
	if len(old.Coordinators) == 3 {
		for _, c := range old.Coordinators {
			for _, a := range []string{c.API, c.Raft} {
				l, err := net.Listen("tcp", a)
				if err != nil {
					return nil, usagef("the coordinators of %s use %s, which is taken now (%v); use --fresh to start a new cluster", dir, a, err)
				}
				l.Close()
			}
			st.Coordinators = append(st.Coordinators, upProc{ID: c.ID, API: c.API, Raft: c.Raft})
		}
	} else {
		if _, err := os.Stat(filepath.Join(dir, "coord")); err == nil {
			return nil, usagef("%s holds coordinator state but no %s: use --fresh to start a new cluster", dir, upStateFile)
		}
		for i := range 3 {
			api, err := freeLoopback()
			if err != nil {
				return nil, err
			}
			raft, err := freeLoopback()
			if err != nil {
				return nil, err
			}
			st.Coordinators = append(st.Coordinators, upProc{ID: fmt.Sprintf("coord-%d", i), API: api, Raft: raft})
		}
	}
	for i := range o.workers {
		st.Workers = append(st.Workers, upProc{ID: fmt.Sprintf("worker-%d", i)})
	}
	for i := range st.Coordinators {
		st.Coordinators[i].Log = filepath.Join(dir, "logs", st.Coordinators[i].ID+".log")
	}
	for i := range st.Workers {
		st.Workers[i].Log = filepath.Join(dir, "logs", st.Workers[i].ID+".log")
	}
	return st, writeJSONFile(path, st)
}

func freeLoopback() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	return p.Signal(syscall.Signal(0)) == nil
}

// prepareDemoData makes the demo's byte-level dataset from the Go
// distribution's sources, unless it is there already.
func prepareDemoData(ctx context.Context, dataDir string, out io.Writer) error {
	if _, err := os.Stat(filepath.Join(dataDir, data.ManifestName)); err == nil {
		return nil
	}
	goroot := goRoot()
	var inputs []string
	for _, p := range demoSources {
		inputs = append(inputs, filepath.Join(goroot, "src", p))
	}
	fmt.Fprintf(out, "preparing byte-level shards from %s/src/{%s} ...\n", goroot, strings.Join(demoSources, ","))
	st, err := data.Prepare(ctx, inputs, dataDir, data.PrepareOptions{Extensions: []string{".go"}, EOD: true})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "prepared %d files, %d tokens in %s\n", st.FilesUsed, st.Tokens, dataDir)
	return nil
}

// waitLeader waits until the coordinators answer, or a child cannot start.
func waitLeader(ctx context.Context, cl *client.Client, sup *supervisor) error {
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		_, err := cl.List(wctx)
		if err == nil {
			return nil
		}
		if wctx.Err() != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("the coordinators elected no leader within 2 minutes (see %s): %w", filepath.Join(sup.dir, "logs"), err)
		}
	}
}

// upDemoSpec is the demo job laid out on dp × sp ranks: the micro-batch is
// the demo's global batch shared by the dp replicas.
func upDemoSpec(o upOptions, dataDir string) ([]byte, error) {
	spec, err := jobspec.Parse(fmt.Appendf(nil, demoSpec, dataDir, o.steps, demoLocation))
	if err != nil {
		return nil, err
	}
	if spec.Batch.GlobalBatch%o.dp != 0 {
		return nil, usagef("--dp: the demo's global batch of %d sequences must be a multiple of it, got %d", spec.Batch.GlobalBatch, o.dp)
	}
	restarts := upRestarts
	spec.Parallel.DP, spec.Parallel.SP = o.dp, o.sp
	spec.Batch.MicroBatch = spec.Batch.GlobalBatch / o.dp
	spec.MaxRestarts = &restarts
	// The job asks for the workers' backend, so that the scheduler places
	// it on them and nowhere else.
	spec.Backend = o.backend
	if err := spec.Validate(); err != nil {
		return nil, usageError{err}
	}
	return spec.Marshal()
}

// runUpDemo submits the demo job, shows its progress and, once it
// succeeded, its checkpoints and its exported model.
func runUpDemo(ctx context.Context, cl *client.Client, o upOptions, dir, dataDir, gwDir string, out io.Writer) error {
	job, err := unfinishedDemo(ctx, cl)
	if err != nil {
		return err
	}
	if job != nil {
		from := "from the start"
		if ck := job.GetLastCheckpoint(); ck != nil {
			from = fmt.Sprintf("from its checkpoint of step %d", ck.GetStep())
		}
		fmt.Fprintf(out, "continuing %s, which an earlier run left unfinished: it resumes %s\n", job.GetId(), from)
	} else {
		doc, err := upDemoSpec(o, dataDir)
		if err != nil {
			return err
		}
		if job, err = cl.Submit(ctx, doc); err != nil {
			return fmt.Errorf("submit the demo job: %w", err)
		}
		specPath := filepath.Join(dir, job.GetId()+".yaml")
		if err := os.WriteFile(specPath, doc, 0o644); err != nil {
			return err
		}
		fmt.Fprintf(out, "submitted %s (spec %s): %d steps of a %d-layer Mamba-2 on dp %d × sp %d ranks\n",
			job.GetId(), specPath, o.steps, 2, o.dp, o.sp)
	}
	j, err := watchUpJob(ctx, cl, job.GetId(), out)
	if err != nil {
		return err
	}
	if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		return fmt.Errorf("job %s ended %s: %s (logs in %s)", j.GetId(), strings.TrimPrefix(strings.ToLower(j.GetState().String()), "job_state_"),
			j.GetMessage(), filepath.Join(dir, "logs"))
	}
	p := j.GetProgress()
	uniform := math.Log(272)
	fmt.Fprintf(out, "\n%s finished: loss %.4f after %d steps in %d generation(s); a uniform guess scores ln(272) = %.4f\n",
		j.GetId(), p.GetLoss(), p.GetStep(), j.GetGeneration(), uniform)
	cks, err := cl.Checkpoints(ctx, j.GetId())
	if err != nil {
		return err
	}
	if len(cks) == 0 {
		return fmt.Errorf("job %s committed no checkpoint", j.GetId())
	}
	local := filepath.Join(gwDir, demoBucket, filepath.FromSlash(strings.TrimPrefix(demoLocation, "s3://"+demoBucket+"/")), j.GetId())
	fmt.Fprintln(out, "committed checkpoints (the gateway keeps them as files):")
	for _, ck := range cks {
		fmt.Fprintf(out, "  step %d: %s\n           %s\n", ck.GetStep(), ck.GetLocation(), filepath.Join(local, checkpoint.StepDir(int(ck.GetStep()))))
	}
	last := cks[len(cks)-1]
	log := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelWarn}))
	loc, err := openCheckpointLocation(ctx, local, log)
	if err != nil {
		return err
	}
	defer loc.Close()
	exportDir := filepath.Join(dir, "export", j.GetId())
	if err := exportCheckpoint(ctx, out, loc, int(last.GetStep()), exportDir, safetensors.F32, "float32"); err != nil {
		return fmt.Errorf("export the checkpoint of step %d: %w", last.GetStep(), err)
	}
	fmt.Fprintf(out, "exported model: %s\n", exportDir)
	fmt.Fprintf(out, "inspect and verify: m2ctl checkpoint inspect %s\n", local)
	if !(p.GetLoss() < uniform) {
		return fmt.Errorf("the loss did not fall below the uniform-guess loss")
	}
	return nil
}

// unfinishedDemo returns the oldest demo job that is queued or running
// (left by an interrupted run), if any.
func unfinishedDemo(ctx context.Context, cl *client.Client) (*pb.Job, error) {
	jobs, err := cl.List(ctx, pb.JobState_JOB_STATE_QUEUED, pb.JobState_JOB_STATE_RUNNING)
	if err != nil {
		return nil, fmt.Errorf("list the jobs: %w", err)
	}
	for _, j := range jobs {
		if j.GetName() == "demo" {
			return j, nil
		}
	}
	return nil, nil
}

// watchUpJob shows a job's progress until it ends, and its events (new
// generations, checkpoints, failures) as they happen.
func watchUpJob(ctx context.Context, cl *client.Client, id string, out io.Writer) (*pb.Job, error) {
	tty := isTerminal(out)
	var (
		seq       uint64
		lastLine  time.Time
		drawn     bool
		genStart  time.Time
		genStep   int64
		gen       uint64
		lastState pb.JobState
	)
	return cl.Watch(ctx, id, func(j *pb.Job) error {
		if evs, err := cl.Events(ctx, id, seq, 0); err == nil {
			for _, e := range evs {
				seq = e.GetSeq()
				if e.GetType() == "submitted" {
					continue
				}
				if drawn {
					fmt.Fprint(out, "\r\x1b[K")
					drawn = false
				}
				fmt.Fprintf(out, "  %s  %s: %s\n", e.GetTime().AsTime().Local().Format("15:04:05"), e.GetType(), e.GetMessage())
			}
		}
		p := j.GetProgress()
		if j.GetGeneration() != gen {
			gen, genStart, genStep = j.GetGeneration(), time.Now(), p.GetStep()
		}
		line := fmt.Sprintf("%s %s gen %d  step %d/%d", j.GetId(), strings.TrimPrefix(strings.ToLower(j.GetState().String()), "job_state_"),
			j.GetGeneration(), p.GetStep(), p.GetTotalSteps())
		if p.GetUpdatedAt() != nil {
			line += fmt.Sprintf("  loss %.4f  %.0f tok/s", p.GetLoss(), p.GetTokensPerSec())
			if done := p.GetStep() - genStep; done > 0 && p.GetTotalSteps() > p.GetStep() {
				eta := time.Duration(float64(time.Since(genStart)) / float64(done) * float64(p.GetTotalSteps()-p.GetStep()))
				line += "  ETA " + eta.Round(time.Second).String()
			}
		}
		switch {
		case tty:
			fmt.Fprintf(out, "\r\x1b[K%s", line)
			drawn = true
		case time.Since(lastLine) >= 5*time.Second || j.GetState() != lastState || client.Terminal(j.GetState()):
			fmt.Fprintln(out, line)
			lastLine = time.Now()
		}
		lastState = j.GetState()
		if client.Terminal(j.GetState()) && drawn {
			fmt.Fprintln(out)
			drawn = false
		}
		return nil
	})
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// supervisor runs the cluster's child processes and starts again any that
// exits while the cluster is up.
type supervisor struct {
	exe   string
	dir   string
	out   io.Writer
	mu    sync.Mutex
	state *upState
	procs map[string]*child
	order []string
}

type child struct {
	id       string
	args     []string
	env      []string
	logPath  string
	cmd      *exec.Cmd
	done     chan struct{}
	stopping bool
}

// start runs a child and keeps it running.
func (s *supervisor) start(id string, args, env []string) error {
	c := &child{id: id, args: args, env: env, logPath: filepath.Join(s.dir, "logs", id+".log")}
	s.mu.Lock()
	s.procs[id] = c
	s.order = append(s.order, id)
	s.mu.Unlock()
	if err := s.spawn(c); err != nil {
		return err
	}
	go s.keep(c)
	return nil
}

func (s *supervisor) spawn(c *child) error {
	logf, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.exe, c.args...)
	cmd.Env = append(os.Environ(), c.env...)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", c.id, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		logf.Close()
		close(done)
	}()
	s.mu.Lock()
	c.cmd, c.done = cmd, done
	s.setPid(c.id, cmd.Process.Pid)
	s.mu.Unlock()
	return nil
}

// keep starts a child again whenever it exits, until it is stopped.
func (s *supervisor) keep(c *child) {
	backoff := 500 * time.Millisecond
	for {
		s.mu.Lock()
		done, cmd := c.done, c.cmd
		s.mu.Unlock()
		<-done
		s.mu.Lock()
		stopping := c.stopping
		s.mu.Unlock()
		if stopping {
			return
		}
		fmt.Fprintf(s.out, "\n%s (pid %d) exited: %v; starting it again\n", c.id, cmd.Process.Pid, cmd.ProcessState)
		time.Sleep(backoff)
		backoff = min(2*backoff, 10*time.Second)
		s.mu.Lock()
		stopping = c.stopping
		s.mu.Unlock()
		if stopping {
			return
		}
		if err := s.spawn(c); err != nil {
			fmt.Fprintf(s.out, "%s: %v\n", c.id, err)
			return
		}
	}
}

// setPid records a child's process ID in the state file; caller holds mu.
func (s *supervisor) setPid(id string, pid int) {
	for _, list := range [][]upProc{s.state.Coordinators, s.state.Workers} {
		for i := range list {
			if list[i].ID == id {
				list[i].Pid = pid
			}
		}
	}
	if err := writeJSONFile(filepath.Join(s.dir, upStateFile), s.state); err != nil {
		fmt.Fprintf(s.out, "write %s: %v\n", upStateFile, err)
	}
}

func (s *supervisor) setReady() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.state.Ready = true
	if err := writeJSONFile(filepath.Join(s.dir, upStateFile), s.state); err != nil {
		fmt.Fprintf(s.out, "write %s: %v\n", upStateFile, err)
	}
}

// stopAll stops the workers, then the coordinators: SIGTERM, and SIGKILL
// for one that has not exited after a while.
func (s *supervisor) stopAll() {
	s.mu.Lock()
	var workers, coords []*child
	for _, id := range s.order {
		c := s.procs[id]
		c.stopping = true
		if strings.HasPrefix(id, "worker-") {
			workers = append(workers, c)
		} else {
			coords = append(coords, c)
		}
	}
	s.state.Ready = false
	if err := writeJSONFile(filepath.Join(s.dir, upStateFile), s.state); err != nil {
		fmt.Fprintf(s.out, "write %s: %v\n", upStateFile, err)
	}
	s.mu.Unlock()
	s.stop(workers, 90*time.Second)
	s.stop(coords, 15*time.Second)
}

func (s *supervisor) stop(cs []*child, timeout time.Duration) {
	deadline := time.After(timeout)
	for _, c := range cs {
		s.mu.Lock()
		cmd, done := c.cmd, c.done
		s.mu.Unlock()
		select {
		case <-done:
		default:
			cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, c := range cs {
		s.mu.Lock()
		cmd, done := c.cmd, c.done
		s.mu.Unlock()
		if cmd == nil {
			continue
		}
		select {
		case <-done:
		case <-deadline:
			cmd.Process.Kill()
			<-done
		}
	}
}

// parentWatch returns a context that ends with ctx or when the process
// that started this one (named by upParentEnv) is gone.
func parentWatch(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	ppid, err := strconv.Atoi(os.Getenv(upParentEnv))
	if err != nil || ppid <= 0 {
		return ctx, cancel
	}
	go func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if os.Getppid() != ppid {
					cancel()
					return
				}
			}
		}
	}()
	return ctx, cancel
}

// upGPUs returns the GPUs to spread the workers over: those of the --gpus
// flag, else those CUDA_VISIBLE_DEVICES (env) names, else the indices of
// the GPUs that discover finds; nil when none is known, and the workers
// then see what the environment gives them.
func upGPUs(flag, env string, discover func() []string) []string {
	split := func(s string) []string {
		var out []string
		for _, e := range strings.Split(s, ",") {
			if e = strings.TrimSpace(e); e != "" {
				out = append(out, e)
			}
		}
		return out
	}
	switch {
	case strings.TrimSpace(flag) != "":
		return split(flag)
	case env != "":
		return split(env)
	}
	return discover()
}

// discoverGPUs lists the NVML indices of this machine's GPUs; none where
// NVML is missing.
func discoverGPUs() []string {
	r, err := gpuinfo.Discover()
	if err != nil {
		return nil
	}
	var out []string
	for _, d := range r.Devices {
		out = append(out, strconv.Itoa(d.Index))
	}
	return out
}

// newUpWorkerCmd is the worker process of `m2ctl up`: the m2worker command.
func newUpWorkerCmd() *cobra.Command {
	return &cobra.Command{
		Use:                "up-worker [m2worker flags]",
		Short:              "Run one worker of m2ctl up (the m2worker command)",
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			ctx, cancel := parentWatch(ctx)
			defer cancel()
			if code := app.MainContext(ctx, args, cmd.ErrOrStderr()); code != app.ExitOK {
				return &cli.ExitError{Code: code, Err: fmt.Errorf("worker exited with status %d", code)}
			}
			return nil
		},
	}
}

// newUpCoordinatorCmd is a coordinator replica of `m2ctl up`: raft, the
// gRPC API and the leader's work, attached to the cluster's etcd.
func newUpCoordinatorCmd() *cobra.Command {
	var r upReplica
	cmd := &cobra.Command{
		Use:    "up-coordinator",
		Short:  "Run one coordinator replica of m2ctl up",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			ctx, cancel := parentWatch(ctx)
			defer cancel()
			return r.run(ctx, cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&r.id, "id", "", "replica ID")
	f.StringVar(&r.dataDir, "data-dir", "", "raft data directory")
	f.StringVar(&r.raftAddr, "raft-addr", "", "raft address")
	f.StringVar(&r.apiAddr, "api-addr", "", "API address")
	f.StringVar(&r.peers, "peers", "", "id=raft-addr,... of every replica")
	f.StringVar(&r.etcd, "etcd-endpoints", "", "etcd endpoints")
	f.IntVar(&r.leaseTTL, "lease-ttl", upLeaseTTL, "worker lease TTL in seconds")
	for _, n := range []string{"id", "data-dir", "raft-addr", "api-addr", "peers", "etcd-endpoints"} {
		cmd.MarkFlagRequired(n)
	}
	return cmd
}

type upReplica struct {
	id, dataDir, raftAddr, apiAddr, peers, etcd string
	leaseTTL                                    int
}

func (r *upReplica) run(ctx context.Context, stderr io.Writer) error {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	peers, err := node.ParsePeers(r.peers)
	if err != nil {
		return usageError{err}
	}
	cfg := node.DefaultConfig()
	cfg.ID, cfg.DataDir, cfg.BindAddr, cfg.Peers, cfg.Logger = r.id, r.dataDir, r.raftAddr, peers, log
	// The workers share the machine's cores: slower heartbeats keep a
	// busy machine from deposing a live leader.
	cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = time.Second, time.Second, 500*time.Millisecond
	n, err := node.Start(cfg)
	if err != nil {
		return err
	}
	defer n.Close()
	eps := strings.Split(r.etcd, ",")
	etcd, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer etcd.Close()
	srv, err := server.New(server.Config{Node: n, APIAddr: r.apiAddr, Etcd: etcd, EtcdEndpoints: eps,
		EtcdPrefix: membership.DefaultPrefix, LeaseTTL: r.leaseTTL, Logger: log})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", r.apiAddr)
	if err != nil {
		return err
	}
	g := srv.GRPCServer(nil)
	served := make(chan error, 1)
	go func() { served <- g.Serve(lis) }()
	log.Info("coordinator replica started", "id", r.id, "api", r.apiAddr, "raft", r.raftAddr)
	select {
	case <-ctx.Done():
	case err := <-served:
		return fmt.Errorf("api server: %w", err)
	}
	stopped := make(chan struct{})
	go func() {
		g.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		g.Stop()
	}
	return nil
}
