package collective

import (
	"crypto/tls"
	"log/slog"
	"time"
)

// Config tunes a communicator and its transport. The zero value is not
// valid; start from DefaultConfig. Every rank of a job must use the same
// Generation, ChunkSize and StreamsPerPeer.
type Config struct {
	// Generation numbers the communicators built on the same addresses; a
	// rank rejects traffic from any other generation. The coordinator bumps
	// it each time it rebuilds the job. Zero is a valid generation.
	Generation uint64

	// Timeout bounds how long an operation waits on a peer that makes no
	// progress (no bytes of the operation) or that sends no heartbeats. A
	// peer silent for Timeout less a settling period (a quarter of Timeout,
	// at most 5s) is suspected; the settling period is spent agreeing on the
	// culprit with the other ranks. It must exceed the
	// largest skew with which ranks reach the same collective. Default 60s.
	Timeout time.Duration

	// HeartbeatInterval is how often a rank tells every peer it is alive.
	// Zero means Timeout/8. It must be less than Timeout/2.
	HeartbeatInterval time.Duration

	// ChunkSize is the size in bytes of one message of an operation: the
	// unit of pipelining around the ring. A multiple of 8 between 4 KiB and
	// 64 MiB. Default 1 MiB.
	ChunkSize int

	// StreamsPerPeer is the number of parallel lanes of an operation; each
	// lane runs its own ring over its own stream (and, for the gRPC
	// transport, its own TCP connection). 1 to 16. Default 2.
	StreamsPerPeer int

	// WindowSize is the flow-control window in bytes of one gRPC stream; the
	// connection window is 4 times as large. 64 KiB to 1 GiB. Default
	// 16 MiB. The in-memory transport ignores it.
	WindowSize int

	// TLS, when not nil, secures the gRPC transport: it is the server
	// configuration of this rank and the client configuration for dialling
	// its peers (so it needs Certificates, RootCAs and, for mutual TLS,
	// ClientCAs with ClientAuth). Nil means plaintext.
	TLS *tls.Config

	// Logger receives the communicator's events (peer failures, culprits);
	// nil discards them.
	Logger *slog.Logger
}

// DefaultConfig returns the recommended configuration.
func DefaultConfig() Config {
	return Config{
		Timeout:        60 * time.Second,
		ChunkSize:      1 << 20,
		StreamsPerPeer: 2,
		WindowSize:     16 << 20,
	}
}

// Validate reports the first field that breaks its rule.
func (c Config) Validate() error {
	switch {
	case c.Timeout < 10*time.Millisecond:
		return invalidf("Config.Timeout is %v; it must be at least 10ms", c.Timeout)
	case c.HeartbeatInterval < 0:
		return invalidf("Config.HeartbeatInterval is %v; it must not be negative", c.HeartbeatInterval)
	case c.HeartbeatInterval > 0 && c.HeartbeatInterval >= c.Timeout/2:
		return invalidf("Config.HeartbeatInterval is %v; it must be less than Timeout/2 (%v)", c.HeartbeatInterval, c.Timeout/2)
	case c.ChunkSize < 4<<10 || c.ChunkSize > 64<<20 || c.ChunkSize%8 != 0:
		return invalidf("Config.ChunkSize is %d; it must be a multiple of 8 between 4096 and 67108864", c.ChunkSize)
	case c.StreamsPerPeer < 1 || c.StreamsPerPeer > 16:
		return invalidf("Config.StreamsPerPeer is %d; it must be between 1 and 16", c.StreamsPerPeer)
	case c.WindowSize < 64<<10 || c.WindowSize > 1<<30:
		return invalidf("Config.WindowSize is %d; it must be between 65536 and 1073741824", c.WindowSize)
	}
	return nil
}

func (c Config) heartbeatInterval() time.Duration {
	if c.HeartbeatInterval > 0 {
		return c.HeartbeatInterval
	}
	return c.Timeout / 8
}

// settle is how long a rank collects failure reports before it picks the
// culprit: a quarter of Timeout, at most 5s.
func (c Config) settle() time.Duration { return min(c.Timeout/4, 5*time.Second) }

// suspectAfter is the silence after which a peer is suspected.
func (c Config) suspectAfter() time.Duration { return c.Timeout - c.settle() }

func (c Config) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.New(slog.DiscardHandler)
}
