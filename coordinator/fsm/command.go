package fsm

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"

	"github.com/m2train/m2train/coordinator/jobspec"
)

// Op identifies a command type in the log encoding.
type Op uint8

// Command types. Values are part of the log format: never renumber.
const (
	OpSubmitJob        Op = 1
	OpCancelJob        Op = 2
	OpRegisterWorker   Op = 3
	OpWorkerLost       Op = 4
	OpAssign           Op = 5
	OpReportProgress   Op = 6
	OpCommitCheckpoint Op = 7
	OpReportFailure    Op = 8
	OpSetMember        Op = 9
)

// formatVersion is the first byte of every encoded command.
const formatVersion = 1

// MaxCommandBytes bounds an encoded command; the spec limit dominates it.
const MaxCommandBytes = jobspec.MaxSpecBytes*4 + 64<<10

// Limits on strings carried by commands.
const (
	maxIDBytes      = 128
	maxAddrBytes    = 256
	maxMessageBytes = 4096
	maxGPUs         = 64
)

// Command is one typed state change. Every command carries At, the leader's
// wall clock in Unix nanoseconds when it proposed the command, so that Apply
// never reads a clock and stays deterministic.
type Command interface {
	Op() Op
	// validate checks the fields that do not depend on the state.
	validate() error
}

// SubmitJob adds a queued job. RequestID, when set, makes the submit
// idempotent: a second SubmitJob with the same RequestID returns the first
// job's ID and changes nothing.
type SubmitJob struct {
	At        int64         `json:"at"`
	RequestID string        `json:"request_id,omitempty"`
	Spec      *jobspec.Spec `json:"spec"`
}

// CancelJob ends a queued or running job.
type CancelJob struct {
	At     int64  `json:"at"`
	JobID  string `json:"job_id"`
	Reason string `json:"reason,omitempty"`
}

// RegisterWorker records a worker. Lease is its etcd lease; a non-zero
// Lease marks the worker alive, zero records it without liveness (an API
// registration before its lease exists) and keeps a live worker alive.
type RegisterWorker struct {
	At       int64  `json:"at"`
	WorkerID string `json:"worker_id"`
	Addr     string `json:"addr,omitempty"`
	Hostname string `json:"hostname,omitempty"`
	GPUs     int    `json:"gpus"`
	Lease    int64  `json:"lease,omitempty"`
}

// WorkerLost marks a worker lost and requeues the jobs it ran. Lease, when
// non-zero, must match the worker's current lease, so that the expiry of an
// old lease does not mark a re-registered worker lost.
type WorkerLost struct {
	At       int64  `json:"at"`
	WorkerID string `json:"worker_id"`
	Lease    int64  `json:"lease,omitempty"`
	Reason   string `json:"reason,omitempty"`
}

// Slot is one GPU of one worker (slot 0 of a CPU worker).
type Slot struct {
	WorkerID string `json:"worker_id"`
	GPU      int    `json:"gpu"`
}

// Assign places a queued job: Slots[r] runs rank r. Generation is the job's
// generation the scheduler saw; the job moves to Generation+1.
type Assign struct {
	At         int64  `json:"at"`
	JobID      string `json:"job_id"`
	Generation uint64 `json:"generation"`
	Slots      []Slot `json:"slots"`
}

// ReportProgress records rank 0's training progress; Done from rank 0 marks
// the job succeeded.
type ReportProgress struct {
	At           int64   `json:"at"`
	JobID        string  `json:"job_id"`
	Generation   uint64  `json:"generation"`
	Rank         int     `json:"rank"`
	Step         int64   `json:"step"`
	Loss         float64 `json:"loss"`
	TokensPerSec float64 `json:"tokens_per_sec"`
	GradNorm     float64 `json:"grad_norm"`
	LR           float64 `json:"lr"`
	Done         bool    `json:"done,omitempty"`
}

// CommitCheckpoint records a checkpoint whose manifest is written. Steps of
// committed checkpoints strictly increase.
type CommitCheckpoint struct {
	At         int64  `json:"at"`
	JobID      string `json:"job_id"`
	Generation uint64 `json:"generation"`
	Step       int64  `json:"step"`
	Location   string `json:"location"`
}

