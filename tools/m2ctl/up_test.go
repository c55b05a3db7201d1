package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/m2train/m2train/coordinator/client"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/worker/data"
)

// TestUpDemo runs the local mode as a user does: `m2ctl up` brings up three
// coordinator processes, four worker processes, etcd and the S3 gateway,
// trains the demo job on dp 2 × sp 2 ranks, prints its checkpoint and
// exports the model, then takes everything down.
func TestUpDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("trains the demo model on four worker processes")
	}
	dir := t.TempDir()
	msg, code := m2ctl(t, "up", "--dir", dir, "--steps", "22")
	export := filepath.Join(dir, "export", "demo-1")
	for _, want := range []string{"cluster up in " + dir + ": 3 coordinators, 4 workers (backend cpu)", "submitted demo-1",
		"scheduled: generation 1: 4 ranks on 4 workers", "checkpoint: step 22 at s3://demo/checkpoints/demo-1/step-00000022",
		"demo-1 finished: loss", "s3://demo/checkpoints/demo-1/step-00000022", "exported model: " + export, "stopping the cluster"} {
		if code != 0 || !strings.Contains(msg, want) {
			t.Fatalf("up: exit %d, output lacks %q:\n%s", code, want, msg)
		}
	}
	for _, f := range []string{"config.json", "model.safetensors"} {
		if _, err := os.Stat(filepath.Join(export, f)); err != nil {
			t.Errorf("exported model: %v", err)
		}
	}
	local := filepath.Join(dir, "s3", "demo", "checkpoints", "demo-1")
	if msg, code := m2ctl(t, "checkpoint", "inspect", local); code != 0 || !strings.Contains(msg, "verified: 4 of 4 objects OK") {
		t.Fatalf("inspect of the job's checkpoint: exit %d:\n%s", code, msg)
	}
}

// upCluster is a `m2ctl up --no-demo` process.
type upCluster struct {
	dir string
	cmd *exec.Cmd
	out *syncBuffer
}

