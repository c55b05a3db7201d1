// Package app is the m2worker command: its flags, each with an M2_*
// environment variable, and its main loop around worker/agent. The m2worker
// binary runs it, and so do the worker processes of `m2ctl up`, so that one
// build is enough for the local mode.
package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/coordinator/flagenv"
	"github.com/m2train/m2train/coordinator/membership"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/worker/agent"
	"github.com/m2train/m2train/worker/gpuinfo"
)

// Exit codes of Main.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
)

// Config is the parsed command line.
type Config struct {
	ID                string
	Coordinators      string
	EtcdPrefix        string
	AdvertiseHost     string
	ListenHost        string
	CollectivePort    int
	Backend           string
	GPU               int
	CacheDir          string
	Token             string
	TokenFile         string
	TLS               security.Files
	CollectiveTimeout time.Duration
	PollInterval      time.Duration
	ShutdownTimeout   time.Duration
	MetricsAddr       string
	LogFormat         string
	LogLevel          string
}

// defaultCacheDir is $M2_CACHE_DIR, else m2train/ in the user's cache
// directory, else in the temporary directory.
func defaultCacheDir() string {
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "m2train")
	}
	return filepath.Join(os.TempDir(), "m2train-cache")
}

// ParseFlags parses args; a flag not given takes its environment variable.
func ParseFlags(args []string, stderr io.Writer) (*Config, error) {
	c := &Config{}
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("m2worker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.ID, "id", host, "worker ID, stable across restarts (a StatefulSet pod name)")
	fs.StringVar(&c.Coordinators, "coordinator", "127.0.0.1:7400", "coordinator API addresses, comma-separated (any replicas)")
	fs.StringVar(&c.EtcdPrefix, "etcd-prefix", membership.DefaultPrefix, "etcd key prefix (the coordinator's)")
	fs.StringVar(&c.AdvertiseHost, "advertise-host", host, "host name or IP the other ranks dial to reach this worker")
	fs.StringVar(&c.ListenHost, "listen-host", "", "interface the collective listens on (default --advertise-host; 0.0.0.0 for all)")
	fs.IntVar(&c.CollectivePort, "collective-port", 0, "collective port of slot 0 (slot g uses port+g); 0 picks free ports")
	fs.StringVar(&c.Backend, "backend", "auto", "training backend: auto (the GPU when the CUDA kernels run, else the CPU), cpu or cuda")
	fs.IntVar(&c.GPU, "gpu", -1, "GPU index to drive (sets CUDA_VISIBLE_DEVICES); -1 keeps the environment's")
	fs.StringVar(&c.CacheDir, "cache-dir", "", "where s3:// datasets and init_from models are downloaded (default $M2_CACHE_DIR, else the user cache directory's m2train/)")
	fs.StringVar(&c.Token, "token", "", "the coordinator's bearer token (prefer --token-file)")
	fs.StringVar(&c.TokenFile, "token-file", "", "file holding the coordinator's bearer token")
	fs.StringVar(&c.TLS.Cert, "tls-cert", "", "certificate (PEM) for mutual TLS to the coordinator, etcd and the other ranks")
	fs.StringVar(&c.TLS.Key, "tls-key", "", "key (PEM) of --tls-cert")
	fs.StringVar(&c.TLS.CA, "tls-ca", "", "CA (PEM) that signs every component's certificate")
	fs.DurationVar(&c.CollectiveTimeout, "collective-timeout", collective.DefaultConfig().Timeout, "how long a collective operation waits on a silent peer; above the largest skew between ranks")
	fs.DurationVar(&c.PollInterval, "poll-interval", agent.DefaultConfig().PollInterval, "how often the assignments are polled")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", agent.DefaultConfig().ShutdownTimeout, "how long SIGTERM waits for the ranks (and a checkpoint upload in flight)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", "", "serve Prometheus metrics on this address (/metrics; /healthz liveness; /readyz, 200 once registered with the coordinator); empty: off")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: m2worker [flags]\n\nRuns one training worker: it registers with the coordinator, keeps an etcd lease,\nand trains the ranks placed on it. Every flag has an environment variable,\nM2_ plus the flag name in upper case with '-' as '_' (e.g. M2_COORDINATOR).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := flagenv.Apply(fs); err != nil {
		return nil, err
	}
	switch {
	case c.ID == "":
		return nil, errors.New("--id is required (no host name found)")
	case c.AdvertiseHost == "":
		return nil, errors.New("--advertise-host is required (no host name found)")
	case len(splitList(c.Coordinators)) == 0:
		return nil, errors.New("--coordinator: at least one address is required")
	case c.LogFormat != "text" && c.LogFormat != "json":
		return nil, fmt.Errorf("--log-format: %q, must be text or json", c.LogFormat)
	case c.Backend != "auto" && c.Backend != "cpu" && c.Backend != "cuda":
		return nil, fmt.Errorf("--backend: %q, must be auto, cpu or cuda", c.Backend)
	case c.GPU < -1:
		return nil, fmt.Errorf("--gpu: %d, must be a GPU index or -1", c.GPU)
	}
	if c.CacheDir == "" {
		c.CacheDir = defaultCacheDir()
	}
	return c, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func newLogger(c *Config, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	if c.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}

// Main runs the command with args until SIGTERM or SIGINT and returns the
// exit code. A second signal ends the process at once.
func Main(args []string, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop()
	}()
	return MainContext(ctx, args, stderr)
}

