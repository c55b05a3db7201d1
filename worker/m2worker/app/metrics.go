package app

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/worker/agent"
)

// namespace prefixes every series of the worker's own (the Go runtime's
// and the process's series keep their standard names).
const namespace = "m2train_worker"

// endedKept is how many ended ranks keep their cumulative series (counters
// and histograms), so that the increments of a rank's last moments are
// still scraped after it ended; older ones are dropped, which bounds the
// series of a long-lived worker. A running rank's gauges go as it ends.
const endedKept = 16

// Outcomes of a rank's end, the values of rank_ends_total's outcome label.
const (
	outcomeFinished = "finished"
	outcomeStopped  = "stopped"
	outcomeFailed   = "failed"
)

// Stages of a checkpoint failure, the values of checkpoint_failures_total's
// stage label.
const (
	stageSave        = "save"
	stageCoordinator = "coordinator"
)

// metrics holds the worker's Prometheus series on a registry of its own:
// the ranks it runs, their steps, the collective's traffic, checkpoints,
// the GPUs (when NVML answers), readiness, and the Go runtime and process
// collectors. observe is the agent's OnRankEvent.
type metrics struct {
	// reg holds the series that are read as they are gathered (Go,
	// process, GPUs, readiness); ranks the series that observe updates,
	// gathered under mu so that a scrape never sees half an event (a
	// rank's end counted, its gauges not yet gone). Both add the worker
	// label to the worker's own series (own, ownRanks).
	reg, ranksReg *prometheus.Registry
	own, ownRanks prometheus.Registerer

	ranks  prometheus.Gauge
	starts prometheus.Counter
	ends   *prometheus.CounterVec

	// Per running rank (job, rank): removed when the rank ends.
	generation, connected, step, loss, tokensPerSec, gradNorm, lr, bandwidth *prometheus.GaugeVec
	// Per rank (job, rank), cumulative: kept for endedKept ended ranks.
	stepSeconds              *prometheus.HistogramVec
	sent, received, commWait *prometheus.CounterVec
	ckptSnapshot, ckptUpload *prometheus.HistogramVec
	ckptCommits, ckptFails   *prometheus.CounterVec

	mu    sync.Mutex
	live  map[rankID]*rankState
	ended []rankID // oldest first

	readyMu sync.Mutex
	ready   func() error
}

type rankID struct {
	job  string
	rank int
}

func (id rankID) labels() []string { return []string{id.job, strconv.Itoa(id.rank)} }

// rankState is what a running rank's events are compared against.
type rankState struct {
	generation uint64
	world      int
	// moved is the communicator's traffic at the previous event.
	moved collective.Stats
}

