// Package grpcnet is the gRPC transport of package collective: every rank
// serves the collective.v1 service on its address and dials every other
// rank.
//
// Each operation lane runs over its own HTTP/2 stream, and lane l of every
// peer uses the l-th of Config.StreamsPerPeer TCP connections, so the lanes
// of a ring do not share a connection's flow control or its writer. Chunks
// are encoded without copying (the payload goes from the caller's buffer to
// the connection) and decoded without copying (the receiving rank reduces or
// copies straight out of gRPC's receive buffers). A long-lived control stream
// per pair of ranks carries the handshake (generation, rank, world size),
// heartbeats, failure reports and goodbyes.
package grpcnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/m2train/m2train/collective"
	collectivev1 "github.com/m2train/m2train/proto/collective/v1"
)

// headerKey is the metadata key of a Transfer stream's StreamHeader.
const headerKey = "x-collective-stream-bin"

// controlQueue is the number of control messages queued per peer; beyond it
// heartbeats are dropped rather than block the caller.
const controlQueue = 256

// Transport is a collective.Transport over gRPC.
type Transport struct {
	cfg   collective.Config
	rank  int
	addrs []string
	lis   net.Listener
	srv   *grpc.Server
	log   *slog.Logger
	peers []*peer

	gen     atomic.Uint64
	handler collective.Handler
	started chan struct{} // closed when Start has set the generation and handler

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup

	mu    sync.Mutex
	slots map[collective.StreamKey]chan *recvStream
	raw   map[net.Conn]bool // dialled connections, closed hard at the end
}

// peer is the state of the connection to one other rank.
type peer struct {
	rank  int
	addr  string
	conns []*grpc.ClientConn

	out      chan *collectivev1.ControlMessage
	ctrl     grpc.ClientStream // our control stream to the peer
	ctrlEnd  context.CancelFunc
	readDone chan struct{} // closed when nothing more comes on ctrl

	inbound     chan struct{} // closed when the peer's control stream reached us
	inboundOnce sync.Once

	inMu     sync.Mutex
	inStream grpc.ServerStream // the peer's control stream to us, while its handler runs

	gone     chan struct{} // closed when the peer said goodbye or was lost
	goneOnce sync.Once
	bye      atomic.Bool
}

// Listen builds the transport of rank among the ranks at addrs and starts
// serving on lis, or on addrs[rank] when lis is nil. The address of a rank
// is what its peers dial and what errors name.
func Listen(cfg collective.Config, rank int, addrs []string, lis net.Listener) (*Transport, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if rank < 0 || rank >= len(addrs) {
		return nil, fmt.Errorf("%w: rank %d of %d addresses", collective.ErrInvalid, rank, len(addrs))
	}
	if lis == nil {
		var err error
		if lis, err = net.Listen("tcp", addrs[rank]); err != nil {
			return nil, fmt.Errorf("grpcnet: listen on %s: %w", addrs[rank], err)
		}
	}
	t := &Transport{cfg: cfg, rank: rank, addrs: addrs, lis: lis, started: make(chan struct{}),
		closing: make(chan struct{}), slots: make(map[collective.StreamKey]chan *recvStream), raw: make(map[net.Conn]bool)}
	t.log = cfg.Logger
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	t.log = t.log.With("rank", rank)

	creds := insecure.NewCredentials()
	if cfg.TLS != nil {
		creds = credentials.NewTLS(cfg.TLS)
	}
	window := int32(cfg.WindowSize)
	connWindow := int32(min(4*int64(cfg.WindowSize), math.MaxInt32))
	maxMsg := 2*cfg.ChunkSize + 4096
	t.srv = grpc.NewServer(
		grpc.Creds(creds),
		grpc.ForceServerCodecV2(rawCodec{}),
		grpc.InitialWindowSize(window),
		grpc.InitialConnWindowSize(connWindow),
		grpc.ReadBufferSize(ioBuffer),
		grpc.WriteBufferSize(ioBuffer),
		grpc.MaxRecvMsgSize(maxMsg),
		grpc.MaxSendMsgSize(maxMsg),
		experimental.BufferPool(framePool),
	)
	t.srv.RegisterService(&collectivev1.Collective_ServiceDesc, &server{t: t})
	dial := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithInitialWindowSize(window),
		grpc.WithInitialConnWindowSize(connWindow),
		grpc.WithReadBufferSize(ioBuffer),
		grpc.WithWriteBufferSize(ioBuffer),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(rawCodec{}), grpc.MaxCallRecvMsgSize(maxMsg), grpc.MaxCallSendMsgSize(maxMsg)),
		grpc.WithDisableRetry(),
		experimental.WithBufferPool(framePool),
		grpc.WithContextDialer(t.dial),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	t.peers = make([]*peer, len(addrs))
	for r, addr := range addrs {
		if r == rank {
			continue
		}
		p := &peer{rank: r, addr: addr, out: make(chan *collectivev1.ControlMessage, controlQueue),
			inbound: make(chan struct{}), gone: make(chan struct{}), readDone: make(chan struct{})}
		for range cfg.StreamsPerPeer {
			cc, err := grpc.NewClient("passthrough:///"+addr, dial...)
			if err != nil {
				t.closeConns()
				_ = lis.Close()
				return nil, fmt.Errorf("grpcnet: client for rank %d at %s: %w", r, addr, err)
			}
			p.conns = append(p.conns, cc)
		}
		t.peers[r] = p
	}
	t.wg.Go(func() { _ = t.srv.Serve(lis) })
	return t, nil
}

