package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/membership"
	"github.com/m2train/m2train/coordinator/node"
	"github.com/m2train/m2train/coordinator/security"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/tools/promtest"
	"github.com/m2train/m2train/tools/testlog"
)

const testSpec = `name: tiny
model: {init_from: s3://models/m}
data: {path: /d, seq_len: 64}
schedule: {total_steps: 10}
`

// logTo routes logs to t.Log until the test's cleanup stops it, so that a
// late line from a closing goroutine cannot fail the test.
func logTo(t *testing.T, prefix string) io.Writer {
	return testlog.Writer(t, prefix)
}

// ports returns n distinct ports, each free on every host at once.
func ports(t *testing.T, n int, hosts ...string) []int {
	t.Helper()
	var out []int
	for attempt := 0; len(out) < n; attempt++ {
		if attempt > 200 {
			t.Fatalf("no port free on all of %v", hosts)
		}
		l, err := net.Listen("tcp", net.JoinHostPort(hosts[0], "0"))
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		ls := []net.Listener{l}
		ok := !slices.Contains(out, port)
		for _, h := range hosts[1:] {
			if !ok {
				break
			}
			l2, err := net.Listen("tcp", net.JoinHostPort(h, strconv.Itoa(port)))
			if ok = err == nil; ok {
				ls = append(ls, l2)
			}
		}
		for _, l := range ls {
			l.Close()
		}
		if ok {
			out = append(out, port)
		}
	}
	return out
}

func addr(host string, port int) string { return net.JoinHostPort(host, strconv.Itoa(port)) }

// replica is one m2coord run in-process.
type replica struct {
	t       *testing.T
	args    []string
	cancel  context.CancelFunc
	done    chan error
	metrics string
}

func startReplica(t *testing.T, metrics string, args ...string) *replica {
	t.Helper()
	r := &replica{t: t, args: args, metrics: metrics}
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *replica) start() {
	r.t.Helper()
	cfg, err := parseFlags(r.args)
	if err != nil {
		r.t.Fatalf("flags %v: %v", r.args, err)
	}
	cfg.logOutput = logTo(r.t, cfg.id+": ")
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan error, 1)
	go func() { r.done <- run(ctx, cfg) }()
}

// stop cancels the run and waits for it; it reports the run's error.
func (r *replica) stop() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	select {
	case err := <-r.done:
		if err != nil {
			r.t.Errorf("run %v: %v", r.args, err)
		}
	case <-time.After(2 * time.Minute):
		r.t.Errorf("run %v did not return within 2 minutes of its cancellation", r.args)
	}
}