// newMetrics builds the registry of a worker; device is its backend.
func newMetrics(worker, device string) *metrics {
	reg, ranksReg := prometheus.NewRegistry(), prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	label := prometheus.Labels{"worker": worker}
	m := &metrics{reg: reg, ranksReg: ranksReg, own: prometheus.WrapRegistererWith(label, reg),
		ownRanks: prometheus.WrapRegistererWith(label, ranksReg), live: map[rankID]*rankState{}}
	rankLabels := []string{"job", "rank"}
	gauge := func(name, help string) *prometheus.GaugeVec {
		v := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, rankLabels)
		m.ownRanks.MustRegister(v)
		return v
	}
	counter := func(name, help string, extra ...string) *prometheus.CounterVec {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, append(rankLabels, extra...))
		m.ownRanks.MustRegister(v)
		return v
	}
	histogram := func(name, help string, buckets []float64) *prometheus.HistogramVec {
		v := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: name, Help: help, Buckets: buckets}, rankLabels)
		m.ownRanks.MustRegister(v)
		return v
	}

	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: "info",
		Help: "Always 1; device is the backend the worker trains on (cpu or cuda)."}, []string{"device"})
	info.WithLabelValues(device).Set(1)
	m.own.MustRegister(info)
	m.own.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: "ready",
		Help: "1 while the worker is registered with the coordinator and holds its lease, else 0 (/readyz says why)."},
		func() float64 {
			if m.readiness() == nil {
				return 1
			}
			return 0
		}))
	m.ranks = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "ranks", Help: "Ranks this worker runs now."})
	m.starts = prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "rank_starts_total",
		Help: "Ranks started (one per rank and generation)."})
	m.ends = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "rank_ends_total",
		Help: "Ranks that returned, by outcome: finished (the job's last step), stopped (withdrawn, stale, shutdown, lease lost) or failed."},
		[]string{"outcome"})
	for _, o := range []string{outcomeFinished, outcomeStopped, outcomeFailed} {
		m.ends.WithLabelValues(o)
	}
	m.ownRanks.MustRegister(m.ranks, m.starts, m.ends)

	m.generation = gauge("rank_generation", "Generation of the job that the rank runs.")
	m.connected = gauge("rank_connected", "1 once the rank's communicator is connected, else 0.")
	m.step = gauge("rank_step", "Last optimizer step of the rank.")
	m.loss = gauge("rank_loss", "Loss of the rank's last step.")
	m.tokensPerSec = gauge("rank_tokens_per_second", "Smoothed target tokens per second of the rank.")
	m.gradNorm = gauge("rank_grad_norm", "Gradient norm of the rank's last step (before clipping).")
	m.lr = gauge("rank_learning_rate", "Learning rate of the rank's last step.")
	m.bandwidth = gauge("collective_bandwidth_bytes_per_second",
		"Bytes the rank's communicator sent and received since the previous step's report, over the last step's wall time (ranks of a world of more than one).")
	m.stepSeconds = histogram("rank_step_duration_seconds", "Wall time of the rank's optimizer steps.", prometheus.ExponentialBuckets(0.001, 2, 18))
	m.sent = counter("collective_sent_bytes_total", "Payload bytes the rank's communicator sent to its peers (ranks of a world of more than one).")
	m.received = counter("collective_received_bytes_total", "Payload bytes the rank's communicator received from its peers (ranks of a world of more than one).")
	m.commWait = counter("collective_wait_seconds_total",
		"Seconds of the rank's steps spent blocked on other ranks: collective operations, the gradient all-reduce the backward pass did not hide, sequence-parallel receives (ranks of a world of more than one).")
	m.ckptSnapshot = histogram("checkpoint_snapshot_duration_seconds", "Time training paused while a checkpoint's state was copied.", prometheus.ExponentialBuckets(0.001, 2, 18))
	m.ckptUpload = histogram("checkpoint_upload_duration_seconds", "Time a checkpoint took to encode, write and commit to the store, in the background.", prometheus.ExponentialBuckets(0.01, 2, 18))
	m.ckptCommits = counter("checkpoint_commits_total", "Checkpoints the rank wrote and committed to the store (rank 0 writes them).")
	m.ckptFails = counter("checkpoint_failures_total",
		"Checkpoint failures by stage: save (writing to the store failed) or coordinator (written, but the coordinator did not commit it).", "stage")
	return m
}

// observe is the agent's OnRankEvent.
func (m *metrics) observe(e agent.RankEvent) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := rankID{job: e.JobID, rank: e.Rank}
	lv := id.labels()
	st := m.live[id]
	current := st != nil && st.generation == e.Generation
	switch e.Kind {
	case agent.RankStarted:
		// A newer generation replaces one still returning on another slot.
		m.live[id] = &rankState{generation: e.Generation, world: e.World}
		m.ended = deleteID(m.ended, id)
		m.starts.Inc()
		m.generation.WithLabelValues(lv...).Set(float64(e.Generation))
		m.connected.WithLabelValues(lv...).Set(0)
		// Counters the rank may never bump start at zero, so that rates
		// and increases see their first event.
		m.stepSeconds.WithLabelValues(lv...)
		m.ckptCommits.WithLabelValues(lv...)
		m.ckptFails.WithLabelValues(append(lv, stageSave)...)
		m.ckptFails.WithLabelValues(append(lv, stageCoordinator)...)
		if e.World > 1 {
			m.sent.WithLabelValues(lv...)
			m.received.WithLabelValues(lv...)
			m.commWait.WithLabelValues(lv...)
		}
	case agent.RankConnected:
		if current {
			m.connected.WithLabelValues(lv...).Set(1)
		}
	case agent.RankProgress:
		if !current {
			return
		}
		p := e.Progress
		m.step.WithLabelValues(lv...).Set(float64(p.Step))
		m.loss.WithLabelValues(lv...).Set(p.Loss)
		m.tokensPerSec.WithLabelValues(lv...).Set(p.TokensPerSec)
		m.gradNorm.WithLabelValues(lv...).Set(p.GradNorm)
		m.lr.WithLabelValues(lv...).Set(p.LR)
		if p.StepTime > 0 {
			m.stepSeconds.WithLabelValues(lv...).Observe(p.StepTime.Seconds())
		}
		if st.world > 1 {
			moved := m.addMoved(id, st, e.Collective)
			m.commWait.WithLabelValues(lv...).Add(p.CommWait.Seconds())
			if p.StepTime > 0 {
				m.bandwidth.WithLabelValues(lv...).Set(float64(moved) / p.StepTime.Seconds())
			}
		}
	case agent.RankCheckpoint:
		m.ckptCommits.WithLabelValues(lv...).Inc()
		m.ckptSnapshot.WithLabelValues(lv...).Observe(e.Checkpoint.Snapshot.Seconds())
		m.ckptUpload.WithLabelValues(lv...).Observe(e.Checkpoint.Upload.Seconds())
		if e.Err != nil {
			m.ckptFails.WithLabelValues(append(lv, stageCoordinator)...).Inc()
		}
	case agent.RankCheckpointFailed:
		m.ckptFails.WithLabelValues(append(lv, stageSave)...).Inc()
	case agent.RankEnded:
		m.ends.WithLabelValues(outcome(e.Err)).Inc()
		if !current {
			return // an older generation, replaced already
		}
		if st.world > 1 {
			m.addMoved(id, st, e.Collective)
		}
		for _, g := range []*prometheus.GaugeVec{m.generation, m.connected, m.step, m.loss, m.tokensPerSec, m.gradNorm, m.lr, m.bandwidth} {
			g.DeleteLabelValues(lv...)
		}
		delete(m.live, id)
		m.ended = append(m.ended, id)
		for len(m.ended) > endedKept {
			old := m.ended[0]
			m.ended = m.ended[1:]
			match := prometheus.Labels{"job": old.job, "rank": strconv.Itoa(old.rank)}
			for _, c := range []interface{ DeletePartialMatch(prometheus.Labels) int }{
				m.stepSeconds, m.sent, m.received, m.commWait, m.ckptSnapshot, m.ckptUpload, m.ckptCommits, m.ckptFails,
			} {
				c.DeletePartialMatch(match)
			}
		}
	}
	m.ranks.Set(float64(len(m.live)))
}

