package server_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/coordtest"
	"github.com/m2train/m2train/coordinator/node"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/coordinator/server"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// fwdOptions configures a cluster for the forwarding tests.
type fwdOptions struct {
	// tls serves the API and raft with mutual TLS from a throwaway CA.
	tls bool
	// token is required on every call when set.
	token string
	// noForward starts the servers with Config.NoForward.
	noForward bool
}

// fwdCluster is three replicas in this process, each counting the relayed
// calls that reach it. coordtest cannot serve TLS or set the forwarding
// options, hence this harness.
type fwdCluster struct {
	t     *testing.T
	opts  fwdOptions
	creds credentials.TransportCredentials // clients' TLS; nil for plain text
	reps  []*fwdReplica
}

type fwdReplica struct {
	id, apiAddr string
	node        *node.Node
	srv         *server.Server
	g           *grpc.Server
	served      chan struct{}
	// relayed counts calls that arrived with the forwarding marker,
	// accepted or not.
	relayed atomic.Int64
	killed  bool
}

func startFwdCluster(t *testing.T, opts fwdOptions) *fwdCluster {
	t.Helper()
	c := &fwdCluster{t: t, opts: opts}
	// With TLS, one certificate serves as the replicas' server, raft peer
	// and forwarding client certificate, as in a Kubernetes install.
	var serverTLS, peerTLS, forwardTLS *tls.Config
	if opts.tls {
		files, err := security.GenerateDevPKI(t.TempDir(), "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		if serverTLS, err = files.Server(); err != nil {
			t.Fatal(err)
		}
		if peerTLS, err = files.Peer(); err != nil {
			t.Fatal(err)
		}
		if forwardTLS, err = files.Client(""); err != nil {
			t.Fatal(err)
		}
		if c.creds, err = files.ClientCredentials(""); err != nil {
			t.Fatal(err)
		}
	}
	const n = 3
	var peers []node.Peer
	lis := make([]net.Listener, n)
	for i := range n {
		raftAddr := coordtest.MustFreeAddr(t)
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[i] = l
		id := fmt.Sprintf("c%d", i)
		peers = append(peers, node.Peer{ID: id, Addr: raftAddr})
		c.reps = append(c.reps, &fwdReplica{id: id, apiAddr: l.Addr().String()})
	}
	t.Cleanup(func() {
		for i := range c.reps {
			c.kill(i)
		}
	})
	dir := t.TempDir()
	for i, r := range c.reps {
		ncfg := node.Config{ID: r.id, DataDir: filepath.Join(dir, r.id), BindAddr: peers[i].Addr, Peers: peers, Logger: testLogger(t)}
		coordtest.FastNode(&ncfg)
		ncfg.TLS = peerTLS
		nd, err := node.Start(ncfg)
		if err != nil {
			t.Fatal(err)
		}
		r.node = nd
		count := func(ctx context.Context) {
			if md, _ := metadata.FromIncomingContext(ctx); len(md.Get(server.ForwardedHeader)) > 0 {
				r.relayed.Add(1)
			}
		}
		scfg := server.Config{
			Node: nd, APIAddr: r.apiAddr, Token: opts.token, NoForward: opts.noForward, ForwardTLS: forwardTLS, Logger: testLogger(t),
			UnaryInterceptors: []grpc.UnaryServerInterceptor{func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
				count(ctx)
				return h(ctx, req)
			}},
			StreamInterceptors: []grpc.StreamServerInterceptor{func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
				count(ss.Context())
				return h(srv, ss)
			}},
		}
		srv, err := server.New(scfg)
		if err != nil {
			t.Fatal(err)
		}
		var creds credentials.TransportCredentials
		if serverTLS != nil {
			creds = credentials.NewTLS(serverTLS)
		}
		r.srv, r.g, r.served = srv, srv.GRPCServer(creds), make(chan struct{})
		go func(g *grpc.Server, l net.Listener, done chan struct{}) {
			defer close(done)
			_ = g.Serve(l)
		}(r.g, lis[i], r.served)
	}
	return c
}

// kill stops replica i as a crash would: its API first, then raft.
func (c *fwdCluster) kill(i int) {
	r := c.reps[i]
	if r.killed {
		return
	}
	r.killed = true
	r.g.Stop()
	<-r.served
	if err := r.srv.Close(); err != nil {
		c.t.Errorf("close server %s: %v", r.id, err)
	}
	if err := r.node.Close(); err != nil {
		c.t.Errorf("close node %s: %v", r.id, err)
	}
}

