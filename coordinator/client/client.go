// Package client is the Go client of the coordinator's gRPC API. It is given
// the addresses of any replicas and follows the raft leader transparently: a
// follower's NotLeader answer redirects the call to the leader it names, an
// unreachable replica sends it to the next address, and retries back off
// until the caller's context ends. Submits carry a request ID, so a retry
// after an unknown outcome cannot create a second job.
package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/security"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// ErrConfig marks an invalid Config; the message names the field.
var ErrConfig = errors.New("client: invalid config")

// MaxMessageBytes bounds messages received from the coordinator.
const MaxMessageBytes = 4 << 20

// Config configures a Client.
type Config struct {
	// Addrs are API addresses (host:port) of one or more replicas.
	Addrs []string
	// Creds secures the connections; nil means plaintext.
	Creds credentials.TransportCredentials
	// Token, when set, is sent as a bearer token on every call.
	Token string
	// AttemptTimeout bounds one unary attempt (5s when 0), so that a
	// replica that hangs does not use up the caller's whole deadline.
	AttemptTimeout time.Duration
	// MaxBackoff caps the pause between retries (100ms when 0): short, so
	// that a client notices a new leader soon after an election.
	MaxBackoff time.Duration
}

// Client calls the leader of a coordinator cluster. It is safe for
// concurrent use.
type Client struct {
	cfg  Config
	opts []grpc.DialOption

	mu      sync.Mutex
	conns   map[string]*grpc.ClientConn
	current string
	closed  bool
}

// New returns a client; it dials lazily.
func New(cfg Config) (*Client, error) {
	if len(cfg.Addrs) == 0 {
		return nil, fmt.Errorf("%w: Addrs needs at least one coordinator address", ErrConfig)
	}
	for i, a := range cfg.Addrs {
		if a == "" {
			return nil, fmt.Errorf("%w: Addrs[%d] is empty", ErrConfig, i)
		}
	}
	if cfg.AttemptTimeout == 0 {
		cfg.AttemptTimeout = 5 * time.Second
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 100 * time.Millisecond
	}
	creds := cfg.Creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes)),
	}
	if cfg.Token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(security.Token{Value: cfg.Token, AllowInsecure: cfg.Creds == nil}))
	}
	return &Client{cfg: cfg, opts: opts, conns: map[string]*grpc.ClientConn{}, current: cfg.Addrs[0]}, nil
}

// Close closes every connection.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	var err error
	for a, cc := range c.conns {
		err = errors.Join(err, cc.Close())
		delete(c.conns, a)
	}
	return err
}

func (c *Client) conn(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errors.New("client: closed")
	}
	if cc, ok := c.conns[addr]; ok {
		return cc, nil
	}
	cc, err := grpc.NewClient(addr, c.opts...)
	if err != nil {
		return nil, fmt.Errorf("client: dial %s: %w", addr, err)
	}
	c.conns[addr] = cc
	return cc, nil
}

// Leader returns the address the client currently sends calls to.
func (c *Client) Leader() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.current
}

func (c *Client) setCurrent(a string) {
	c.mu.Lock()
	c.current = a
	c.mu.Unlock()
}

// nextAddr returns the configured address after a (round robin); an address
// learned from a redirect is followed by the first configured one.
func (c *Client) nextAddr(a string) string {
	i := slices.Index(c.cfg.Addrs, a)
	return c.cfg.Addrs[(i+1)%len(c.cfg.Addrs)]
}

// redirect inspects a failed call: it returns where to try next and whether
// the failure is one that another attempt may cure.
func (c *Client) redirect(addr string, err error) (next string, retry bool) {
	st, ok := status.FromError(err)
	if !ok {
		return c.nextAddr(addr), false
	}
	for _, d := range st.Details() {
		if nl, ok := d.(*pb.NotLeader); ok {
			if nl.GetLeaderAddr() != "" && nl.GetLeaderAddr() != addr {
				return nl.GetLeaderAddr(), true
			}
			return c.nextAddr(addr), true
		}
	}
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded:
		return c.nextAddr(addr), true
	}
	return addr, false
}

// Do runs fn against the leader, following redirects and retrying
// transient failures until ctx ends. Each attempt gets AttemptTimeout. It
// is the building block of the typed methods; use it for calls they lack.
func (c *Client) Do(ctx context.Context, fn func(ctx context.Context, cc grpc.ClientConnInterface) error) error {
	return c.do(ctx, true, fn)
}

