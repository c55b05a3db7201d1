package checkpoint

import (
	"context"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m2train/m2train/worker/checkpoint/s3gw"
)

// TestMain lets the test binary double as the S3 gateway: the S3 tests
// start it again as a child process, so that requests take a real network
// path and the server can be killed like a crashed one.
func TestMain(m *testing.M) {
	s3gw.RunIfChild()
	os.Exit(m.Run())
}

// testBucket is the bucket every test gateway creates.
const testBucket = "ckpt"

// gateway is a gateway child process of one test, restartable on the
// same address and directory.
type gateway struct {
	t    *testing.T
	opts s3gw.Options
	mu   sync.Mutex
	p    *s3gw.Process
}

func startGateway(t *testing.T) *gateway {
	t.Helper()
	g := &gateway{t: t, opts: s3gw.Options{Dir: t.TempDir(), Buckets: []string{testBucket}}}
	g.start()
	t.Cleanup(func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		g.p.Stop(30 * time.Second)
	})
	return g
}

func (g *gateway) start() {
	p, err := s3gw.StartProcess(context.Background(), g.opts, testWriter{g.t})
	if err != nil {
		g.t.Fatalf("start the gateway: %v", err)
	}
	g.mu.Lock()
	g.p = p
	g.opts.Addr, g.opts.AccessKey, g.opts.SecretKey = p.Addr, p.AccessKey, p.SecretKey
	g.mu.Unlock()
}

// kill ends the gateway with SIGKILL and waits for it.
func (g *gateway) kill() {
	g.mu.Lock()
	p := g.p
	g.mu.Unlock()
	if err := p.Kill(); err != nil {
		g.t.Errorf("kill the gateway: %v", err)
	}
}

// restart starts a new gateway on the address and directory of the last.
func (g *gateway) restart() { g.start() }

func (g *gateway) config() S3Config {
	g.mu.Lock()
	defer g.mu.Unlock()
	return S3Config{Endpoint: g.p.Endpoint, Bucket: testBucket, AccessKey: g.p.AccessKey, SecretKey: g.p.SecretKey,
		PartSize: MinPartSize, Retry: RetryPolicy{Attempts: 4, BaseDelay: 5 * time.Millisecond, MaxDelay: 50 * time.Millisecond}}
}

func (g *gateway) store(t *testing.T, cfg S3Config) *S3Store {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = testLogger(t)
	}
	s, err := NewS3Store(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// testWriter sends a child's output to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// hookReader calls hook once, before the first read at or past offset at.
type hookReader struct {
	r    io.Reader
	at   int64
	off  int64
	hook func()
	once sync.Once
}

func (h *hookReader) Read(p []byte) (int, error) {
	if h.off+int64(len(p)) > h.at {
		if h.off < h.at {
			p = p[:h.at-h.off]
		} else {
			h.once.Do(h.hook)
		}
	}
	n, err := h.r.Read(p)
	h.off += int64(n)
	return n, err
}

// slogTo logs text lines into w.
func slogTo(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }
