package collective

import (
	"errors"
	"fmt"
)

// Sentinel errors. A failure caused by another rank comes as a *PeerError
// whose Err wraps one of the ErrPeer* sentinels.
var (
	// ErrClosed: the communicator (or its transport) was closed.
	ErrClosed = errors.New("collective: closed")
	// ErrPeerTimeout: a peer made no progress and sent no heartbeat for
	// longer than the configured timeout.
	ErrPeerTimeout = errors.New("collective: peer timeout")
	// ErrPeerLost: the connection to a peer broke.
	ErrPeerLost = errors.New("collective: peer lost")
	// ErrPeerClosed: a peer closed its communicator while an operation
	// still needed it.
	ErrPeerClosed = errors.New("collective: peer closed")
	// ErrPeerAborted: a peer abandoned an operation because its caller
	// cancelled it.
	ErrPeerAborted = errors.New("collective: peer aborted")
	// ErrMismatch: ranks called different operations, or the same operation
	// with different lengths, types or roots.
	ErrMismatch = errors.New("collective: operation mismatch")
	// ErrStaleGeneration: a message came from another generation of the
	// communicator.
	ErrStaleGeneration = errors.New("collective: stale generation")
	// ErrInvalid: bad arguments or configuration.
	ErrInvalid = errors.New("collective: invalid argument")
)

// PeerError is the error of an operation that failed because of another rank
// (or of this rank, when it abandoned an operation). Rank is the world rank of
// the culprit and Addr its transport address.
type PeerError struct {
	Rank int
	Addr string
	Op   string
	Err  error
}

// Error implements error.
func (e *PeerError) Error() string {
	op := e.Op
	if op == "" {
		op = "communicator"
	}
	return fmt.Sprintf("collective: %s failed because of rank %d (%s): %v", op, e.Rank, e.Addr, e.Err)
}

// Unwrap returns the cause, which wraps one of the ErrPeer* sentinels.
func (e *PeerError) Unwrap() error { return e.Err }

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}