func (c *Client) do(ctx context.Context, bounded bool, fn func(ctx context.Context, cc grpc.ClientConnInterface) error) error {
	addr := c.Leader()
	backoff := 10 * time.Millisecond
	var last error
	for attempt := 0; ; attempt++ {
		cc, err := c.conn(addr)
		if err != nil {
			return err
		}
		actx, cancel := ctx, context.CancelFunc(func() {})
		if bounded {
			actx, cancel = context.WithTimeout(ctx, c.cfg.AttemptTimeout)
		}
		err = fn(actx, cc)
		cancel()
		if err == nil {
			c.setCurrent(addr)
			return nil
		}
		next, retry := c.redirect(addr, err)
		if !retry {
			return err
		}
		last = err
		if ctx.Err() != nil {
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
		}
		// A redirect to a named leader goes at once; otherwise pause, so
		// that an election can finish.
		if st, _ := status.FromError(err); !hasLeader(st) || attempt > 3 {
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return status.Error(codes.DeadlineExceeded, fmt.Sprintf("%v (last error: %v)", ctx.Err(), last))
			case <-t.C:
			}
			backoff = min(backoff*2, c.cfg.MaxBackoff)
		}
		addr = next
	}
}

func hasLeader(st *status.Status) bool {
	for _, d := range st.Details() {
		if nl, ok := d.(*pb.NotLeader); ok && nl.GetLeaderAddr() != "" {
			return true
		}
	}
	return false
}

// NewRequestID returns a random request ID for an idempotent submit.
func NewRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Submit submits a job spec (YAML) and returns the created job. Retries
// reuse one request ID, so at most one job is created.
func (c *Client) Submit(ctx context.Context, specYAML []byte) (*pb.Job, error) {
	req := &pb.SubmitJobRequest{SpecYaml: specYAML, RequestId: NewRequestID()}
	var out *pb.Job
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewJobServiceClient(cc).SubmitJob(ctx, req)
		out = r.GetJob()
		return err
	})
	return out, err
}

// Get returns a job.
func (c *Client) Get(ctx context.Context, id string) (*pb.Job, error) {
	var out *pb.Job
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewJobServiceClient(cc).GetJob(ctx, &pb.GetJobRequest{JobId: id})
		out = r.GetJob()
		return err
	})
	return out, err
}

// List returns the jobs in submit order, filtered by state when states are
// given.
func (c *Client) List(ctx context.Context, states ...pb.JobState) ([]*pb.Job, error) {
	var out []*pb.Job
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewJobServiceClient(cc).ListJobs(ctx, &pb.ListJobsRequest{States: states})
		out = r.GetJobs()
		return err
	})
	return out, err
}

// Cancel cancels a job and returns it.
func (c *Client) Cancel(ctx context.Context, id, reason string) (*pb.Job, error) {
	var out *pb.Job
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewJobServiceClient(cc).CancelJob(ctx, &pb.CancelJobRequest{JobId: id, Reason: reason})
		out = r.GetJob()
		return err
	})
	return out, err
}

// Checkpoints returns a job's committed checkpoints, oldest first.
func (c *Client) Checkpoints(ctx context.Context, id string) ([]*pb.Checkpoint, error) {
	var out []*pb.Checkpoint
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewJobServiceClient(cc).ListCheckpoints(ctx, &pb.ListCheckpointsRequest{JobId: id})
		out = r.GetCheckpoints()
		return err
	})
	return out, err
}

// Events returns events of a job (all jobs when id is empty) after
// sequence number after, at most limit (0: the server's maximum).
func (c *Client) Events(ctx context.Context, id string, after uint64, limit int) ([]*pb.Event, error) {
	var out []*pb.Event
	err := c.Do(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewJobServiceClient(cc).ListEvents(ctx, &pb.ListEventsRequest{JobId: id, AfterSeq: after, Limit: int32(limit)})
		out = r.GetEvents()
		return err
	})
	return out, err
}

// Terminal reports whether a job state never changes again.
func Terminal(s pb.JobState) bool {
	return s == pb.JobState_JOB_STATE_SUCCEEDED || s == pb.JobState_JOB_STATE_FAILED || s == pb.JobState_JOB_STATE_CANCELLED
}

// Watch calls fn with the job now and after every change until the job
// reaches a terminal state (then it returns the last job and nil), fn
// returns an error, or ctx ends. It resumes on the new leader after a
// leader change.
func (c *Client) Watch(ctx context.Context, id string, fn func(*pb.Job) error) (*pb.Job, error) {
	var last *pb.Job
	for {
		var fnErr error
		err := c.do(ctx, false, func(ctx context.Context, cc grpc.ClientConnInterface) error {
			stream, err := pb.NewJobServiceClient(cc).WatchJob(ctx, &pb.WatchJobRequest{JobId: id})
			if err != nil {
				return err
			}
			for {
				r, err := stream.Recv()
				if err == io.EOF {
					return nil
				}
				if err != nil {
					return err
				}
				last = r.GetJob()
				if fnErr = fn(last); fnErr != nil {
					return nil
				}
			}
		})
		switch {
		case fnErr != nil:
			return last, fnErr
		case err != nil:
			return last, err
		case last != nil && Terminal(last.GetState()):
			return last, nil
		}
		// The stream ended early (a server shutting down); resume.
		if ctx.Err() != nil {
			return last, ctx.Err()
		}
	}
}
