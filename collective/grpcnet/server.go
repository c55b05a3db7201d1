package grpcnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/m2train/m2train/collective"
	collectivev1 "github.com/m2train/m2train/proto/collective/v1"
)

// server implements collectivev1.CollectiveServer.
type server struct {
	collectivev1.UnimplementedCollectiveServer
	t *Transport
}

// waitStarted holds a stream that arrives before Start until the transport
// knows its generation.
func (s *server) waitStarted(ctx context.Context) error {
	select {
	case <-s.t.started:
		return nil
	case <-s.t.closing:
		return status.Error(codes.Unavailable, "rank is closing")
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}

// Control serves the control stream a peer opened to this rank.
func (s *server) Control(stream grpc.BidiStreamingServer[collectivev1.ControlMessage, collectivev1.ControlMessage]) error {
	t := s.t
	if err := s.waitStarted(stream.Context()); err != nil {
		return err
	}
	var first collectivev1.ControlMessage
	if err := stream.RecvMsg(&first); err != nil {
		return err
	}
	hello := first.GetHello()
	switch {
	case hello == nil:
		return status.Error(codes.InvalidArgument, "a control stream starts with a hello")
	case hello.GetGeneration() != t.gen.Load():
		return status.Errorf(codes.FailedPrecondition, "%v: rank %d runs generation %d, the caller %d",
			collective.ErrStaleGeneration, t.rank, t.gen.Load(), hello.GetGeneration())
	case int(hello.GetWorldSize()) != len(t.addrs) || int(hello.GetRank()) >= len(t.addrs) || int(hello.GetRank()) == t.rank:
		return status.Errorf(codes.InvalidArgument, "caller says it is rank %d of %d; this is rank %d of %d",
			hello.GetRank(), hello.GetWorldSize(), t.rank, len(t.addrs))
	}
	p := t.peers[hello.GetRank()]
	if err := stream.SendMsg(&collectivev1.ControlMessage{Body: &collectivev1.ControlMessage_Hello{Hello: &collectivev1.Hello{
		Generation: t.gen.Load(), Rank: uint32(t.rank), WorldSize: uint32(len(t.addrs))}}}); err != nil {
		return err
	}
	p.inMu.Lock()
	p.inStream = stream
	p.inMu.Unlock()
	p.inboundOnce.Do(func() { close(p.inbound) })

	recvErr := make(chan error, 1)
	go func() {
		for {
			var m collectivev1.ControlMessage
			if err := stream.RecvMsg(&m); err != nil {
				recvErr <- err
				return
			}
			switch b := m.GetBody().(type) {
			case *collectivev1.ControlMessage_Heartbeat:
				t.handler.Control(p.rank, collective.Control{})
			case *collectivev1.ControlMessage_Report:
				r := b.Report
				t.handler.Control(p.rank, collective.Control{Report: &collective.Report{
					Culprit: int(r.GetCulpritRank()), Reason: collective.FailureReason(r.GetReason()),
					Since: time.Unix(0, r.GetSinceUnixNano()), Detail: r.GetDetail()}})
			case *collectivev1.ControlMessage_Bye:
				t.bye(p)
			}
		}
	}()
	var err error
	select {
	case err = <-recvErr:
		if errors.Is(err, io.EOF) {
			err = nil
		}
		t.lost(p, fmt.Errorf("control stream from rank %d ended: %w", p.rank, err))
	case <-t.closing:
		_ = stream.SendMsg(&collectivev1.ControlMessage{Body: &collectivev1.ControlMessage_Bye{Bye: &collectivev1.Bye{}}})
	}
	p.inMu.Lock()
	p.inStream = nil
	p.inMu.Unlock()
	return err
}

// Transfer serves a stream of chunks: it hands the stream to the operation
// that waits for it (OpenRecv) and returns once that operation is done with
// it.
func (s *server) Transfer(stream grpc.BidiStreamingServer[collectivev1.Chunk, collectivev1.TransferAck]) error {
	t := s.t
	ctx := stream.Context()
	if err := s.waitStarted(ctx); err != nil {
		return err
	}
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get(headerKey)
	if len(vals) != 1 {
		return status.Error(codes.InvalidArgument, "missing stream header")
	}
	var hp collectivev1.StreamHeader
	if err := proto.Unmarshal([]byte(vals[0]), &hp); err != nil {
		return status.Errorf(codes.InvalidArgument, "bad stream header: %v", err)
	}
	if hp.GetGeneration() != t.gen.Load() {
		return status.Errorf(codes.FailedPrecondition, "%v: stream of generation %d on rank %d of generation %d",
			collective.ErrStaleGeneration, hp.GetGeneration(), t.rank, t.gen.Load())
	}
	h := headerFromProto(&hp)
	if h.Dst != t.rank || h.Src < 0 || h.Src >= len(t.peers) || t.peers[h.Src] == nil {
		return status.Errorf(codes.InvalidArgument, "stream from rank %d to rank %d served by rank %d", h.Src, h.Dst, t.rank)
	}
	rs := &recvStream{t: t, p: t.peers[h.Src], ss: stream, h: h, gen: hp.GetGeneration(), done: make(chan error, 1)}
	slot := t.slot(h.Key())
	select {
	case slot <- rs:
	default:
		return status.Errorf(codes.AlreadyExists, "stream %+v opened twice", h.Key())
	}
	select {
	case err := <-rs.done:
		return err
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-t.closing:
		return status.Error(codes.Unavailable, "rank is closing")
	}
}

// recvStream is the receiving end of a Transfer stream, used by the
// operation's goroutine while the server's handler waits.
type recvStream struct {
	t      *Transport
	p      *peer
	ss     grpc.ServerStream
	h      collective.StreamHeader
	gen    uint64
	done   chan error // tells the handler to return
	once   sync.Once
	stop   func() bool
	chunks uint32
	bytes  uint64
}

func (rs *recvStream) end(err error) {
	rs.once.Do(func() { rs.done <- err })
}

func (rs *recvStream) Header() collective.StreamHeader { return rs.h }

func (rs *recvStream) Recv(fn func([]byte)) (uint32, int, error) {
	in := chunkIn{consume: fn}
	if err := rs.ss.RecvMsg(&in); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, 0, fmt.Errorf("%w: rank %d ended the stream after %d chunks", collective.ErrMismatch, rs.h.Src, rs.chunks)
		}
		return 0, 0, rs.t.streamErr(rs.p, err)
	}
	if in.generation != rs.gen || in.opID != rs.h.OpID || int(in.src) != rs.h.Src {
		return 0, 0, fmt.Errorf("%w: chunk of generation %d, op %d, rank %d on the stream of generation %d, op %d, rank %d",
			collective.ErrStaleGeneration, in.generation, in.opID, in.src, rs.gen, rs.h.OpID, rs.h.Src)
	}
	rs.chunks++
	rs.bytes += uint64(in.n)
	return in.seq, in.n, nil
}