// syncBuffer is a bytes.Buffer safe for a writing process and a reading
// test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startUp runs `m2ctl up --no-demo` with the flags extra and waits until
// DIR/cluster.json says the cluster is ready.
func startUp(t *testing.T, ctx context.Context, extra ...string) *upCluster {
	t.Helper()
	u := &upCluster{dir: t.TempDir(), out: &syncBuffer{}}
	u.cmd = exec.Command(os.Args[0], append([]string{"up", "--no-demo", "--dir", u.dir}, extra...)...)
	u.cmd.Env = append(os.Environ(), "M2CTL_AS_MAIN=1")
	u.cmd.Stdout, u.cmd.Stderr = u.out, u.out
	if err := u.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- u.cmd.Wait() }()
	t.Cleanup(func() {
		u.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil && !t.Failed() {
				t.Errorf("m2ctl up exited with %v:\n%s", err, u.out.String())
			}
		case <-time.After(3 * time.Minute):
			u.cmd.Process.Kill()
			t.Errorf("m2ctl up did not stop on SIGTERM:\n%s", u.out.String())
		}
		if t.Failed() {
			u.dumpLogs(t)
		}
	})
	for {
		if st, err := u.state(); err == nil && st.Ready {
			return u
		}
		select {
		case err := <-exited:
			t.Fatalf("m2ctl up exited early (%v):\n%s", err, u.out.String())
		case <-ctx.Done():
			t.Fatalf("the cluster did not come up:\n%s", u.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (u *upCluster) state() (*upState, error) {
	b, err := os.ReadFile(filepath.Join(u.dir, upStateFile))
	if err != nil {
		return nil, err
	}
	var st upState
	return &st, json.Unmarshal(b, &st)
}

// pidOf returns the process ID of a child named by its ID, or of the
// coordinator serving API address api.
func (u *upCluster) pidOf(t *testing.T, id, api string) int {
	t.Helper()
	st, err := u.state()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range append(st.Coordinators, st.Workers...) {
		if (id != "" && p.ID == id) || (api != "" && p.API == api) {
			return p.Pid
		}
	}
	t.Fatalf("no process %q %q in %+v", id, api, st)
	return 0
}

func (u *upCluster) dumpLogs(t *testing.T) {
	logs, _ := filepath.Glob(filepath.Join(u.dir, "logs", "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		t.Logf("--- %s (last lines)\n%s", filepath.Base(l), strings.Join(lines, "\n"))
	}
}

// faultSpec is a tiny dp 2 × sp 2 job with checkpoints in the cluster's S3
// gateway every 5 steps.
func faultSpec(name, dataDir string) []byte {
	return fmt.Appendf(nil, `name: %s
model:
  config: {d_model: 32, n_layer: 1, vocab_size: 272, d_state: 16, headdim: 16, expand: 2, chunk_size: 16}
data: {path: %s, seq_len: 64}
parallel: {dp: 2, sp: 2}
batch: {micro_batch: 2, global_batch: 4}
optimizer: {lr: 0.01, grad_clip: 1.0}
schedule: {warmup_steps: 2, total_steps: 60}
checkpoint: {location: s3://demo/faults, every_steps: 5, keep: 3}
seed: 3
backend: cpu
max_restarts: 10
`, name, dataDir)
}

func faultData(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	for i := range 4 {
		var sb strings.Builder
		for j := range 80 {
			fmt.Fprintf(&sb, "func g%d_%d(s string) string { return s + %q } // %d\n", i, j, strings.Repeat("ab", j%7), i*j)
		}
		if err := os.WriteFile(filepath.Join(src, fmt.Sprintf("g%d.go", i)), []byte(sb.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(t.TempDir(), "data")
	if _, err := data.Prepare(context.Background(), []string{src}, out, data.PrepareOptions{EOD: true}); err != nil {
		t.Fatal(err)
	}
	return out
}

// runFaultJob submits spec and watches it; act is called with every update
// until it returns true. It returns the job once it ended.
func runFaultJob(t *testing.T, ctx context.Context, cl *client.Client, spec []byte, act func(*pb.Job) bool) *pb.Job {
	t.Helper()
	job, err := cl.Submit(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	acted := act == nil
	j, err := cl.Watch(ctx, job.GetId(), func(j *pb.Job) error {
		if !acted {
			acted = act(j)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("watch %s: %v", job.GetId(), err)
	}
	if !acted {
		t.Fatalf("%s ended (%v at step %d) before the fault was injected", j.GetId(), j.GetState(), j.GetProgress().GetStep())
	}
	if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("%s ended %v: %s", j.GetId(), j.GetState(), j.GetMessage())
	}
	return j
}

func jobEvents(t *testing.T, ctx context.Context, cl *client.Client, id string) []*pb.Event {
	t.Helper()
	evs, err := cl.Events(ctx, id, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs {
		t.Logf("%s %s: %s", id, e.GetType(), e.GetMessage())
	}
	return evs
}

// TestUpFaults runs the local cluster as processes and trains the same
// dp 2 × sp 2 job three times: undisturbed; with the worker of rank 1
// killed (SIGKILL) after a checkpoint was committed, which the job survives
// by resuming from its last committed checkpoint in a new generation; and
// with the coordinators' leader killed, which the job does not notice. All
// three end with bitwise the same loss.
func TestUpFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a cluster of processes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	u := startUp(t, ctx)
	st, err := u.state()
	if err != nil {
		t.Fatal(err)
	}
	cl, err := client.New(client.Config{Addrs: st.coordinatorAddrs()})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	dataDir := faultData(t)

	ref := runFaultJob(t, ctx, cl, faultSpec("ref", dataDir), nil)
	want := ref.GetProgress().GetLoss()
	if ref.GetGeneration() != 1 || ref.GetProgress().GetStep() != 60 {
		t.Fatalf("the undisturbed job: generation %d, step %d", ref.GetGeneration(), ref.GetProgress().GetStep())
	}
	t.Logf("undisturbed: final loss %v", want)

	// Kill the worker of rank 1 once a checkpoint is committed and the
	// job trained past it.
	var killedAt, lastCkpt int64
	var victim string
	j := runFaultJob(t, ctx, cl, faultSpec("killworker", dataDir), func(j *pb.Job) bool {
		ck := j.GetLastCheckpoint()
		if j.GetGeneration() != 1 || ck == nil || j.GetProgress().GetStep() <= ck.GetStep() {
			return false
		}
		victim = j.GetAssignments()[1].GetWorkerId()
		killedAt, lastCkpt = j.GetProgress().GetStep(), ck.GetStep()
		pid := u.pidOf(t, victim, "")
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatalf("kill %s (pid %d): %v", victim, pid, err)
		}
		t.Logf("killed %s (pid %d, rank 1) at step %d; last committed checkpoint: step %d", victim, pid, killedAt, lastCkpt)
		return true
	})
	if j.GetGeneration() < 2 {
		t.Errorf("generation %d after a worker was killed", j.GetGeneration())
	}
	if got := j.GetProgress().GetLoss(); got != want {
		t.Errorf("final loss %v after the kill, %v undisturbed: not bitwise equal", got, want)
	} else {
		t.Logf("worker killed: %d generations, final loss %v bitwise equal", j.GetGeneration(), got)
	}
	resumed := false
	for _, e := range jobEvents(t, ctx, cl, j.GetId()) {
		if e.GetType() == "requeued" && strings.Contains(e.GetMessage(), fmt.Sprintf("resume from the checkpoint of step %d", lastCkpt)) {
			resumed = true
		}
	}
	if !resumed {
		t.Errorf("no requeue resumed from the last committed checkpoint, step %d", lastCkpt)
	}
	if pid := u.pidOf(t, victim, ""); pid == 0 || !processAlive(pid) {
		t.Errorf("%s was not started again (pid %d)", victim, pid)
	}

	// Kill the coordinators' leader in the middle of a job.
	j = runFaultJob(t, ctx, cl, faultSpec("killleader", dataDir), func(j *pb.Job) bool {
		if j.GetProgress().GetStep() < 10 {
			return false
		}
		leader := cl.Leader()
		pid := u.pidOf(t, "", leader)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatalf("kill the leader at %s (pid %d): %v", leader, pid, err)
		}
		t.Logf("killed the coordinators' leader at %s (pid %d) at step %d", leader, pid, j.GetProgress().GetStep())
		return true
	})
	if j.GetGeneration() != 1 || j.GetRestarts() != 0 {
		t.Errorf("the leader's death restarted the job: generation %d, restarts %d", j.GetGeneration(), j.GetRestarts())
	}
	if got := j.GetProgress().GetLoss(); got != want {
		t.Errorf("final loss %v after the leader was killed, %v undisturbed: not bitwise equal", got, want)
	}
	jobEvents(t, ctx, cl, j.GetId())
}

// TestUpSpreadsWorkersOverGPUs brings a cluster up with --backend auto
// and --gpus naming two GPUs for three workers: each worker process runs
// with CUDA_VISIBLE_DEVICES set to its GPU in turn, as cluster.json records
// (with no GPU here the workers then train on the CPU, saying why).
func TestUpSpreadsWorkersOverGPUs(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a cluster of processes")
	}
	if _, err := os.Stat("/proc/self/environ"); err != nil {
		t.Skip("reads the workers' environment from /proc, which this system lacks")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	u := startUp(t, ctx, "--backend", "auto", "--gpus", "GPU-a,GPU-b", "--workers", "3")
	st, err := u.state()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"GPU-a", "GPU-b", "GPU-a"}
	if len(st.Workers) != len(want) {
		t.Fatalf("%d workers, want %d", len(st.Workers), len(want))
	}
	for i, w := range st.Workers {
		if w.GPU != want[i] {
			t.Errorf("cluster.json: worker %s on GPU %q, want %q", w.ID, w.GPU, want[i])
		}
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", w.Pid))
		if err != nil {
			t.Fatalf("worker %s (pid %d): %v", w.ID, w.Pid, err)
		}
		if !slices.Contains(strings.Split(string(env), "\x00"), "CUDA_VISIBLE_DEVICES="+want[i]) {
			t.Errorf("worker %s (pid %d) runs without CUDA_VISIBLE_DEVICES=%s", w.ID, w.Pid, want[i])
		}
	}
	if out := u.out.String(); !strings.Contains(out, "workers on GPUs GPU-a,GPU-b") {
		t.Errorf("m2ctl up does not say where the workers run:\n%s", out)
	}
}

// TestUpGPUs checks where the GPUs to spread the workers over come from:
// the flag first, then CUDA_VISIBLE_DEVICES, then what NVML finds.
func TestUpGPUs(t *testing.T) {
	found := func() []string { return []string{"0", "1", "2"} }
	none := func() []string { return nil }
	for _, c := range []struct {
		flag, env string
		discover  func() []string
		want      []string
	}{
		{"1, 3", "0", found, []string{"1", "3"}},
		{"", "GPU-abc,2", found, []string{"GPU-abc", "2"}},
		{" ", "", found, []string{"0", "1", "2"}},
		{"", "", none, nil},
		{"", ",", none, nil}, // CUDA_VISIBLE_DEVICES set to nothing usable: no GPU to hand out
	} {
		if got := upGPUs(c.flag, c.env, c.discover); !reflect.DeepEqual(got, c.want) {
			t.Errorf("upGPUs(%q, %q) = %q, want %q", c.flag, c.env, got, c.want)
		}
	}
}
