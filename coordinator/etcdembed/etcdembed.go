// Package etcdembed runs a real etcd member inside the process. Start runs a
// single member on loopback at free ports, for local use and tests, so that
// one m2coord binary is enough on a laptop. StartMember runs one member of a
// static cluster whose members live in the coordinator replicas, so that a
// multi-replica coordinator needs no etcd of its own; production may also
// point the coordinator and the workers at an external etcd cluster.
//
// The package starts and stops members; it does not change a cluster's
// membership (adding or removing members is etcd's own operation).
package etcdembed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/storage/wal"
	"go.uber.org/zap"
)

// Sentinel errors of the package.
var (
	// ErrStart marks a failure to start the embedded server.
	ErrStart = errors.New("etcdembed: start")
	// ErrConfig marks an invalid Config; the message names the field and
	// the rule.
	ErrConfig = errors.New("etcdembed: invalid config")
)

// DefaultClusterToken is the initial cluster token of a cluster started
// with an empty Config.ClusterToken.
const DefaultClusterToken = "m2train-coordinator"

// Member is one member of a static cluster: its name and the URLs the other
// members and the clients dial.
type Member struct {
	// Name is the member's name (a coordinator replica's ID).
	Name string
	// PeerURL is the URL other members dial, e.g. "https://coord-1.coord:2380".
	PeerURL string
	// ClientURL is the URL clients dial, e.g. "https://coord-1.coord:2379".
	ClientURL string
}

// TLSFiles names the PEM files that secure a member: its certificate and
// key (used as both server and client certificate) and the CA that signs
// every member's and client's certificate.
type TLSFiles struct {
	Cert string
	Key  string
	CA   string
}

// Config configures one member of a static cluster.
type Config struct {
	// Name is this member's name; Members must hold it (required).
	Name string
	// Dir holds the member's data (required). A Dir that holds a
	// write-ahead log restarts the member from it; the cluster settings
	// below are then ignored by etcd, as the cluster already exists.
	Dir string
	// ListenClient and ListenPeer are the host:port addresses the member
	// binds for clients and for other members (required). The host must be
	// an IP address (0.0.0.0 for every interface) or "localhost".
	ListenClient string
	ListenPeer   string
	// Members is the whole cluster, this member included (required). Its
	// URLs use https when TLS is set, else http.
	Members []Member
	// TLS, when set, secures client and peer traffic: both sides present a
	// certificate signed by the CA.
	TLS *TLSFiles
	// ClusterToken distinguishes this cluster from others while it
	// bootstraps (DefaultClusterToken when empty).
	ClusterToken string
	// Logger receives the member's warnings and errors; nil discards them.
	Logger *slog.Logger
}

// Validate names the first field that breaks a rule.
func (c Config) Validate() error {
	switch {
	case c.Name == "":
		return fmt.Errorf("%w: Name is required", ErrConfig)
	case c.Dir == "":
		return fmt.Errorf("%w: Dir is required", ErrConfig)
	case len(c.Members) == 0:
		return fmt.Errorf("%w: Members must list the whole cluster, this member included", ErrConfig)
	}
	if err := checkListen("ListenClient", c.ListenClient); err != nil {
		return err
	}
	if err := checkListen("ListenPeer", c.ListenPeer); err != nil {
		return err
	}
	if c.TLS != nil && (c.TLS.Cert == "" || c.TLS.Key == "" || c.TLS.CA == "") {
		return fmt.Errorf("%w: TLS needs Cert, Key and CA (got %q, %q, %q)", ErrConfig, c.TLS.Cert, c.TLS.Key, c.TLS.CA)
	}
	scheme := c.scheme()
	names := map[string]bool{}
	urls := map[string]string{}
	for i, m := range c.Members {
		if m.Name == "" {
			return fmt.Errorf("%w: Members[%d].Name is required", ErrConfig, i)
		}
		if names[m.Name] {
			return fmt.Errorf("%w: Members[%d]: name %q appears twice", ErrConfig, i, m.Name)
		}
		names[m.Name] = true
		for _, f := range []struct{ field, v string }{{"PeerURL", m.PeerURL}, {"ClientURL", m.ClientURL}} {
			field := fmt.Sprintf("Members[%d].%s", i, f.field)
			if err := checkURL(field, f.v, scheme); err != nil {
				return err
			}
			if prev, ok := urls[f.v]; ok {
				return fmt.Errorf("%w: %s %q is also %s", ErrConfig, field, f.v, prev)
			}
			urls[f.v] = field
		}
	}
	if !names[c.Name] {
		return fmt.Errorf("%w: Members must include this member's name %q", ErrConfig, c.Name)
	}
	return nil
}

func (c Config) scheme() string {
	if c.TLS != nil {
		return "https"
	}
	return "http"
}

func (c Config) self() Member {
	i := slices.IndexFunc(c.Members, func(m Member) bool { return m.Name == c.Name })
	return c.Members[i]
}

func checkListen(field, addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: %s %q must be host:port: %v", ErrConfig, field, addr, err)
	}
	if host != "localhost" && net.ParseIP(host) == nil {
		return fmt.Errorf("%w: %s %q: the host must be an IP address or localhost (etcd binds addresses, not names)", ErrConfig, field, addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%w: %s %q: the port must be in [1, 65535]", ErrConfig, field, addr)
	}
	return nil
}

func checkURL(field, s, scheme string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%w: %s %q: %v", ErrConfig, field, s, err)
	}
	if u.Scheme != scheme {
		return fmt.Errorf("%w: %s %q: the scheme must be %s (https exactly when TLS is set)", ErrConfig, field, s, scheme)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" || port == "" || u.Path != "" && u.Path != "/" {
		return fmt.Errorf("%w: %s %q must be %s://host:port", ErrConfig, field, s, scheme)
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return fmt.Errorf("%w: %s %q: %s is not an address others can dial", ErrConfig, field, s, host)
	}
	return nil
}

