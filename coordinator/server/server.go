// Package server owns the coordinator's gRPC services and the work its raft
// leader does: it serves the job API (JobService) and the worker API
// (WorkerService) on the leader, relays calls that reach a follower to the
// leader (or, when asked, answers them with the leader's address), watches
// worker leases in etcd and turns their expiry into WorkerLost commands, and
// runs the scheduler and commits its placements.
// All state changes go through node.Propose; the package holds no state of
// its own beyond the current term's bookkeeping.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/coordinator/membership"
	"github.com/m2train/m2train/coordinator/node"
	"github.com/m2train/m2train/coordinator/security"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// MaxMessageBytes bounds every gRPC message received or sent.
const MaxMessageBytes = 4 << 20

// MaxEventsPerCall bounds ListEvents.
const MaxEventsPerCall = 1000

// ErrConfig marks an invalid Config; the message names the field.
var ErrConfig = errors.New("coordinator: invalid server config")

// Config configures the services of one replica.
type Config struct {
	// Node is the replica's raft node (required).
	Node *node.Node
	// APIAddr is the address clients dial for this replica's gRPC API; the
	// leader records it so that followers can forward or redirect to it
	// (required).
	APIAddr string
	// NoForward makes followers answer every call with a NotLeader status
	// naming the leader's APIAddr, for the client to follow. By default
	// (false) a follower relays the call to the leader and returns its
	// answer, so that a client that reaches only one replica (through a
	// port-forward, say) needs no route to the leader; a call can still ask
	// for the redirect with the NoForwardHeader.
	NoForward bool
	// ForwardTLS is the client TLS configuration a follower dials the
	// leader's API with when relaying calls: it must trust the certificate
	// the API serves and present one the API accepts. Nil dials in plain
	// text, which suits only an API served without TLS.
	ForwardTLS *tls.Config
	// Etcd is the client for worker liveness; nil disables lease watching
	// (workers are then never marked lost).
	Etcd *clientv3.Client
	// EtcdEndpoints is told to registering workers.
	EtcdEndpoints []string
	// EtcdPrefix is the key prefix (membership.DefaultPrefix when empty).
	EtcdPrefix string
	// LeaseTTL is the worker lease TTL in seconds told to workers
	// (membership.DefaultTTL when 0).
	LeaseTTL int
	// Token, when set, is the bearer token every call must carry.
	Token string
	// ScheduleInterval is how often the leader reschedules without a state
	// change (1s when 0).
	ScheduleInterval time.Duration
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// UnaryInterceptors and StreamInterceptors wrap every call, the first
	// outermost, around the token check, so that they see rejected calls
	// too (metrics use them).
	UnaryInterceptors  []grpc.UnaryServerInterceptor
	StreamInterceptors []grpc.StreamServerInterceptor
}

// Server implements pb.JobServiceServer and pb.WorkerServiceServer.
type Server struct {
	pb.UnimplementedJobServiceServer
	pb.UnimplementedWorkerServiceServer

	cfg  Config
	node *node.Node
	log  *slog.Logger
	fwd  *forwarder
	// ready is true while this replica leads and has applied every entry of
	// earlier terms (so its reads are current).
	ready atomic.Bool
}

// New validates cfg and returns a server whose leader work starts whenever
// the node becomes leader.
func New(cfg Config) (*Server, error) {
	switch {
	case cfg.Node == nil:
		return nil, fmt.Errorf("%w: Node is required", ErrConfig)
	case cfg.APIAddr == "":
		return nil, fmt.Errorf("%w: APIAddr is required", ErrConfig)
	case cfg.LeaseTTL < 0:
		return nil, fmt.Errorf("%w: LeaseTTL must not be negative, got %d", ErrConfig, cfg.LeaseTTL)
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = membership.DefaultTTL
	}
	if cfg.ScheduleInterval == 0 {
		cfg.ScheduleInterval = time.Second
	}
	cfg.EtcdPrefix = membership.NormalizePrefix(cfg.EtcdPrefix)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, node: cfg.Node, log: log.With("node", cfg.Node.ID())}
	s.fwd = newForwarder(cfg.ForwardTLS, s.log)
	cfg.Node.WhileLeader(s.lead)
	return s, nil
}

// Close ends forwarding: later calls that a follower would relay fail with
// Unavailable, and the connection to the leader closes when the relayed
// calls in flight end. Stopping the gRPC server alone also closes that
// connection, once its last client connection has ended.
func (s *Server) Close() error {
	s.fwd.close()
	return nil
}

// GRPCServer returns a gRPC server with both services registered, message
// size limits, the configured interceptors, the token check and, inside it,
// the forwarding to the leader; creds may be nil for plaintext.
func (s *Server) GRPCServer(creds credentials.TransportCredentials) *grpc.Server {
	// The token is checked before a call is relayed, so that a follower
	// never relays a call it would refuse; the leader checks it again.
	unary := append(slices.Clone(s.cfg.UnaryInterceptors), s.unaryAuth, s.unaryForward)
	stream := append(slices.Clone(s.cfg.StreamInterceptors), s.streamAuth, s.streamForward)
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		grpc.MaxSendMsgSize(MaxMessageBytes),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	}
	if !s.cfg.NoForward {
		opts = append(opts, grpc.StatsHandler(s.fwd))
		if creds != nil && s.cfg.ForwardTLS == nil {
			s.log.Warn("the API serves TLS but ForwardTLS is not set: followers relay calls to the leader in plain text, which a leader serving TLS refuses")
		}
	}
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	g := grpc.NewServer(opts...)
	pb.RegisterJobServiceServer(g, s)
	pb.RegisterWorkerServiceServer(g, s)
	return g
}

func (s *Server) unaryAuth(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := security.CheckToken(ctx, s.cfg.Token); err != nil {
		return nil, toStatus(err, "")
	}
	return h(ctx, req)
}

func (s *Server) streamAuth(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := security.CheckToken(ss.Context(), s.cfg.Token); err != nil {
		return toStatus(err, "")
	}
	return h(srv, ss)
}

// leaderAddr returns the API address of the current leader, if known.
func (s *Server) leaderAddr() string {
	id, _ := s.node.Leader()
	if id == "" {
		return ""
	}
	addr, _ := s.node.FSM().Member(id)
	return addr
}

// checkLeader fails with a NotLeader status unless this replica leads and is
// ready to serve reads.
func (s *Server) checkLeader() error {
	if !s.node.IsLeader() {
		return s.status(node.ErrNotLeader)
	}
	if !s.ready.Load() {
		return s.status(errLeaderNotReady)
	}
	return nil
}

// status converts an error for the wire, attaching the leader's address to
// not-leader errors.
func (s *Server) status(err error) error {
	if errors.Is(err, node.ErrNotLeader) {
		return toStatus(err, s.leaderAddr())
	}
	return toStatus(err, "")
}

func now() int64 { return time.Now().UnixNano() }

// specYAML renders a stored spec for the API.
func specYAML(sp *jobspec.Spec) string {
	b, err := sp.Marshal()
	if err != nil {
		return ""
	}
	return string(b)
}

// Ready reports whether this replica leads and serves requests.
func (s *Server) Ready() bool { return s.node.IsLeader() && s.ready.Load() }
