package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/goleak"

	"github.com/m2train/m2train/coordinator/fsm"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/tools/testlog"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testLogger routes logs to t.Log until the test's cleanup stops it, so that
// a late line from a closing goroutine cannot fail the test.
func testLogger(t *testing.T) *slog.Logger {
	return testlog.New(t, slog.LevelWarn)
}

// faultLayer is a TCP stream layer that can be cut off from every peer: while
// isolated it refuses to dial, drops accepted connections and has closed all
// connections it had.
type faultLayer struct {
	net.Listener
	isolated atomic.Bool
	mu       sync.Mutex
	conns    []net.Conn
}

func newFaultLayer(t *testing.T, addr string) *faultLayer {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return &faultLayer{Listener: l}
}

// track records c so that isolation can cut it, or closes it at once when
// the layer is already isolated. Checking the flag under the same lock that
// setIsolated holds leaves no window in which a connection opened just
// before the partition survives it.
func (f *faultLayer) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.isolated.Load() {
		c.Close()
		return false
	}
	f.conns = append(f.conns, c)
	return true
}

func (f *faultLayer) Accept() (net.Conn, error) {
	for {
		c, err := f.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if f.track(c) {
			return c, nil
		}
	}
}

func (f *faultLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if f.isolated.Load() {
		return nil, errors.New("partitioned")
	}
	c, err := net.DialTimeout("tcp", string(addr), timeout)
	if err != nil {
		return nil, err
	}
	if !f.track(c) {
		return nil, errors.New("partitioned")
	}
	return c, nil
}

func (f *faultLayer) Close() error {
	err := f.Listener.Close()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		c.Close()
	}
	f.conns = nil
	return err
}

func (f *faultLayer) setIsolated(v bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.isolated.Store(v)
	if !v {
		return
	}
	for _, c := range f.conns {
		c.Close()
	}
	f.conns = nil
}

