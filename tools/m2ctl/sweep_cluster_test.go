package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/coordtest"
	"github.com/m2train/m2train/coordinator/etcdembed"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/tools/testlog"
	"github.com/m2train/m2train/worker/agent"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/metrics"
)

// startSweepCluster runs a cluster in the test's process: an embedded
// etcd, one coordinator replica that requires token, and workers CPU
// workers (the agent with the training runner of m2worker). It returns a
// client of the coordinator and its API addresses.
func startSweepCluster(t *testing.T, workers int, token string) (*client.Client, []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	etcd, err := etcdembed.Start(ctx, t.TempDir(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Close)
	const prefix = "/sweep-test/"
	log := testlog.New(t, slog.LevelWarn)
	c, err := coordtest.Start(coordtest.Options{Replicas: 1, Dir: t.TempDir(), EtcdEndpoints: []string{etcd.Endpoint()},
		EtcdPrefix: prefix, LeaseTTL: 3, Token: token, Node: coordtest.FastNode, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close the coordinator: %v", err)
		}
	})
	for k := range workers {
		cfg := agent.DefaultConfig()
		cfg.WorkerID = fmt.Sprintf("cpu-%d", k)
		cfg.Coordinators = c.Addrs()
		cfg.Token = token
		cfg.EtcdPrefix = prefix
		cfg.AdvertiseHost = "127.0.0.1"
		cfg.PollInterval = 100 * time.Millisecond
		cfg.Runner = &agent.TrainRunner{Device: agent.DeviceCPU, CacheDir: t.TempDir()}
		cfg.Logger = log.With("worker", cfg.WorkerID)
		a, err := agent.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		actx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := a.Run(actx); err != nil && actx.Err() == nil {
				t.Errorf("worker %s: %v", cfg.WorkerID, err)
			}
		}()
		// Registered after the coordinator's Close, so run before it.
		t.Cleanup(func() {
			stop()
			select {
			case <-done:
			case <-time.After(2 * time.Minute):
				t.Errorf("worker %s did not stop", cfg.WorkerID)
			}
		})
	}
	cl, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl, c.Addrs()
}

// clusterGrid is a two-point sweep small enough for CPU workers of a
// loaded test machine.
var clusterGrid = []string{"--seq-lens", "32", "--d-models", "16,32", "--d-states", "8", "--vocab-size", "64", "--num-pairs", "4",
	"--steps", "6", "--batch", "4", "--headdim", "8", "--chunk-size", "16", "--eval-samples", "32", "--lrs", "0.001"}

// jobsNamed returns the cluster's jobs of that name.
func jobsNamed(t *testing.T, cl *client.Client, name string) []*pb.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	jobs, err := cl.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*pb.Job
	for _, j := range jobs {
		if j.GetName() == name {
			out = append(out, j)
		}
	}
	return out
}

