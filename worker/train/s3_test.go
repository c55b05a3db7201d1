package train

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/checkpoint/s3gw"
)

// TestMain lets the test binary double as the S3 gateway, which the S3
// tests start as a child process so that the server can be killed.
func TestMain(m *testing.M) {
	s3gw.RunIfChild()
	os.Exit(m.Run())
}

const bucket = "train"

// gateway is a restartable gateway child process of one test.
type gateway struct {
	t    *testing.T
	mu   sync.Mutex
	opts s3gw.Options
	p    *s3gw.Process
}

func startGateway(t *testing.T) *gateway {
	g := &gateway{t: t, opts: s3gw.Options{Dir: t.TempDir(), Buckets: []string{bucket}}}
	g.start()
	t.Cleanup(func() { g.current().Stop(30 * time.Second) })
	return g
}

func (g *gateway) current() *s3gw.Process {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.p
}

func (g *gateway) start() {
	p, err := s3gw.StartProcess(context.Background(), g.opts, logWriter{g.t})
	if err != nil {
		g.t.Errorf("start the gateway: %v", err)
		return
	}
	g.mu.Lock()
	g.p = p
	g.opts.Addr, g.opts.AccessKey, g.opts.SecretKey = p.Addr, p.AccessKey, p.SecretKey
	g.mu.Unlock()
}

func (g *gateway) kill() {
	if err := g.current().Kill(); err != nil {
		g.t.Errorf("kill the gateway: %v", err)
	}
}

// store opens the job's bucket through checkpoint.OpenStore, with the
// endpoint and credentials in the environment as a deployment has them.
func (g *gateway) store(t *testing.T, onRetry func()) checkpoint.Store {
	p := g.current()
	t.Setenv("M2_S3_ENDPOINT", p.Endpoint)
	t.Setenv("AWS_ACCESS_KEY_ID", p.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", p.SecretKey)
	cfg, err := checkpoint.S3ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Retry = checkpoint.RetryPolicy{Attempts: 6, BaseDelay: 5 * time.Millisecond, MaxDelay: 100 * time.Millisecond}
	if onRetry != nil {
		cfg.OnRetry = func(string, string, int, error) { onRetry() }
	}
	cfg.Log = testLogger(t)
	s, prefix, err := checkpoint.OpenStore(context.Background(), "s3://"+bucket+"/runs", checkpoint.OpenOptions{S3: &cfg})
	if err != nil {
		t.Fatal(err)
	}
	if prefix != "runs" {
		t.Fatalf("prefix %q, want runs", prefix)
	}
	t.Cleanup(func() { s.(*checkpoint.S3Store).Close() })
	return s
}

// jobPrefix is where a job's checkpoints go in the bucket: the location's
// prefix, then the job name.
func jobPrefix(name string) string { return checkpoint.JoinKey("runs", name) }

// hooked calls onPut before the first read of every Put whose name ends
// with suffix.
type hooked struct {
	checkpoint.Store
	suffix string
	onPut  func()
}

func (h hooked) Put(ctx context.Context, n string, r io.Reader, size int64) error {
	if strings.HasSuffix(n, h.suffix) {
		h.onPut()
	}
	return h.Store.Put(ctx, n, r, size)
}

func (h hooked) AbortIncomplete(ctx context.Context, prefix string) (int, error) {
	return h.Store.(checkpoint.UploadJanitor).AbortIncomplete(ctx, prefix)
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(logWriter{t}, nil))
}

func sameLosses(t *testing.T, got, want []float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d losses, want %d", len(got), len(want))
	}
	for i := range got {
		if math.Float64bits(got[i]) != math.Float64bits(want[i]) {
			t.Errorf("step %d: loss %v, %v in the uninterrupted run", i+1, got[i], want[i])
		}
	}
}

// TestResumeFromS3IsBitwiseIdentical is TestResumeIsBitwiseIdentical with
// the checkpoints in a bucket of a gateway in another process.
func TestResumeFromS3IsBitwiseIdentical(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	straight := newRun[float32](t, testSpec(t, dataDir, t.TempDir(), 9))
	if err := straight.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}

	g := startGateway(t)
	store := g.store(t, nil)
	spec := testSpec(t, dataDir, "s3://"+bucket+"/runs", 9)
	first := newRunOn[float32](t, spec, store, nil)
	if err := first.tr.RunUntil(ctx, 6); err != nil {
		t.Fatal(err)
	}
	second := newRunOn[float32](t, spec, store, nil)
	if ok, err := second.tr.Resume(ctx); err != nil || !ok || second.tr.Step() != 6 {
		t.Fatalf("resume: %v, %v at step %d; want step 6", ok, err, second.tr.Step())
	}
	if err := second.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}
	sameLosses(t, append(first.losses, second.losses...), straight.losses)
	for i, v := range second.m.Params() {
		if math.Float32bits(v) != math.Float32bits(straight.m.Params()[i]) {
			t.Fatalf("parameter %d differs after resume: %v vs %v", i, v, straight.m.Params()[i])
		}
	}
	if steps, err := checkpoint.Steps(ctx, store, jobPrefix(spec.Name)); err != nil || !reflect.DeepEqual(steps, []int{9, 6}) {
		t.Errorf("retention kept %v (%v), want [9 6]", steps, err)
	}
	// The checkpoint is a plain file tree under the gateway's directory.
	if _, err := os.Stat(filepath.Join(g.opts.Dir, bucket, "runs", spec.Name, checkpoint.StepDir(9), checkpoint.ModelObject)); err != nil {
		t.Error(err)
	}
}

