package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/m2train/m2train/coordinator/node"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// Metadata keys of forwarding. A follower relays a call that needs the
// leader to the leader itself, unless the call says otherwise.
const (
	// ForwardedHeader marks a call relayed by a follower; its value is the
	// relaying replica's ID. A replica that receives such a call and does
	// not lead answers NotLeader instead of relaying it again, so a call
	// makes at most one hop.
	ForwardedHeader = "m2-forwarded-by"
	// NoForwardHeader, sent with any value by a client, asks a follower to
	// answer NotLeader with the leader's address instead of relaying the
	// call (the behaviour of servers with Config.NoForward).
	NoForwardHeader = "m2-no-forward"
)

// rpcTypes are the message types of one method that needs the leader.
type rpcTypes struct {
	in, out protoreflect.MessageType
}

// leaderMethods maps the full name (/package.Service/Method) of every method
// of the job and worker services to its message types. Every one of them
// needs the leader: writes go through raft, and reads must be current.
var leaderMethods = func() map[string]rpcTypes {
	out := map[string]rpcTypes{}
	svcs := pb.File_coordinator_v1_coordinator_proto.Services()
	for i := range svcs.Len() {
		sd := svcs.Get(i)
		for j := range sd.Methods().Len() {
			md := sd.Methods().Get(j)
			in, err := protoregistry.GlobalTypes.FindMessageByName(md.Input().FullName())
			if err != nil {
				panic(fmt.Sprintf("server: input of %s: %v", md.FullName(), err))
			}
			res, err := protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName())
			if err != nil {
				panic(fmt.Sprintf("server: output of %s: %v", md.FullName(), err))
			}
			out["/"+string(sd.FullName())+"/"+string(md.Name())] = rpcTypes{in: in, out: res}
		}
	}
	return out
}()

// forwarder holds the connection to the leader that a follower relays calls
// over. The connection is replaced when the leader's address changes; the
// previous one closes once the calls still using it end. It lives while the
// API has clients connected: as the gRPC server's stats handler the
// forwarder counts their connections and closes its own after the last one
// ends, so that a stopped server leaves no connection behind, and dials
// again for the next relayed call.
type forwarder struct {
	creds credentials.TransportCredentials
	log   *slog.Logger

	mu      sync.Mutex
	cur     *leaderConn
	clients int    // open client connections of the API
	logged  string // the leader address last logged
	closed  bool
}

// leaderConn is one connection to a leader's API, counted by the calls
// that use it.
type leaderConn struct {
	addr    string
	cc      *grpc.ClientConn
	refs    int
	retired bool
}

func newForwarder(tlsCfg *tls.Config, log *slog.Logger) *forwarder {
	creds := insecure.NewCredentials()
	if tlsCfg != nil {
		creds = credentials.NewTLS(tlsCfg.Clone())
	}
	return &forwarder{creds: creds, log: log}
}

// acquire returns a connection to addr that the caller must release.
func (f *forwarder) acquire(addr string) (*leaderConn, error) {
	var old *grpc.ClientConn
	defer func() { closeConn(old, f.log) }()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, node.ErrClosed
	}
	if f.cur == nil || f.cur.addr != addr {
		cc, err := grpc.NewClient(addr,
			grpc.WithTransportCredentials(f.creds),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes), grpc.MaxCallSendMsgSize(MaxMessageBytes)),
			// The leader is on the same network: retry a lost connection
			// within about a second rather than after grpc's default
			// backoff of up to two minutes.
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
				MinConnectTimeout: 5 * time.Second,
			}),
		)
		if err != nil {
			return nil, fmt.Errorf("%w: dial leader at %s: %v", errNoLeader, addr, err)
		}
		if f.cur != nil {
			old = f.retireLocked(f.cur)
		}
		if addr != f.logged {
			f.log.Info("relaying calls to the leader", "addr", addr)
			f.logged = addr
		}
		f.cur = &leaderConn{addr: addr, cc: cc}
	}
	f.cur.refs++
	return f.cur, nil
}

// release ends one call's use of lc. A call that outlived the last client
// connection (a server stopped without waiting for its handlers) retires
// the connection it used, as that connection's end would have.
func (f *forwarder) release(lc *leaderConn) {
	f.mu.Lock()
	lc.refs--
	var done *grpc.ClientConn
	switch {
	case lc.retired && lc.refs == 0:
		done = lc.cc
	case lc == f.cur && f.clients == 0:
		done = f.dropLocked()
	}
	f.mu.Unlock()
	closeConn(done, f.log)
}

// retireLocked marks lc for closing once its calls end; it returns lc's
// connection when none is in flight, for the caller to close after
// unlocking.
func (f *forwarder) retireLocked(lc *leaderConn) *grpc.ClientConn {
	lc.retired = true
	if lc.refs == 0 {
		return lc.cc
	}
	return nil
}

// dropLocked retires the current connection, if any.
func (f *forwarder) dropLocked() *grpc.ClientConn {
	if f.cur == nil {
		return nil
	}
	cc := f.retireLocked(f.cur)
	f.cur = nil
	return cc
}

func closeConn(cc *grpc.ClientConn, log *slog.Logger) {
	if cc == nil {
		return
	}
	if err := cc.Close(); err != nil {
		log.Warn("close connection to the leader", "addr", cc.Target(), "err", err)
	}
}

// close refuses further forwarding and closes the current connection once
// its calls end (at once when none is in flight).
func (f *forwarder) close() {
	f.mu.Lock()
	f.closed = true
	cc := f.dropLocked()
	f.mu.Unlock()
	closeConn(cc, f.log)
}

