package app

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/coordtest"
	"github.com/m2train/m2train/coordinator/etcdembed"
	"github.com/m2train/m2train/coordinator/membership"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/worker/data"
)

// TestMain lets the test binary run as m2worker when M2WORKER_AS_MAIN is
// set, so that the tests start real worker processes.
func TestMain(m *testing.M) {
	if os.Getenv("M2WORKER_AS_MAIN") == "1" {
		os.Exit(Main(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

func TestParseFlags(t *testing.T) {
	t.Setenv("M2_COORDINATOR", "a:1, b:2")
	t.Setenv("M2_BACKEND", "cpu")
	t.Setenv("M2_POLL_INTERVAL", "250ms")
	c, err := ParseFlags([]string{"--id", "w7", "--backend", "auto", "--advertise-host", "10.0.0.7"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// A flag wins over its variable; a variable fills a flag not given.
	if c.ID != "w7" || c.Backend != "auto" || c.AdvertiseHost != "10.0.0.7" || c.PollInterval != 250*time.Millisecond ||
		fmt.Sprint(splitList(c.Coordinators)) != "[a:1 b:2]" || c.CacheDir == "" {
		t.Fatalf("parsed %+v", c)
	}
	for _, tc := range []struct {
		args []string
		env  [2]string
		want string
	}{
		{[]string{"--backend", "tpu"}, [2]string{}, `--backend: "tpu", must be auto, cpu or cuda`},
		{[]string{"--log-format", "xml"}, [2]string{}, `--log-format: "xml", must be text or json`},
		{[]string{"--gpu", "-2"}, [2]string{}, "--gpu: -2, must be a GPU index or -1"},
		{[]string{"--coordinator", " , "}, [2]string{}, "--coordinator: at least one address is required"},
		{[]string{"extra"}, [2]string{}, `unexpected arguments ["extra"]`},
		{nil, [2]string{"M2_COLLECTIVE_PORT", "x"}, "M2_COLLECTIVE_PORT: parse error"},
	} {
		if tc.env[0] != "" {
			t.Setenv(tc.env[0], tc.env[1])
		}
		_, err := ParseFlags(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseFlags(%q, %v) = %v, want %q", tc.args, tc.env, err, tc.want)
		}
		if tc.env[0] != "" {
			os.Unsetenv(tc.env[0])
		}
	}
}

// TestSIGTERM runs m2worker as a process against an in-process coordinator
// with a long lease TTL: the worker trains a job, then SIGTERM makes it
// release its lease and exit with status 0. The coordinator learns it at
// once (its record is gone from etcd when the process has exited, long
// before the TTL) and requeues the job.
func TestSIGTERM(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const prefix = "/sigterm/"
	tc := startTestCluster(ctx, t, dir, prefix)
	etcd, c, cl, dataDir := tc.etcd, tc.coord, tc.client, tc.dataDir

	var out bytes.Buffer
	cmd := exec.Command(os.Args[0], "--id", "w0", "--coordinator", strings.Join(c.Addrs(), ","), "--advertise-host", "127.0.0.1",
		"--etcd-prefix", prefix, "--backend", "cpu", "--poll-interval", "100ms", "--cache-dir", filepath.Join(dir, "cache"))
	cmd.Env = append(os.Environ(), "M2WORKER_AS_MAIN=1")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("m2worker output:\n%s", out.String())
		}
	}()

	job, err := cl.Submit(ctx, fmt.Appendf(nil, `name: long
model: {config: {d_model: 32, n_layer: 1, vocab_size: 272, d_state: 16, headdim: 16, chunk_size: 16}}
data: {path: %s, seq_len: 32}
schedule: {total_steps: 1000000}
backend: cpu
`, dataDir))
	if err != nil {
		t.Fatal(err)
	}
	// Wait for training to be under way.
	_, err = cl.Watch(ctx, job.GetId(), func(j *pb.Job) error {
		if j.GetProgress().GetStep() >= 3 {
			return errTraining
		}
		return nil
	})
	if err != errTraining {
		t.Fatalf("watch: %v", err)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("m2worker exited with %v", err)
		}
	case <-ctx.Done():
		t.Fatal("m2worker did not exit after SIGTERM")
	}
	ec, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd.Endpoint()}})
	if err != nil {
		t.Fatal(err)
	}
	defer ec.Close()
	members, _, err := membership.ListWorkers(ctx, ec, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(members) != 0 {
		t.Fatalf("the worker's record outlived the process: %+v", members)
	}
	// The leader sees the record go and requeues the job.
	_, err = cl.Watch(ctx, job.GetId(), func(j *pb.Job) error {
		if j.GetState() == pb.JobState_JOB_STATE_QUEUED {
			if !strings.Contains(j.GetMessage(), "worker w0 lost (lease expired or revoked)") {
				t.Errorf("requeued because %q", j.GetMessage())
			}
			return errTraining
		}
		return nil
	})
	if err != errTraining {
		t.Fatalf("watch after the shutdown: %v", err)
	}
	for _, want := range []string{"backend device=cpu", "registered", "rank starting", "stopping the ranks", "rank stopped", "worker stopped; lease released"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("m2worker's log lacks %q", want)
		}
	}
}

var errTraining = fmt.Errorf("condition met")

// testCluster is an embedded etcd, a one-replica coordinator, a client of
// it and a small byte-level dataset, for the tests of whole workers.
type testCluster struct {
	etcd    *etcdembed.Server
	coord   *coordtest.Cluster
	client  *client.Client
	dataDir string
}

// startTestCluster starts a testCluster under dir whose coordinator uses
// etcd key prefix; everything stops at the end of the test.
func startTestCluster(ctx context.Context, t *testing.T, dir, prefix string) testCluster {
	t.Helper()
	etcd, err := etcdembed.Start(ctx, filepath.Join(dir, "etcd"), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Close)
	c, err := coordtest.Start(coordtest.Options{Replicas: 1, Dir: filepath.Join(dir, "coord"), EtcdEndpoints: []string{etcd.Endpoint()},
		EtcdPrefix: prefix, LeaseTTL: 60, Node: coordtest.FastNode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cl, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "a.go"), bytes.Repeat([]byte("package a // some text to learn\n"), 400), 0o644); err != nil {
		t.Fatal(err)
	}
	dataDir := filepath.Join(dir, "data")
	if _, err := data.Prepare(ctx, []string{src}, dataDir, data.PrepareOptions{EOD: true}); err != nil {
		t.Fatal(err)
	}
	return testCluster{etcd: etcd, coord: c, client: cl, dataDir: dataDir}
}