// ioBuffer is the size of the read and write buffers of a connection: one
// system call moves eight full HTTP/2 frames, and the buffer stays in cache
// for the kernel's copy. (Unbuffered framing with writev and readv of each
// frame's payload saves the copies but costs more in system calls on
// loopback; see the collbench notes.)
const ioBuffer = 128 << 10

// New listens on addrs[rank] and builds the world communicator over gRPC; see
// collective.New.
func New(ctx context.Context, cfg collective.Config, rank int, addrs []string) (*collective.Communicator, error) {
	t, err := Listen(cfg, rank, addrs, nil)
	if err != nil {
		return nil, err
	}
	return collective.New(ctx, cfg, t)
}

// Rank implements collective.Transport.
func (t *Transport) Rank() int { return t.rank }

// Size implements collective.Transport.
func (t *Transport) Size() int { return len(t.addrs) }

// Addr implements collective.Transport.
func (t *Transport) Addr(r int) string { return t.addrs[r] }

// Start implements collective.Transport: it dials every peer, exchanges
// hellos, and waits until every peer has dialled back.
func (t *Transport) Start(ctx context.Context, generation uint64, h collective.Handler) error {
	select {
	case <-t.started:
		return fmt.Errorf("%w: transport started twice", collective.ErrInvalid)
	default:
	}
	t.gen.Store(generation)
	t.handler = h
	close(t.started)

	errs := make(chan error, len(t.peers))
	var wg sync.WaitGroup
	for _, p := range t.peers {
		if p == nil {
			continue
		}
		wg.Go(func() { errs <- t.connect(ctx, p) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	for _, p := range t.peers {
		if p == nil {
			continue
		}
		select {
		case <-p.inbound:
		case <-ctx.Done():
			return fmt.Errorf("grpcnet: waiting for rank %d at %s to connect: %w", p.rank, p.addr, ctx.Err())
		case <-t.closing:
			return collective.ErrClosed
		}
	}
	return nil
}

// connect opens the control stream to p (retrying until ctx ends while the
// peer is not up yet or still runs an older generation) and connects every
// lane.
func (t *Transport) connect(ctx context.Context, p *peer) error {
	var last error
	for attempt := 0; ; attempt++ {
		err := t.hello(ctx, p)
		if err == nil {
			break
		}
		last = err
		if status.Code(err) == codes.InvalidArgument {
			return err
		}
		delay := min(time.Duration(attempt+1)*20*time.Millisecond, 500*time.Millisecond)
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			if status.Code(last) == codes.FailedPrecondition {
				return fmt.Errorf("%w: rank %d at %s: %v", collective.ErrStaleGeneration, p.rank, p.addr, status.Convert(last).Message())
			}
			return fmt.Errorf("grpcnet: connecting to rank %d at %s: %w (last error: %v)", p.rank, p.addr, ctx.Err(), last)
		case <-t.closing:
			return collective.ErrClosed
		}
	}
	for _, cc := range p.conns[1:] {
		cc.Connect()
		for s := cc.GetState(); s != connectivity.Ready; s = cc.GetState() {
			if !cc.WaitForStateChange(ctx, s) {
				return fmt.Errorf("grpcnet: connecting lanes to rank %d at %s: %w", p.rank, p.addr, ctx.Err())
			}
		}
	}
	t.wg.Go(func() { t.readControl(p) })
	t.wg.Go(func() { t.writeControl(p) })
	return nil
}

// hello opens the control stream to p and exchanges hellos.
func (t *Transport) hello(ctx context.Context, p *peer) error {
	sctx, cancel := context.WithCancel(context.Background())
	stop := context.AfterFunc(ctx, cancel)
	cs, err := p.conns[0].NewStream(sctx, &collectivev1.Collective_ServiceDesc.Streams[0],
		collectivev1.Collective_Control_FullMethodName, grpc.WaitForReady(true))
	if err == nil {
		err = cs.SendMsg(&collectivev1.ControlMessage{Body: &collectivev1.ControlMessage_Hello{Hello: &collectivev1.Hello{
			Generation: t.gen.Load(), Rank: uint32(t.rank), WorldSize: uint32(len(t.addrs))}}})
	}
	var reply collectivev1.ControlMessage
	if err == nil {
		err = cs.RecvMsg(&reply)
	}
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err == nil {
		hello := reply.GetHello()
		switch {
		case hello == nil:
			err = status.Error(codes.InvalidArgument, "peer answered the hello with something else")
		case int(hello.GetRank()) != p.rank || int(hello.GetWorldSize()) != len(t.addrs):
			err = status.Errorf(codes.InvalidArgument, "rank %d at %s says it is rank %d of %d; want rank %d of %d",
				p.rank, p.addr, hello.GetRank(), hello.GetWorldSize(), p.rank, len(t.addrs))
		case hello.GetGeneration() != t.gen.Load():
			err = status.Errorf(codes.FailedPrecondition, "rank %d runs generation %d, this rank %d", p.rank, hello.GetGeneration(), t.gen.Load())
		}
	}
	if err != nil {
		cancel()
		return err
	}
	p.ctrl, p.ctrlEnd = cs, cancel
	return nil
}

// readControl watches our control stream to p: the peer only answers with
// its hello and, at the end, a goodbye.
func (t *Transport) readControl(p *peer) {
	defer close(p.readDone)
	for {
		var m collectivev1.ControlMessage
		err := p.ctrl.RecvMsg(&m)
		if err != nil {
			t.lost(p, err)
			return
		}
		if m.GetBye() != nil {
			t.bye(p)
		}
	}
}

// writeControl sends p the queued control messages, and a goodbye when the
// transport closes.
func (t *Transport) writeControl(p *peer) {
	defer p.ctrlEnd()
	for {
		select {
		case m := <-p.out:
			if err := p.ctrl.SendMsg(m); err != nil {
				// The reader sees the broken stream and reports it.
				<-t.closing
				return
			}
		case <-t.closing:
			// Messages queued before the close go out first: a failure
			// report that a rank broadcasts just before it closes must
			// reach its peers ahead of the goodbye, or they would blame
			// it for leaving instead of the rank it reported.
			for drained := false; !drained; {
				select {
				case m := <-p.out:
					_ = p.ctrl.SendMsg(m)
				default:
					drained = true
				}
			}
			if !p.bye.Load() {
				_ = p.ctrl.SendMsg(&collectivev1.ControlMessage{Body: &collectivev1.ControlMessage_Bye{Bye: &collectivev1.Bye{}}})
				_ = p.ctrl.CloseSend()
				// The peer ends the stream once it has read the goodbye;
				// give it a moment before the connection closes under it.
				select {
				case <-p.readDone:
				case <-time.After(time.Second):
				}
			}
			p.ctrlEnd()
			<-p.readDone
			return
		}
	}
}

// lost reports a broken connection to p, unless it said goodbye or this
// transport is closing.
func (t *Transport) lost(p *peer, err error) {
	select {
	case <-t.closing:
		return
	default:
	}
	if p.bye.Load() {
		return
	}
	first := false
	p.goneOnce.Do(func() { first = true; close(p.gone) })
	if first {
		t.log.Warn("connection to peer lost", "peer", p.rank, "addr", p.addr, "err", err)
		t.handler.PeerLost(p.rank, fmt.Errorf("%w: connection to rank %d at %s broke: %v", collective.ErrPeerLost, p.rank, p.addr, status.Convert(err).Message()))
	}
}

// bye records that p closed its transport.
func (t *Transport) bye(p *peer) {
	if p.bye.Swap(true) {
		return
	}
	first := false
	p.goneOnce.Do(func() { first = true; close(p.gone) })
	if first {
		t.handler.PeerClosed(p.rank)
	}
}

// SendControl implements collective.Transport.
func (t *Transport) SendControl(peer int, m collective.Control) error {
	if peer < 0 || peer >= len(t.peers) || t.peers[peer] == nil {
		return fmt.Errorf("%w: control message to rank %d", collective.ErrInvalid, peer)
	}
	p := t.peers[peer]
	msg := &collectivev1.ControlMessage{}
	if r := m.Report; r != nil {
		msg.Body = &collectivev1.ControlMessage_Report{Report: &collectivev1.FailureReport{
			CulpritRank: uint32(r.Culprit), Reason: collectivev1.FailureReason(r.Reason),
			SinceUnixNano: r.Since.UnixNano(), Detail: r.Detail}}
	} else {
		msg.Body = &collectivev1.ControlMessage_Heartbeat{Heartbeat: &collectivev1.Heartbeat{SentUnixNano: time.Now().UnixNano()}}
	}
	select {
	case p.out <- msg:
		return nil
	case <-t.closing:
		return collective.ErrClosed
	default:
		return fmt.Errorf("grpcnet: control queue to rank %d is full", peer)
	}
}

// OpenSend implements collective.Transport.
func (t *Transport) OpenSend(ctx context.Context, h collective.StreamHeader) (collective.SendStream, error) {
	p, err := t.peerOf(h.Dst, h.Src)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.gone:
		return nil, t.streamErr(p, errors.New("peer is gone"))
	default:
	}
	hb, err := proto.Marshal(headerProto(t.gen.Load(), h))
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	sctx = metadata.NewOutgoingContext(sctx, metadata.Pairs(headerKey, string(hb)))
	cs, err := p.conns[h.Lane%len(p.conns)].NewStream(sctx, &collectivev1.Collective_ServiceDesc.Streams[1],
		collectivev1.Collective_Transfer_FullMethodName)
	if err != nil {
		cancel()
		return nil, t.streamErr(p, err)
	}
	return &sendStream{t: t, p: p, cs: cs, cancel: cancel, h: h, gen: t.gen.Load()}, nil
}

// OpenRecv implements collective.Transport.
func (t *Transport) OpenRecv(ctx context.Context, h collective.StreamHeader) (collective.RecvStream, error) {
	p, err := t.peerOf(h.Src, h.Dst)
	if err != nil {
		return nil, err
	}
	slot := t.slot(h.Key())
	var rs *recvStream
	select {
	case rs = <-slot:
	default:
		select {
		case rs = <-slot:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-p.gone:
			select {
			case rs = <-slot:
			default:
				return nil, t.streamErr(p, errors.New("peer is gone"))
			}
		case <-t.closing:
			return nil, collective.ErrClosed
		}
	}
	t.mu.Lock()
	delete(t.slots, h.Key())
	t.mu.Unlock()
	rs.stop = context.AfterFunc(ctx, func() { rs.end(status.Error(codes.Canceled, "receiver stopped")) })
	return rs, nil
}

// slot returns the rendezvous of the stream key, where the server puts the
// stream and OpenRecv takes it.
func (t *Transport) slot(k collective.StreamKey) chan *recvStream {
	t.mu.Lock()
	defer t.mu.Unlock()
	s, ok := t.slots[k]
	if !ok {
		s = make(chan *recvStream, 1)
		t.slots[k] = s
	}
	return s
}

func (t *Transport) peerOf(r, self int) (*peer, error) {
	if self != t.rank || r < 0 || r >= len(t.peers) || t.peers[r] == nil {
		return nil, fmt.Errorf("%w: stream between ranks %d and %d on rank %d", collective.ErrInvalid, self, r, t.rank)
	}
	select {
	case <-t.closing:
		return nil, collective.ErrClosed
	default:
	}
	return t.peers[r], nil
}

// streamErr classifies an error of a stream with p.
func (t *Transport) streamErr(p *peer, err error) error {
	select {
	case <-t.closing:
		return collective.ErrClosed
	default:
	}
	msg := status.Convert(err).Message()
	switch {
	case p.bye.Load():
		return fmt.Errorf("%w: rank %d at %s closed its transport: %s", collective.ErrPeerClosed, p.rank, p.addr, msg)
	case status.Code(err) == codes.FailedPrecondition:
		return fmt.Errorf("%w: rank %d at %s: %s", collective.ErrStaleGeneration, p.rank, p.addr, msg)
	case status.Code(err) == codes.InvalidArgument:
		return fmt.Errorf("%w: rank %d at %s: %s", collective.ErrMismatch, p.rank, p.addr, msg)
	}
	return fmt.Errorf("%w: stream with rank %d at %s: %s", collective.ErrPeerLost, p.rank, p.addr, msg)
}

// Close implements collective.Transport: it says goodbye on every control
// stream, ends the streams it serves, and closes the connections.
func (t *Transport) Close() error {
	t.closeOnce.Do(func() {
		close(t.closing)
		stopped := make(chan struct{})
		go func() {
			t.srv.GracefulStop()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-time.After(2 * time.Second):
			t.srv.Stop()
			<-stopped
		}
		// A connection whose peer stopped reading blocks gRPC's writer;
		// closing the socket first lets the client connections close at
		// once.
		t.mu.Lock()
		for c := range t.raw {
			_ = c.Close()
		}
		t.mu.Unlock()
		t.wg.Wait()
		t.closeConns()
	})
	return nil
}

// dial opens a TCP connection to a peer and remembers it for Close.
func (t *Transport) dial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case <-t.closing:
		_ = c.Close()
		return nil, collective.ErrClosed
	default:
	}
	t.raw[c] = true
	return &trackedConn{Conn: c, t: t}, nil
}

