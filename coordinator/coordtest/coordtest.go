// Package coordtest runs whole coordinator clusters inside one process for
// tests and benchmarks: n replicas, each a raft node over loopback TCP with
// its gRPC API on its own loopback port, optionally attached to an etcd. A
// replica can be killed and restarted from its data directory on the same
// addresses. It is not for production use.
package coordtest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/node"
	"github.com/m2train/m2train/coordinator/server"
)

// Options configures a cluster. Zero values take the defaults noted.
type Options struct {
	// Replicas is the number of replicas (3 when 0).
	Replicas int
	// Dir holds the replicas' data directories (a new temporary directory
	// when empty; Close removes only a directory it created).
	Dir string
	// EtcdEndpoints, when set, attach every replica to that etcd.
	EtcdEndpoints []string
	// EtcdPrefix isolates this cluster's keys.
	EtcdPrefix string
	// LeaseTTL is told to workers (membership default when 0).
	LeaseTTL int
	// Token, when set, is required on every call.
	Token string
	// Node adjusts each replica's node config (timeouts); nil keeps the
	// production defaults.
	Node func(*node.Config)
	// Logger receives every replica's logs; nil discards them.
	Logger *slog.Logger
}

// Replica is one running (or killed) replica.
type Replica struct {
	ID       string
	Dir      string
	RaftAddr string
	APIAddr  string

	Node   *node.Node
	Server *server.Server
	GRPC   *grpc.Server
	etcd   *clientv3.Client
	served chan struct{}

	// Listeners that hold the replica's ports from Start until its first
	// start takes them, so that no other socket of a busy machine (the
	// other replicas' raft dials among them) gets a port in between.
	raftHold, apiHold net.Listener
}

// Cluster is a running set of replicas.
type Cluster struct {
	opts     Options
	ownDir   bool
	peers    []node.Peer
	mu       sync.Mutex
	replicas []*Replica
}

