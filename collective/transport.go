package collective

import (
	"context"
	"fmt"
	"time"
)

// OpKind names the operation a stream belongs to.
type OpKind uint8

// Operation kinds; the values match the OpKind enum of the protocol.
const (
	OpAllReduce     OpKind = 1
	OpReduceScatter OpKind = 2
	OpAllGather     OpKind = 3
	OpBroadcast     OpKind = 4
	OpBarrier       OpKind = 5
	OpSend          OpKind = 6
)

// String returns the operation's name as errors print it.
func (k OpKind) String() string {
	switch k {
	case OpAllReduce:
		return "all-reduce"
	case OpReduceScatter:
		return "reduce-scatter"
	case OpAllGather:
		return "all-gather"
	case OpBroadcast:
		return "broadcast"
	case OpBarrier:
		return "barrier"
	case OpSend:
		return "send"
	}
	return fmt.Sprintf("OpKind(%d)", uint8(k))
}

// StreamHeader names one stream: the bytes that one lane of one operation
// moves from world rank Src to world rank Dst. The transport matches the two
// ends on StreamKey and hands the sender's header to the receiver, which
// checks it against its own with Check.
type StreamHeader struct {
	Group      uint64 // the communicator (world or sub-group)
	OpID       uint64 // the operation within the group
	Lane       int
	Src, Dst   int // world ranks
	Kind       OpKind
	DType      DType
	Count      int // elements of the operation's buffer
	Root       int // group rank of a broadcast's root
	ChunkElems int
}

// StreamKey identifies a stream within a generation.
type StreamKey struct {
	Group    uint64
	OpID     uint64
	Lane     int
	Src, Dst int
}

// Key returns the header's key.
func (h StreamHeader) Key() StreamKey {
	return StreamKey{Group: h.Group, OpID: h.OpID, Lane: h.Lane, Src: h.Src, Dst: h.Dst}
}

// Check reports whether the sender's header got describes the same operation
// as the receiver's header h.
func (h StreamHeader) Check(got StreamHeader) error {
	if h.Key() != got.Key() || h.Kind != got.Kind || h.DType != got.DType || h.Count != got.Count ||
		h.Root != got.Root || h.ChunkElems != got.ChunkElems {
		return fmt.Errorf("%w: rank %d called %s of %d %s (root %d, chunk %d), rank %d called %s of %d %s (root %d, chunk %d)",
			ErrMismatch, got.Src, got.Kind, got.Count, got.DType, got.Root, got.ChunkElems,
			h.Dst, h.Kind, h.Count, h.DType, h.Root, h.ChunkElems)
	}
	return nil
}

// SendStream is the sending end of a stream.
type SendStream interface {
	// Send queues one chunk. The transport may read payload until Finish
	// returns, so the caller must not modify it before then.
	Send(seq uint32, payload []byte) error
	// Finish ends the stream and waits until the receiver has consumed and
	// acknowledged every chunk.
	Finish() error
	// Close releases the stream; after a failed or unfinished stream it
	// cancels it. It is safe to call more than once.
	Close()
}

// RecvStream is the receiving end of a stream.
type RecvStream interface {
	// Header returns the sender's header.
	Header() StreamHeader
	// Recv receives the next chunk and passes its payload to fn in one or
	// more pieces, in order; a piece is valid only during the call. It
	// returns the chunk's sequence number and payload length.
	Recv(fn func(piece []byte)) (seq uint32, n int, err error)
	// Finish waits for the end of the stream and acknowledges it.
	Finish() error
	// Close releases the stream; it is safe to call more than once.
	Close()
}

// FailureReason classifies a failure report.
type FailureReason uint8

// Failure reasons; the values match the FailureReason enum of the protocol.
const (
	ReasonTimeout  FailureReason = 1
	ReasonLost     FailureReason = 2
	ReasonClosed   FailureReason = 3
	ReasonMismatch FailureReason = 4
	ReasonAborted  FailureReason = 5
)

func (r FailureReason) sentinel() error {
	switch r {
	case ReasonTimeout:
		return ErrPeerTimeout
	case ReasonLost:
		return ErrPeerLost
	case ReasonClosed:
		return ErrPeerClosed
	case ReasonMismatch:
		return ErrMismatch
	case ReasonAborted:
		return ErrPeerAborted
	}
	return ErrPeerLost
}

// Report is a rank's verdict on a failure: whom it blames, why, and since
// when the culprit was silent.
type Report struct {
	Culprit int // world rank
	Reason  FailureReason
	Since   time.Time
	Detail  string
	// From is the world rank that made the report. It is not sent: the
	// receiving rank fills it in from the control channel it came on.
	From int
}

// Control is a message of the control channel between two ranks: a
// heartbeat when Report is nil, else a failure report.
type Control struct {
	Report *Report
}

// Handler receives the events of a transport. Calls for one peer come in
// order; the handler must not block.
type Handler interface {
	// Control delivers a control message from peer.
	Control(from int, m Control)
	// PeerLost says that the connection to peer broke without a goodbye.
	PeerLost(peer int, err error)
	// PeerClosed says that peer closed its transport.
	PeerClosed(peer int)
}

// Transport connects the ranks of one world for one generation. Ranks are
// world ranks. A Transport serves one Communicator (and its sub-groups).
type Transport interface {
	// Rank returns this endpoint's rank.
	Rank() int
	// Size returns the number of ranks.
	Size() int
	// Addr returns a printable address of rank r.
	Addr(r int) string
	// Start connects to every peer, exchanging the generation, and returns
	// once every peer is connected both ways. Events go to h from then on.
	Start(ctx context.Context, generation uint64, h Handler) error
	// OpenSend opens the sending end of the stream h to h.Dst. The stream
	// lives until ctx is done or it is finished or closed.
	OpenSend(ctx context.Context, h StreamHeader) (SendStream, error)
	// OpenRecv waits until the peer h.Src has opened the stream h.Key() and
	// returns its receiving end. The stream lives until ctx is done or it is
	// finished or closed.
	OpenRecv(ctx context.Context, h StreamHeader) (RecvStream, error)
	// SendControl sends a control message to peer without waiting for it to
	// be delivered.
	SendControl(peer int, m Control) error
	// Close says goodbye to every peer and releases everything; pending
	// streams fail.
	Close() error
}
