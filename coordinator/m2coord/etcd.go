package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"

	"github.com/m2train/m2train/coordinator/etcdembed"
	"github.com/m2train/m2train/coordinator/node"
)

// etcdPlan says which etcd this replica uses: an external cluster, a
// single-member etcd on loopback (one replica, the local default), or its
// member of an etcd cluster embedded in every replica.
type etcdPlan struct {
	// external lists the endpoints of an etcd run elsewhere.
	external []string
	// loopback runs a single-member etcd on loopback at free ports, with
	// its data in dir.
	loopback bool
	dir      string
	// member is this replica's member of an embedded cluster.
	member *etcdembed.Config
}

// planEtcd reads the etcd flags. Without --etcd-endpoints, every replica of
// a cluster runs one etcd member named by its --id: it binds
// --etcd-listen-host (by default the host of --raft-addr) at the client and
// peer ports, and advertises the host of its --peers entry (a single replica
// without --peers advertises the host of --raft-advertise, else the listen
// host). Every replica binds the same ports on its own host.
func planEtcd(c *config, peers []node.Peer) (*etcdPlan, error) {
	external := splitList(c.etcdEndpoints)
	embedded := c.etcdClientPort != 0 || c.etcdPeerPort != 0 || c.etcdListenHost != ""
	if len(external) > 0 {
		if embedded {
			return nil, errors.New("--etcd-client-port, --etcd-peer-port and --etcd-listen-host configure the embedded etcd; leave them unset with --etcd-endpoints")
		}
		return &etcdPlan{external: external}, nil
	}
	for _, p := range []struct {
		flag string
		v    int
	}{{"--etcd-client-port", c.etcdClientPort}, {"--etcd-peer-port", c.etcdPeerPort}} {
		if p.v < 0 || p.v > 65535 {
			return nil, fmt.Errorf("%s: %d is not a port (0-65535)", p.flag, p.v)
		}
	}
	dir := filepath.Join(c.dataDir, "etcd")
	if c.etcdClientPort == 0 && c.etcdPeerPort == 0 {
		if len(peers) > 1 {
			return nil, fmt.Errorf("--etcd-client-port and --etcd-peer-port are required with %d replicas in --peers and no --etcd-endpoints: "+
				"every replica then runs one member of an embedded etcd cluster (an etcd of its own per replica would split worker membership)", len(peers))
		}
		if c.etcdListenHost != "" {
			return nil, errors.New("--etcd-listen-host needs --etcd-client-port and --etcd-peer-port")
		}
		return &etcdPlan{loopback: true, dir: dir}, nil
	}
	if c.etcdClientPort == 0 || c.etcdPeerPort == 0 {
		return nil, fmt.Errorf("--etcd-client-port and --etcd-peer-port must be given together (got %d and %d)", c.etcdClientPort, c.etcdPeerPort)
	}
	if c.etcdClientPort == c.etcdPeerPort {
		return nil, fmt.Errorf("--etcd-client-port and --etcd-peer-port must differ (both %d)", c.etcdClientPort)
	}

	listen := c.etcdListenHost
	if listen == "" {
		h, _, err := net.SplitHostPort(c.raftAddr)
		if err != nil {
			return nil, fmt.Errorf("--raft-addr %q: %w", c.raftAddr, err)
		}
		listen = h
	}
	if listen == "" {
		listen = "0.0.0.0"
	}
	if listen != "localhost" && net.ParseIP(listen) == nil {
		return nil, fmt.Errorf("--etcd-listen-host %q must be an IP address (etcd binds addresses, not names); it defaults to the host of --raft-addr", listen)
	}

	scheme := "http"
	var tls *etcdembed.TLSFiles
	if c.tls.Enabled() {
		scheme = "https"
		tls = &etcdembed.TLSFiles{Cert: c.tls.Cert, Key: c.tls.Key, CA: c.tls.CA}
	}
	member := func(id, host string) etcdembed.Member {
		return etcdembed.Member{
			Name:      id,
			PeerURL:   scheme + "://" + net.JoinHostPort(host, strconv.Itoa(c.etcdPeerPort)),
			ClientURL: scheme + "://" + net.JoinHostPort(host, strconv.Itoa(c.etcdClientPort)),
		}
	}
	var members []etcdembed.Member
	if len(peers) == 0 {
		host := listen
		if c.raftAdvertise != "" {
			h, _, err := net.SplitHostPort(c.raftAdvertise)
			if err != nil {
				return nil, fmt.Errorf("--raft-advertise %q: %w", c.raftAdvertise, err)
			}
			host = h
		}
		if !dialable(host) {
			return nil, fmt.Errorf("the embedded etcd member would advertise %q, which others cannot dial: set --raft-advertise or --etcd-listen-host to this replica's address", host)
		}
		members = append(members, member(c.id, host))
	}
	self := false
	for _, p := range peers {
		host, _, _ := net.SplitHostPort(p.Addr) // ParsePeers checked the form
		if !dialable(host) {
			return nil, fmt.Errorf("--peers: the host %q of %s is not an address other replicas can dial (the embedded etcd advertises it)", host, p.ID)
		}
		self = self || p.ID == c.id
		members = append(members, member(p.ID, host))
	}
	if len(peers) > 0 && !self {
		return nil, fmt.Errorf("--peers must include this replica's --id %q", c.id)
	}
	port := func(p int) string { return net.JoinHostPort(listen, strconv.Itoa(p)) }
	cfg := &etcdembed.Config{
		Name: c.id,
		// Not the loopback etcd's directory: a member must not restart from
		// the data of a single-member cluster.
		Dir:          filepath.Join(c.dataDir, "etcd-member"),
		ListenClient: port(c.etcdClientPort),
		ListenPeer:   port(c.etcdPeerPort),
		Members:      members,
		TLS:          tls,
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("embedded etcd: %w", err)
	}
	return &etcdPlan{member: cfg}, nil
}

