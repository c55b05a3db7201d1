package server

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/fsm"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/coordinator/node"
	"github.com/m2train/m2train/coordinator/security"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// errLeaderNotReady is returned in the moment between winning an election
// and having applied the previous terms' entries.
var errLeaderNotReady = errors.New("coordinator: leader is not ready yet")

// errNoLeader is returned by a follower that should relay a call while no
// leader is known or the leader's API address is not yet recorded.
var errNoLeader = errors.New("coordinator: no leader to forward to")

// toStatus is the one place where coordinator errors become gRPC status
// codes. A not-leader status carries a NotLeader detail naming leaderAddr.
func toStatus(err error, leaderAddr string) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var code codes.Code
	switch {
	case errors.Is(err, node.ErrNotLeader):
		st := status.New(codes.FailedPrecondition, err.Error())
		if d, derr := st.WithDetails(&pb.NotLeader{LeaderAddr: leaderAddr}); derr == nil {
			return d.Err()
		}
		return st.Err()
	case errors.Is(err, errLeaderNotReady), errors.Is(err, errNoLeader), errors.Is(err, node.ErrUnknownOutcome), errors.Is(err, node.ErrClosed):
		code = codes.Unavailable
	case errors.Is(err, security.ErrUnauthenticated):
		code = codes.Unauthenticated
	case errors.Is(err, jobspec.ErrInvalid), errors.Is(err, jobspec.ErrMalformed),
		errors.Is(err, fsm.ErrInvalid), errors.Is(err, fsm.ErrBadCommand):
		code = codes.InvalidArgument
	case errors.Is(err, fsm.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, fsm.ErrStale):
		code = codes.Aborted
	case errors.Is(err, fsm.ErrConflict):
		code = codes.FailedPrecondition
	case errors.Is(err, fsm.ErrLimit):
		code = codes.ResourceExhausted
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	default:
		code = codes.Internal
	}
	return status.Error(code, err.Error())
}
