package agent_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/coordtest"
	"github.com/m2train/m2train/coordinator/etcdembed"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/coordinator/membership"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/model/ref"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/tools/testlog"
	"github.com/m2train/m2train/worker/agent"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/train"
)

var etcdEndpoint string

// TestMain runs one embedded etcd for the package's tests; each test uses
// its own key prefix.
func TestMain(m *testing.M) {
	before := goleak.IgnoreCurrent()
	dir, err := os.MkdirTemp("", "agent-etcd-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	srv, err := etcdembed.Start(ctx, dir, "127.0.0.1")
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	etcdEndpoint = srv.Endpoint()
	code := m.Run()
	srv.Close()
	os.RemoveAll(dir)
	// Every agent, rank, communicator and report of the tests has ended.
	if code == 0 {
		if err := goleak.Find(before); err != nil {
			fmt.Fprintln(os.Stderr, "goroutines left behind:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// testLogger routes logs at level and above to t.Log while the test runs.
func testLogger(t *testing.T, level slog.Level) *slog.Logger {
	return testlog.New(t, level)
}

// makeDataset writes a small byte-level dataset (with end-of-document
// tokens, vocabulary 257) in several shards.
func makeDataset(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	for i := range 6 {
		var sb strings.Builder
		for j := range 60 {
			fmt.Fprintf(&sb, "func f%d_%d(x int) int { return x*%d + %d } // file %d\n", i, j, i+j, j, i)
		}
		if err := os.WriteFile(filepath.Join(src, fmt.Sprintf("f%d.go", i)), []byte(sb.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out := t.TempDir()
	if _, err := data.Prepare(context.Background(), []string{src}, out, data.PrepareOptions{EOD: true, ShardTokens: 8000}); err != nil {
		t.Fatal(err)
	}
	return out
}

// tinySpec is a job small enough to train in seconds on a loaded CPU.
func tinySpec(name string, dp, sp, steps, every int, dataDir, ckptDir string) string {
	return fmt.Sprintf(`name: %s
model:
  config: {d_model: 32, n_layer: 1, vocab_size: 272, d_state: 16, headdim: 16, expand: 2, chunk_size: 16}
data: {path: %s, seq_len: 32}
parallel: {dp: %d, sp: %d}
batch: {micro_batch: 2, global_batch: 4}
optimizer: {lr: 0.01, grad_clip: 1.0}
schedule: {warmup_steps: 2, total_steps: %d}
checkpoint: {location: %s, every_steps: %d, keep: 2}
seed: 7
backend: cpu
max_restarts: 5
`, name, dataDir, dp, sp, steps, ckptDir, every)
}

func startCluster(t *testing.T, replicas int) *coordtest.Cluster {
	t.Helper()
	c, err := coordtest.Start(coordtest.Options{Replicas: replicas, Dir: t.TempDir(), EtcdEndpoints: []string{etcdEndpoint},
		EtcdPrefix: "/" + t.Name() + "/", LeaseTTL: 3, Node: coordtest.FastNode, Logger: testLogger(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	return c
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// events collects the rank events of the agents of a test. hook, when
// set, runs on the rank's goroutine: blocking in it holds the rank at that
// point (a progress event holds it after the step).
type events struct {
	mu   sync.Mutex
	all  []agent.RankEvent
	hook func(agent.RankEvent)
}

func (e *events) add(ev agent.RankEvent) {
	e.mu.Lock()
	e.all = append(e.all, ev)
	hook := e.hook
	e.mu.Unlock()
	if hook != nil {
		hook(ev)
	}
}

func (e *events) setHook(h func(agent.RankEvent)) {
	e.mu.Lock()
	e.hook = h
	e.mu.Unlock()
}

func (e *events) list() []agent.RankEvent {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]agent.RankEvent(nil), e.all...)
}

// runningAgent is an agent running in the test's process.
type runningAgent struct {
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

// stop shuts the agent down gracefully and returns Run's result.
func (r *runningAgent) stop() error {
	r.cancel()
	<-r.done
	return r.err
}

func startAgent(t *testing.T, c *coordtest.Cluster, id string, runner agent.Runner, ev *events) *runningAgent {
	t.Helper()
	return startAgentWith(t, c, id, runner, ev, nil)
}

// startAgentWith is startAgent with edit applied to the configuration.
func startAgentWith(t *testing.T, c *coordtest.Cluster, id string, runner agent.Runner, ev *events, edit func(*agent.Config)) *runningAgent {
	t.Helper()
	cfg := agent.DefaultConfig()
	cfg.WorkerID = id
	cfg.Coordinators = c.Addrs()
	cfg.EtcdPrefix = "/" + t.Name() + "/"
	cfg.AdvertiseHost = "127.0.0.1"
	cfg.PollInterval = 100 * time.Millisecond
	cfg.Collective.Timeout = 30 * time.Second
	cfg.Runner = runner
	cfg.Logger = testLogger(t, slog.LevelInfo).With("test_worker", id)
	if ev != nil {
		cfg.OnRankEvent = ev.add
	}
	if edit != nil {
		edit(&cfg)
	}
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &runningAgent{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.err = a.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(2 * time.Minute):
			t.Errorf("agent %s did not stop", id)
		}
	})
	return r
}

func newClient(t *testing.T, c *coordtest.Cluster) *client.Client {
	t.Helper()
	cl, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// waitJob watches a job until it ends and returns its last state.
func waitJob(t *testing.T, ctx context.Context, cl *client.Client, id string) *pb.Job {
	t.Helper()
	j, err := cl.Watch(ctx, id, func(*pb.Job) error { return nil })
	if err != nil {
		t.Fatalf("watch %s: %v", id, err)
	}
	return j
}

// localLoss trains spec in this process with train.New, as `m2ctl train`
// does, and returns the final loss: the reference of a single-rank job.
func localLoss(t *testing.T, doc string) float64 {
	t.Helper()
	spec, err := jobspec.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	spec.Checkpoint.Location = ""
	spec.Checkpoint.EverySteps, spec.Checkpoint.Keep = 0, 0
	cfg, err := train.ConfigFromSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ref.New[float32](cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := train.LoadInit(spec, cfg, m.Layout(), m.Params()); err != nil {
		t.Fatal(err)
	}
	ds, err := data.Open(spec.Data.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer ds.Close()
	tr, err := train.New(spec, m, ds, train.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	return tr.Loss()
}

// TestSingleRankJob runs a one-rank job end to end through a three-replica
// coordinator: the agent registers, takes the assignment, reports every
// step, commits every checkpoint, and ends the job; the final loss is that
// of the same spec trained in one process, bit for bit.
func TestSingleRankJob(t *testing.T) {
	c := startCluster(t, 3)
	ctx := ctxT(t, 3*time.Minute)
	cl := newClient(t, c)
	ckpt := t.TempDir()
	doc := tinySpec("single", 1, 1, 12, 4, makeDataset(t), ckpt)
	var ev events
	startAgent(t, c, "w0", &agent.TrainRunner{Device: agent.DeviceCPU}, &ev)

	job, err := cl.Submit(ctx, []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, ctx, cl, job.GetId())
	if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("job ended %v: %s", j.GetState(), j.GetMessage())
	}
	if j.GetGeneration() != 1 || j.GetRestarts() != 0 {
		t.Errorf("generation %d, restarts %d; want 1 and 0", j.GetGeneration(), j.GetRestarts())
	}
	if p := j.GetProgress(); p.GetStep() != 12 {
		t.Errorf("final progress step %d, want 12", p.GetStep())
	}
	want := localLoss(t, doc)
	if got := j.GetProgress().GetLoss(); got != want {
		t.Errorf("final loss %v, single process %v: not bitwise equal", got, want)
	} else {
		t.Logf("final loss %v, bitwise equal to the single-process run", got)
	}

	// Every step was reported, in order, with its wall time; a world of
	// one waits on no peer and moves nothing through its communicator.
	// Each checkpoint was reported once, committed by the coordinator.
	var steps, saved []int
	for _, e := range ev.list() {
		switch e.Kind {
		case agent.RankProgress:
			steps = append(steps, e.Progress.Step)
			if e.Progress.StepTime <= 0 || e.Progress.CommWait != 0 || e.Collective != (collective.Stats{}) {
				t.Errorf("step %d: step time %v, wait %v, collective %+v", e.Progress.Step, e.Progress.StepTime, e.Progress.CommWait, e.Collective)
			}
		case agent.RankCheckpoint:
			saved = append(saved, e.Checkpoint.Step)
			if e.Err != nil || e.Checkpoint.Upload <= 0 {
				t.Errorf("checkpoint event %+v: err %v", e.Checkpoint, e.Err)
			}
		case agent.RankCheckpointFailed:
			t.Errorf("checkpoint of step %d failed: %v", e.Checkpoint.Step, e.Err)
		}
	}
	if fmt.Sprint(steps) != fmt.Sprint([]int{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}) {
		t.Errorf("progress events for steps %v", steps)
	}
	if fmt.Sprint(saved) != "[4 8 12]" {
		t.Errorf("checkpoint events for steps %v, want [4 8 12]", saved)
	}

	// The checkpoints of steps 4, 8 and 12 were committed; the coordinator
	// keeps the newest two, and they are in the store under the job's ID.
	cks, err := cl.Checkpoints(ctx, j.GetId())
	if err != nil {
		t.Fatal(err)
	}
	if len(cks) != 2 || cks[0].GetStep() != 8 || cks[1].GetStep() != 12 {
		t.Fatalf("committed checkpoints %v, want steps 8 and 12", cks)
	}
	for _, ck := range cks {
		wantLoc := filepath.Join(ckpt, j.GetId(), checkpoint.StepDir(int(ck.GetStep())))
		if ck.GetLocation() != wantLoc {
			t.Errorf("checkpoint location %q, want %q", ck.GetLocation(), wantLoc)
		}
		if _, err := os.Stat(filepath.Join(wantLoc, "manifest.json")); err != nil {
			t.Errorf("checkpoint of step %d: %v", ck.GetStep(), err)
		}
	}
	evs, err := cl.Events(ctx, j.GetId(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, e := range evs {
		types = append(types, e.GetType())
	}
	if want := "[submitted scheduled checkpoint checkpoint checkpoint succeeded]"; fmt.Sprint(types) != want {
		t.Errorf("events %v, want %s", types, want)
	}
}

// runJob submits doc, waits for the job to end and returns it.
func runJob(t *testing.T, ctx context.Context, cl *client.Client, doc string) *pb.Job {
	t.Helper()
	job, err := cl.Submit(ctx, []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, ctx, cl, job.GetId())
	if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("job %s ended %v: %s", j.GetId(), j.GetState(), j.GetMessage())
	}
	return j
}

// TestGridJobSurvivesAStoppedWorker trains a dp 2 × sp 2 job on four
// agents, then the same spec again while the worker of rank 1 stops after
// a checkpoint was committed and a fifth worker takes its place: the job
// resumes in a new generation from its last committed checkpoint, and its
// final loss is bitwise that of the uninterrupted run.
func TestGridJobSurvivesAStoppedWorker(t *testing.T) {
	c := startCluster(t, 1)
	ctx := ctxT(t, 4*time.Minute)
	cl := newClient(t, c)
	dataDir := makeDataset(t)
	var ev events
	workers := map[string]*runningAgent{}
	for _, id := range []string{"w0", "w1", "w2", "w3"} {
		workers[id] = startAgent(t, c, id, &agent.TrainRunner{Device: agent.DeviceCPU}, &ev)
	}
	ref := runJob(t, ctx, cl, tinySpec("grid", 2, 2, 16, 4, dataDir, t.TempDir()))
	if ref.GetGeneration() != 1 {
		t.Fatalf("the uninterrupted run took %d generations", ref.GetGeneration())
	}
	want := ref.GetProgress().GetLoss()
	single := localLoss(t, tinySpec("grid", 1, 1, 16, 4, dataDir, t.TempDir()))
	t.Logf("dp 2 × sp 2 final loss %v; one process %v", want, single)
	if d := want - single; d > 1e-6 || d < -1e-6 {
		t.Errorf("the grid's loss %v is far from one process's %v", want, single)
	}
	// Every rank of the grid moved bytes both ways and waited on its
	// peers; the four ranks' totals balance, since every byte sent was
	// received.
	var sent, recv int64
	ended := 0
	for _, e := range ev.list() {
		if e.JobID != ref.GetId() {
			continue
		}
		switch e.Kind {
		case agent.RankEnded:
			ended++
			if e.Err != nil || e.Collective.BytesSent <= 0 || e.Collective.BytesReceived <= 0 {
				t.Errorf("rank %d ended with %v having moved %+v", e.Rank, e.Err, e.Collective)
			}
			sent += e.Collective.BytesSent
			recv += e.Collective.BytesReceived
		case agent.RankProgress:
			if e.Progress.CommWait <= 0 || e.Progress.CommWait > e.Progress.StepTime {
				t.Errorf("rank %d step %d waited %v of %v", e.Rank, e.Progress.Step, e.Progress.CommWait, e.Progress.StepTime)
			}
		}
	}
	if ended != 4 || sent != recv {
		t.Errorf("%d ranks ended; they sent %d bytes and received %d", ended, sent, recv)
	}

	// Rank 0 of the second job waits after step 6 until the checkpoint of
	// step 4 is committed and the worker of rank 1 has stopped; a spare
	// worker joins.
	var victim string
	var once sync.Once
	ev.setHook(func(e agent.RankEvent) {
		if e.Kind != agent.RankProgress || !strings.HasPrefix(e.JobID, "gridfault-") || e.Generation != 1 || e.Rank != 0 || e.Progress.Step != 6 {
			return
		}
		once.Do(func() {
			for {
				j, err := cl.Get(ctx, e.JobID)
				if err != nil {
					t.Errorf("get %s: %v", e.JobID, err)
					return
				}
				if j.GetLastCheckpoint().GetStep() == 4 {
					victim = j.GetAssignments()[1].GetWorkerId()
					break
				}
				if !sleepCtx(ctx, 20*time.Millisecond) {
					t.Error("the checkpoint of step 4 was not committed")
					return
				}
			}
			t.Logf("stopping %s (rank 1) while rank 0 holds after step 6", victim)
			if err := workers[victim].stop(); err != nil {
				t.Errorf("agent %s: %v", victim, err)
			}
			startAgent(t, c, "w4", &agent.TrainRunner{Device: agent.DeviceCPU}, &ev)
		})
	})
	j := runJob(t, ctx, cl, tinySpec("gridfault", 2, 2, 16, 4, dataDir, t.TempDir()))
	if victim == "" {
		t.Fatal("no worker was stopped")
	}
	if j.GetGeneration() < 2 {
		t.Errorf("generation %d: the job did not restart", j.GetGeneration())
	}
	if got := j.GetProgress().GetLoss(); got != want {
		t.Errorf("final loss %v after the restart, %v uninterrupted: not bitwise equal", got, want)
	} else {
		t.Logf("final loss %v after %d generations, bitwise equal to the uninterrupted run", got, j.GetGeneration())
	}
	evs, err := cl.Events(ctx, j.GetId(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	resumed := false
	for _, e := range evs {
		t.Logf("event %s: %s", e.GetType(), e.GetMessage())
		if e.GetType() == "requeued" && strings.Contains(e.GetMessage(), "resume from the checkpoint of step 4") {
			resumed = true
		}
	}
	if !resumed {
		t.Error("no requeue event that resumes from the checkpoint of step 4")
	}
	// The last generation's ranks resumed: rank 0's first step there is 5.
	first := map[uint64]int{}
	for _, e := range ev.list() {
		if e.Kind == agent.RankProgress && e.JobID == j.GetId() && e.Rank == 0 {
			if _, ok := first[e.Generation]; !ok {
				first[e.Generation] = e.Progress.Step
			}
		}
	}
	if s := first[j.GetGeneration()]; s != 5 {
		t.Errorf("the last generation's first step is %d, want 5 (resumed from step 4)", s)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// TestReady follows a worker's readiness: not registered before Run, nor
// while the coordinator cannot be reached (the reason names the failure);
// registered once it is; not after the shutdown.
func TestReady(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := lis.Addr().String()
	lis.Close() // nothing listens there now

	newAgent := func(coords ...string) *agent.Agent {
		cfg := agent.DefaultConfig()
		cfg.WorkerID = "w0"
		cfg.Coordinators = coords
		cfg.EtcdPrefix = "/" + t.Name() + "/"
		cfg.AdvertiseHost = "127.0.0.1"
		cfg.PollInterval = 100 * time.Millisecond
		cfg.ReportTimeout = 2 * time.Second
		cfg.Runner = agent.RunnerFunc(func(ctx context.Context, r *agent.Rank) (agent.Result, error) { return agent.Result{}, nil })
		cfg.Logger = testLogger(t, slog.LevelWarn)
		a, err := agent.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	run := func(a *agent.Agent) (stop func() error) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(ctx) }()
		return func() error {
			cancel()
			return <-done
		}
	}
	// waitFor polls Ready until cond holds.
	waitFor := func(a *agent.Agent, what string, cond func(error) bool) {
		t.Helper()
		ctx := ctxT(t, time.Minute)
		for !cond(a.Ready()) {
			if !sleepCtx(ctx, 20*time.Millisecond) {
				t.Fatalf("readiness never became %s; last %v", what, a.Ready())
			}
		}
	}

	a := newAgent(dead)
	if err := a.Ready(); !errors.Is(err, agent.ErrNotRegistered) || !strings.Contains(err.Error(), "Run has not registered it yet") {
		t.Fatalf("Ready before Run = %v", err)
	}
	stop := run(a)
	waitFor(a, "a registration failure", func(err error) bool {
		return errors.Is(err, agent.ErrNotRegistered) && strings.Contains(err.Error(), "register with the coordinator") &&
			strings.Contains(err.Error(), "(retrying)")
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if err := a.Ready(); !errors.Is(err, agent.ErrNotRegistered) {
		t.Fatalf("Ready after a shutdown before registering = %v", err)
	}

	c := startCluster(t, 1)
	a = newAgent(c.Addrs()...)
	stop = run(a)
	waitFor(a, "ready", func(err error) bool { return err == nil })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if err := a.Ready(); !errors.Is(err, agent.ErrNotRegistered) || !errors.Is(err, agent.ErrShutdown) {
		t.Fatalf("Ready after the shutdown = %v, want ErrNotRegistered and ErrShutdown", err)
	}
}

// TestFatalFailureFailsTheJob runs a spec the CPU worker cannot train
// (bf16 needs the CUDA backend): the rank reports a fatal failure and the
// job fails at once instead of being placed again.
func TestFatalFailureFailsTheJob(t *testing.T) {
	c := startCluster(t, 1)
	ctx := ctxT(t, 2*time.Minute)
	cl := newClient(t, c)
	startAgent(t, c, "w0", &agent.TrainRunner{Device: agent.DeviceCPU}, nil)
	doc := strings.Replace(tinySpec("bf16", 1, 1, 8, 4, makeDataset(t), t.TempDir()), "backend: cpu", "backend: auto\nprecision: bf16", 1)
	job, err := cl.Submit(ctx, []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, ctx, cl, job.GetId())
	if j.GetState() != pb.JobState_JOB_STATE_FAILED || j.GetRestarts() != 0 ||
		!strings.Contains(j.GetMessage(), "rank 0 failed in generation 1: agent: precision bf16 needs the CUDA backend") {
		t.Fatalf("job %v, restarts %d: %s", j.GetState(), j.GetRestarts(), j.GetMessage())
	}
}

// holdAt returns a hook that holds rank 0 of the job named name after step
// (generation 1) until act returned.
func holdAt(name string, step int, act func(agent.RankEvent)) func(agent.RankEvent) {
	var once sync.Once
	return func(e agent.RankEvent) {
		if e.Kind == agent.RankProgress && strings.HasPrefix(e.JobID, name+"-") && e.Generation == 1 && e.Rank == 0 && e.Progress.Step == step {
			once.Do(func() { act(e) })
		}
	}
}

// TestCancelStopsTheRanks cancels a running job: every rank stops with
// ErrWithdrawn, and the workers take the next job.
func TestCancelStopsTheRanks(t *testing.T) {
	c := startCluster(t, 1)
	ctx := ctxT(t, 2*time.Minute)
	cl := newClient(t, c)
	var ev events
	for _, id := range []string{"w0", "w1"} {
		startAgent(t, c, id, &agent.TrainRunner{Device: agent.DeviceCPU}, &ev)
	}
	dataDir := makeDataset(t)
	ev.setHook(holdAt("cancel", 3, func(e agent.RankEvent) {
		if _, err := cl.Cancel(ctx, e.JobID, "test"); err != nil {
			t.Errorf("cancel: %v", err)
		}
	}))
	job, err := cl.Submit(ctx, []byte(tinySpec("cancel", 2, 1, 1000, 100, dataDir, t.TempDir())))
	if err != nil {
		t.Fatal(err)
	}
	if j := waitJob(t, ctx, cl, job.GetId()); j.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("job %v: %s", j.GetState(), j.GetMessage())
	}
	runJob(t, ctx, cl, tinySpec("next", 2, 1, 4, 2, dataDir, t.TempDir()))
	ended := 0
	for _, e := range ev.list() {
		if e.Kind == agent.RankEnded && e.JobID == job.GetId() {
			ended++
			if !errors.Is(e.Err, agent.ErrWithdrawn) && !errors.Is(e.Err, agent.ErrStale) {
				t.Errorf("rank %d ended with %v, want a stop by the agent", e.Rank, e.Err)
			}
		}
	}
	if ended != 2 {
		t.Errorf("%d ranks of the cancelled job ended, want 2", ended)
	}
}

// TestLeaseLossRegistersAgain revokes a worker's lease behind its back in
// the middle of a job: the agent stops its rank, registers again with a
// new lease, and the job resumes from its last committed checkpoint and
// ends with the loss of an undisturbed run.
func TestLeaseLossRegistersAgain(t *testing.T) {
	c := startCluster(t, 1)
	ctx := ctxT(t, 3*time.Minute)
	cl := newClient(t, c)
	var ev events
	startAgent(t, c, "w0", &agent.TrainRunner{Device: agent.DeviceCPU}, &ev)
	dataDir := makeDataset(t)
	want := runJob(t, ctx, cl, tinySpec("undisturbed", 1, 1, 12, 4, dataDir, t.TempDir())).GetProgress().GetLoss()

	etcd, err := clientv3.New(clientv3.Config{Endpoints: []string{etcdEndpoint}})
	if err != nil {
		t.Fatal(err)
	}
	defer etcd.Close()
	ev.setHook(holdAt("lapse", 6, func(e agent.RankEvent) {
		for {
			j, err := cl.Get(ctx, e.JobID)
			if err != nil {
				t.Errorf("get: %v", err)
				return
			}
			if j.GetLastCheckpoint().GetStep() == 4 {
				break
			}
			if !sleepCtx(ctx, 20*time.Millisecond) {
				t.Error("the checkpoint of step 4 was not committed")
				return
			}
		}
		members, _, err := membership.ListWorkers(ctx, etcd, "/"+t.Name()+"/")
		if err != nil || len(members) != 1 {
			t.Errorf("workers %v, %v", members, err)
			return
		}
		if _, err := etcd.Revoke(ctx, clientv3.LeaseID(members[0].Lease)); err != nil {
			t.Errorf("revoke: %v", err)
		}
	}))
	j := runJob(t, ctx, cl, tinySpec("lapse", 1, 1, 12, 4, dataDir, t.TempDir()))
	if j.GetGeneration() != 2 || j.GetProgress().GetLoss() != want {
		t.Errorf("generation %d, loss %v; want 2 and the undisturbed loss %v", j.GetGeneration(), j.GetProgress().GetLoss(), want)
	}
	// The rank of generation 1 was stopped (by the lost lease, by the
	// coordinator's answer to a report or by its withdrawal of the
	// assignment, whichever came first); generation 2 resumed from the
	// checkpoint of step 4, the last one committed, even when a newer one
	// was written before the stop.
	var ends []agent.RankEvent
	firstStep := map[uint64]int{}
	for _, e := range ev.list() {
		if e.JobID != j.GetId() {
			continue
		}
		switch e.Kind {
		case agent.RankEnded:
			ends = append(ends, e)
		case agent.RankProgress:
			if _, ok := firstStep[e.Generation]; !ok {
				firstStep[e.Generation] = e.Progress.Step
			}
		}
	}
	if len(ends) == 0 || ends[0].Generation != 1 || !(errors.Is(ends[0].Err, agent.ErrLeaseLost) || errors.Is(ends[0].Err, agent.ErrStale) || errors.Is(ends[0].Err, agent.ErrWithdrawn)) {
		t.Errorf("the job's ranks ended %+v; want a stop in generation 1 first", ends)
	}
	if firstStep[2] != 5 {
		t.Errorf("generation 2 started at step %d, want 5 (resumed from step 4)", firstStep[2])
	}
}

// TestCollectiveOverMutualTLS trains a two-rank job whose ranks talk over
// mutual TLS with certificates of one CA; with a rank whose certificate
// another CA signed, the ranks cannot connect and the job fails.
func TestCollectiveOverMutualTLS(t *testing.T) {
	c := startCluster(t, 1)
	ctx := ctxT(t, 2*time.Minute)
	cl := newClient(t, c)
	files, err := security.GenerateDevPKI(t.TempDir(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	peer, err := files.Peer()
	if err != nil {
		t.Fatal(err)
	}
	withTLS := func(cfg *agent.Config) { cfg.Collective.TLS = peer }
	startAgentWith(t, c, "w0", &agent.TrainRunner{Device: agent.DeviceCPU}, nil, withTLS)
	startAgentWith(t, c, "w1", &agent.TrainRunner{Device: agent.DeviceCPU}, nil, withTLS)
	dataDir := makeDataset(t)
	j := runJob(t, ctx, cl, tinySpec("tls", 2, 1, 6, 3, dataDir, t.TempDir()))
	if j.GetGeneration() != 1 {
		t.Errorf("generation %d, want 1", j.GetGeneration())
	}

	t.Run("foreign CA", func(t *testing.T) { foreignCA(t, ctx, peer, dataDir) })
}

// foreignCA runs a two-rank job whose second worker has a certificate of
// another CA: the job fails as the ranks cannot connect.
func foreignCA(t *testing.T, ctx context.Context, peer *tls.Config, dataDir string) {
	c2 := startCluster(t, 1)
	cl2 := newClient(t, c2)
	other, err := security.GenerateDevPKI(t.TempDir(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := other.Peer()
	if err != nil {
		t.Fatal(err)
	}
	short := func(tlsCfg *tls.Config) func(*agent.Config) {
		return func(cfg *agent.Config) {
			cfg.Collective.TLS = tlsCfg
			cfg.RendezvousTimeout = 3 * time.Second
		}
	}
	startAgentWith(t, c2, "w0", &agent.TrainRunner{Device: agent.DeviceCPU}, nil, short(peer))
	startAgentWith(t, c2, "w1", &agent.TrainRunner{Device: agent.DeviceCPU}, nil, short(foreign))
	doc := strings.Replace(tinySpec("foreign", 2, 1, 6, 3, dataDir, t.TempDir()), "max_restarts: 5", "max_restarts: 0", 1)
	job, err := cl2.Submit(ctx, []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, ctx, cl2, job.GetId())
	if j.GetState() != pb.JobState_JOB_STATE_FAILED || !strings.Contains(j.GetMessage(), "connecting the ranks of generation 1") {
		t.Fatalf("job with a foreign certificate ended %v: %s", j.GetState(), j.GetMessage())
	}
	t.Logf("foreign certificate: %s", j.GetMessage())
}