func dialable(host string) bool {
	ip := net.ParseIP(host)
	return host != "" && (ip == nil || !ip.IsUnspecified())
}

// startEtcd starts the embedded etcd the plan calls for, if any, and returns
// the client endpoints, a channel that reports the server's fatal error, and
// a function that stops it. A loopback etcd is ready on return; a cluster
// member serves once a quorum of the replicas runs, which it logs.
func startEtcd(ctx context.Context, p *etcdPlan, log *slog.Logger) (endpoints []string, failed <-chan error, stop func(), err error) {
	var srv *etcdembed.Server
	switch {
	case p.loopback:
		if srv, err = etcdembed.Start(ctx, p.dir, "127.0.0.1"); err != nil {
			return nil, nil, nil, err
		}
		log.Info("embedded etcd", "endpoint", srv.Endpoint(), "dir", p.dir)
	case p.member != nil:
		cfg := *p.member
		cfg.Logger = log
		if srv, err = etcdembed.StartMember(cfg); err != nil {
			return nil, nil, nil, err
		}
		log.Info("embedded etcd member started; it serves once a quorum of the replicas runs",
			"member", cfg.Name, "client", cfg.ListenClient, "peer", cfg.ListenPeer, "cluster", len(cfg.Members), "dir", cfg.Dir)
	default:
		return p.external, nil, func() {}, nil
	}
	errc := make(chan error, 1)
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.WaitReady(wctx); err != nil {
			if wctx.Err() == nil {
				errc <- err
			}
			return
		}
		if p.member != nil {
			log.Info("embedded etcd member ready", "member", p.member.Name)
		}
		select {
		case err, ok := <-srv.Err():
			if ok && err != nil {
				errc <- fmt.Errorf("embedded etcd: %w", err)
			}
		case <-wctx.Done():
		}
	}()
	stop = func() {
		cancel()
		<-done
		srv.Close()
	}
	return srv.Endpoints(), errc, stop, nil
}