// TagConn implements stats.Handler.
func (f *forwarder) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }

// HandleConn implements stats.Handler: it counts the API's client
// connections and retires the connection to the leader when none is left.
func (f *forwarder) HandleConn(_ context.Context, cs stats.ConnStats) {
	var idle *grpc.ClientConn
	f.mu.Lock()
	switch cs.(type) {
	case *stats.ConnBegin:
		f.clients++
	case *stats.ConnEnd:
		if f.clients--; f.clients == 0 {
			idle = f.dropLocked()
		}
	}
	f.mu.Unlock()
	closeConn(idle, f.log)
}

// TagRPC implements stats.Handler.
func (f *forwarder) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

// HandleRPC implements stats.Handler.
func (f *forwarder) HandleRPC(context.Context, stats.RPCStats) {}

// route decides how this replica serves a call: locally (nil, nil), relayed
// over the returned connection to the leader, or not at all (an error
// status, when the call should be relayed but no leader is known).
func (s *Server) route(ctx context.Context, method string, clientStream bool) (*leaderConn, error) {
	if s.cfg.NoForward || clientStream {
		// The API has no client-streaming methods; should one be added,
		// its followers redirect rather than relay it.
		return nil, nil
	}
	if _, ok := leaderMethods[method]; !ok {
		return nil, nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if len(md.Get(ForwardedHeader)) > 0 || len(md.Get(NoForwardHeader)) > 0 {
		// Served here: a follower answers NotLeader, so that a relayed
		// call is never relayed again.
		return nil, nil
	}
	if s.node.IsLeader() {
		return nil, nil
	}
	id, _ := s.node.Leader()
	if id == "" {
		return nil, toStatus(fmt.Errorf("%w: replica %s knows no leader (an election is in progress or no quorum is reachable); retry", errNoLeader, s.node.ID()), "")
	}
	addr, _ := s.node.FSM().Member(id)
	switch {
	case addr == "":
		return nil, toStatus(fmt.Errorf("%w: leader %s has not recorded its API address yet; retry", errNoLeader, id), "")
	case id == s.node.ID() || addr == s.cfg.APIAddr:
		// Raft names this replica leader while it is not (yet) one.
		return nil, toStatus(fmt.Errorf("%w: replica %s is changing role; retry", errNoLeader, id), "")
	}
	lc, err := s.fwd.acquire(addr)
	if err != nil {
		return nil, toStatus(err, "")
	}
	return lc, nil
}

// forwardContext returns the outgoing context of a relayed call: the
// caller's deadline, cancellation and metadata (its bearer token among
// them), without the headers that the transport sets itself, plus the
// forwarding marker.
func (s *Server) forwardContext(ctx context.Context) context.Context {
	in, _ := metadata.FromIncomingContext(ctx)
	out := make(metadata.MD, len(in)+1)
	for k, v := range in {
		if strings.HasPrefix(k, ":") || transportHeaders[k] {
			continue
		}
		out[k] = slices.Clone(v)
	}
	out.Set(ForwardedHeader, s.node.ID())
	return metadata.NewOutgoingContext(ctx, out)
}

// transportHeaders are the incoming headers that gRPC sets on every call
// itself, and the forwarding headers, which the relay sets afresh.
var transportHeaders = map[string]bool{
	"content-type": true, "user-agent": true, "te": true,
	"grpc-accept-encoding": true, "grpc-encoding": true, "grpc-timeout": true,
	ForwardedHeader: true, NoForwardHeader: true,
}

// unaryForward relays a unary call to the leader when route says so, and
// returns the leader's answer as it came: response, or status with its code,
// message and details.
func (s *Server) unaryForward(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	lc, err := s.route(ctx, info.FullMethod, false)
	if err != nil {
		return nil, err
	}
	if lc == nil {
		return h(ctx, req)
	}
	defer s.fwd.release(lc)
	reply := leaderMethods[info.FullMethod].out.New().Interface()
	if err := lc.cc.Invoke(s.forwardContext(ctx), info.FullMethod, req, reply); err != nil {
		return nil, err
	}
	return reply, nil
}

// streamForward relays a server-streaming call to the leader message by
// message. The relay ends when either side does: with the leader's status
// (io.EOF from the leader is a normal end), or when the caller goes away,
// which cancels the leader's stream.
func (s *Server) streamForward(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	lc, err := s.route(ss.Context(), info.FullMethod, info.IsClientStream)
	if err != nil {
		return err
	}
	if lc == nil {
		return h(srv, ss)
	}
	defer s.fwd.release(lc)
	types := leaderMethods[info.FullMethod]
	ctx, cancel := context.WithCancel(s.forwardContext(ss.Context()))
	defer cancel()

	req := types.in.New().Interface()
	if err := ss.RecvMsg(req); err != nil {
		return err
	}
	desc := &grpc.StreamDesc{StreamName: info.FullMethod, ServerStreams: info.IsServerStream}
	cs, err := lc.cc.NewStream(ctx, desc, info.FullMethod)
	if err != nil {
		return err
	}
	// A failed send means that the stream has ended; RecvMsg returns its
	// status.
	if err := cs.SendMsg(req); err == nil {
		if err := cs.CloseSend(); err != nil {
			return err
		}
	}
	for {
		m := types.out.New().Interface()
		if err := cs.RecvMsg(m); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := ss.SendMsg(m); err != nil {
			return err
		}
	}
}
