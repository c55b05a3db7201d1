package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/m2train/m2train/collective"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/tools/promtest"
	"github.com/m2train/m2train/tools/testlog"
	"github.com/m2train/m2train/worker/agent"
	"github.com/m2train/m2train/worker/gpuinfo"
)

// sample is one series of a scrape.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// scrape is what one GET of /metrics returned, flattened: a histogram
// becomes its _count and _sum series (the buckets are not needed here).
type scrape []sample

// getURL fetches url and returns the status and body.
func getURL(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// scrapeAt reads http://addr/metrics over HTTP and parses it.
func scrapeAt(t *testing.T, addr string) scrape {
	t.Helper()
	code, body := getURL(t, "http://"+addr+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d\n%s", code, body)
	}
	fams, err := promtest.Parse(body)
	if err != nil {
		t.Fatalf("parsing /metrics: %v\n%s", err, body)
	}
	var out scrape
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				out = append(out, sample{name, labels, m.GetCounter().GetValue()})
			case dto.MetricType_GAUGE:
				out = append(out, sample{name, labels, m.GetGauge().GetValue()})
			case dto.MetricType_HISTOGRAM:
				out = append(out, sample{name + "_count", labels, float64(m.GetHistogram().GetSampleCount())},
					sample{name + "_sum", labels, m.GetHistogram().GetSampleSum()})
			default:
				out = append(out, sample{name, labels, m.GetUntyped().GetValue()})
			}
		}
	}
	return out
}

// find returns the series named name whose labels include the pairs kv.
func (s scrape) find(name string, kv ...string) []sample {
	var out []sample
next:
	for _, x := range s {
		if x.name != name {
			continue
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if v, ok := x.labels[kv[i]]; !ok || v != kv[i+1] {
				continue next
			}
		}
		out = append(out, x)
	}
	return out
}

// value returns the one series named name with the labels kv; it fails
// the test when there is none or more than one.
func (s scrape) value(t *testing.T, name string, kv ...string) float64 {
	t.Helper()
	f := s.find(name, kv...)
	if len(f) != 1 {
		t.Fatalf("%d series %s%v, want 1", len(f), name, kv)
	}
	return f[0].value
}

// want checks that the series named name with labels kv has value v.
func (s scrape) want(t *testing.T, v float64, name string, kv ...string) {
	t.Helper()
	if got := s.value(t, name, kv...); got != v {
		t.Errorf("%s%v = %v, want %v", name, kv, got, v)
	}
}

// absent checks that no series named name has the labels kv.
func (s scrape) absent(t *testing.T, name string, kv ...string) {
	t.Helper()
	if f := s.find(name, kv...); len(f) != 0 {
		t.Errorf("%s%v present: %v", name, kv, f)
	}
}