// testCluster is n replicas on loopback TCP with fixed addresses, so that
// replicas can be restarted from their data directories.
type testCluster struct {
	t      *testing.T
	peers  []Peer
	dirs   []string
	nodes  []*Node
	layers []*faultLayer
	log    *slog.Logger
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func newTestCluster(t *testing.T, n int) *testCluster {
	c := &testCluster{t: t, log: testLogger(t), nodes: make([]*Node, n), layers: make([]*faultLayer, n)}
	for i := range n {
		c.peers = append(c.peers, Peer{ID: fmt.Sprintf("c%d", i), Addr: freeAddr(t)})
		c.dirs = append(c.dirs, t.TempDir())
	}
	for i := range n {
		c.start(i)
	}
	t.Cleanup(c.closeAll)
	return c
}

func (c *testCluster) start(i int) {
	c.t.Helper()
	layer := newFaultLayer(c.t, c.peers[i].Addr)
	n, err := Start(Config{
		ID: c.peers[i].ID, DataDir: c.dirs[i], Peers: c.peers, StreamLayer: layer,
		HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond,
		LeaderLeaseTimeout: 150 * time.Millisecond, Logger: c.log,
	})
	if err != nil {
		c.t.Fatalf("start %s: %v", c.peers[i].ID, err)
	}
	c.nodes[i], c.layers[i] = n, layer
}

func (c *testCluster) stop(i int) {
	if c.nodes[i] != nil {
		if err := c.nodes[i].Close(); err != nil {
			c.t.Errorf("close %s: %v", c.peers[i].ID, err)
		}
		c.nodes[i] = nil
	}
}

func (c *testCluster) closeAll() {
	for i := range c.nodes {
		c.stop(i)
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
		time.Sleep(10 * time.Millisecond)
	}
}

// leader waits for exactly one running replica (among those not excluded)
// to lead and returns its index.
func (c *testCluster) leader(exclude ...int) int {
	c.t.Helper()
	idx := -1
	waitFor(c.t, 20*time.Second, "a leader", func() bool {
		idx = -1
		for i, n := range c.nodes {
			skip := n == nil
			for _, e := range exclude {
				skip = skip || e == i
			}
			if !skip && n.IsLeader() {
				if idx >= 0 {
					return false
				}
				idx = i
			}
		}
		return idx >= 0
	})
	return idx
}

func spec(t testing.TB, name string) *jobspec.Spec {
	s, err := jobspec.Parse([]byte("name: " + name + `
model: {init_from: s3://models/m}
data: {path: /d, seq_len: 64}
schedule: {total_steps: 10}
`))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// submit proposes a job on whichever replica leads, retrying through
// elections, and returns its ID.
func (c *testCluster) submit(name string) string {
	c.t.Helper()
	var id string
	waitFor(c.t, 20*time.Second, "submit of "+name, func() bool {
		l := c.leader()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := c.nodes[l].Propose(ctx, &fsm.SubmitJob{At: time.Now().UnixNano(), RequestID: name, Spec: spec(c.t, name)})
		if err != nil {
			return false
		}
		if r.Err != nil {
			c.t.Fatalf("submit %s: %v", name, r.Err)
		}
		id = r.JobID
		return true
	})
	return id
}

// converged waits until every running replica holds exactly the jobs ids.
func (c *testCluster) converged(ids ...string) {
	c.t.Helper()
	waitFor(c.t, 20*time.Second, fmt.Sprintf("replicas to hold %v", ids), func() bool {
		for _, n := range c.nodes {
			if n == nil {
				continue
			}
			if len(n.FSM().Jobs()) != len(ids) {
				return false
			}
			for _, id := range ids {
				if _, ok := n.FSM().Job(id); !ok {
					return false
				}
			}
		}
		return true
	})
}

func TestLeaderFailover(t *testing.T) {
	c := newTestCluster(t, 3)
	var ids []string
	for i := range 5 {
		ids = append(ids, c.submit(fmt.Sprintf("job%d", i)))
	}
	c.converged(ids...)

	old := c.leader()
	c.stop(old)
	next := c.leader(old)
	if next == old {
		t.Fatal("the killed replica still leads")
	}
	// The new leader serves every committed job and accepts new ones.
	for _, id := range ids {
		if _, ok := c.nodes[next].FSM().Job(id); !ok {
			t.Fatalf("new leader %s lost job %s", c.peers[next].ID, id)
		}
	}
	ids = append(ids, c.submit("after-failover"))
	c.converged(ids...)

	// The old leader rejoins as a follower and catches up.
	c.start(old)
	c.converged(ids...)
	if c.nodes[old].IsLeader() && c.leader() != old {
		t.Fatal("two leaders")
	}
}

func TestRestartAllFromDataDirs(t *testing.T) {
	c := newTestCluster(t, 3)
	var ids []string
	for i := range 3 {
		ids = append(ids, c.submit(fmt.Sprintf("before%d", i)))
	}
	c.converged(ids...)
	// Snapshot one replica so that its restart restores from a snapshot
	// plus the log tail, and the others replay the log.
	if err := c.nodes[0].Snapshot(); err != nil {
		t.Fatal(err)
	}
	ids = append(ids, c.submit("after-snapshot"))
	c.converged(ids...)
	c.closeAll()

	for i := range c.nodes {
		c.start(i)
	}
	c.converged(ids...)
	// Request IDs survive the restart: a retried submit is deduplicated.
	if again := c.submit("before0"); again != ids[0] {
		t.Fatalf("retried submit after restart made %s, want %s", again, ids[0])
	}
	ids = append(ids, c.submit("after-restart"))
	c.converged(ids...)
}

func TestPartitionedMinorityCannotCommit(t *testing.T) {
	c := newTestCluster(t, 3)
	first := c.submit("first")
	c.converged(first)

	old := c.leader()
	c.layers[old].setIsolated(true)
	// The isolated leader accepts the proposal into its log but can never
	// commit it: it fails once the leader steps down.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := c.nodes[old].Propose(ctx, &fsm.SubmitJob{At: time.Now().UnixNano(), RequestID: "lost", Spec: spec(t, "lost")})
	if err == nil {
		t.Fatalf("isolated leader committed a command: %+v", r)
	}
	if !errors.Is(err, ErrUnknownOutcome) && !errors.Is(err, ErrNotLeader) {
		t.Fatalf("isolated leader: %v", err)
	}
	if _, ok := c.nodes[old].FSM().Job("lost-2"); ok {
		t.Fatal("uncommitted job reached the isolated replica's state")
	}
	// The majority elects a new leader and commits.
	c.leader(old)
	second := c.submit("second")
	if _, err := c.nodes[old].Propose(ctx, &fsm.SubmitJob{At: 1, Spec: spec(t, "x")}); err == nil {
		t.Fatal("isolated replica committed while a majority leads elsewhere")
	}
	// After healing, the old leader drops its uncommitted entry.
	c.layers[old].setIsolated(false)
	c.converged(first, second)
}

func TestProposeOnFollower(t *testing.T) {
	c := newTestCluster(t, 3)
	l := c.leader()
	f := (l + 1) % 3
	_, err := c.nodes[f].Propose(context.Background(), &fsm.SubmitJob{At: 1, Spec: spec(t, "x")})
	if !errors.Is(err, ErrNotLeader) {
		t.Fatalf("follower Propose = %v, want ErrNotLeader", err)
	}
	waitFor(t, 10*time.Second, "followers to learn the leader", func() bool {
		id, addr := c.nodes[f].Leader()
		return id == c.peers[l].ID && addr == c.peers[l].Addr
	})
}

func TestWhileLeaderRunsOnlyOnTheLeader(t *testing.T) {
	c := newTestCluster(t, 3)
	var running [3]atomic.Int32
	for i, n := range c.nodes {
		n.WhileLeader(func(ctx context.Context) {
			running[i].Add(1)
			<-ctx.Done()
			running[i].Add(-1)
		})
	}
	l := c.leader()
	waitFor(t, 10*time.Second, "the leader's function to run", func() bool { return running[l].Load() == 1 })
	c.stop(l)
	if running[l].Load() != 0 {
		t.Fatal("function still runs on the closed replica")
	}
	next := c.leader(l)
	waitFor(t, 10*time.Second, "the new leader's function to run", func() bool { return running[next].Load() == 1 })
	for i := range running {
		if i != next && running[i].Load() != 0 {
			t.Fatalf("replica %d runs the leader function too", i)
		}
	}
}

func TestSingleReplica(t *testing.T) {
	n, err := Start(Config{ID: "solo", DataDir: t.TempDir(), BindAddr: "127.0.0.1:0", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	waitFor(t, 10*time.Second, "the single replica to lead", n.IsLeader)
	r, err := n.Propose(context.Background(), &fsm.SubmitJob{At: 1, Spec: spec(t, "solo")})
	if err != nil || r.Err != nil || r.JobID != "solo-1" {
		t.Fatalf("Propose = %+v, %v", r, err)
	}
}

func TestConfigValidate(t *testing.T) {
	base := func() Config {
		c := DefaultConfig()
		c.ID, c.DataDir, c.BindAddr = "a", "/tmp/x", ":0"
		return c
	}
	cases := []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"no id", func(c *Config) { c.ID = "" }, "ID is required"},
		{"no dir", func(c *Config) { c.DataDir = "" }, "DataDir is required"},
		{"no bind", func(c *Config) { c.BindAddr = "" }, "BindAddr is required"},
		{"lease above heartbeat", func(c *Config) { c.LeaderLeaseTimeout = time.Second }, "LeaderLeaseTimeout"},
		{"election below heartbeat", func(c *Config) { c.ElectionTimeout = time.Millisecond }, "ElectionTimeout"},
		{"self not in peers", func(c *Config) { c.Peers = []Peer{{ID: "b", Addr: "h:1"}} }, "must include"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.edit(&c)
			err := c.Validate()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestParsePeers(t *testing.T) {
	got, err := ParsePeers(" a=h0:7000, b=h1:7000 ,c=[::1]:7000")
	if err != nil || len(got) != 3 || got[1] != (Peer{"b", "h1:7000"}) || got[2].Addr != "[::1]:7000" {
		t.Fatalf("ParsePeers = %v, %v", got, err)
	}
	for _, bad := range []string{"a", "a=", "=h:1", "a=h", "a=h:1,a=h:2"} {
		if _, err := ParsePeers(bad); !errors.Is(err, ErrConfig) {
			t.Errorf("ParsePeers(%q) = %v, want ErrConfig", bad, err)
		}
	}
}

// TestMutualTLSTransport runs a cluster whose raft traffic uses mutual TLS
// and checks that it commits, and that a replica without the cluster's
// certificate cannot join the conversation.
func TestMutualTLSTransport(t *testing.T) {
	files, err := security.GenerateDevPKI(t.TempDir(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	peerTLS, err := files.Peer()
	if err != nil {
		t.Fatal(err)
	}
	log := testLogger(t)
	var peers []Peer
	for i := range 3 {
		peers = append(peers, Peer{ID: fmt.Sprintf("t%d", i), Addr: freeAddr(t)})
	}
	nodes := make([]*Node, 3)
	for i, p := range peers {
		n, err := Start(Config{ID: p.ID, DataDir: t.TempDir(), BindAddr: p.Addr, Peers: peers, TLS: peerTLS, Logger: log,
			HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond, LeaderLeaseTimeout: 150 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		nodes[i] = n
		defer n.Close()
	}
	var r *fsm.Result
	waitFor(t, 20*time.Second, "a commit over TLS", func() bool {
		for _, n := range nodes {
			if n.IsLeader() {
				r, err = n.Propose(context.Background(), &fsm.SubmitJob{At: 1, Spec: spec(t, "tls")})
				return err == nil
			}
		}
		return false
	})
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	waitFor(t, 20*time.Second, "replication over TLS", func() bool {
		for _, n := range nodes {
			if _, ok := n.FSM().Job(r.JobID); !ok {
				return false
			}
		}
		return true
	})

	// A replica without a certificate cannot handshake with the cluster.
	intruder, err := listenTCP("127.0.0.1:0", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer intruder.Close()
	noCert := peerTLS.Clone()
	noCert.Certificates = nil
	intruder.tls = noCert
	conn, err := intruder.Dial(raft.ServerAddress(peers[0].Addr), time.Second)
	if err == nil {
		// TLS 1.3 reports the rejected client certificate on first read.
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("a client without a certificate talked to a TLS replica")
	}
}