// ReportFailure ends the current generation of a job: Fatal fails the job,
// otherwise it is queued again (up to the spec's max_restarts).
type ReportFailure struct {
	At         int64  `json:"at"`
	JobID      string `json:"job_id"`
	Generation uint64 `json:"generation"`
	Rank       int    `json:"rank"`
	WorkerID   string `json:"worker_id,omitempty"`
	Message    string `json:"message,omitempty"`
	Fatal      bool   `json:"fatal,omitempty"`
}

// SetMember records the API address of a coordinator replica, so that
// followers can name the leader's address to clients.
type SetMember struct {
	At      int64  `json:"at"`
	ID      string `json:"id"`
	APIAddr string `json:"api_addr"`
}

// Op implements Command.
func (*SubmitJob) Op() Op { return OpSubmitJob }

// Op implements Command.
func (*CancelJob) Op() Op { return OpCancelJob }

// Op implements Command.
func (*RegisterWorker) Op() Op { return OpRegisterWorker }

// Op implements Command.
func (*WorkerLost) Op() Op { return OpWorkerLost }

// Op implements Command.
func (*Assign) Op() Op { return OpAssign }

// Op implements Command.
func (*ReportProgress) Op() Op { return OpReportProgress }

// Op implements Command.
func (*CommitCheckpoint) Op() Op { return OpCommitCheckpoint }

// Op implements Command.
func (*ReportFailure) Op() Op { return OpReportFailure }

// Op implements Command.
func (*SetMember) Op() Op { return OpSetMember }

func newCommand(op Op) Command {
	switch op {
	case OpSubmitJob:
		return &SubmitJob{}
	case OpCancelJob:
		return &CancelJob{}
	case OpRegisterWorker:
		return &RegisterWorker{}
	case OpWorkerLost:
		return &WorkerLost{}
	case OpAssign:
		return &Assign{}
	case OpReportProgress:
		return &ReportProgress{}
	case OpCommitCheckpoint:
		return &CommitCheckpoint{}
	case OpReportFailure:
		return &ReportFailure{}
	case OpSetMember:
		return &SetMember{}
	}
	return nil
}