// trackedConn forgets itself when gRPC closes it.
type trackedConn struct {
	net.Conn
	t    *Transport
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.raw, c.Conn)
		c.t.mu.Unlock()
	})
	return c.Conn.Close()
}

func (t *Transport) closeConns() {
	for _, p := range t.peers {
		if p == nil {
			continue
		}
		for _, cc := range p.conns {
			_ = cc.Close()
		}
	}
}

func headerProto(gen uint64, h collective.StreamHeader) *collectivev1.StreamHeader {
	return &collectivev1.StreamHeader{Generation: gen, Group: h.Group, OpId: h.OpID, Lane: uint32(h.Lane),
		SrcRank: uint32(h.Src), DstRank: uint32(h.Dst), Kind: collectivev1.OpKind(h.Kind),
		Dtype: collectivev1.DType(h.DType), Count: uint64(h.Count), Root: uint32(h.Root), ChunkElems: uint32(h.ChunkElems)}
}

func headerFromProto(m *collectivev1.StreamHeader) collective.StreamHeader {
	return collective.StreamHeader{Group: m.GetGroup(), OpID: m.GetOpId(), Lane: int(m.GetLane()),
		Src: int(m.GetSrcRank()), Dst: int(m.GetDstRank()), Kind: collective.OpKind(m.GetKind()),
		DType: collective.DType(m.GetDtype()), Count: int(m.GetCount()), Root: int(m.GetRoot()), ChunkElems: int(m.GetChunkElems())}
}

var _ collective.Transport = (*Transport)(nil)