// failed reports the run's error if it returned on its own.
func (r *replica) failed() error {
	select {
	case err := <-r.done:
		r.cancel = nil
		return fmt.Errorf("run %v returned: %v", r.args, err)
	default:
		return nil
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func get(url string) (int, string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (r *replica) ready() bool {
	if err := r.failed(); err != nil {
		r.t.Fatal(err)
	}
	code, _, err := get("http://" + r.metrics + "/readyz")
	return err == nil && code == http.StatusOK
}

// scrape reads and parses /metrics.
func (r *replica) scrape() map[string]*dto.MetricFamily {
	r.t.Helper()
	code, body, err := get("http://" + r.metrics + "/metrics")
	if err != nil || code != http.StatusOK {
		r.t.Fatalf("GET /metrics: %d, %v", code, err)
	}
	mfs, err := promtest.Parse(body)
	if err != nil {
		r.t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return mfs
}

func mustValue(t *testing.T, mfs map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	v, ok := promtest.Value(mfs, name, labels...)
	if !ok {
		t.Fatalf("series %s%v missing", name, labels)
	}
	return v
}

func TestSingleReplicaMetricsAndHealth(t *testing.T) {
	p := ports(t, 3, "127.0.0.1")
	api, metrics := addr("127.0.0.1", p[0]), addr("127.0.0.1", p[2])
	r := startReplica(t, metrics, "--id", "solo", "--data-dir", t.TempDir(), "--raft-addr", addr("127.0.0.1", p[1]),
		"--api-addr", api, "--metrics-addr", metrics, "--token", "secret", "--log-level", "warn")
	waitFor(t, time.Minute, "/readyz to answer 200", r.ready)
	if code, body, err := get("http://" + metrics + "/healthz"); err != nil || code != http.StatusOK || body != "ok\n" {
		t.Fatalf("/healthz: %d %q %v", code, body, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cl, err := client.New(client.Config{Addrs: []string{api}, Token: "secret"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	// A read succeeds once the leader has applied its log and recorded its
	// address: from then on the indices are past the bootstrap.
	if _, err := cl.List(ctx); err != nil {
		t.Fatal(err)
	}
	// raft reports leader changes to an observer asynchronously.
	waitFor(t, time.Minute, "the leader change to be counted", func() bool {
		v, _ := promtest.Value(r.scrape(), "m2train_coordinator_raft_leader_changes_total")
		return v >= 1
	})

	mfs := r.scrape()
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total", "m2train_coordinator_raft_apply_failures_total"} {
		if _, ok := mfs[name]; !ok {
			t.Errorf("series %s missing", name)
		}
	}
	for _, s := range []string{"follower", "candidate", "shutdown"} {
		if v := mustValue(t, mfs, "m2train_coordinator_raft_state", "state", s); v != 0 {
			t.Errorf("raft_state{state=%q} = %v on the only replica", s, v)
		}
	}
	checks := []struct {
		name   string
		labels []string
		ok     func(float64) bool
		want   string
	}{
		{"m2train_coordinator_is_leader", nil, eq(1), "1"},
		{"m2train_coordinator_raft_state", []string{"state", "leader"}, eq(1), "1"},
		{"m2train_coordinator_raft_peers", nil, eq(1), "1"},
		{"m2train_coordinator_raft_term", nil, atLeast(1), ">= 1"},
		{"m2train_coordinator_raft_leader_changes_total", nil, atLeast(1), ">= 1"},
		{"m2train_coordinator_raft_last_log_index", nil, atLeast(2), ">= 2"},
		{"m2train_coordinator_raft_commit_index", nil, atLeast(2), ">= 2"},
		{"m2train_coordinator_raft_applied_index", nil, atLeast(2), ">= 2"},
		{"m2train_coordinator_raft_apply_duration_seconds", nil, atLeast(1), ">= 1 observation"},
		{"m2train_coordinator_api_requests_total", []string{"method", "JobService/ListJobs", "code", "OK"}, eq(1), "1"},
		{"m2train_coordinator_jobs", []string{"state", "queued"}, eq(0), "0"},
		{"m2train_coordinator_workers", []string{"state", "alive"}, eq(0), "0"},
		// Every method's OK series exists before its first call.
		{"m2train_coordinator_api_requests_total", []string{"method", "JobService/SubmitJob", "code", "OK"}, eq(0), "0"},
		{"m2train_coordinator_api_requests_total", []string{"method", "WorkerService/ReportProgress", "code", "OK"}, eq(0), "0"},
	}
	for _, c := range checks {
		if v := mustValue(t, mfs, c.name, c.labels...); !c.ok(v) {
			t.Errorf("%s%v = %v, want %s", c.name, c.labels, v, c.want)
		}
	}
	applies := mustValue(t, mfs, "m2train_coordinator_raft_apply_duration_seconds")

	job, err := cl.Submit(ctx, []byte(testSpec))
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := cl.Get(ctx, job.GetId()); err != nil {
			t.Fatal(err)
		}
	}
	anon, err := client.New(client.Config{Addrs: []string{api}})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	if _, err := anon.List(ctx); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a call without the token: %v, want Unauthenticated", err)
	}

	mfs = r.scrape()
	checks = []struct {
		name   string
		labels []string
		ok     func(float64) bool
		want   string
	}{
		{"m2train_coordinator_jobs", []string{"state", "queued"}, eq(1), "1"},
		{"m2train_coordinator_jobs", []string{"state", "running"}, eq(0), "0"},
		{"m2train_coordinator_api_requests_total", []string{"method", "JobService/SubmitJob", "code", "OK"}, eq(1), "1"},
		{"m2train_coordinator_api_requests_total", []string{"method", "JobService/GetJob", "code", "OK"}, eq(2), "2"},
		{"m2train_coordinator_api_requests_total", []string{"method", "JobService/ListJobs", "code", "Unauthenticated"}, eq(1), "1"},
		{"m2train_coordinator_api_request_duration_seconds", []string{"method", "JobService/GetJob"}, atLeast(2), ">= 2 observations"},
		{"m2train_coordinator_raft_apply_duration_seconds", nil, atLeast(applies + 1), fmt.Sprintf(">= %v observations", applies+1)},
	}
	for _, c := range checks {
		if v := mustValue(t, mfs, c.name, c.labels...); !c.ok(v) {
			t.Errorf("%s%v = %v, want %s", c.name, c.labels, v, c.want)
		}
	}

	r.stop()
	if _, _, err := get("http://" + metrics + "/healthz"); err == nil {
		t.Error("the metrics server still answers after run returned")
	}
}

func eq(want float64) func(float64) bool     { return func(v float64) bool { return v == want } }
func atLeast(min float64) func(float64) bool { return func(v float64) bool { return v >= min } }

func TestReadyzReasons(t *testing.T) {
	o := newObserver()
	srv := o.handler()
	for _, tt := range []struct {
		path string
		code int
		body string
	}{
		{"/healthz", http.StatusOK, "ok\n"},
		{"/readyz", http.StatusServiceUnavailable, "gRPC API not serving\n"},
	} {
		rec := newRecorder()
		req, _ := http.NewRequest(http.MethodGet, tt.path, nil)
		srv.ServeHTTP(rec, req)
		if rec.code != tt.code || rec.body.String() != tt.body {
			t.Errorf("%s: %d %q, want %d %q", tt.path, rec.code, rec.body.String(), tt.code, tt.body)
		}
	}
	o.serving.Store(true)
	if why := o.notReady(); why != "raft not started" {
		t.Errorf("serving without a node: %q", why)
	}
}

type recorder struct {
	h    http.Header
	code int
	body strings.Builder
}

func newRecorder() *recorder                    { return &recorder{h: http.Header{}, code: http.StatusOK} }
func (r *recorder) Header() http.Header         { return r.h }
func (r *recorder) WriteHeader(c int)           { r.code = c }
func (r *recorder) Write(p []byte) (int, error) { return r.body.Write(p) }

// TestThreeReplicasWithEmbeddedEtcd runs three replicas on three loopback
// addresses, each with the same ports, as three pods would: they form one
// raft cluster and one etcd cluster, a worker's lease taken in that etcd
// makes it alive everywhere, and the cluster survives the loss and return
// of its leader. It runs in plain text and with mutual TLS everywhere.
func TestThreeReplicasWithEmbeddedEtcd(t *testing.T) {
	t.Run("plain", func(t *testing.T) { testThreeReplicas(t, false) })
	t.Run("tls", func(t *testing.T) { testThreeReplicas(t, true) })
}

func testThreeReplicas(t *testing.T, withTLS bool) {
	hosts := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}
	p := ports(t, 5, hosts...)
	raftPort, apiPort, clientPort, peerPort, metricsPort := p[0], p[1], p[2], p[3], p[4]
	dir := t.TempDir()
	scheme := "http"
	var tlsArgs []string
	var creds credentials.TransportCredentials
	var etcdTLS *tls.Config
	if withTLS {
		files, err := security.GenerateDevPKI(dir, hosts...)
		if err != nil {
			t.Fatal(err)
		}
		scheme, tlsArgs = "https", []string{"--tls-cert", files.Cert, "--tls-key", files.Key, "--tls-ca", files.CA}
		if creds, err = files.ClientCredentials(""); err != nil {
			t.Fatal(err)
		}
		if etcdTLS, err = files.Client(""); err != nil {
			t.Fatal(err)
		}
	}
	var peers, apis, wantEndpoints []string
	for i, h := range hosts {
		peers = append(peers, fmt.Sprintf("c%d=%s", i, addr(h, raftPort)))
		apis = append(apis, addr(h, apiPort))
		wantEndpoints = append(wantEndpoints, scheme+"://"+addr(h, clientPort))
	}
	reps := make([]*replica, len(hosts))
	for i, h := range hosts {
		id := fmt.Sprintf("c%d", i)
		args := []string{"--id", id, "--data-dir", filepath.Join(dir, id),
			"--raft-addr", addr(h, raftPort), "--api-addr", addr(h, apiPort), "--peers", strings.Join(peers, ","),
			"--etcd-client-port", strconv.Itoa(clientPort), "--etcd-peer-port", strconv.Itoa(peerPort),
			"--metrics-addr", addr(h, metricsPort), "--lease-ttl", "10", "--log-level", "warn"}
		reps[i] = startReplica(t, addr(h, metricsPort), append(args, tlsArgs...)...)
	}
	for i, r := range reps {
		waitFor(t, 2*time.Minute, fmt.Sprintf("c%d's /readyz", i), r.ready)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cl, err := client.New(client.Config{Addrs: apis, Creds: creds})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	job, err := cl.Submit(ctx, []byte(testSpec))
	if err != nil {
		t.Fatal(err)
	}
	reg, err := cl.RegisterWorker(ctx, &pb.RegisterWorkerRequest{WorkerId: "w1", Hostname: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(reg.GetEtcdEndpoints(), wantEndpoints) {
		t.Fatalf("workers are told etcd %v, want every replica's member %v", reg.GetEtcdEndpoints(), wantEndpoints)
	}

	// The worker takes its lease in the embedded cluster, through every
	// member's endpoint as a worker would.
	etcd, err := clientv3.New(clientv3.Config{Endpoints: reg.GetEtcdEndpoints(), DialTimeout: 10 * time.Second, TLS: etcdTLS, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer etcd.Close()
	sess, err := membership.Register(ctx, etcd, membership.WorkerInfo{ID: "w1", Hostname: "test"}, membership.Options{TTL: int(reg.GetLeaseTtlSeconds())})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()

	// Every replica's metrics show the live worker and the job it runs, and
	// exactly one leader.
	leader := -1
	waitFor(t, 2*time.Minute, "every replica to show one leader, the alive worker and the running job", func() bool {
		leader = -1
		for i, r := range reps {
			mfs := r.scrape()
			if v, _ := promtest.Value(mfs, "m2train_coordinator_raft_peers"); v != 3 {
				return false
			}
			if v, _ := promtest.Value(mfs, "m2train_coordinator_workers", "state", "alive"); v != 1 {
				return false
			}
			if v, _ := promtest.Value(mfs, "m2train_coordinator_jobs", "state", "running"); v != 1 {
				return false
			}
			if v, _ := promtest.Value(mfs, "m2train_coordinator_is_leader"); v == 1 {
				if leader >= 0 {
					return false
				}
				leader = i
			}
		}
		return leader >= 0
	})

	// The leader's replica goes, with its raft node and its etcd member:
	// the other two elect a leader and keep the worker alive.
	reps[leader].stop()
	waitFor(t, 2*time.Minute, "a new leader with the job and the live worker", func() bool {
		for i, r := range reps {
			if i == leader {
				continue
			}
			mfs := r.scrape()
			isLeader, _ := promtest.Value(mfs, "m2train_coordinator_is_leader")
			alive, _ := promtest.Value(mfs, "m2train_coordinator_workers", "state", "alive")
			if isLeader == 1 && alive == 1 && r.ready() {
				return true
			}
		}
		return false
	})
	if got, err := cl.Get(ctx, job.GetId()); err != nil || got.GetState() != pb.JobState_JOB_STATE_RUNNING {
		t.Fatalf("job after failover: %v, %v", got, err)
	}
	select {
	case <-sess.Done():
		t.Fatal("the worker lost its lease when one etcd member of three went")
	default:
	}

	// It comes back from its data directories and rejoins both clusters.
	reps[leader].start()
	waitFor(t, 2*time.Minute, "the restarted replica's /readyz", reps[leader].ready)
	waitFor(t, 2*time.Minute, "the restarted replica to hold the job and the live worker", func() bool {
		mfs := reps[leader].scrape()
		running, _ := promtest.Value(mfs, "m2train_coordinator_jobs", "state", "running")
		alive, _ := promtest.Value(mfs, "m2train_coordinator_workers", "state", "alive")
		return running == 1 && alive == 1
	})
	own, err := clientv3.New(clientv3.Config{Endpoints: wantEndpoints[leader : leader+1], DialTimeout: 10 * time.Second, TLS: etcdTLS, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	resp, err := own.Get(ctx, membership.WorkerKey(membership.DefaultPrefix, "w1"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("the worker's key through the restarted member: %v, %v", resp, err)
	}
}

func TestPlanEtcd(t *testing.T) {
	peers3 := "c0=coord-0.coord:7401,c1=coord-1.coord:7401,c2=coord-2.coord:7401"
	tests := []struct {
		name    string
		args    []string
		want    string // error text, or "" for success
		check   func(t *testing.T, p *etcdPlan)
		needTLS bool
	}{
		{name: "single replica on loopback", args: nil, check: func(t *testing.T, p *etcdPlan) {
			if !p.loopback || p.member != nil || p.dir != filepath.Join("d", "etcd") {
				t.Errorf("plan %+v", p)
			}
		}},
		{name: "external", args: []string{"--peers", peers3, "--id", "c1", "--etcd-endpoints", "http://e:2379, http://f:2379"}, check: func(t *testing.T, p *etcdPlan) {
			if !slices.Equal(p.external, []string{"http://e:2379", "http://f:2379"}) || p.member != nil || p.loopback {
				t.Errorf("plan %+v", p)
			}
		}},
		{name: "cluster", args: []string{"--peers", peers3, "--id", "c1", "--raft-addr", "0.0.0.0:7401", "--etcd-client-port", "2379", "--etcd-peer-port", "2380"},
			check: func(t *testing.T, p *etcdPlan) {
				m := p.member
				if m == nil || m.Name != "c1" || m.ListenClient != "0.0.0.0:2379" || m.ListenPeer != "0.0.0.0:2380" || m.TLS != nil || m.Dir != filepath.Join("d", "etcd-member") {
					t.Fatalf("member %+v", m)
				}
				var got []string
				for _, mm := range m.Members {
					got = append(got, mm.Name+"="+mm.PeerURL+"|"+mm.ClientURL)
				}
				want := []string{"c0=http://coord-0.coord:2380|http://coord-0.coord:2379", "c1=http://coord-1.coord:2380|http://coord-1.coord:2379",
					"c2=http://coord-2.coord:2380|http://coord-2.coord:2379"}
				if !slices.Equal(got, want) {
					t.Errorf("members %v, want %v", got, want)
				}
			}},
		{name: "cluster with TLS and a listen host", needTLS: true,
			args: []string{"--peers", peers3, "--id", "c0", "--etcd-client-port", "2379", "--etcd-peer-port", "2380", "--etcd-listen-host", "10.0.0.5"},
			check: func(t *testing.T, p *etcdPlan) {
				m := p.member
				if m.TLS == nil || m.ListenClient != "10.0.0.5:2379" || m.Members[2].PeerURL != "https://coord-2.coord:2380" {
					t.Errorf("member %+v", m)
				}
			}},
		{name: "one replica with ports advertises --raft-advertise", args: []string{"--id", "solo", "--raft-addr", ":7401", "--raft-advertise", "solo.svc:7401",
			"--etcd-client-port", "2379", "--etcd-peer-port", "2380"}, check: func(t *testing.T, p *etcdPlan) {
			m := p.member
			if m.ListenClient != "0.0.0.0:2379" || len(m.Members) != 1 || m.Members[0].ClientURL != "http://solo.svc:2379" {
				t.Errorf("member %+v", m)
			}
		}},
		{name: "cluster without ports", args: []string{"--peers", peers3, "--id", "c0"}, want: "--etcd-client-port and --etcd-peer-port are required with 3 replicas"},
		{name: "one port", args: []string{"--peers", peers3, "--id", "c0", "--etcd-client-port", "2379"}, want: "must be given together"},
		{name: "same ports", args: []string{"--peers", peers3, "--id", "c0", "--etcd-client-port", "2379", "--etcd-peer-port", "2379"}, want: "must differ"},
		{name: "bad port", args: []string{"--etcd-client-port", "70000", "--etcd-peer-port", "2380"}, want: "--etcd-client-port: 70000 is not a port"},
		{name: "ports with external", args: []string{"--etcd-endpoints", "http://e:2379", "--etcd-client-port", "2379"}, want: "leave them unset with --etcd-endpoints"},
		{name: "listen host alone", args: []string{"--etcd-listen-host", "0.0.0.0"}, want: "--etcd-listen-host needs"},
		{name: "listen on a name", args: []string{"--peers", peers3, "--id", "c0", "--raft-addr", "coord-0.coord:7401", "--etcd-client-port", "2379", "--etcd-peer-port", "2380"},
			want: `--etcd-listen-host "coord-0.coord" must be an IP address`},
		{name: "unspecified peer host", args: []string{"--peers", "c0=0.0.0.0:7401,c1=b:7401", "--id", "c0", "--etcd-client-port", "2379", "--etcd-peer-port", "2380"},
			want: `the host "0.0.0.0" of c0 is not an address`},
		{name: "unspecified own host", args: []string{"--id", "solo", "--raft-addr", "0.0.0.0:7401", "--etcd-client-port", "2379", "--etcd-peer-port", "2380"},
			want: "set --raft-advertise or --etcd-listen-host"},
		{name: "not in peers", args: []string{"--peers", peers3, "--id", "c9", "--etcd-client-port", "2379", "--etcd-peer-port", "2380"},
			want: `--peers must include this replica's --id "c9"`},
		{name: "same host for every peer", args: []string{"--peers", "a=127.0.0.1:1,b=127.0.0.1:2", "--id", "a", "--etcd-client-port", "2379", "--etcd-peer-port", "2380"},
			want: "embedded etcd: etcdembed: invalid config: Members[1].PeerURL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--data-dir", "d", "--id", "x"}, tt.args...)
			if tt.needTLS {
				args = append(args, "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem")
			}
			c, err := parseFlags(args)
			if err != nil {
				t.Fatal(err)
			}
			peers, err := node.ParsePeers(c.peers)
			if err != nil {
				t.Fatal(err)
			}
			p, err := planEtcd(c, peers)
			switch {
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("planEtcd: %v, want an error mentioning %q", err, tt.want)
			case tt.want == "" && err != nil:
				t.Fatalf("planEtcd: %v", err)
			case tt.want == "":
				tt.check(t, p)
			}
		})
	}
}

func TestParseFlagsReadsEnvironment(t *testing.T) {
	t.Setenv("M2_METRICS_ADDR", "0.0.0.0:9400")
	t.Setenv("M2_ETCD_CLIENT_PORT", "2379")
	t.Setenv("M2_ETCD_PEER_PORT", "not-a-number")
	if _, err := parseFlags([]string{"--id", "a"}); err == nil || !strings.Contains(err.Error(), "M2_ETCD_PEER_PORT") {
		t.Fatalf("a bad port in the environment: %v", err)
	}
	t.Setenv("M2_ETCD_PEER_PORT", "2380")
	c, err := parseFlags([]string{"--id", "a", "--etcd-client-port", "3379"})
	if err != nil {
		t.Fatal(err)
	}
	if c.metricsAddr != "0.0.0.0:9400" || c.etcdClientPort != 3379 || c.etcdPeerPort != 2380 {
		t.Fatalf("config %+v: the flag wins over the environment, which fills the rest", c)
	}
}
