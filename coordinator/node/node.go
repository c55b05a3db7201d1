// Package node owns one coordinator replica's raft wiring: the durable log
// and stable store (raft-boltdb), file snapshots, the TCP (optionally mTLS)
// transport, bootstrapping from a static peer list, proposing commands to the
// replicated state machine, and running a function for as long as this
// replica leads. It knows nothing of gRPC or etcd.
package node

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
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"

	"github.com/m2train/m2train/coordinator/fsm"
)

// Sentinel errors of the package.
var (
	// ErrNotLeader is returned by Propose on a replica that does not lead.
	ErrNotLeader = errors.New("coordinator: not leader")
	// ErrUnknownOutcome is returned when leadership was lost after a command
	// was proposed: it may or may not have been committed.
	ErrUnknownOutcome = errors.New("coordinator: leadership lost, outcome unknown")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("coordinator: node closed")
	// ErrConfig marks an invalid Config; the message names the field.
	ErrConfig = errors.New("coordinator: invalid node config")
)

// Peer is one replica of the static cluster: its raft server ID and the
// address other replicas dial for raft traffic.
type Peer struct {
	ID   string
	Addr string
}

// ParsePeers parses "id=host:port,id=host:port,...", the form a Kubernetes
// StatefulSet gives through one flag or environment variable.
func ParsePeers(s string) ([]Peer, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var out []Peer
	seen := map[string]bool{}
	for i, part := range strings.Split(s, ",") {
		id, addr, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok || id == "" || addr == "" {
			return nil, fmt.Errorf("%w: peers[%d] %q must be id=host:port", ErrConfig, i, part)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("%w: peers[%d] address %q: %v", ErrConfig, i, addr, err)
		}
		if seen[id] {
			return nil, fmt.Errorf("%w: peers[%d]: id %q appears twice", ErrConfig, i, id)
		}
		seen[id] = true
		out = append(out, Peer{ID: id, Addr: addr})
	}
	return out, nil
}

// Config configures a replica. Zero durations take DefaultConfig's values.
type Config struct {
	// ID is this replica's raft server ID (a StatefulSet pod name).
	ID string
	// DataDir holds raft.db (log and stable store) and snapshots/.
	DataDir string
	// BindAddr is the raft listen address, e.g. ":7000" or "127.0.0.1:0".
	BindAddr string
	// AdvertiseAddr is the address other replicas dial; empty means the
	// listener's address (which must then not be unspecified).
	AdvertiseAddr string
	// Peers is the static cluster including this replica; empty means a
	// single-replica cluster of this node alone.
	Peers []Peer

	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	// SnapshotThreshold is the number of log entries between snapshots.
	SnapshotThreshold uint64
	SnapshotInterval  time.Duration
	// ApplyTimeout bounds Propose when the context has no deadline.
	ApplyTimeout time.Duration

	// TLS, when set, secures raft traffic: it must hold this replica's
	// certificate, require and verify client certificates, and trust the
	// cluster's CA as root and client CA.
	TLS *tls.Config
	// StreamLayer replaces the TCP listener (tests inject faults with it);
	// BindAddr, AdvertiseAddr and TLS are then ignored.
	StreamLayer raft.StreamLayer

	// Logger receives the node's and raft's logs; nil discards them.
	Logger *slog.Logger

	// ApplyObserver, when set, is called once for every command Propose
	// hands to raft, when raft answers: with the time from handing it over
	// until this leader applied it to the state machine (err nil), or until
	// it failed. A Propose whose context ends first is still observed when
	// raft answers. It runs on its own goroutine and must not block.
	ApplyObserver func(took time.Duration, err error)
}

// DefaultConfig returns timeouts for a LAN or one Kubernetes cluster: a
// follower starts an election 0.4-0.8 s after the last heartbeat, so a dead
// leader is replaced in about 0.5-2 s (tools/coordbench failover measures
// it).
func DefaultConfig() Config {
	return Config{
		HeartbeatTimeout:   400 * time.Millisecond,
		ElectionTimeout:    400 * time.Millisecond,
		LeaderLeaseTimeout: 200 * time.Millisecond,
		CommitTimeout:      20 * time.Millisecond,
		SnapshotThreshold:  4096,
		SnapshotInterval:   60 * time.Second,
		ApplyTimeout:       10 * time.Second,
	}
}

func (c *Config) fill() {
	d := DefaultConfig()
	setDur := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	setDur(&c.HeartbeatTimeout, d.HeartbeatTimeout)
	setDur(&c.ElectionTimeout, d.ElectionTimeout)
	setDur(&c.LeaderLeaseTimeout, d.LeaderLeaseTimeout)
	setDur(&c.CommitTimeout, d.CommitTimeout)
	setDur(&c.SnapshotInterval, d.SnapshotInterval)
	setDur(&c.ApplyTimeout, d.ApplyTimeout)
	if c.SnapshotThreshold == 0 {
		c.SnapshotThreshold = d.SnapshotThreshold
	}
}

