package agent

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"google.golang.org/grpc/credentials"

	"github.com/m2train/m2train/collective"
)

// ErrConfig marks an invalid Config; the message names the field and the
// rule.
var ErrConfig = errors.New("agent: invalid config")

// Config configures an Agent. Start from DefaultConfig; zero durations take
// the defaults noted.
type Config struct {
	// WorkerID names the worker to the coordinator (required): 1-128 bytes
	// without '/'. A restarted process keeps its ID (a StatefulSet pod
	// name); the coordinator then ends the generations its old process
	// ran.
	WorkerID string
	// Coordinators are the API addresses (host:port) of one or more
	// coordinator replicas (required); calls follow the leader.
	Coordinators []string
	// CoordinatorCreds secures the coordinator API; nil means plaintext.
	CoordinatorCreds credentials.TransportCredentials
	// Token is the coordinator's bearer token, if it requires one.
	Token string
	// EtcdTLS secures the etcd client; nil means plaintext.
	EtcdTLS *tls.Config
	// EtcdPrefix is the key prefix of the cluster (membership.DefaultPrefix
	// when empty); it must match the coordinator's.
	EtcdPrefix string

	// AdvertiseHost is the host name or IP address that the other ranks
	// dial to reach this worker's collective (required).
	AdvertiseHost string
	// ListenHost is the interface the collective listens on (AdvertiseHost
	// when empty; "0.0.0.0" for every interface).
	ListenHost string
	// CollectivePort is the port of slot 0's collective; slot g listens on
	// CollectivePort+g. 0 picks a free port for every rank.
	CollectivePort int
	// GPUs is the number of slots announced to the scheduler: the GPUs
	// this worker drives, or 0 for a CPU worker with one slot.
	GPUs int
	// Hostname is reported to the coordinator (informational).
	Hostname string

	// Collective tunes the communicators (Timeout, ChunkSize, TLS, ...);
	// the agent sets Generation and Logger for each generation.
	Collective collective.Config

	// PollInterval is how often the assignments are polled (500ms when 0).
	PollInterval time.Duration
	// RendezvousTimeout bounds the wait for the other ranks of a
	// generation at the rendezvous and while the communicator connects
	// (10 minutes when 0); the rank then reports a failure.
	RendezvousTimeout time.Duration
	// ReportTimeout bounds each call to the coordinator while it is
	// unreachable (registration, a poll, a progress report, a checkpoint
	// commit; 2 minutes when 0). The end of a job and a rank's failure
	// are retried until the coordinator answers or the rank is stopped.
	ReportTimeout time.Duration
	// ShutdownTimeout bounds how long a graceful stop waits for the ranks
	// to return, which includes a checkpoint upload in flight (1 minute
	// when 0).
	ShutdownTimeout time.Duration

	// Runner trains the ranks (required).
	Runner Runner
	// Logger receives the agent's logs; nil discards them.
	Logger *slog.Logger
	// OnRankEvent, when set, is called for each change of a rank's life
	// (started, rendezvous done, a step, a checkpoint, ended); metrics and
	// tests watch it. It runs on the rank's goroutines and must return
	// promptly: checkpoint events come from the goroutine that saves in
	// the background, concurrently with the steps, and ranks on different
	// slots call it concurrently.
	OnRankEvent func(RankEvent)
}

// DefaultConfig returns a configuration with the defaults filled in; the
// caller sets WorkerID, Coordinators, AdvertiseHost and Runner.
func DefaultConfig() Config {
	return Config{
		Collective:        collective.DefaultConfig(),
		PollInterval:      500 * time.Millisecond,
		RendezvousTimeout: 10 * time.Minute,
		ReportTimeout:     2 * time.Minute,
		ShutdownTimeout:   time.Minute,
	}
}

// withDefaults fills zero durations.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.PollInterval == 0 {
		c.PollInterval = d.PollInterval
	}
	if c.RendezvousTimeout == 0 {
		c.RendezvousTimeout = d.RendezvousTimeout
	}
	if c.ReportTimeout == 0 {
		c.ReportTimeout = d.ReportTimeout
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = d.ShutdownTimeout
	}
	if c.ListenHost == "" {
		c.ListenHost = c.AdvertiseHost
	}
	return c
}

// Validate names the first field that breaks its rule.
func (c Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrConfig}, args...)...)
	}
	switch {
	case c.WorkerID == "" || len(c.WorkerID) > 128 || strings.ContainsAny(c.WorkerID, "/\x00"):
		return bad("WorkerID %q must be 1-128 bytes without '/'", c.WorkerID)
	case len(c.Coordinators) == 0:
		return bad("Coordinators needs at least one address")
	case c.AdvertiseHost == "":
		return bad("AdvertiseHost is required: the host the other ranks dial")
	case c.CollectivePort < 0 || c.CollectivePort > 65535:
		return bad("CollectivePort must be in [0, 65535], got %d", c.CollectivePort)
	case c.GPUs < 0 || c.GPUs > 64:
		return bad("GPUs must be in [0, 64], got %d", c.GPUs)
	case c.CollectivePort > 0 && c.CollectivePort+max(c.GPUs, 1)-1 > 65535:
		return bad("CollectivePort %d leaves no port for slot %d", c.CollectivePort, max(c.GPUs, 1)-1)
	case c.PollInterval < 0 || c.RendezvousTimeout < 0 || c.ReportTimeout < 0 || c.ShutdownTimeout < 0:
		return bad("durations must not be negative")
	case c.Runner == nil:
		return bad("Runner is required")
	}
	for i, a := range c.Coordinators {
		if a == "" {
			return bad("Coordinators[%d] is empty", i)
		}
	}
	if err := c.Collective.Validate(); err != nil {
		return fmt.Errorf("%w: Collective: %w", ErrConfig, err)
	}
	return nil
}

// slots is the number of ranks the worker runs at once.
func (c Config) slots() int { return max(c.GPUs, 1) }