// MainContext runs the command with args until ctx ends (a graceful
// shutdown) and returns the exit code.
func MainContext(ctx context.Context, args []string, stderr io.Writer) int {
	c, err := ParseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return ExitOK
	}
	if err != nil {
		fmt.Fprintln(stderr, "m2worker:", err)
		return ExitUsage
	}
	if err := Run(ctx, c, stderr); err != nil {
		fmt.Fprintln(stderr, "m2worker:", err)
		var ue usageError
		if errors.As(err, &ue) {
			return ExitUsage
		}
		return ExitFailure
	}
	return ExitOK
}

// usageError marks a failure caused by the command line.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// Run runs the worker until ctx ends.
func Run(ctx context.Context, c *Config, stderr io.Writer) error {
	return run(ctx, c, stderr, runHooks{})
}

// runHooks let tests watch a worker that run starts in their process.
type runHooks struct {
	// metricsAddr, when set, receives the address the metrics endpoint
	// listens on.
	metricsAddr func(net.Addr)
	// agentConfig, when set, edits the agent's configuration last.
	agentConfig func(*agent.Config)
}

func run(ctx context.Context, c *Config, stderr io.Writer, hooks runHooks) error {
	log, err := newLogger(c, stderr)
	if err != nil {
		return usageError{err}
	}
	if c.GPU >= 0 {
		// Before anything loads the CUDA library.
		os.Setenv("CUDA_VISIBLE_DEVICES", fmt.Sprint(c.GPU))
	}
	dev, note, err := agent.DetectDevice(c.Backend, agent.ProbeCUDA)
	if err != nil {
		return err
	}
	log.Info("backend", "device", dev, "detail", note)

	token, err := security.ReadToken(c.Token, c.TokenFile)
	if err != nil {
		return usageError{err}
	}
	cfg := agent.DefaultConfig()
	cfg.WorkerID = c.ID
	cfg.Coordinators = splitList(c.Coordinators)
	cfg.Token = token
	cfg.EtcdPrefix = c.EtcdPrefix
	cfg.AdvertiseHost = c.AdvertiseHost
	cfg.ListenHost = c.ListenHost
	cfg.CollectivePort = c.CollectivePort
	cfg.GPUs = dev.GPUs()
	if h, err := os.Hostname(); err == nil {
		cfg.Hostname = h
	}
	cfg.Collective.Timeout = c.CollectiveTimeout
	cfg.PollInterval = c.PollInterval
	cfg.ShutdownTimeout = c.ShutdownTimeout
	cfg.Logger = log
	if c.TLS.Enabled() {
		if err := withTLS(&cfg, c.TLS); err != nil {
			return usageError{err}
		}
	}
	cfg.Runner = &agent.TrainRunner{Device: dev, CacheDir: c.CacheDir}
	met := newMetrics(c.ID, string(dev))
	cfg.OnRankEvent = met.observe
	if hooks.agentConfig != nil {
		hooks.agentConfig(&cfg)
	}

	a, err := agent.New(cfg)
	if err != nil {
		return usageError{err}
	}
	met.watchReadiness(a.Ready)
	if c.MetricsAddr != "" {
		if s, err := gpuinfo.Open(); err != nil {
			log.Info("no GPU metrics", "reason", err)
		} else {
			defer s.Close()
			if err := met.addGPUs(newGPUCollector(s.Sample, cudaVisible, log)); err != nil {
				return err
			}
		}
		srv, addr, err := met.serve(c.MetricsAddr, log)
		if err != nil {
			return usageError{fmt.Errorf("--metrics-addr: %w", err)}
		}
		defer srv.Close()
		log.Info("metrics", "addr", addr.String())
		if hooks.metricsAddr != nil {
			hooks.metricsAddr(addr)
		}
	}
	log.Info("m2worker started", "id", c.ID, "coordinators", cfg.Coordinators, "advertise", c.AdvertiseHost, "slots", max(cfg.GPUs, 1))
	return a.Run(ctx)
}

// withTLS sets mutual TLS on the coordinator client, the etcd client and
// the collective (server and client side of every rank).
func withTLS(cfg *agent.Config, f security.Files) error {
	creds, err := f.ClientCredentials("")
	if err != nil {
		return err
	}
	cli, err := f.Client("")
	if err != nil {
		return err
	}
	peer, err := f.Peer()
	if err != nil {
		return err
	}
	cfg.CoordinatorCreds = creds
	cfg.EtcdTLS = cli
	cfg.Collective.TLS = peer
	return nil
}