// Validate names the first field that breaks a rule.
func (c Config) Validate() error {
	switch {
	case c.ID == "":
		return fmt.Errorf("%w: ID is required", ErrConfig)
	case c.DataDir == "":
		return fmt.Errorf("%w: DataDir is required", ErrConfig)
	case c.StreamLayer == nil && c.BindAddr == "":
		return fmt.Errorf("%w: BindAddr is required", ErrConfig)
	case c.LeaderLeaseTimeout > c.HeartbeatTimeout:
		return fmt.Errorf("%w: LeaderLeaseTimeout %v must not exceed HeartbeatTimeout %v", ErrConfig, c.LeaderLeaseTimeout, c.HeartbeatTimeout)
	case c.ElectionTimeout < c.HeartbeatTimeout:
		return fmt.Errorf("%w: ElectionTimeout %v must be at least HeartbeatTimeout %v", ErrConfig, c.ElectionTimeout, c.HeartbeatTimeout)
	}
	if len(c.Peers) > 0 {
		found := false
		for _, p := range c.Peers {
			found = found || p.ID == c.ID
		}
		if !found {
			return fmt.Errorf("%w: Peers must include this replica's ID %q", ErrConfig, c.ID)
		}
	}
	return nil
}

// Node is one running replica.
type Node struct {
	cfg    Config
	log    *slog.Logger
	fsm    *fsm.FSM
	raft   *raft.Raft
	trans  *raft.NetworkTransport
	store  *raftboltdb.BoltStore
	notify chan bool

	mu       sync.Mutex
	closed   bool
	leading  func(ctx context.Context)
	stopLead context.CancelFunc
	leadDone chan struct{}
	loopDone chan struct{}

	leaders *leaderWatch
}

// Start opens the stores in DataDir, starts raft and, when no state exists
// yet, bootstraps the cluster from Peers. Every replica of a new cluster may
// bootstrap with the same peer list.
func Start(cfg Config) (*Node, error) {
	cfg.fill()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	logger = logger.With("node", cfg.ID)
	hl := hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Warn, Output: &slogWriter{logger}, DisableTime: true})

	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("coordinator: data dir: %w", err)
	}
	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.DataDir, "raft.db")})
	if err != nil {
		return nil, fmt.Errorf("coordinator: open raft store: %w", err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(filepath.Join(cfg.DataDir, "snapshots"), 2, hl)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("coordinator: snapshot store: %w", err)
	}
	layer := cfg.StreamLayer
	if layer == nil {
		layer, err = listenTCP(cfg.BindAddr, cfg.AdvertiseAddr, cfg.TLS)
		if err != nil {
			store.Close()
			return nil, err
		}
	}
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: layer, MaxPool: 3, Timeout: 5 * time.Second, Logger: hl,
	})

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = cfg.CommitTimeout
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.SnapshotInterval = cfg.SnapshotInterval
	rc.Logger = hl
	notify := make(chan bool, 16)
	rc.NotifyCh = notify

	logs, err := raft.NewLogCache(512, store)
	if err != nil {
		trans.Close()
		store.Close()
		return nil, fmt.Errorf("coordinator: log cache: %w", err)
	}
	f := fsm.New()
	hasState, err := raft.HasExistingState(logs, store, snaps)
	if err != nil {
		trans.Close()
		store.Close()
		return nil, fmt.Errorf("coordinator: read raft state: %w", err)
	}
	r, err := raft.NewRaft(rc, f, logs, store, snaps, trans)
	if err != nil {
		trans.Close()
		store.Close()
		return nil, fmt.Errorf("coordinator: start raft: %w", err)
	}
	n := &Node{cfg: cfg, log: logger, fsm: f, raft: r, trans: trans, store: store, notify: notify, loopDone: make(chan struct{})}
	n.leaders = watchLeaders(r)
	if !hasState {
		peers := cfg.Peers
		if len(peers) == 0 {
			peers = []Peer{{ID: cfg.ID, Addr: string(trans.LocalAddr())}}
		}
		var conf raft.Configuration
		for _, p := range peers {
			conf.Servers = append(conf.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(p.ID), Address: raft.ServerAddress(p.Addr)})
		}
		if err := r.BootstrapCluster(conf).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			n.Close()
			return nil, fmt.Errorf("coordinator: bootstrap: %w", err)
		}
		logger.Info("bootstrapped cluster", "peers", len(peers))
	}
	go n.leadershipLoop()
	return n, nil
}

// FSM returns the replica's state machine (read it freely; change it only
// through Propose).
func (n *Node) FSM() *fsm.FSM { return n.fsm }

