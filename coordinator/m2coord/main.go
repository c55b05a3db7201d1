// Command m2coord runs one replica of the coordinator: the raft-replicated
// control plane that holds jobs and decides which worker runs what. Three
// replicas started from one static peer list (as a Kubernetes StatefulSet
// gives them: stable names, one flag or environment variable) form a
// cluster that survives the loss of any one; a single replica with no peer
// list and no etcd endpoints runs a real etcd embedded in-process, so that
// one binary is enough on a laptop. A cluster without an external etcd runs
// one etcd member inside every replica (--etcd-client-port,
// --etcd-peer-port). --metrics-addr serves Prometheus metrics and the
// liveness and readiness endpoints (docs/metrics.md).
//
// Every flag has an environment variable (M2_ plus the flag name in upper
// case with '-' as '_'), read when the flag is not given.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/m2train/m2train/coordinator/flagenv"
	"github.com/m2train/m2train/coordinator/membership"
	"github.com/m2train/m2train/coordinator/node"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/coordinator/server"
)

type config struct {
	id            string
	dataDir       string
	raftAddr      string
	raftAdvertise string
	apiAddr       string
	apiAdvertise  string
	// forward makes followers relay leader-only calls to the leader.
	forward       bool
	peers         string
	etcdEndpoints string
	etcdPrefix    string
	// The embedded etcd cluster's ports and bind address.
	etcdClientPort int
	etcdPeerPort   int
	etcdListenHost string
	metricsAddr    string
	leaseTTL       int
	token          string
	tokenFile      string
	tls            security.Files
	logFormat      string
	logLevel       string
	// logOutput receives the logs (os.Stderr when nil; tests set it).
	logOutput io.Writer
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "m2coord:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "m2coord:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (*config, error) {
	c := &config{}
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("m2coord", flag.ContinueOnError)
	fs.StringVar(&c.id, "id", host, "this replica's raft ID (a StatefulSet pod name)")
	fs.StringVar(&c.dataDir, "data-dir", "", "directory of the raft log, stable store and snapshots, and of the embedded etcd's data (etcd/ on loopback, etcd-member/ in a cluster) (default ./m2coord-data/ID)")
	fs.StringVar(&c.raftAddr, "raft-addr", "127.0.0.1:7401", "raft listen address")
	fs.StringVar(&c.raftAdvertise, "raft-advertise", "", "raft address other replicas dial (default: this ID's entry in --peers, else --raft-addr)")
	fs.StringVar(&c.apiAddr, "api-addr", "127.0.0.1:7400", "gRPC API listen address")
	fs.StringVar(&c.apiAdvertise, "api-advertise", "", "API address other replicas forward calls to and followers name when redirecting clients (default --api-addr, with the host name when it listens on all interfaces)")
	fs.BoolVar(&c.forward, "forward", true, "followers relay calls that need the leader to it over the API (with --tls-* as client certificate), so that a client reaching any one replica works; "+
		"false: followers answer with the leader's --api-advertise address for the client to dial")
	fs.StringVar(&c.peers, "peers", "", "static cluster: id=host:raftport,... including this replica; empty runs a single replica")
	fs.StringVar(&c.etcdEndpoints, "etcd-endpoints", "", "external etcd endpoints (comma-separated); empty runs an embedded etcd: one member per replica with --etcd-client-port and --etcd-peer-port, else (single replica only) one on loopback at a free port")
	fs.IntVar(&c.etcdClientPort, "etcd-client-port", 0, "embedded etcd cluster: every replica runs one member, named by --id, serving clients on this port of --etcd-listen-host and advertised on the host of its --peers entry; "+
		"required with --etcd-peer-port when --peers lists more than one replica and --etcd-endpoints is empty; 0: a single replica's etcd on loopback at a free port")
	fs.IntVar(&c.etcdPeerPort, "etcd-peer-port", 0, "embedded etcd cluster: the port members dial each other on (see --etcd-client-port); with --tls-* both ports use https and require client certificates")
	fs.StringVar(&c.etcdListenHost, "etcd-listen-host", "", "IP address the embedded etcd member binds, 0.0.0.0 for all interfaces (default: the host of --raft-addr)")
	fs.StringVar(&c.etcdPrefix, "etcd-prefix", membership.DefaultPrefix, "etcd key prefix")
	fs.IntVar(&c.leaseTTL, "lease-ttl", membership.DefaultTTL, "worker lease TTL in seconds, told to workers")
	fs.StringVar(&c.token, "token", "", "bearer token required on every API call (prefer --token-file)")
	fs.StringVar(&c.tokenFile, "token-file", "", "file holding the bearer token")
	fs.StringVar(&c.tls.Cert, "tls-cert", "", "certificate (PEM) for mutual TLS on the API, raft and etcd")
	fs.StringVar(&c.tls.Key, "tls-key", "", "key (PEM) of --tls-cert")
	fs.StringVar(&c.tls.CA, "tls-ca", "", "CA (PEM) that signs every component's certificate")
	fs.StringVar(&c.metricsAddr, "metrics-addr", "", "plain-HTTP listen address (e.g. 0.0.0.0:9400) of /metrics (Prometheus), /healthz (200 while the process serves) and /readyz "+
		"(200 while the gRPC API serves and raft knows a leader, else 503 and the reason); empty: off")
	fs.StringVar(&c.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := flagenv.Apply(fs); err != nil {
		return nil, err
	}
	if c.id == "" {
		return nil, errors.New("--id is required (no host name found)")
	}
	if c.dataDir == "" {
		c.dataDir = filepath.Join("m2coord-data", c.id)
	}
	if c.logFormat != "text" && c.logFormat != "json" {
		return nil, fmt.Errorf("--log-format: %q, must be text or json", c.logFormat)
	}
	return c, nil
}

func newLogger(c *config) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	out := c.logOutput
	if out == nil {
		out = os.Stderr
	}
	if c.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(out, opts)), nil
	}
	return slog.New(slog.NewTextHandler(out, opts)), nil
}