// leader waits until a live replica leads and serves, and returns it.
func (c *fwdCluster) leader(ctx context.Context) int {
	c.t.Helper()
	for {
		for i, r := range c.reps {
			if !r.killed && r.srv.Ready() {
				return i
			}
		}
		select {
		case <-ctx.Done():
			c.t.Fatalf("no leader: %v", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// waitFollows waits until replica f has applied the record of leader l's
// API address, which a follower applies a little after the leader.
func (c *fwdCluster) waitFollows(ctx context.Context, f, l int) {
	c.t.Helper()
	for {
		if addr, _ := c.reps[f].node.FSM().Member(c.reps[l].id); addr == c.reps[l].apiAddr {
			return
		}
		select {
		case <-ctx.Done():
			c.t.Fatalf("replica %s does not know leader %s's address: %v", c.reps[f].id, c.reps[l].id, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// client returns a leader-following client that knows only replica i.
func (c *fwdCluster) client(i int, token string) *client.Client {
	c.t.Helper()
	return newClient(c.t, client.Config{Addrs: []string{c.reps[i].apiAddr}, Creds: c.creds, Token: token})
}

// raw returns a plain job API client of replica i that sends token.
func (c *fwdCluster) raw(i int, token string) pb.JobServiceClient {
	c.t.Helper()
	creds := c.creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(security.Token{Value: token, AllowInsecure: c.creds == nil}))
	}
	cc, err := grpc.NewClient(c.reps[i].apiAddr, opts...)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { cc.Close() })
	return pb.NewJobServiceClient(cc)
}

// notLeader returns the leader address of a NotLeader status.
func notLeader(err error) (addr string, ok bool) {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if nl, isNL := d.(*pb.NotLeader); isNL {
			return nl.GetLeaderAddr(), true
		}
	}
	return "", false
}

// TestForwardThroughFollowerTLS gives a client only a follower's address,
// with mutual TLS and a token on the API: every call reaches the leader
// through the follower, answers and errors come back intact, and the
// client never learns another address.
func TestForwardThroughFollowerTLS(t *testing.T) {
	c := startFwdCluster(t, fwdOptions{tls: true, token: "s3cret"})
	ctx := ctxT(t, 2*time.Minute)
	l := c.leader(ctx)
	f := (l + 1) % 3
	cl := c.client(f, "s3cret")

	job, err := cl.Submit(ctx, specYAML("demo", 2, "cpu"))
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	if job.GetId() != "demo-1" || job.GetState() != pb.JobState_JOB_STATE_QUEUED || job.GetWorldSize() != 2 {
		t.Fatalf("submitted job = %v", job)
	}
	got, err := cl.Get(ctx, job.GetId())
	if err != nil || got.GetProgress().GetTotalSteps() != 100 {
		t.Fatalf("Get = %v, %v", got, err)
	}
	all, err := cl.List(ctx)
	if err != nil || len(all) != 1 || all[0].GetId() != "demo-1" {
		t.Fatalf("List = %v, %v", all, err)
	}
	if _, err := cl.RegisterWorker(ctx, &pb.RegisterWorkerRequest{WorkerId: "w0", Addr: "w0:9000", Gpus: 1}); err != nil {
		t.Fatalf("RegisterWorker: %v", err)
	}
	if as, err := cl.GetAssignment(ctx, "w0"); err != nil || len(as) != 0 {
		t.Fatalf("GetAssignment = %v, %v", as, err)
	}

	// A watch through the follower streams every change until the end.
	updates := make(chan *pb.Job, 64)
	watched := make(chan error, 1)
	var final *pb.Job
	go func() {
		var err error
		final, err = cl.Watch(ctx, job.GetId(), func(j *pb.Job) error {
			updates <- j
			return nil
		})
		watched <- err
	}()
	if first := <-updates; first.GetState() != pb.JobState_JOB_STATE_QUEUED {
		t.Fatalf("first watched state = %v", first.GetState())
	}
	if _, err := cl.Cancel(ctx, job.GetId(), "watched to the end"); err != nil {
		t.Fatal(err)
	}
	if err := <-watched; err != nil || final.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("Watch = %v, %v", final, err)
	}

	// Errors keep their codes and messages.
	if _, err := cl.Get(ctx, "nope-9"); code(err) != codes.NotFound || !strings.Contains(err.Error(), "nope-9") {
		t.Fatalf("Get(nope-9) = %v, want NotFound naming the job", err)
	}
	if _, err := cl.Submit(ctx, specYAML("demo", -1, "cpu")); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "parallel.dp") {
		t.Fatalf("Submit(dp -1) = %v, want InvalidArgument naming parallel.dp", err)
	}

	if cl.Leader() != c.reps[f].apiAddr {
		t.Errorf("client moved to %s; it should have stayed on the follower %s", cl.Leader(), c.reps[f].apiAddr)
	}
	if c.reps[l].relayed.Load() == 0 {
		t.Error("the leader saw no relayed call")
	}
	for i, r := range c.reps {
		if i != l && r.relayed.Load() != 0 {
			t.Errorf("follower %s received %d relayed calls", r.id, r.relayed.Load())
		}
	}
}

// TestForwardChecksTokenOnBothHops: a follower refuses a call with a wrong
// token itself, without relaying it, and the leader checks the token of a
// relayed call again (the marker grants nothing).
func TestForwardChecksTokenOnBothHops(t *testing.T) {
	c := startFwdCluster(t, fwdOptions{token: "s3cret"})
	ctx := ctxT(t, 2*time.Minute)
	l := c.leader(ctx)
	f := (l + 1) % 3

	for _, token := range []string{"", "wrong"} {
		t.Run("token="+token, func(t *testing.T) {
			before := c.reps[l].relayed.Load()
			cl := c.client(f, token)
			if _, err := cl.List(ctx); code(err) != codes.Unauthenticated {
				t.Fatalf("List = %v, want Unauthenticated", err)
			}
			if _, err := cl.Watch(ctx, "none-1", func(*pb.Job) error { return nil }); code(err) != codes.Unauthenticated {
				t.Fatalf("Watch = %v, want Unauthenticated", err)
			}
			if n := c.reps[l].relayed.Load() - before; n != 0 {
				t.Fatalf("the follower relayed %d calls it should have refused", n)
			}
		})
	}

	t.Run("leader checks relayed calls", func(t *testing.T) {
		relayed := metadata.AppendToOutgoingContext(ctx, server.ForwardedHeader, c.reps[f].id)
		if _, err := c.raw(l, "wrong").ListJobs(relayed, &pb.ListJobsRequest{}); code(err) != codes.Unauthenticated {
			t.Fatalf("relayed ListJobs with a wrong token = %v, want Unauthenticated", err)
		}
		if _, err := c.raw(l, "s3cret").ListJobs(relayed, &pb.ListJobsRequest{}); err != nil {
			t.Fatalf("relayed ListJobs with the token = %v", err)
		}
	})

	t.Run("right token", func(t *testing.T) {
		before := c.reps[l].relayed.Load()
		if _, err := c.client(f, "s3cret").List(ctx); err != nil {
			t.Fatal(err)
		}
		if c.reps[l].relayed.Load() == before {
			t.Fatal("the call was not relayed to the leader")
		}
	})
}

// TestForwardRedirects covers the cases where a follower answers NotLeader
// as before: a call that was relayed once already (no second hop), a call
// that asks for the redirect, and servers with NoForward.
func TestForwardRedirects(t *testing.T) {
	t.Run("marker and header", func(t *testing.T) {
		c := startFwdCluster(t, fwdOptions{})
		ctx := ctxT(t, 2*time.Minute)
		l := c.leader(ctx)
		f := (l + 1) % 3
		c.waitFollows(ctx, f, l)
		for _, h := range []string{server.ForwardedHeader, server.NoForwardHeader} {
			t.Run(h, func(t *testing.T) {
				before := c.reps[l].relayed.Load()
				mctx := metadata.AppendToOutgoingContext(ctx, h, "1")
				_, err := c.raw(f, "").ListJobs(mctx, &pb.ListJobsRequest{})
				if addr, ok := notLeader(err); !ok || addr != c.reps[l].apiAddr || code(err) != codes.FailedPrecondition {
					t.Fatalf("ListJobs = %v, want NotLeader naming %s", err, c.reps[l].apiAddr)
				}
				stream, err := c.raw(f, "").WatchJob(mctx, &pb.WatchJobRequest{JobId: "none-1"})
				if err == nil {
					_, err = stream.Recv()
				}
				if addr, ok := notLeader(err); !ok || addr != c.reps[l].apiAddr {
					t.Fatalf("WatchJob = %v, want NotLeader naming %s", err, c.reps[l].apiAddr)
				}
				if n := c.reps[l].relayed.Load() - before; n != 0 {
					t.Fatalf("%d calls relayed despite %s", n, h)
				}
			})
		}
	})

	t.Run("NoForward", func(t *testing.T) {
		c := startFwdCluster(t, fwdOptions{noForward: true})
		ctx := ctxT(t, 2*time.Minute)
		l := c.leader(ctx)
		f := (l + 1) % 3
		c.waitFollows(ctx, f, l)
		_, err := c.raw(f, "").ListJobs(ctx, &pb.ListJobsRequest{})
		if addr, ok := notLeader(err); !ok || addr != c.reps[l].apiAddr {
			t.Fatalf("ListJobs = %v, want NotLeader naming %s", err, c.reps[l].apiAddr)
		}
		// The client follows the redirect.
		cl := c.client(f, "")
		if _, err := cl.Submit(ctx, specYAML("demo", 1, "cpu")); err != nil {
			t.Fatal(err)
		}
		if cl.Leader() != c.reps[l].apiAddr {
			t.Fatalf("client calls %s, leader is %s", cl.Leader(), c.reps[l].apiAddr)
		}
		for _, r := range c.reps {
			if r.relayed.Load() != 0 {
				t.Fatalf("replica %s received %d relayed calls", r.id, r.relayed.Load())
			}
		}
	})
}

// TestForwardWithoutLeader: a replica that knows no leader answers
// Unavailable, which clients retry, and says why.
func TestForwardWithoutLeader(t *testing.T) {
	c := startFwdCluster(t, fwdOptions{})
	ctx := ctxT(t, 2*time.Minute)
	l := c.leader(ctx)
	f := (l + 1) % 3
	// The last replica has no quorum: it stays a candidate without a leader.
	c.kill(l)
	c.kill((l + 2) % 3)
	for {
		if id, _ := c.reps[f].node.Leader(); id == "" {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the last replica still names a leader")
		case <-time.After(10 * time.Millisecond):
		}
	}
	_, err := c.raw(f, "").ListJobs(ctx, &pb.ListJobsRequest{})
	if code(err) != codes.Unavailable || !strings.Contains(err.Error(), "knows no leader") {
		t.Fatalf("ListJobs = %v, want Unavailable saying that no leader is known", err)
	}
	stream, err := c.raw(f, "").WatchJob(ctx, &pb.WatchJobRequest{JobId: "any-1"})
	if err == nil {
		_, err = stream.Recv()
	}
	if code(err) != codes.Unavailable {
		t.Fatalf("WatchJob = %v, want Unavailable", err)
	}
}

// TestForwardedWatchFailover kills the leader under a watch relayed by a
// follower: the relayed stream ends with a status clients retry, a client's
// watch resumes through the same follower, and the surviving follower
// relays to the new leader over a new connection.
func TestForwardedWatchFailover(t *testing.T) {
	c := startFwdCluster(t, fwdOptions{})
	ctx := ctxT(t, 2*time.Minute)
	l := c.leader(ctx)
	a, b := (l+1)%3, (l+2)%3
	clA, clB := c.client(a, ""), c.client(b, "")
	job, err := clA.Submit(ctx, specYAML("watched", 1, "cpu"))
	if err != nil {
		t.Fatal(err)
	}
	// Both followers relay to the first leader.
	if _, err := clB.List(ctx); err != nil {
		t.Fatal(err)
	}

	stream, err := c.raw(a, "").WatchJob(ctx, &pb.WatchJobRequest{JobId: job.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if first, err := stream.Recv(); err != nil || first.GetJob().GetState() != pb.JobState_JOB_STATE_QUEUED {
		t.Fatalf("first message = %v, %v", first, err)
	}
	updates := make(chan *pb.Job, 64)
	watched := make(chan error, 1)
	var mu sync.Mutex
	var final *pb.Job
	go func() {
		j, err := clA.Watch(ctx, job.GetId(), func(j *pb.Job) error {
			updates <- j
			return nil
		})
		mu.Lock()
		final = j
		mu.Unlock()
		watched <- err
	}()
	<-updates

	c.kill(l)
	_, err = stream.Recv()
	t.Logf("relayed stream ended with %v", err)
	if _, nl := notLeader(err); code(err) != codes.Unavailable && !nl {
		t.Fatalf("relayed stream ended with %v, want Unavailable or NotLeader", err)
	}
	if errors.Is(err, context.Canceled) || code(err) == codes.Canceled {
		t.Fatalf("relayed stream ended with %v", err)
	}

	l2 := c.leader(ctx)
	other := a
	if l2 == a {
		other = b
	}
	before := c.reps[l2].relayed.Load()
	cancelled, err := c.client(other, "").Cancel(ctx, job.GetId(), "failover seen")
	if err != nil || cancelled.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("Cancel through %s = %v, %v", c.reps[other].id, cancelled, err)
	}
	if c.reps[l2].relayed.Load() == before {
		t.Fatalf("follower %s did not relay to the new leader %s", c.reps[other].id, c.reps[l2].id)
	}
	if err := <-watched; err != nil {
		t.Fatalf("client watch: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if final.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Fatalf("client watch ended at %v", final.GetState())
	}
}
