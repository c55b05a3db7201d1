// Package etcdembed runs a real single-member etcd inside the process, on
// loopback, for local use and tests, so that one m2coord binary is enough on
// a laptop. Production points the coordinator and the workers at an external
// etcd cluster instead. The embedded server logs nothing (it reports
// harmless errors while closing).
package etcdembed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// ErrStart marks a failure to start the embedded server.
var ErrStart = errors.New("etcdembed: start")

// Server is a running embedded etcd.
type Server struct {
	e        *embed.Etcd
	endpoint string
}

// Start runs an etcd member with its data in dir, serving clients on host
// (e.g. "127.0.0.1") at a free port. It returns once the server is ready to
// serve or ctx ends.
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
	cfg := embed.NewConfig()
	cfg.Name = "m2coord"
	cfg.Dir = dir
	cu := url.URL{Scheme: "http", Host: net.JoinHostPort(host, clientPort)}
	pu := url.URL{Scheme: "http", Host: net.JoinHostPort(host, peerPort)}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.Logger = "zap"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	// Compact history hourly; worker keys are small and churn slowly.
	cfg.AutoCompactionMode = embed.CompactorModePeriodic
	cfg.AutoCompactionRetention = "1h"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStart, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("%w: %w", ErrStart, err)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("%w: %w", ErrStart, ctx.Err())
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("%w: not ready after 60s", ErrStart)
	}
	return &Server{e: e, endpoint: cu.String()}, nil
}

// Endpoint is the client URL, e.g. "http://127.0.0.1:43121".
func (s *Server) Endpoint() string { return s.endpoint }

// Err reports a fatal server error.
func (s *Server) Err() <-chan error { return s.e.Err() }

// Close stops the server and waits for it.
func (s *Server) Close() {
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