// names returns the distinct series names that start with prefix.
func (s scrape) names(prefix string) []string {
	seen := map[string]bool{}
	for _, x := range s {
		if strings.HasPrefix(x.name, prefix) {
			seen[x.name] = true
		}
	}
	var out []string
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func quietLogger(t *testing.T) *slog.Logger {
	return testlog.New(t, slog.LevelInfo)
}

// serveMetrics starts m's endpoint on a free loopback port.
func serveMetrics(t *testing.T, m *metrics) string {
	t.Helper()
	srv, addr, err := m.serve("127.0.0.1:0", quietLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return addr.String()
}

// TestMetricsFromEvents drives the observer with a rank's life and checks
// every series the worker documents, over HTTP.
func TestMetricsFromEvents(t *testing.T) {
	m := newMetrics("w0", "cpu")
	var notReady atomic.Pointer[error]
	why := error(fmt.Errorf("%w: registration failed (retrying)", agent.ErrNotRegistered))
	notReady.Store(&why)
	m.watchReadiness(func() error { return *notReady.Load() })
	addr := serveMetrics(t, m)
	w := []string{"worker", "w0"}
	r1 := append(w[:2:2], "job", "j-1", "rank", "1")

	// Before any rank: the worker's own series, readiness, the Go and
	// process collectors (without the worker label), and no GPU series.
	s := scrapeAt(t, addr)
	s.want(t, 1, "m2train_worker_info", "worker", "w0", "device", "cpu")
	s.want(t, 0, "m2train_worker_ready", w...)
	s.want(t, 0, "m2train_worker_ranks", w...)
	s.want(t, 0, "m2train_worker_rank_starts_total", w...)
	for _, o := range []string{"finished", "stopped", "failed"} {
		s.want(t, 0, "m2train_worker_rank_ends_total", "worker", "w0", "outcome", o)
	}
	if g := s.find("go_goroutines"); len(g) != 1 || g[0].labels["worker"] != "" {
		t.Errorf("go_goroutines: %v", g)
	}
	if len(s.find("process_cpu_seconds_total")) != 1 {
		t.Error("no process_cpu_seconds_total")
	}
	if g := s.names("m2train_worker_gpu_"); len(g) != 0 {
		t.Errorf("GPU series without a GPU collector: %v", g)
	}
	if code, body := getURL(t, "http://"+addr+"/readyz"); code != http.StatusServiceUnavailable ||
		body != "not ready: agent: not registered with the coordinator: registration failed (retrying)\n" {
		t.Errorf("/readyz before registration: %d %q", code, body)
	}
	if code, body := getURL(t, "http://"+addr+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	why = nil
	notReady.Store(&why)
	if code, body := getURL(t, "http://"+addr+"/readyz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/readyz once registered: %d %q", code, body)
	}

	ev := agent.RankEvent{JobID: "j-1", Generation: 2, Rank: 1, World: 4}
	observe := func(k agent.RankEventKind, edit func(*agent.RankEvent)) {
		e := ev
		e.Kind = k
		if edit != nil {
			edit(&e)
		}
		m.observe(e)
	}
	observe(agent.RankStarted, nil)
	s = scrapeAt(t, addr)
	s.want(t, 1, "m2train_worker_ready", w...)
	s.want(t, 1, "m2train_worker_ranks", w...)
	s.want(t, 1, "m2train_worker_rank_starts_total", w...)
	s.want(t, 2, "m2train_worker_rank_generation", r1...)
	s.want(t, 0, "m2train_worker_rank_connected", r1...)
	// Counters start at zero; a step's gauges wait for its report.
	s.want(t, 0, "m2train_worker_rank_step_duration_seconds_count", r1...)
	s.want(t, 0, "m2train_worker_collective_sent_bytes_total", r1...)
	s.want(t, 0, "m2train_worker_collective_received_bytes_total", r1...)
	s.want(t, 0, "m2train_worker_collective_wait_seconds_total", r1...)
	s.want(t, 0, "m2train_worker_checkpoint_commits_total", r1...)
	s.want(t, 0, "m2train_worker_checkpoint_failures_total", append(r1, "stage", "save")...)
	s.want(t, 0, "m2train_worker_checkpoint_failures_total", append(r1, "stage", "coordinator")...)
	s.absent(t, "m2train_worker_rank_step", r1...)
	s.absent(t, "m2train_worker_checkpoint_upload_duration_seconds_count", r1...)

	observe(agent.RankConnected, nil)
	step := func(n int, stepTime, wait time.Duration, sent, recv int64) {
		observe(agent.RankProgress, func(e *agent.RankEvent) {
			e.Progress = agent.Progress{Step: n, Loss: 2.5 - float64(n)/100, TokensPerSec: 1000 + float64(n), GradNorm: 0.5, LR: 0.001,
				StepTime: stepTime, CommWait: wait}
			e.Collective = collective.Stats{BytesSent: sent, BytesReceived: recv}
		})
	}
	step(12, 250*time.Millisecond, 100*time.Millisecond, 1000, 3000)
	step(13, 500*time.Millisecond, 200*time.Millisecond, 3000, 4000)
	// A report of the previous generation (still returning) is ignored.
	observe(agent.RankProgress, func(e *agent.RankEvent) {
		e.Generation = 1
		e.Progress = agent.Progress{Step: 99, StepTime: time.Second}
	})
	observe(agent.RankCheckpoint, func(e *agent.RankEvent) {
		e.Checkpoint = agent.CheckpointInfo{Step: 12, Snapshot: 20 * time.Millisecond, Upload: 1500 * time.Millisecond}
	})
	observe(agent.RankCheckpoint, func(e *agent.RankEvent) {
		e.Checkpoint = agent.CheckpointInfo{Step: 13, Snapshot: 30 * time.Millisecond, Upload: 500 * time.Millisecond}
		e.Err = errors.New("the coordinator is unreachable")
	})
	observe(agent.RankCheckpointFailed, func(e *agent.RankEvent) {
		e.Checkpoint.Step, e.Err = 14, errors.New("disk full")
	})
	s = scrapeAt(t, addr)
	s.want(t, 1, "m2train_worker_rank_connected", r1...)
	s.want(t, 13, "m2train_worker_rank_step", r1...)
	s.want(t, 2.5-13.0/100, "m2train_worker_rank_loss", r1...)
	s.want(t, 1013, "m2train_worker_rank_tokens_per_second", r1...)
	s.want(t, 0.5, "m2train_worker_rank_grad_norm", r1...)
	s.want(t, 0.001, "m2train_worker_rank_learning_rate", r1...)
	s.want(t, 2, "m2train_worker_rank_step_duration_seconds_count", r1...)
	s.want(t, 0.75, "m2train_worker_rank_step_duration_seconds_sum", r1...)
	s.want(t, 3000, "m2train_worker_collective_sent_bytes_total", r1...)
	s.want(t, 4000, "m2train_worker_collective_received_bytes_total", r1...)
	s.want(t, (100*time.Millisecond).Seconds()+(200*time.Millisecond).Seconds(), "m2train_worker_collective_wait_seconds_total", r1...)
	// Step 13 moved 2000 + 1000 bytes in 0.5 s.
	s.want(t, 6000, "m2train_worker_collective_bandwidth_bytes_per_second", r1...)
	s.want(t, 2, "m2train_worker_checkpoint_commits_total", r1...)
	s.want(t, 1, "m2train_worker_checkpoint_failures_total", append(r1, "stage", "coordinator")...)
	s.want(t, 1, "m2train_worker_checkpoint_failures_total", append(r1, "stage", "save")...)
	s.want(t, 2, "m2train_worker_checkpoint_snapshot_duration_seconds_count", r1...)
	s.want(t, 0.02+0.03, "m2train_worker_checkpoint_snapshot_duration_seconds_sum", r1...)
	s.want(t, 2, "m2train_worker_checkpoint_upload_duration_seconds_count", r1...)
	s.want(t, 2, "m2train_worker_checkpoint_upload_duration_seconds_sum", r1...)

	// The end: the running rank's gauges go, its cumulative series stay
	// (with the bytes moved after the last step).
	observe(agent.RankEnded, func(e *agent.RankEvent) {
		e.Err = fmt.Errorf("rank stopped: %w", agent.ErrWithdrawn)
		e.Collective = collective.Stats{BytesSent: 3500, BytesReceived: 4000}
	})
	s = scrapeAt(t, addr)
	s.want(t, 0, "m2train_worker_ranks", w...)
	s.want(t, 1, "m2train_worker_rank_ends_total", "worker", "w0", "outcome", "stopped")
	for _, g := range []string{"rank_generation", "rank_connected", "rank_step", "rank_loss", "rank_tokens_per_second",
		"rank_grad_norm", "rank_learning_rate", "collective_bandwidth_bytes_per_second"} {
		s.absent(t, "m2train_worker_"+g, "job", "j-1")
	}
	s.want(t, 3500, "m2train_worker_collective_sent_bytes_total", r1...)
	s.want(t, 2, "m2train_worker_checkpoint_commits_total", r1...)
	s.want(t, 2, "m2train_worker_rank_step_duration_seconds_count", r1...)

	// Outcomes of a rank's end.
	for i, c := range []struct {
		err     error
		outcome string
	}{
		{nil, "finished"},
		{fmt.Errorf("%w (peer gone)", agent.ErrStale), "stopped"},
		{agent.ErrShutdown, "stopped"},
		{agent.ErrLeaseLost, "stopped"},
		{errors.New("collective: rank 2 lost"), "failed"},
		{agent.Fatal(errors.New("bad spec")), "failed"},
	} {
		id := fmt.Sprintf("o-%d", i)
		m.observe(agent.RankEvent{Kind: agent.RankStarted, JobID: id, Generation: 1, World: 1})
		m.observe(agent.RankEvent{Kind: agent.RankEnded, JobID: id, Generation: 1, World: 1, Err: c.err})
		if got := outcome(c.err); got != c.outcome {
			t.Errorf("outcome(%v) = %s, want %s", c.err, got, c.outcome)
		}
	}
	s = scrapeAt(t, addr)
	s.want(t, 1, "m2train_worker_rank_ends_total", "worker", "w0", "outcome", "finished")
	s.want(t, 4, "m2train_worker_rank_ends_total", "worker", "w0", "outcome", "stopped")
	s.want(t, 2, "m2train_worker_rank_ends_total", "worker", "w0", "outcome", "failed")
	s.want(t, 7, "m2train_worker_rank_starts_total", w...)
	// A world of one has no collective series.
	s.absent(t, "m2train_worker_collective_sent_bytes_total", "job", "o-0")
	s.want(t, 0, "m2train_worker_checkpoint_commits_total", "job", "o-0")

	// j-1 ended first: once endedKept ranks have ended after it, its
	// series go; the later ones stay.
	for i := range endedKept - 6 {
		id := fmt.Sprintf("k-%d", i)
		m.observe(agent.RankEvent{Kind: agent.RankStarted, JobID: id, Generation: 1, World: 2})
		m.observe(agent.RankEvent{Kind: agent.RankEnded, JobID: id, Generation: 1, World: 2})
	}
	s = scrapeAt(t, addr)
	for _, n := range []string{"collective_sent_bytes_total", "collective_received_bytes_total", "collective_wait_seconds_total",
		"rank_step_duration_seconds_count", "checkpoint_commits_total", "checkpoint_failures_total",
		"checkpoint_snapshot_duration_seconds_count", "checkpoint_upload_duration_seconds_count"} {
		s.absent(t, "m2train_worker_"+n, "job", "j-1")
	}
	s.want(t, 0, "m2train_worker_checkpoint_commits_total", "job", "o-0")
	s.want(t, 0, "m2train_worker_collective_sent_bytes_total", "job", fmt.Sprintf("k-%d", endedKept-7))

	// A new generation starts on another slot while the previous one is
	// still returning: the old one's end leaves the new one's series.
	g := agent.RankEvent{JobID: "j-2", Rank: 0, World: 2}
	for _, x := range []struct {
		kind agent.RankEventKind
		gen  uint64
	}{{agent.RankStarted, 1}, {agent.RankStarted, 2}, {agent.RankEnded, 1}, {agent.RankConnected, 1}} {
		e := g
		e.Kind, e.Generation = x.kind, x.gen
		m.observe(e)
	}
	s = scrapeAt(t, addr)
	s.want(t, 1, "m2train_worker_ranks", w...)
	s.want(t, 2, "m2train_worker_rank_generation", "job", "j-2", "rank", "0")
	s.want(t, 0, "m2train_worker_rank_connected", "job", "j-2", "rank", "0")
}

// TestGPUCollector samples GPUs through a fake NVML: the series of the
// devices CUDA_VISIBLE_DEVICES names, each query's series only where the
// device answered it, health and problems, and no device series while
// sampling fails.
func TestGPUCollector(t *testing.T) {
	t.Setenv("CUDA_VISIBLE_DEVICES", "1,0")
	healthy := gpuinfo.Device{Index: 0, UUID: "GPU-aaaa", Name: "NVIDIA H200", MemoryTotal: 150 << 30, MemoryUsed: 40 << 30,
		UtilizationGPU: 87, UtilizationMemory: 35, TemperatureC: 55, SlowdownC: 90, PowerMilliwatts: 350500}
	sick := gpuinfo.Device{Index: 1, UUID: "GPU-bbbb", Name: "NVIDIA H200", MemoryTotal: 150 << 30, MemoryUsed: 1 << 30,
		UtilizationGPU: 3, TemperatureC: 95, SlowdownC: 90, ECCUncorrected: 2,
		Problems: []string{"2 uncorrectable ECC errors", "too hot"}, Notes: []string{"power: Not Supported"}}
	hidden := gpuinfo.Device{Index: 2, UUID: "GPU-cccc", Name: "NVIDIA H200"}
	var fail atomic.Bool
	sampleFn := func() (*gpuinfo.Report, error) {
		if fail.Load() {
			return nil, errors.New("gpuinfo: NVML: GPU is lost")
		}
		return &gpuinfo.Report{Devices: []gpuinfo.Device{healthy, sick, hidden}}, nil
	}
	m := newMetrics("w0", "cuda")
	if err := m.addGPUs(newGPUCollector(sampleFn, cudaVisible, quietLogger(t))); err != nil {
		t.Fatal(err)
	}
	addr := serveMetrics(t, m)

	s := scrapeAt(t, addr)
	g0 := []string{"worker", "w0", "gpu", "0", "uuid", "GPU-aaaa", "name", "NVIDIA H200"}
	g1 := []string{"worker", "w0", "gpu", "1", "uuid", "GPU-bbbb", "name", "NVIDIA H200"}
	s.want(t, 0.87, "m2train_worker_gpu_utilization_ratio", g0...)
	s.want(t, 0.35, "m2train_worker_gpu_memory_utilization_ratio", g0...)
	s.want(t, 40<<30, "m2train_worker_gpu_memory_used_bytes", g0...)
	s.want(t, 150<<30, "m2train_worker_gpu_memory_total_bytes", g0...)
	s.want(t, 55, "m2train_worker_gpu_temperature_celsius", g0...)
	s.want(t, 350.5, "m2train_worker_gpu_power_watts", g0...)
	s.want(t, 1, "m2train_worker_gpu_healthy", g0...)
	s.absent(t, "m2train_worker_gpu_problem", "gpu", "0")

	s.want(t, 0.03, "m2train_worker_gpu_utilization_ratio", g1...)
	s.want(t, 95, "m2train_worker_gpu_temperature_celsius", g1...)
	s.absent(t, "m2train_worker_gpu_power_watts", "gpu", "1")
	s.want(t, 0, "m2train_worker_gpu_healthy", g1...)
	s.want(t, 1, "m2train_worker_gpu_problem", append(g1, "problem", gpuinfo.ProblemECCUncorrected)...)
	s.want(t, 1, "m2train_worker_gpu_problem", append(g1, "problem", gpuinfo.ProblemThermalSlowdown)...)
	if n := len(s.find("m2train_worker_gpu_problem")); n != 2 {
		t.Errorf("%d problem series, want 2", n)
	}
	s.absent(t, "m2train_worker_gpu_healthy", "gpu", "2")
	s.want(t, 0, "m2train_worker_gpu_sample_errors_total", "worker", "w0")

	fail.Store(true)
	s = scrapeAt(t, addr)
	if n := s.names("m2train_worker_gpu_"); len(n) != 1 || n[0] != "m2train_worker_gpu_sample_errors_total" {
		t.Errorf("GPU series while sampling fails: %v", n)
	}
	s.want(t, 1, "m2train_worker_gpu_sample_errors_total", "worker", "w0")
	fail.Store(false)
	s = scrapeAt(t, addr)
	s.want(t, 1, "m2train_worker_gpu_healthy", g0...)
	s.want(t, 1, "m2train_worker_gpu_sample_errors_total", "worker", "w0")

	// Without CUDA_VISIBLE_DEVICES every device is reported.
	t.Setenv("CUDA_VISIBLE_DEVICES", "")
	if got := cudaVisible([]gpuinfo.Device{healthy, sick}); len(got) != 0 {
		t.Errorf("CUDA_VISIBLE_DEVICES empty: %d devices, want none", len(got))
	}
	os.Unsetenv("CUDA_VISIBLE_DEVICES") // t.Setenv restores it
	if got := cudaVisible([]gpuinfo.Device{healthy, sick, hidden}); len(got) != 3 {
		t.Errorf("CUDA_VISIBLE_DEVICES unset: %d devices, want 3", len(got))
	}
}

// workerAt is a worker that run started in the test's process.
type workerAt struct {
	id   string
	addr string // its metrics endpoint
	done chan error
}

// startWorker runs the worker command in this process with args and the
// metrics endpoint on a free port, returning once it serves.
func startWorker(t *testing.T, ctx context.Context, id string, args []string, edit func(*agent.Config)) *workerAt {
	t.Helper()
	args = append([]string{"--id", id, "--advertise-host", "127.0.0.1", "--backend", "cpu", "--poll-interval", "100ms",
		"--metrics-addr", "127.0.0.1:0", "--cache-dir", t.TempDir(), "--log-level", "warn"}, args...)
	c, err := ParseFlags(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	w := &workerAt{id: id, done: make(chan error, 1)}
	serving := make(chan string, 1)
	stderr := testlog.Writer(t, id+": ")
	go func() {
		w.done <- run(ctx, c, stderr, runHooks{metricsAddr: func(a net.Addr) { serving <- a.String() }, agentConfig: edit})
	}()
	select {
	case w.addr = <-serving:
	case err := <-w.done:
		t.Fatalf("worker %s returned before serving metrics: %v", id, err)
	case <-ctx.Done():
		t.Fatalf("worker %s does not serve metrics", id)
	}
	return w
}

// waitScrape scrapes addr until cond holds and returns that scrape.
func waitScrape(t *testing.T, ctx context.Context, addr, what string, cond func(scrape) bool) scrape {
	t.Helper()
	for {
		s := scrapeAt(t, addr)
		if cond(s) {
			return s
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: never seen", what)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestReadyzWithoutCoordinator runs a worker whose coordinator does not
// answer: /readyz says 503 and why, /healthz 200.
func TestReadyzWithoutCoordinator(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := lis.Addr().String()
	lis.Close() // nothing listens there now
	wctx, stop := context.WithCancel(ctx)
	w := startWorker(t, wctx, "w0", []string{"--coordinator", dead}, func(c *agent.Config) { c.ReportTimeout = time.Second })
	defer func() {
		stop()
		if err := <-w.done; err != nil {
			t.Errorf("worker: %v", err)
		}
	}()
	code, body := getURL(t, "http://"+w.addr+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.HasPrefix(body, "not ready: agent: not registered with the coordinator: ") {
		t.Errorf("/readyz: %d %q", code, body)
	}
	for !strings.Contains(body, "register with the coordinator") || !strings.Contains(body, "(retrying)") {
		select {
		case <-ctx.Done():
			t.Fatalf("/readyz never names the failed registration: %d %q", code, body)
		case <-time.After(20 * time.Millisecond):
		}
		code, body = getURL(t, "http://"+w.addr+"/readyz")
		if code != http.StatusServiceUnavailable {
			t.Fatalf("/readyz: %d %q", code, body)
		}
	}
	t.Logf("/readyz: %d %s", code, strings.TrimSpace(body))
	scrapeAt(t, w.addr).want(t, 0, "m2train_worker_ready", "worker", "w0")
	if code, _ := getURL(t, "http://"+w.addr+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}
}

// TestWorkerMetrics trains a two-rank data-parallel job on the CPU on two
// workers run in this process against a real coordinator and etcd, and
// reads their /metrics over HTTP: while both ranks hold after step 5, the
// ranks' gauges equal what they reported; once the job succeeded, the step
// histograms count its 12 steps, rank 0 counts its three checkpoints, the
// bytes one rank sent are the bytes the other received, and the running
// ranks' gauges are gone. GPU series are there exactly when NVML answers.
func TestWorkerMetrics(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const prefix = "/metrics/"
	tc := startTestCluster(ctx, t, dir, prefix)
	c, cl, dataDir := tc.coord, tc.client, tc.dataDir

	// Each worker's ranks hold after step 5 until released.
	const holdStep, steps = 5, 12
	type heldRank struct {
		worker int
		e      agent.RankEvent
	}
	held := make(chan heldRank, 2)
	release := make(chan struct{})
	var releaseOnce atomic.Bool
	releaseAll := func() {
		if releaseOnce.CompareAndSwap(false, true) {
			close(release)
		}
	}
	wctx, stopWorkers := context.WithCancel(ctx)
	var workers []*workerAt
	defer func() {
		releaseAll()
		stopWorkers()
		for _, w := range workers {
			if err := <-w.done; err != nil {
				t.Errorf("worker %s: %v", w.id, err)
			}
		}
	}()
	for i, id := range []string{"w0", "w1"} {
		hold := func(cfg *agent.Config) {
			observe := cfg.OnRankEvent
			cfg.OnRankEvent = func(e agent.RankEvent) {
				observe(e)
				if e.Kind == agent.RankProgress && e.Generation == 1 && e.Progress.Step == holdStep {
					held <- heldRank{i, e}
					select {
					case <-release:
					case <-wctx.Done():
					}
				}
			}
		}
		workers = append(workers, startWorker(t, wctx, id, []string{"--coordinator", strings.Join(c.Addrs(), ","),
			"--etcd-prefix", prefix, "--collective-timeout", "2m"}, hold))
	}
	for _, w := range workers {
		waitScrape(t, ctx, w.addr, w.id+" ready", func(s scrape) bool {
			return len(s.find("m2train_worker_ready", "worker", w.id)) == 1 && s.value(t, "m2train_worker_ready", "worker", w.id) == 1
		})
		if code, body := getURL(t, "http://"+w.addr+"/readyz"); code != http.StatusOK {
			t.Fatalf("%s /readyz: %d %q", w.id, code, body)
		}
	}

	job, err := cl.Submit(ctx, fmt.Appendf(nil, `name: metrics
model: {config: {d_model: 32, n_layer: 1, vocab_size: 272, d_state: 16, headdim: 16, chunk_size: 16}}
data: {path: %s, seq_len: 32}
parallel: {dp: 2}
batch: {micro_batch: 1, global_batch: 2}
schedule: {total_steps: %d}
checkpoint: {location: %s, every_steps: 4}
backend: cpu
`, dataDir, steps, filepath.Join(dir, "ckpt")))
	if err != nil {
		t.Fatal(err)
	}
	jobID := job.GetId()

	// Both ranks hold after step 5.
	rankOf := map[int]int{} // worker -> rank
	for range 2 {
		select {
		case h := <-held:
			rankOf[h.worker] = h.e.Rank
			w := workers[h.worker]
			s := scrapeAt(t, w.addr)
			r := []string{"worker", w.id, "job", jobID, "rank", fmt.Sprint(h.e.Rank)}
			p := h.e.Progress
			s.want(t, 1, "m2train_worker_ranks", "worker", w.id)
			s.want(t, 1, "m2train_worker_rank_starts_total", "worker", w.id)
			s.want(t, 1, "m2train_worker_rank_generation", r...)
			s.want(t, 1, "m2train_worker_rank_connected", r...)
			s.want(t, holdStep, "m2train_worker_rank_step", r...)
			s.want(t, p.Loss, "m2train_worker_rank_loss", r...)
			s.want(t, p.TokensPerSec, "m2train_worker_rank_tokens_per_second", r...)
			s.want(t, p.GradNorm, "m2train_worker_rank_grad_norm", r...)
			s.want(t, p.LR, "m2train_worker_rank_learning_rate", r...)
			s.want(t, holdStep, "m2train_worker_rank_step_duration_seconds_count", r...)
			for _, n := range []string{"collective_sent_bytes_total", "collective_received_bytes_total",
				"collective_wait_seconds_total", "collective_bandwidth_bytes_per_second"} {
				if v := s.value(t, "m2train_worker_"+n, r...); v <= 0 {
					t.Errorf("%s rank %d: %s = %v, want > 0", w.id, h.e.Rank, n, v)
				}
			}
			if p.Loss <= 0 || p.LR <= 0 || p.TokensPerSec <= 0 || p.GradNorm <= 0 {
				t.Errorf("rank %d reported %+v", h.e.Rank, p)
			}
		case <-ctx.Done():
			t.Fatal("the ranks did not reach step 5")
		}
	}
	if len(rankOf) != 2 || rankOf[0] == rankOf[1] {
		t.Fatalf("ranks by worker %v", rankOf)
	}
	releaseAll()

	j, err := cl.Watch(ctx, jobID, func(*pb.Job) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("job ended %v: %s", j.GetState(), j.GetMessage())
	}
	// The coordinator learns of the end before the ranks' end events:
	// wait for them.
	final := map[int]scrape{} // by rank
	gpus, nvmlErr := gpuinfo.Discover()
	for i, w := range workers {
		s := waitScrape(t, ctx, w.addr, w.id+"'s rank end", func(s scrape) bool {
			return s.value(t, "m2train_worker_rank_ends_total", "worker", w.id, "outcome", "finished") == 1
		})
		rank := rankOf[i]
		final[rank] = s
		r := []string{"worker", w.id, "job", jobID, "rank", fmt.Sprint(rank)}
		s.want(t, 0, "m2train_worker_ranks", "worker", w.id)
		s.want(t, 0, "m2train_worker_rank_ends_total", "worker", w.id, "outcome", "stopped")
		s.want(t, 0, "m2train_worker_rank_ends_total", "worker", w.id, "outcome", "failed")
		for _, g := range []string{"rank_generation", "rank_connected", "rank_step", "rank_loss", "rank_tokens_per_second",
			"rank_grad_norm", "rank_learning_rate", "collective_bandwidth_bytes_per_second"} {
			s.absent(t, "m2train_worker_"+g, "job", jobID)
		}
		s.want(t, steps, "m2train_worker_rank_step_duration_seconds_count", r...)
		s.want(t, 0, "m2train_worker_checkpoint_failures_total", append(r, "stage", "save")...)
		s.want(t, 0, "m2train_worker_checkpoint_failures_total", append(r, "stage", "coordinator")...)
		if rank == 0 {
			// Steps 4, 8 and 12.
			s.want(t, 3, "m2train_worker_checkpoint_commits_total", r...)
			s.want(t, 3, "m2train_worker_checkpoint_snapshot_duration_seconds_count", r...)
			s.want(t, 3, "m2train_worker_checkpoint_upload_duration_seconds_count", r...)
		} else {
			s.want(t, 0, "m2train_worker_checkpoint_commits_total", r...)
			s.absent(t, "m2train_worker_checkpoint_upload_duration_seconds_count", r...)
		}
		if code, _ := getURL(t, "http://"+w.addr+"/healthz"); code != http.StatusOK {
			t.Errorf("%s /healthz: %d", w.id, code)
		}
		if len(s.find("go_goroutines")) != 1 || len(s.find("process_resident_memory_bytes")) != 1 {
			t.Errorf("%s: no Go or process collector series", w.id)
		}
		switch g := s.names("m2train_worker_gpu_"); {
		case nvmlErr != nil && len(g) != 0:
			t.Errorf("%s: GPU series without NVML (%v): %v", w.id, nvmlErr, g)
		case nvmlErr == nil && len(gpus.Devices) > 0 && len(s.find("m2train_worker_gpu_memory_total_bytes")) == 0:
			t.Errorf("%s: NVML sees %d GPUs, but there are no GPU series: %v", w.id, len(gpus.Devices), g)
		}
	}
	moved := func(rank int, n string) float64 {
		return final[rank].value(t, "m2train_worker_collective_"+n+"_bytes_total", "job", jobID, "rank", fmt.Sprint(rank))
	}
	if moved(0, "sent") != moved(1, "received") || moved(1, "sent") != moved(0, "received") {
		t.Errorf("rank 0 sent %v and received %v bytes; rank 1 sent %v and received %v",
			moved(0, "sent"), moved(0, "received"), moved(1, "sent"), moved(1, "received"))
	}
	t.Logf("rank 0 sent %v bytes and received %v", moved(0, "sent"), moved(0, "received"))
}