// TestServerKilledDuringCheckpoint kills the gateway (SIGKILL) while the
// step-6 checkpoint uploads. That save fails without committing, training
// goes on with the same losses as an uninterrupted run, the gateway comes
// back, the step-9 checkpoint commits, and resume takes step 9, with
// nothing of step 6 left behind.
func TestServerKilledDuringCheckpoint(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	straight := newRun[float32](t, testSpec(t, dataDir, t.TempDir(), 9))
	if err := straight.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}

	g := startGateway(t)
	base := g.store(t, nil)
	spec := testSpec(t, dataDir, "s3://"+bucket+"/runs", 9)
	spec.Checkpoint.Keep = 5
	// config.json of step 6 is stored; the kill lands before the weights.
	store := hooked{Store: base, suffix: checkpoint.StepDir(6) + "/" + checkpoint.ModelObject, onPut: g.kill}
	var failed []int
	r := newRunOn[float32](t, spec, store, func(o *Options) {
		o.OnCheckpointError = func(step int, err error) {
			t.Logf("checkpoint %d failed as expected: %v", step, err)
			failed = append(failed, step)
			g.start() // before the next checkpoint, which waits for this one
		}
	})
	if err := r.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(failed, []int{6}) {
		t.Fatalf("failed checkpoints %v, want [6]", failed)
	}
	sameLosses(t, r.losses, straight.losses)
	if steps, err := checkpoint.Steps(ctx, base, jobPrefix(spec.Name)); err != nil || !reflect.DeepEqual(steps, []int{9, 3}) {
		t.Fatalf("committed steps %v (%v), want [9 3]", steps, err)
	}
	// Retention after the step-9 commit removed step 6's orphaned objects.
	if left, _ := base.List(ctx, jobPrefix(spec.Name)+"/"+checkpoint.StepDir(6)); len(left) != 0 {
		t.Errorf("the failed checkpoint left %v", left)
	}
	again := newRunOn[float32](t, spec, base, nil)
	if ok, err := again.tr.Resume(ctx); err != nil || !ok || again.tr.Step() != 9 {
		t.Fatalf("resume: %v, %v at step %d; want step 9", ok, err, again.tr.Step())
	}
	if n, err := base.(checkpoint.UploadJanitor).AbortIncomplete(ctx, jobPrefix(spec.Name)+"/"); err != nil || n != 0 {
		t.Errorf("incomplete uploads left after resume: %d (%v)", n, err)
	}
}

// TestStoreUnavailableDuringCheckpoint stops the gateway just before the
// step-6 checkpoint and brings it back once a request has failed: the
// retries carry the save, training never stops, and every checkpoint
// commits.
func TestStoreUnavailableDuringCheckpoint(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	straight := newRun[float32](t, testSpec(t, dataDir, t.TempDir(), 9))
	if err := straight.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}

	g := startGateway(t)
	var retries atomic.Int32
	base := g.store(t, func() {
		if retries.Add(1) == 1 {
			g.start()
		}
	})
	spec := testSpec(t, dataDir, "s3://"+bucket+"/runs", 9)
	var down sync.Once
	store := hooked{Store: base, suffix: checkpoint.StepDir(6) + "/" + checkpoint.ConfigObject, onPut: func() { down.Do(g.kill) }}
	var commits []int
	var mu sync.Mutex
	r := newRunOn[float32](t, spec, store, func(o *Options) {
		o.OnCheckpoint = func(step int) { mu.Lock(); commits = append(commits, step); mu.Unlock() }
		o.OnCheckpointError = func(step int, err error) { t.Errorf("checkpoint %d failed: %v", step, err) }
	})
	if err := r.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if retries.Load() == 0 {
		t.Fatal("no request was retried: the store was never unavailable")
	}
	if !reflect.DeepEqual(commits, []int{3, 6, 9}) {
		t.Errorf("commits %v, want [3 6 9]", commits)
	}
	sameLosses(t, r.losses, straight.losses)
	again := newRunOn[float32](t, spec, base, nil)
	if ok, err := again.tr.Resume(ctx); err != nil || !ok || again.tr.Step() != 9 {
		t.Fatalf("resume: %v, %v at step %d; want step 9", ok, err, again.tr.Step())
	}
}

// TestCorruptObjectOnS3FallsBack flips a byte of the newest checkpoint's
// weights in the gateway's directory: resume detects it, says which
// checkpoint it skipped and why, and continues from the previous one.
func TestCorruptObjectOnS3FallsBack(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	g := startGateway(t)
	store := g.store(t, nil)
	spec := testSpec(t, dataDir, "s3://"+bucket+"/runs", 9)
	r := newRunOn[float64](t, spec, store, nil)
	if err := r.tr.RunUntil(ctx, 6); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(g.opts.Dir, bucket, "runs", spec.Name, checkpoint.StepDir(6), checkpoint.ModelObject)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-3] ^= 0x01
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	again := newRunOn[float64](t, spec, store, func(o *Options) { o.Log = slog.New(slog.NewTextHandler(&logs, nil)) })
	if ok, err := again.tr.Resume(ctx); err != nil || !ok {
		t.Fatalf("resume: %v, %v", ok, err)
	}
	if again.tr.Step() != 3 {
		t.Errorf("resumed at step %d, want the previous checkpoint's 3", again.tr.Step())
	}
	for _, w := range []string{"step=6", "model.safetensors segment 0 of 1", `fallback="trying step 3"`} {
		if !strings.Contains(logs.String(), w) {
			t.Errorf("the log does not say %q:\n%s", w, logs.String())
		}
	}
}