// ID is the replica's raft server ID.
func (n *Node) ID() string { return n.cfg.ID }

// RaftAddr is the address other replicas dial.
func (n *Node) RaftAddr() string { return string(n.trans.LocalAddr()) }

// IsLeader reports whether the replica leads now.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the current leader's server ID and raft address, empty
// when none is known.
func (n *Node) Leader() (id, addr string) {
	a, i := n.raft.LeaderWithID()
	return string(i), string(a)
}

// Stats returns raft's counters, for diagnostics.
func (n *Node) Stats() map[string]string { return n.raft.Stats() }

// Propose commits a command through raft and returns the state machine's
// result. It fails with ErrNotLeader on a follower and ErrUnknownOutcome
// when leadership was lost after the command was sent.
func (n *Node) Propose(ctx context.Context, c fsm.Command) (*fsm.Result, error) {
	b, err := fsm.Encode(c)
	if err != nil {
		return nil, err
	}
	if n.raft.State() != raft.Leader {
		return nil, ErrNotLeader
	}
	timeout := n.cfg.ApplyTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	if timeout <= 0 {
		return nil, context.DeadlineExceeded
	}
	start := time.Now()
	fut := n.raft.Apply(b, timeout)
	done := make(chan error, 1)
	go func() {
		err := fut.Error()
		if obs := n.cfg.ApplyObserver; obs != nil {
			obs(time.Since(start), err)
		}
		done <- err
	}()
	select {
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %w", ErrUnknownOutcome, ctx.Err())
	case err := <-done:
		switch {
		case err == nil:
		case errors.Is(err, raft.ErrNotLeader):
			return nil, ErrNotLeader
		case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrLeadershipTransferInProgress):
			return nil, ErrUnknownOutcome
		case errors.Is(err, raft.ErrRaftShutdown):
			return nil, ErrClosed
		case errors.Is(err, raft.ErrEnqueueTimeout):
			return nil, fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
		default:
			return nil, fmt.Errorf("coordinator: apply: %w", err)
		}
	}
	r, ok := fut.Response().(*fsm.Result)
	if !ok {
		return nil, fmt.Errorf("coordinator: apply returned %T", fut.Response())
	}
	return r, nil
}

// Barrier waits until every committed entry is applied to this leader's
// state machine, so that its reads reflect all committed writes.
func (n *Node) Barrier(ctx context.Context) error {
	timeout := n.cfg.ApplyTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	if err := n.raft.Barrier(timeout).Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return ErrNotLeader
		}
		return fmt.Errorf("coordinator: barrier: %w", err)
	}
	return nil
}

// Snapshot forces a snapshot now.
func (n *Node) Snapshot() error {
	if err := n.raft.Snapshot().Error(); err != nil {
		return fmt.Errorf("coordinator: snapshot: %w", err)
	}
	return nil
}

// WhileLeader registers fn to run each time the replica becomes leader; its
// context is cancelled when leadership is lost or the node closes, and the
// next term waits for fn to return. Call it once, before the node is
// expected to lead.
func (n *Node) WhileLeader(fn func(ctx context.Context)) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.leading = fn
	if !n.closed && n.stopLead == nil && n.raft.State() == raft.Leader {
		select {
		case n.notify <- true:
		default:
		}
	}
}

func (n *Node) leadershipLoop() {
	defer close(n.loopDone)
	for isLeader := range n.notify {
		n.mu.Lock()
		if n.closed {
			n.mu.Unlock()
			return
		}
		if isLeader && n.stopLead == nil && n.leading != nil {
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			n.stopLead, n.leadDone = cancel, done
			fn := n.leading
			go func() {
				defer close(done)
				fn(ctx)
			}()
			n.log.Info("leading")
		} else if !isLeader && n.stopLead != nil {
			n.stopLead()
			done := n.leadDone
			n.stopLead, n.leadDone = nil, nil
			n.mu.Unlock()
			<-done
			n.log.Info("stopped leading")
			continue
		}
		n.mu.Unlock()
	}
}

// Close shuts the replica down without handing leadership over (as a crash
// would, apart from flushing the stores) and releases its files and ports.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	stop, done := n.stopLead, n.leadDone
	n.stopLead, n.leadDone = nil, nil
	n.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
	err := n.raft.Shutdown().Error()
	n.leaders.stop()
	close(n.notify)
	<-n.loopDone
	if e := n.trans.Close(); err == nil {
		err = e
	}
	if e := n.store.Close(); err == nil {
		err = e
	}
	return err
}

// slogWriter forwards hclog's formatted lines to slog.
type slogWriter struct{ l *slog.Logger }

func (w *slogWriter) Write(p []byte) (int, error) {
	w.l.Warn(strings.TrimSpace(string(p)), "component", "raft")
	return len(p), nil
}