// Encode renders a command for the raft log: a format version byte, the op
// byte, then the command as JSON. It validates the command first, so that a
// bad command fails at the proposer rather than in every replica.
func Encode(c Command) ([]byte, error) {
	if c == nil {
		return nil, fmt.Errorf("%w: nil command", ErrBadCommand)
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	body, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	out := make([]byte, 0, len(body)+2)
	out = append(out, formatVersion, byte(c.Op()))
	out = append(out, body...)
	if len(out) > MaxCommandBytes {
		return nil, fmt.Errorf("%w: command of %d bytes exceeds %d", ErrLimit, len(out), MaxCommandBytes)
	}
	return out, nil
}

// Decode parses an encoded command. It rejects unknown versions, ops and
// fields, trailing data and commands that break their rules; it never
// panics.
func Decode(b []byte) (Command, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("%w: %d bytes is too short", ErrBadCommand, len(b))
	}
	if len(b) > MaxCommandBytes {
		return nil, fmt.Errorf("%w: %d bytes exceeds %d", ErrBadCommand, len(b), MaxCommandBytes)
	}
	if b[0] != formatVersion {
		return nil, fmt.Errorf("%w: unknown format version %d", ErrBadCommand, b[0])
	}
	c := newCommand(Op(b[1]))
	if c == nil {
		return nil, fmt.Errorf("%w: unknown op %d", ErrBadCommand, b[1])
	}
	dec := json.NewDecoder(bytes.NewReader(b[2:]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		return nil, fmt.Errorf("%w: op %d: %v", ErrBadCommand, b[1], err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: op %d: trailing data", ErrBadCommand, b[1])
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return c, nil
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...)
}

func checkID(field, v string) error {
	if v == "" {
		return invalidf("%s is required", field)
	}
	if len(v) > maxIDBytes {
		return invalidf("%s must be at most %d bytes, got %d", field, maxIDBytes, len(v))
	}
	return nil
}

func checkLen(field, v string, n int) error {
	if len(v) > n {
		return invalidf("%s must be at most %d bytes, got %d", field, n, len(v))
	}
	return nil
}

func checkAt(at int64) error {
	if at <= 0 {
		return invalidf("at must be a positive Unix time in nanoseconds, got %d", at)
	}
	return nil
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func (c *SubmitJob) validate() error {
	if err := firstErr(checkAt(c.At), checkLen("request_id", c.RequestID, maxIDBytes)); err != nil {
		return err
	}
	if c.Spec == nil {
		return invalidf("spec is required")
	}
	return nil
}

func (c *CancelJob) validate() error {
	return firstErr(checkAt(c.At), checkID("job_id", c.JobID), checkLen("reason", c.Reason, maxMessageBytes))
}

func (c *RegisterWorker) validate() error {
	if err := firstErr(checkAt(c.At), checkID("worker_id", c.WorkerID),
		checkLen("addr", c.Addr, maxAddrBytes), checkLen("hostname", c.Hostname, maxAddrBytes)); err != nil {
		return err
	}
	if c.GPUs < 0 || c.GPUs > maxGPUs {
		return invalidf("gpus must be in [0, %d], got %d", maxGPUs, c.GPUs)
	}
	if c.Lease < 0 {
		return invalidf("lease must not be negative, got %d", c.Lease)
	}
	return nil
}

func (c *WorkerLost) validate() error {
	return firstErr(checkAt(c.At), checkID("worker_id", c.WorkerID), checkLen("reason", c.Reason, maxMessageBytes))
}

func (c *Assign) validate() error {
	if err := firstErr(checkAt(c.At), checkID("job_id", c.JobID)); err != nil {
		return err
	}
	if len(c.Slots) == 0 {
		return invalidf("slots must not be empty")
	}
	for i, s := range c.Slots {
		if err := checkID(fmt.Sprintf("slots[%d].worker_id", i), s.WorkerID); err != nil {
			return err
		}
		if s.GPU < 0 || s.GPU >= maxGPUs {
			return invalidf("slots[%d].gpu must be in [0, %d), got %d", i, maxGPUs, s.GPU)
		}
	}
	return nil
}

func finite(field string, v float64) error {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return invalidf("%s must be finite, got %g", field, v)
	}
	return nil
}

func (c *ReportProgress) validate() error {
	if err := firstErr(checkAt(c.At), checkID("job_id", c.JobID), finite("loss", c.Loss),
		finite("tokens_per_sec", c.TokensPerSec), finite("grad_norm", c.GradNorm), finite("lr", c.LR)); err != nil {
		return err
	}
	if c.Rank < 0 {
		return invalidf("rank must not be negative, got %d", c.Rank)
	}
	if c.Step < 0 {
		return invalidf("step must not be negative, got %d", c.Step)
	}
	return nil
}

func (c *CommitCheckpoint) validate() error {
	if err := firstErr(checkAt(c.At), checkID("job_id", c.JobID), checkLen("location", c.Location, maxAddrBytes*4)); err != nil {
		return err
	}
	if c.Location == "" {
		return invalidf("location is required")
	}
	if c.Step < 0 {
		return invalidf("step must not be negative, got %d", c.Step)
	}
	return nil
}

func (c *ReportFailure) validate() error {
	if err := firstErr(checkAt(c.At), checkID("job_id", c.JobID), checkLen("worker_id", c.WorkerID, maxIDBytes),
		checkLen("message", c.Message, maxMessageBytes)); err != nil {
		return err
	}
	if c.Rank < 0 {
		return invalidf("rank must not be negative, got %d", c.Rank)
	}
	return nil
}

func (c *SetMember) validate() error {
	return firstErr(checkAt(c.At), checkID("id", c.ID), checkLen("api_addr", c.APIAddr, maxAddrBytes))
}