// Server is a running embedded etcd member.
type Server struct {
	e         *embed.Etcd
	endpoint  string
	endpoints []string
	log       *slogCore
}

// StartMember starts this member of a static cluster and returns once it
// listens; it serves clients only when a quorum of the cluster's members
// runs (Ready). The first start in an empty Dir bootstraps the member as
// part of a new cluster; a later start reuses the data in Dir and rejoins.
// A member whose data was lost while the others kept theirs cannot join
// this way: etcd refuses it ("member ... has already been bootstrapped"),
// and it must be removed and added again with etcd's member commands.
func StartMember(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	self := cfg.self()
	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	scheme := cfg.scheme()
	lc := url.URL{Scheme: scheme, Host: cfg.ListenClient}
	lp := url.URL{Scheme: scheme, Host: cfg.ListenPeer}
	ac, _ := url.Parse(self.ClientURL)
	ap, _ := url.Parse(self.PeerURL)
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{lc}, []url.URL{*ac}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{lp}, []url.URL{*ap}
	initial := ""
	for i, m := range cfg.Members {
		if i > 0 {
			initial += ","
		}
		initial += m.Name + "=" + m.PeerURL
	}
	ec.InitialCluster = initial
	ec.InitialClusterToken = cfg.ClusterToken
	if ec.InitialClusterToken == "" {
		ec.InitialClusterToken = DefaultClusterToken
	}
	// A member with a log restarts from it whatever the state says; saying
	// "existing" then keeps the intent plain in etcd's own checks.
	ec.ClusterState = embed.ClusterStateFlagNew
	if wal.Exist(filepath.Join(cfg.Dir, "member", "wal")) {
		ec.ClusterState = embed.ClusterStateFlagExisting
	}
	if t := cfg.TLS; t != nil {
		info := transport.TLSInfo{CertFile: t.Cert, KeyFile: t.Key, TrustedCAFile: t.CA, ClientCertAuth: true}
		ec.ClientTLSInfo = info
		// Every certificate is signed by the cluster's CA, which is what
		// admits a peer (as on the coordinator's raft transport); the names
		// in a peer's certificate need not resolve to the address it
		// connects from (a shared or wildcard certificate, pod IPs).
		info.SkipClientSANVerify = true
		ec.PeerTLSInfo = info
	}
	core := newSlogCore(cfg.Logger)
	ec.Logger = "zap"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.New(core))
	// Compact history hourly; worker keys are small and churn slowly.
	ec.AutoCompactionMode = embed.CompactorModePeriodic
	ec.AutoCompactionRetention = "1h"
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("%w: member %s: %w", ErrStart, cfg.Name, err)
	}
	eps := make([]string, len(cfg.Members))
	for i, m := range cfg.Members {
		eps[i] = m.ClientURL
	}
	return &Server{e: e, endpoint: self.ClientURL, endpoints: eps, log: core}, nil
}

// Start runs a single-member etcd with its data in dir, serving clients on
// host (e.g. "127.0.0.1") at a free port. It returns once the server is
// ready to serve or ctx ends. It logs nothing.
func Start(ctx context.Context, dir, host string) (*Server, error) {
	if host == "" {
		host = "127.0.0.1"
	}
	clientPort, err := freePort(host)
	if err != nil {
		return nil, err
	}
	peerPort, err := freePort(host)
	if err != nil {
		return nil, err
	}
	client := net.JoinHostPort(host, clientPort)
	peer := net.JoinHostPort(host, peerPort)
	s, err := StartMember(Config{
		Name: "m2coord", Dir: dir, ListenClient: client, ListenPeer: peer,
		Members: []Member{{Name: "m2coord", PeerURL: "http://" + peer, ClientURL: "http://" + client}},
		// The token etcd uses when none is given, so that data directories
		// of earlier versions keep working.
		ClusterToken: "etcd-cluster",
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := s.WaitReady(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Endpoint is this member's client URL, e.g. "http://127.0.0.1:43121".
func (s *Server) Endpoint() string { return s.endpoint }

// Endpoints are the client URLs of every member of the cluster.
func (s *Server) Endpoints() []string { return slices.Clone(s.endpoints) }

// Ready is closed once the member serves clients: it has joined a cluster
// with a quorum of members running.
func (s *Server) Ready() <-chan struct{} { return s.e.Server.ReadyNotify() }

// WaitReady waits until the member serves clients, fails, or ctx ends.
func (s *Server) WaitReady(ctx context.Context) error {
	select {
	case <-s.e.Server.ReadyNotify():
		return nil
	case err := <-s.e.Err():
		return fmt.Errorf("%w: %w", ErrStart, err)
	case <-s.e.Server.StopNotify():
		return fmt.Errorf("%w: the server stopped before it was ready", ErrStart)
	case <-ctx.Done():
		return fmt.Errorf("%w: not ready: %w", ErrStart, context.Cause(ctx))
	}
}

// Err reports a fatal server error.
func (s *Server) Err() <-chan error { return s.e.Err() }

// Close stops the server and waits for it. The member's log goes quiet
// first: etcd reports harmless errors while its listeners close.
func (s *Server) Close() {
	s.log.quiet.Store(true)
	s.e.Close()
	<-s.e.Server.StopNotify()
}

func freePort(host string) (string, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", fmt.Errorf("%w: pick a port: %w", ErrStart, err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port, nil
}
