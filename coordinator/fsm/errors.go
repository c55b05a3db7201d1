package fsm

import "errors"

// Errors returned through Result.Err by Apply and by Decode. The gRPC layer
// maps them to status codes in one place.
var (
	// ErrBadCommand marks a log entry that does not decode to a valid command.
	ErrBadCommand = errors.New("fsm: bad command")
	// ErrInvalid marks a command whose fields break a rule (bad spec, rank
	// out of range, non-finite number).
	ErrInvalid = errors.New("fsm: invalid argument")
	// ErrNotFound marks a command naming a job or worker that does not exist.
	ErrNotFound = errors.New("fsm: not found")
	// ErrStale marks a report for a generation that is no longer current or
	// for a job that no longer runs.
	ErrStale = errors.New("fsm: stale generation")
	// ErrConflict marks a command that the job's state forbids, e.g.
	// cancelling a finished job or assigning a running one.
	ErrConflict = errors.New("fsm: conflict with current state")
	// ErrLimit marks a command that would exceed a size limit.
	ErrLimit = errors.New("fsm: limit exceeded")
)