// addMoved adds the traffic since the rank's previous event to the byte
// counters and returns it (sent plus received).
func (m *metrics) addMoved(id rankID, st *rankState, now collective.Stats) int64 {
	ds, dr := now.BytesSent-st.moved.BytesSent, now.BytesReceived-st.moved.BytesReceived
	if ds < 0 || dr < 0 {
		// Not the communicator of the previous event: count it afresh.
		ds, dr = now.BytesSent, now.BytesReceived
	}
	st.moved = now
	lv := id.labels()
	m.sent.WithLabelValues(lv...).Add(float64(ds))
	m.received.WithLabelValues(lv...).Add(float64(dr))
	return ds + dr
}

// outcome classifies how a rank ended (RankEvent.Err).
func outcome(err error) string {
	switch {
	case err == nil:
		return outcomeFinished
	case errors.Is(err, agent.ErrWithdrawn) || errors.Is(err, agent.ErrStale) ||
		errors.Is(err, agent.ErrShutdown) || errors.Is(err, agent.ErrLeaseLost):
		return outcomeStopped
	}
	return outcomeFailed
}

func deleteID(ids []rankID, id rankID) []rankID {
	out := ids[:0]
	for _, x := range ids {
		if x != id {
			out = append(out, x)
		}
	}
	return out
}

// watchReadiness sets the worker's readiness: nil when ready, else why not.
func (m *metrics) watchReadiness(ready func() error) {
	m.readyMu.Lock()
	m.ready = ready
	m.readyMu.Unlock()
}

var errStarting = errors.New("the worker is starting")

func (m *metrics) readiness() error {
	m.readyMu.Lock()
	ready := m.ready
	m.readyMu.Unlock()
	if ready == nil {
		return errStarting
	}
	return ready()
}

// addGPUs registers a collector of the worker's GPUs.
func (m *metrics) addGPUs(c prometheus.Collector) error { return m.own.Register(c) }

// handler serves /metrics, /healthz (the process answers) and /readyz
// (200 while the worker is registered with the coordinator, else 503 with
// the reason).
func (m *metrics) handler(log *slog.Logger) http.Handler {
	ranks := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.ranksReg.Gather()
	})
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{m.reg, ranks}, promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ErrorHandling: promhttp.ContinueOnError,
		Registry:      m.reg,
	}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if err := m.readiness(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "not ready: "+err.Error()+"\n")
			return
		}
		io.WriteString(w, "ok\n")
	})
	return mux
}

// serve starts the metrics endpoint on addr and returns the server and the
// address it listens on.
func (m *metrics) serve(addr string, log *slog.Logger) (*http.Server, net.Addr, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	srv := &http.Server{Handler: m.handler(log), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("the metrics endpoint stopped", "addr", lis.Addr().String(), "err", err)
		}
	}()
	return srv, lis.Addr(), nil
}