func run(ctx context.Context, c *config) error {
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	peers, err := node.ParsePeers(c.peers)
	if err != nil {
		return fmt.Errorf("--peers: %w", err)
	}
	advertise := c.raftAdvertise
	for _, p := range peers {
		if p.ID == c.id && advertise == "" {
			advertise = p.Addr
		}
	}
	token, err := security.ReadToken(c.token, c.tokenFile)
	if err != nil {
		return err
	}
	var peerTLS *tlsPair
	if c.tls.Enabled() {
		if peerTLS, err = loadTLS(c.tls); err != nil {
			return err
		}
	}

	plan, err := planEtcd(c, peers)
	if err != nil {
		return err
	}
	apiAdvertise, err := advertised(c.apiAddr, c.apiAdvertise)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// Health and metrics come first: /healthz answers while the replica
	// waits for its peers.
	obs := newObserver()
	if c.metricsAddr != "" {
		stopHTTP, err := obs.serveHTTP(c.metricsAddr, log)
		if err != nil {
			return err
		}
		defer stopHTTP()
	}

	endpoints, etcdFailed, stopEtcd, err := startEtcd(ctx, plan, log)
	if err != nil {
		return err
	}
	defer stopEtcd()
	ecfg := clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second}
	if peerTLS != nil && !plan.loopback {
		ecfg.TLS = peerTLS.client
	}
	etcd, err := clientv3.New(ecfg)
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	defer etcd.Close()

	ncfg := node.DefaultConfig()
	ncfg.ID, ncfg.DataDir, ncfg.BindAddr, ncfg.AdvertiseAddr, ncfg.Peers, ncfg.Logger = c.id, c.dataDir, c.raftAddr, advertise, peers, log
	ncfg.ApplyObserver = obs.observeApply
	if peerTLS != nil {
		ncfg.TLS = peerTLS.peer
	}
	n, err := node.Start(ncfg)
	if err != nil {
		return err
	}
	defer n.Close()
	obs.setNode(n)

	scfg := server.Config{
		Node: n, APIAddr: apiAdvertise, NoForward: !c.forward, Etcd: etcd, EtcdEndpoints: endpoints, EtcdPrefix: c.etcdPrefix,
		LeaseTTL: c.leaseTTL, Token: token, Logger: log,
		UnaryInterceptors: []grpc.UnaryServerInterceptor{obs.unary}, StreamInterceptors: []grpc.StreamServerInterceptor{obs.stream},
	}
	var creds credentials.TransportCredentials
	if peerTLS != nil {
		creds = credentials.NewTLS(peerTLS.server)
		scfg.ForwardTLS = peerTLS.client
	}
	srv, err := server.New(scfg)
	if err != nil {
		return err
	}
	// Deferred after the node's Close, so it runs before it, and after the
	// API has stopped.
	defer srv.Close()
	g := srv.GRPCServer(creds)
	obs.initMethods(g)
	lis, err := net.Listen("tcp", c.apiAddr)
	if err != nil {
		return fmt.Errorf("api listen: %w", err)
	}
	served := make(chan error, 1)
	go func() { served <- g.Serve(lis) }()
	// The listener accepts from here on; Serve takes the connections.
	obs.serving.Store(true)
	log.Info("m2coord started", "id", c.id, "api", apiAdvertise, "raft", n.RaftAddr(), "peers", len(peers), "etcd", endpoints)

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-served:
		obs.serving.Store(false)
		return fmt.Errorf("api server: %w", err)
	case err := <-etcdFailed:
		obs.serving.Store(false)
		g.Stop()
		return err
	}
	obs.serving.Store(false)
	done := make(chan struct{})
	go func() {
		g.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		g.Stop()
	}
	return nil
}

// tlsPair holds the TLS configs built from one set of files.
type tlsPair struct{ server, client, peer *tls.Config }

func loadTLS(f security.Files) (*tlsPair, error) {
	srv, err := f.Server()
	if err != nil {
		return nil, err
	}
	cli, err := f.Client("")
	if err != nil {
		return nil, err
	}
	peer, err := f.Peer()
	if err != nil {
		return nil, err
	}
	return &tlsPair{server: srv, client: cli, peer: peer}, nil
}

// advertised returns the API address to record for redirects: adv when
// set, else the listen address with the host name in place of an
// unspecified host.
func advertised(listen, adv string) (string, error) {
	if adv != "" {
		return adv, nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("--api-addr %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		h, err := os.Hostname()
		if err != nil {
			return "", fmt.Errorf("--api-advertise is required: %w", err)
		}
		host = h
	}
	return net.JoinHostPort(host, port), nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