// TestSweepMQARCluster runs the cluster mode end to end on CPU workers: a
// point whose spec was submitted before is followed instead of submitted
// again, every point's final checkpoint is in the store, the table holds
// the numbers that the local mode computes for the same grid (the CPU
// trains bit for bit the same in a worker and in m2ctl), a second run
// submits nothing, and failed jobs are reported with exit status 1.
func TestSweepMQARCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a coordinator and two workers")
	}
	const token = "sweep-secret"
	cl, addrs := startSweepCluster(t, 2, token)
	coord := []string{"--coordinator", strings.Join(addrs, ","), "--token", token, "--parallel", "2"}

	local := t.TempDir()
	if out, code := m2ctl(t, append([]string{"sweep", "mqar", "--out", local, "--backend", "cpu"}, clusterGrid...)...); code != 0 {
		t.Fatalf("local sweep: exit %d:\n%s", code, out)
	}
	want := readCSV(t, filepath.Join(local, "results.csv"))

	dir := t.TempDir()
	args := append(append([]string{"sweep", "mqar", "--out", dir}, clusterGrid...), coord...)
	if out, code := m2ctl(t, append(args, "--dry-run")...); code != 0 {
		t.Fatalf("dry run: exit %d:\n%s", code, out)
	}
	// Submit the second point's spec as a user would have; the sweep must
	// take that job, whether it is still running or done by then.
	const early = "mqar-l32-d32-n8"
	doc, err := os.ReadFile(filepath.Join(dir, "specs", early+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), "location: "+filepath.Join(dir, "checkpoints", early)) {
		t.Errorf("the spec does not put its checkpoints under DIR/checkpoints/NAME:\n%s", doc)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pre, err := cl.Submit(ctx, doc)
	if err != nil {
		t.Fatal(err)
	}

	out, code := m2ctl(t, args...)
	if code != 0 {
		t.Fatalf("cluster sweep: exit %d:\n%s", code, out)
	}
	t.Logf("cluster sweep:\n%s", out)
	if !strings.Contains(out, "job "+pre.GetId()+" of the same spec is") {
		t.Errorf("the sweep did not follow the job submitted before (%s):\n%s", pre.GetId(), out)
	}
	rows := readCSV(t, filepath.Join(dir, "results.csv"))
	if len(rows) != 2 {
		t.Fatalf("%d result rows, want 2:\n%s", len(rows), out)
	}
	for i, row := range rows {
		name := row["name"]
		for _, col := range []string{"name", "params", "steps", "final_loss", "eval_loss", "accuracy", "correct", "answers"} {
			if row[col] != want[i][col] {
				t.Errorf("%s: %s %q on the cluster, %q in this process", name, col, row[col], want[i][col])
			}
		}
		if row["answers"] != "128" || row["backend"] != "auto-float32" {
			t.Errorf("%s: answers %s, backend %q", name, row["answers"], row["backend"])
		}
		jobs := jobsNamed(t, cl, name)
		if len(jobs) != 1 || jobs[0].GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
			var got []string
			for _, j := range jobs {
				got = append(got, j.GetId()+" "+jobStateName(j.GetState()))
			}
			t.Fatalf("%s: jobs on the cluster %v, want one that succeeded", name, got)
		}
		id := jobs[0].GetId()
		if name == early && id != pre.GetId() {
			t.Errorf("%s: trained by job %s, not by %s submitted before", name, id, pre.GetId())
		}
		var res sweepResult
		b, err := os.ReadFile(filepath.Join(dir, "results", name+".json"))
		if err == nil {
			err = json.Unmarshal(b, &res)
		}
		if err != nil {
			t.Fatal(err)
		}
		jobDir := filepath.Join(dir, "checkpoints", name, id)
		if res.Job != id || len(res.Workers) != 1 || !strings.HasPrefix(res.Workers[0], "cpu-") || res.Checkpoint != filepath.Join(jobDir, "step-00000006") {
			t.Errorf("%s: result names job %q on %v, checkpoint %s", name, res.Job, res.Workers, res.Checkpoint)
		}
		steps, err := checkpoint.Steps(context.Background(), checkpoint.LocalStore{Root: jobDir}, "")
		if err != nil || len(steps) != 1 || steps[0] != 6 {
			t.Errorf("%s: committed checkpoints %v (%v) in %s, want step 6 alone (keep 1)", name, steps, err, jobDir)
		}
		ev := evalJSON(t, "--checkpoint", jobDir, "--spec", filepath.Join(dir, "specs", name+".yaml"), "--samples", "32")
		if fmt.Sprint(ev.Correct) != row["correct"] {
			t.Errorf("%s: eval mqar of the job's checkpoint gives %d correct, the table %s", name, ev.Correct, row["correct"])
		}
		h, err := metrics.ReadFile(filepath.Join(dir, "metrics", name+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		if n := len(h.Train); n == 0 || h.Train[n-1].Step != 6 || fmt.Sprintf("%.4f", h.Train[n-1].Loss) != row["final_loss"] ||
			len(h.Eval) != 1 || h.Eval[0].Step != 6 || fmt.Sprint(h.Eval[0].Correct) != row["correct"] || h.Header.Labels["job"] != id {
			t.Errorf("%s: history %+v, evals %+v, labels %v", name, h.Train, h.Eval, h.Header.Labels)
		}
		checkImages(t, filepath.Join(dir, "plots", name), "accuracy")
	}
	checkImages(t, filepath.Join(dir, "sweep"), "sequence length 32", "d_state 8")

	out, code = m2ctl(t, args...)
	if code != 0 || strings.Count(out, "done before") != 2 || strings.Contains(out, "submitted") {
		t.Errorf("second sweep did not reuse both results: exit %d:\n%s", code, out)
	}

	// bf16 needs the CUDA backend: the CPU workers fail both jobs, one
	// after the other, and the sweep says so.
	failed := t.TempDir()
	fargs := append(append([]string{"sweep", "mqar", "--out", failed, "--precision", "bf16"}, clusterGrid...), coord...)
	out, code = m2ctl(t, append(fargs, "--parallel", "1")...)
	t.Logf("sweep of failing jobs:\n%s", out)
	if code != exitFailure || strings.Count(out, "FAILED") != 2 || !strings.Contains(out, "2 of 2 grid points failed") || !strings.Contains(out, "bf16 needs the CUDA backend") {
		t.Errorf("sweep of failing jobs: exit %d, want %d, two failures named:\n%s", code, exitFailure, out)
	}
	if rows := readCSV(t, filepath.Join(failed, "results.csv")); len(rows) != 0 {
		t.Errorf("failed points in the table: %v", rows)
	}
}

// TestSweepMQARClusterFlags checks the cluster mode's flags without a
// cluster.
func TestSweepMQARClusterFlags(t *testing.T) {
	dir := t.TempDir()
	out, code := m2ctl(t, "sweep", "mqar", "--out", dir, "--dry-run", "--coordinator", "127.0.0.1:1", "--checkpoints", "s3://bucket/mqar", "--steps", "100", "--lrs", "0.02")
	if code != 0 {
		t.Fatalf("dry run: exit %d:\n%s", code, out)
	}
	doc, err := os.ReadFile(filepath.Join(dir, "specs", "mqar-l256-d64-n16.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"location: s3://bucket/mqar/mqar-l256-d64-n16", "every_steps: 10", "keep: 1"} {
		if !strings.Contains(string(doc), want) {
			t.Errorf("cluster spec lacks %q:\n%s", want, doc)
		}
	}
	for _, tc := range []struct {
		name string
		args []string
		msg  string
		code int
	}{
		{"cluster flag without --coordinator", []string{"--parallel", "2"}, "--parallel: only applies with --coordinator", exitUsage},
		{"checkpoints without --coordinator", []string{"--checkpoints", "/tmp/x"}, "--checkpoints: only applies with --coordinator", exitUsage},
		{"eval-every on a cluster", []string{"--coordinator", "127.0.0.1:1", "--eval-every", "10"}, "--eval-every", exitUsage},
		{"no parallelism", []string{"--coordinator", "127.0.0.1:1", "--parallel", "0"}, "--parallel: must be at least 1", exitUsage},
		{"no coordinator answers", append([]string{"--coordinator", "127.0.0.1:1", "--timeout", "1s"}, clusterGrid...), "list the cluster's jobs", 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := m2ctl(t, append([]string{"sweep", "mqar", "--out", t.TempDir()}, tc.args...)...)
			if code != tc.code || !strings.Contains(out, tc.msg) {
				t.Errorf("exit %d, output %q; want exit %d mentioning %q", code, out, tc.code, tc.msg)
			}
		})
	}
}