func (rs *recvStream) Finish() error {
	in := chunkIn{consume: func([]byte) {}}
	err := rs.ss.RecvMsg(&in)
	switch {
	case err == nil:
		return fmt.Errorf("%w: rank %d sent chunk %d past the end", collective.ErrMismatch, rs.h.Src, in.seq)
	case !errors.Is(err, io.EOF):
		return rs.t.streamErr(rs.p, err)
	}
	if err := rs.ss.SendMsg(&collectivev1.TransferAck{Chunks: rs.chunks, Bytes: rs.bytes}); err != nil {
		return rs.t.streamErr(rs.p, err)
	}
	rs.end(nil)
	return nil
}

func (rs *recvStream) Close() {
	rs.end(status.Error(codes.Aborted, "receiver abandoned the stream"))
	if rs.stop != nil {
		rs.stop()
	}
}

// sendStream is the sending end of a Transfer stream.
type sendStream struct {
	t      *Transport
	p      *peer
	cs     grpc.ClientStream
	cancel context.CancelFunc
	h      collective.StreamHeader
	gen    uint64
}

func (s *sendStream) Send(seq uint32, payload []byte) error {
	err := s.cs.SendMsg(&chunkOut{generation: s.gen, opID: s.h.OpID, src: uint32(s.h.Src), seq: seq, payload: payload})
	if err != nil {
		if errors.Is(err, io.EOF) {
			// The server ended the stream; its status says why.
			var ack collectivev1.TransferAck
			for err = s.cs.RecvMsg(&ack); err == nil; err = s.cs.RecvMsg(&ack) {
			}
		}
		return s.t.streamErr(s.p, err)
	}
	return nil
}

func (s *sendStream) Finish() error {
	if err := s.cs.CloseSend(); err != nil {
		return s.t.streamErr(s.p, err)
	}
	var ack collectivev1.TransferAck
	if err := s.cs.RecvMsg(&ack); err != nil {
		return s.t.streamErr(s.p, err)
	}
	if err := s.cs.RecvMsg(&ack); !errors.Is(err, io.EOF) {
		if err == nil {
			err = errors.New("two acknowledgements")
		}
		return s.t.streamErr(s.p, err)
	}
	return nil
}

func (s *sendStream) Close() { s.cancel() }