// Start starts every replica and returns without waiting for a leader.
func Start(opts Options) (*Cluster, error) {
	if opts.Replicas == 0 {
		opts.Replicas = 3
	}
	c := &Cluster{opts: opts}
	if c.opts.Dir == "" {
		d, err := os.MkdirTemp("", "coordtest-")
		if err != nil {
			return nil, err
		}
		c.opts.Dir, c.ownDir = d, true
	}
	for i := range opts.Replicas {
		id := fmt.Sprintf("c%d", i)
		r := &Replica{ID: id, Dir: filepath.Join(c.opts.Dir, id)}
		c.replicas = append(c.replicas, r)
		var err error
		if r.raftHold, err = net.Listen("tcp", "127.0.0.1:0"); err == nil {
			r.apiHold, err = net.Listen("tcp", "127.0.0.1:0")
		}
		if err != nil {
			c.Close()
			return nil, err
		}
		r.RaftAddr, r.APIAddr = r.raftHold.Addr().String(), r.apiHold.Addr().String()
		c.peers = append(c.peers, node.Peer{ID: id, Addr: r.RaftAddr})
	}
	for i := range c.replicas {
		if err := c.Restart(i); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// FastNode sets raft timeouts that suit tests on a busy machine: elections
// within about a second, without spurious ones.
func FastNode(cfg *node.Config) {
	cfg.HeartbeatTimeout = 300 * time.Millisecond
	cfg.ElectionTimeout = 300 * time.Millisecond
	cfg.LeaderLeaseTimeout = 150 * time.Millisecond
}

// FreeAddr returns a loopback address whose port was free a moment ago.
func FreeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// MustFreeAddr is FreeAddr for a test, which it fails when no port is free.
func MustFreeAddr(t testing.TB) string {
	t.Helper()
	addr, err := FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// Replica returns replica i.
func (c *Cluster) Replica(i int) *Replica {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.replicas[i]
}

// Len is the number of replicas.
func (c *Cluster) Len() int { return len(c.replicas) }

// Addrs returns every replica's API address.
func (c *Cluster) Addrs() []string {
	out := make([]string, len(c.replicas))
	for i, r := range c.replicas {
		out[i] = r.APIAddr
	}
	return out
}

// Client returns a client that knows every replica.
func (c *Cluster) Client() (*client.Client, error) {
	return client.New(client.Config{Addrs: c.Addrs(), Token: c.opts.Token})
}

// Restart starts replica i (again) from its data directory on its
// addresses.
func (c *Cluster) Restart(i int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.replicas[i]
	if r.Node != nil {
		return fmt.Errorf("coordtest: replica %s is running", r.ID)
	}
	cfg := node.Config{ID: r.ID, DataDir: r.Dir, BindAddr: r.RaftAddr, Peers: c.peers, Logger: c.opts.Logger}
	if c.opts.Node != nil {
		c.opts.Node(&cfg)
	}
	if r.raftHold != nil {
		// The node listens on the address itself: free the port just before.
		r.raftHold.Close()
		r.raftHold = nil
	}
	n, err := node.Start(cfg)
	if err != nil {
		return err
	}
	var etcd *clientv3.Client
	if len(c.opts.EtcdEndpoints) > 0 {
		etcd, err = clientv3.New(clientv3.Config{Endpoints: c.opts.EtcdEndpoints, DialTimeout: 5 * time.Second})
		if err != nil {
			n.Close()
			return err
		}
	}
	srv, err := server.New(server.Config{
		Node: n, APIAddr: r.APIAddr, Etcd: etcd, EtcdEndpoints: c.opts.EtcdEndpoints, EtcdPrefix: c.opts.EtcdPrefix,
		LeaseTTL: c.opts.LeaseTTL, Token: c.opts.Token, Logger: c.opts.Logger,
	})
	if err != nil {
		n.Close()
		return err
	}
	lis := r.apiHold
	r.apiHold = nil
	if lis == nil {
		if lis, err = listenRetry(r.APIAddr); err != nil {
			n.Close()
			return err
		}
	}
	g := srv.GRPCServer(nil)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = g.Serve(lis)
	}()
	r.Node, r.Server, r.GRPC, r.etcd, r.served = n, srv, g, etcd, served
	return nil
}

// listenRetry listens on addr, retrying briefly while a just-closed
// listener's port is released.
func listenRetry(addr string) (net.Listener, error) {
	var err error
	for range 50 {
		var l net.Listener
		if l, err = net.Listen("tcp", addr); err == nil {
			return l, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, err
}

// Kill stops replica i abruptly: its API stops at once and raft shuts down
// without handing leadership over. Its data directory stays.
func (c *Cluster) Kill(i int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.kill(c.replicas[i])
}

func (c *Cluster) kill(r *Replica) error {
	// A replica that never started still holds its ports.
	if r.raftHold != nil {
		r.raftHold.Close()
		r.raftHold = nil
	}
	if r.apiHold != nil {
		r.apiHold.Close()
		r.apiHold = nil
	}
	if r.Node == nil {
		return nil
	}
	r.GRPC.Stop()
	<-r.served
	err := r.Node.Close()
	if r.etcd != nil {
		err = errors.Join(err, r.etcd.Close())
	}
	r.Node, r.Server, r.GRPC, r.etcd = nil, nil, nil, nil
	return err
}

// Leader waits for a running replica to lead and be ready to serve, and
// returns its index.
func (c *Cluster) Leader(ctx context.Context) (int, error) {
	for {
		c.mu.Lock()
		for i, r := range c.replicas {
			if r.Node != nil && r.Node.IsLeader() && r.Server.Ready() {
				c.mu.Unlock()
				return i, nil
			}
		}
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("coordtest: no leader: %w", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Close kills every replica and removes the data directory if Start made
// it.
func (c *Cluster) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var err error
	for _, r := range c.replicas {
		err = errors.Join(err, c.kill(r))
	}
	if c.ownDir {
		err = errors.Join(err, os.RemoveAll(c.opts.Dir))
	}
	return err
}
