package server_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/coordtest"
	"github.com/m2train/m2train/coordinator/fsm"
	"github.com/m2train/m2train/coordinator/internal/etcdtest"
	"github.com/m2train/m2train/coordinator/membership"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/tools/testlog"
)

var etcdEndpoint string

// TestMain runs the tests against one embedded etcd and then checks that
// every replica, connection and relayed call of the tests has ended.
func TestMain(m *testing.M) {
	before := goleak.IgnoreCurrent()
	code := etcdtest.Main(m, &etcdEndpoint)
	if code == 0 {
		if err := goleak.Find(before); err != nil {
			fmt.Fprintln(os.Stderr, "goroutines left behind:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func testLogger(t *testing.T) *slog.Logger {
	return testlog.New(t, slog.LevelWarn)
}

func startCluster(t *testing.T, opts coordtest.Options) *coordtest.Cluster {
	t.Helper()
	opts.Node = coordtest.FastNode
	opts.Logger = testLogger(t)
	opts.Dir = t.TempDir()
	c, err := coordtest.Start(opts)
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

func newClient(t *testing.T, cfg client.Config) *client.Client {
	t.Helper()
	cl, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

func specYAML(name string, dp int, backend string) []byte {
	return fmt.Appendf(nil, `name: %s
model:
  config: {d_model: 64, n_layer: 2, vocab_size: 256, d_state: 16, headdim: 16}
data: {path: /data/tiny, seq_len: 64}
parallel: {dp: %d}
batch: {micro_batch: 2}
schedule: {total_steps: 100}
checkpoint: {location: /ckpt, every_steps: 10}
backend: %s
`, name, dp, backend)
}

func code(err error) codes.Code { return status.Code(err) }

// TestJobAPIThroughFollower gives the client only a follower's address and
// exercises every job call through the follower, which relays it to the
// leader.
func TestJobAPIThroughFollower(t *testing.T) {
	c := startCluster(t, coordtest.Options{})
	ctx := ctxT(t, 60*time.Second)
	l, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	follower := c.Replica((l + 1) % 3).APIAddr
	cl := newClient(t, client.Config{Addrs: []string{follower}})

	job, err := cl.Submit(ctx, specYAML("demo", 2, "cpu"))
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	if job.GetId() != "demo-1" || job.GetState() != pb.JobState_JOB_STATE_QUEUED || job.GetWorldSize() != 2 {
		t.Fatalf("submitted job = %v", job)
	}
	// The follower relays the calls: the client stays where it was sent.
	if cl.Leader() != follower {
		t.Errorf("client calls %s, want the follower %s", cl.Leader(), follower)
	}
	got, err := cl.Get(ctx, job.GetId())
	if err != nil || got.GetProgress().GetTotalSteps() != 100 || !strings.Contains(got.GetSpecYaml(), "d_model: 64") {
		t.Fatalf("Get = %v, %v", got, err)
	}
	if _, err := cl.Submit(ctx, specYAML("other", 1, "cpu")); err != nil {
		t.Fatal(err)
	}
	all, err := cl.List(ctx)
	if err != nil || len(all) != 2 || all[0].GetId() != "demo-1" || all[1].GetId() != "other-2" {
		t.Fatalf("List = %v, %v", all, err)
	}
	queued, err := cl.List(ctx, pb.JobState_JOB_STATE_RUNNING)
	if err != nil || len(queued) != 0 {
		t.Fatalf("List(running) = %v, %v", queued, err)
	}
	cancelled, err := cl.Cancel(ctx, "other-2", "not needed")
	if err != nil || cancelled.GetState() != pb.JobState_JOB_STATE_CANCELLED || !strings.Contains(cancelled.GetMessage(), "not needed") {
		t.Fatalf("Cancel = %v, %v", cancelled, err)
	}
	// Watching a finished job returns at once with its final state.
	final, err := cl.Watch(ctx, "other-2", func(*pb.Job) error { return nil })
	if err != nil || final.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("Watch = %v, %v", final, err)
	}
	evs, err := cl.Events(ctx, "other-2", 0, 0)
	if err != nil || len(evs) != 2 || evs[0].GetType() != fsm.EventSubmitted || evs[1].GetType() != fsm.EventCancelled {
		t.Fatalf("Events = %v, %v", evs, err)
	}
	cks, err := cl.Checkpoints(ctx, "demo-1")
	if err != nil || len(cks) != 0 {
		t.Fatalf("Checkpoints = %v, %v", cks, err)
	}

	cases := []struct {
		name string
		call func() error
		want codes.Code
		msg  string
	}{
		{"invalid spec names the field", func() error {
			_, err := cl.Submit(ctx, specYAML("demo", -1, "cpu"))
			return err
		}, codes.InvalidArgument, "parallel.dp"},
		{"unknown field", func() error {
			_, err := cl.Submit(ctx, append(specYAML("demo", 1, "cpu"), "colour: red\n"...))
			return err
		}, codes.InvalidArgument, "field colour not found"},
		{"oversized spec", func() error {
			_, err := cl.Submit(ctx, make([]byte, 65<<10))
			return err
		}, codes.InvalidArgument, "exceeds the limit"},
		{"unknown job", func() error {
			_, err := cl.Get(ctx, "nope-9")
			return err
		}, codes.NotFound, "nope-9"},
		{"cancel finished job", func() error {
			_, err := cl.Cancel(ctx, "other-2", "")
			return err
		}, codes.FailedPrecondition, "already cancelled"},
		{"events of unknown job", func() error {
			_, err := cl.Events(ctx, "nope-9", 0, 0)
			return err
		}, codes.NotFound, "nope-9"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if code(err) != tc.want || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
}

// TestFailoverDuringWatch kills the leader while a watch is open: the watch
// resumes on the new leader, which has every committed job and accepts
// submits.
func TestFailoverDuringWatch(t *testing.T) {
	c := startCluster(t, coordtest.Options{})
	ctx := ctxT(t, 60*time.Second)
	cl := newClient(t, client.Config{Addrs: c.Addrs()})
	var ids []string
	for i := range 3 {
		j, err := cl.Submit(ctx, specYAML(fmt.Sprintf("j%d", i), 1, "cpu"))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, j.GetId())
	}
	updates := make(chan *pb.Job, 64)
	watchDone := make(chan error, 1)
	go func() {
		_, err := cl.Watch(ctx, ids[0], func(j *pb.Job) error {
			updates <- j
			return nil
		})
		watchDone <- err
	}()
	<-updates

	l, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Kill(l); err != nil {
		t.Fatal(err)
	}
	j, err := cl.Submit(ctx, specYAML("after", 1, "cpu"))
	if err != nil {
		t.Fatalf("submit after failover: %v", err)
	}
	ids = append(ids, j.GetId())
	all, err := cl.List(ctx)
	if err != nil || len(all) != len(ids) {
		t.Fatalf("List after failover = %d jobs, %v", len(all), err)
	}
	// The resumed watch sees the cancel made on the new leader.
	if _, err := cl.Cancel(ctx, ids[0], "done watching"); err != nil {
		t.Fatal(err)
	}
	if err := <-watchDone; err != nil {
		t.Fatalf("watch: %v", err)
	}
	var last *pb.Job
	for len(updates) > 0 {
		last = <-updates
	}
	if last == nil || last.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("last watched state = %v", last)
	}
}

func TestRestartAllKeepsJobs(t *testing.T) {
	c := startCluster(t, coordtest.Options{})
	ctx := ctxT(t, 60*time.Second)
	cl := newClient(t, client.Config{Addrs: c.Addrs()})
	for i := range 3 {
		if _, err := cl.Submit(ctx, specYAML(fmt.Sprintf("j%d", i), 1, "cpu")); err != nil {
			t.Fatal(err)
		}
	}
	for i := range c.Len() {
		if err := c.Kill(i); err != nil {
			t.Fatal(err)
		}
	}
	for i := range c.Len() {
		if err := c.Restart(i); err != nil {
			t.Fatal(err)
		}
	}
	all, err := cl.List(ctx)
	if err != nil || len(all) != 3 {
		t.Fatalf("List after restart = %v, %v", all, err)
	}
}

func TestToken(t *testing.T) {
	c := startCluster(t, coordtest.Options{Replicas: 1, Token: "s3cret"})
	ctx := ctxT(t, 30*time.Second)
	if _, err := c.Leader(ctx); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		token string
		want  codes.Code
	}{{"", codes.Unauthenticated}, {"wrong", codes.Unauthenticated}, {"s3cret", codes.OK}} {
		t.Run("token="+tc.token, func(t *testing.T) {
			cl := newClient(t, client.Config{Addrs: c.Addrs(), Token: tc.token})
			_, err := cl.List(ctx)
			if code(err) != tc.want {
				t.Fatalf("List = %v, want %v", err, tc.want)
			}
			_, err = cl.Watch(ctx, "none", func(*pb.Job) error { return nil })
			if tc.want != codes.OK && code(err) != tc.want {
				t.Fatalf("Watch = %v, want %v", err, tc.want)
			}
		})
	}
}

// worker is a simulated worker: it registers through the API and holds its
// lease in etcd with its own client, which the test closes to make the
// lease lapse as if the process died.
type worker struct {
	id   string
	etcd *clientv3.Client
	sess *membership.Session
}

func startWorker(t *testing.T, ctx context.Context, cl *client.Client, prefix, id string, gpus, ttl int) *worker {
	t.Helper()
	resp, err := cl.RegisterWorker(ctx, &pb.RegisterWorkerRequest{WorkerId: id, Addr: id + ":9000", Gpus: int32(gpus)})
	if err != nil {
		t.Fatal(err)
	}
	e, err := clientv3.New(clientv3.Config{Endpoints: resp.GetEtcdEndpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s, err := membership.Register(ctx, e, membership.WorkerInfo{ID: id, Addr: id + ":9000", GPUs: gpus},
		membership.Options{TTL: ttl, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	w := &worker{id: id, etcd: e, sess: s}
	t.Cleanup(func() { w.etcd.Close() })
	return w
}

func waitJob(t *testing.T, ctx context.Context, cl *client.Client, id, what string, cond func(*pb.Job) bool) *pb.Job {
	t.Helper()
	for {
		j, err := cl.Get(ctx, id)
		if err == nil && cond(j) {
			return j
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v (last %v, %v)", what, ctx.Err(), j, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestWorkerLeaseLapse runs a job on two CPU workers, lets one worker's
// lease lapse, and checks that the worker is marked lost within the TTL
// plus one second and that the job's next generation is placed on the
// spare worker, resuming from its last committed checkpoint.
func TestWorkerLeaseLapse(t *testing.T) {
	const ttl = 2
	prefix := "/lapse/"
	c := startCluster(t, coordtest.Options{EtcdEndpoints: []string{etcdEndpoint}, EtcdPrefix: prefix, LeaseTTL: ttl})
	ctx := ctxT(t, 60*time.Second)
	cl := newClient(t, client.Config{Addrs: c.Addrs()})

	w := []*worker{
		startWorker(t, ctx, cl, prefix, "w0", 0, ttl),
		startWorker(t, ctx, cl, prefix, "w1", 0, ttl),
	}
	job, err := cl.Submit(ctx, specYAML("lapse", 2, "cpu"))
	if err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, ctx, cl, job.GetId(), "generation 1", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING && j.GetGeneration() == 1
	})
	if len(j.GetAssignments()) != 2 || j.GetAssignments()[1].GetWorkerAddr() == "" {
		t.Fatalf("assignments = %v", j.GetAssignments())
	}
	// The ranks report progress and commit a checkpoint.
	if stop, err := cl.ReportProgress(ctx, &pb.ReportProgressRequest{JobId: j.GetId(), Generation: 1, Step: 10, Loss: 4.2}); err != nil || stop {
		t.Fatalf("ReportProgress = %v, %v", stop, err)
	}
	if err := cl.ReportCheckpoint(ctx, &pb.ReportCheckpointRequest{JobId: j.GetId(), Generation: 1, Step: 10, Location: "/ckpt/lapse-1/step-10"}); err != nil {
		t.Fatal(err)
	}
	// Worker assignments as each worker sees them.
	as, err := cl.GetAssignment(ctx, "w1")
	if err != nil || len(as) != 1 || as[0].GetGeneration() != 1 || as[0].GetWorldSize() != 2 || as[0].GetResumeFrom().GetStep() != 10 {
		t.Fatalf("GetAssignment(w1) = %v, %v", as, err)
	}

	// A spare worker joins; then w1 dies without revoking its lease.
	startWorker(t, ctx, cl, prefix, "w2", 0, ttl)
	lost := j.GetAssignments()[1].GetWorkerId()
	var victim *worker
	for _, x := range w {
		if x.id == lost {
			victim = x
		}
	}
	victim.etcd.Close()
	died := time.Now()

	l, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f := c.Replica(l).Node.FSM()
	deadline := died.Add(ttl*time.Second + time.Second)
	for {
		if wk, ok := f.Worker(lost); ok && wk.State == fsm.WorkerLostState {
			t.Logf("worker %s marked lost %v after its keep-alive stopped", lost, time.Since(died))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker %s not marked lost within TTL+1s", lost)
		}
		time.Sleep(10 * time.Millisecond)
	}

	j = waitJob(t, ctx, cl, j.GetId(), "generation 2", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING && j.GetGeneration() == 2
	})
	for _, a := range j.GetAssignments() {
		if a.GetWorkerId() == lost {
			t.Fatalf("generation 2 still uses the lost worker: %v", j.GetAssignments())
		}
	}
	if j.GetRestarts() != 1 || j.GetLastCheckpoint().GetStep() != 10 {
		t.Fatalf("restarts %d, last checkpoint %v", j.GetRestarts(), j.GetLastCheckpoint())
	}
	as, err = cl.GetAssignment(ctx, "w2")
	if err != nil || len(as) != 1 || as[0].GetGeneration() != 2 || as[0].GetResumeFrom().GetLocation() != "/ckpt/lapse-1/step-10" {
		t.Fatalf("GetAssignment(w2) = %v, %v", as, err)
	}
	// Generation 1's reports are stale: the rank is told to stop.
	if stop, err := cl.ReportProgress(ctx, &pb.ReportProgressRequest{JobId: j.GetId(), Generation: 1, Rank: 0, Step: 11}); err != nil || !stop {
		t.Fatalf("stale ReportProgress = %v, %v", stop, err)
	}
	if err := cl.ReportCheckpoint(ctx, &pb.ReportCheckpointRequest{JobId: j.GetId(), Generation: 1, Step: 20, Location: "/x"}); code(err) != codes.Aborted {
		t.Fatalf("stale ReportCheckpoint = %v, want Aborted", err)
	}
	// Rank 0 of generation 2 finishes the job.
	if stop, err := cl.ReportProgress(ctx, &pb.ReportProgressRequest{JobId: j.GetId(), Generation: 2, Step: 100, Loss: 1.5, Done: true}); err != nil || !stop {
		t.Fatalf("final ReportProgress = %v, %v", stop, err)
	}
	j, err = cl.Get(ctx, j.GetId())
	if err != nil || j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("final job = %v, %v", j, err)
	}
	evs, err := cl.Events(ctx, j.GetId(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, e := range evs {
		types = append(types, e.GetType())
	}
	want := []string{"submitted", "scheduled", "checkpoint", "requeued", "scheduled", "succeeded"}
	if fmt.Sprint(types) != fmt.Sprint(want) {
		t.Fatalf("events = %v, want %v", types, want)
	}
}

func TestWorkerReportErrors(t *testing.T) {
	c := startCluster(t, coordtest.Options{Replicas: 1})
	ctx := ctxT(t, 30*time.Second)
	cl := newClient(t, client.Config{Addrs: c.Addrs()})
	_, err := cl.RegisterWorker(ctx, &pb.RegisterWorkerRequest{WorkerId: "", Gpus: 1})
	if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "worker_id") {
		t.Fatalf("RegisterWorker without ID = %v", err)
	}
	_, err = cl.RegisterWorker(ctx, &pb.RegisterWorkerRequest{WorkerId: "w", Gpus: 100})
	if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "gpus") {
		t.Fatalf("RegisterWorker with 100 GPUs = %v", err)
	}
	err = cl.ReportFailure(ctx, &pb.ReportFailureRequest{JobId: "missing-1", Generation: 1})
	if code(err) != codes.NotFound {
		t.Fatalf("ReportFailure for a missing job = %v", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatal("call timed out instead of failing")
	}
}
