package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/fsm"
	"github.com/m2train/m2train/coordinator/node"
)

// metricPrefix starts the name of every series of the coordinator; the
// series are documented in docs/metrics.md.
const metricPrefix = "m2train_coordinator_"

var (
	jobStates    = []fsm.JobState{fsm.JobQueued, fsm.JobRunning, fsm.JobSucceeded, fsm.JobFailed, fsm.JobCancelled}
	workerStates = []fsm.WorkerState{fsm.WorkerRegistered, fsm.WorkerAlive, fsm.WorkerLostState}
)

// observer holds a replica's metrics and health: a registry of its own
// (never the global one, which the embedded etcd fills), the gRPC
// interceptors and raft apply observer that feed it, and the state that
// /readyz reports. Its zero value is not usable; call newObserver.
type observer struct {
	reg     *prometheus.Registry
	node    atomic.Pointer[node.Node]
	serving atomic.Bool

	applyTime     prometheus.Histogram
	applyFailures prometheus.Counter
	requests      *prometheus.CounterVec
	requestTime   *prometheus.HistogramVec

	raftState, isLeader, term, lastIndex, commitIndex, appliedIndex, voters, leaderChanges, jobs, workers *prometheus.Desc

	// The job and worker counts are kept per FSM version, so that a scrape
	// does not copy every job when nothing changed.
	mu        sync.Mutex
	version   uint64
	counted   bool
	jobN      map[fsm.JobState]int
	workerN   map[fsm.WorkerState]int
	countedBy *node.Node
}

func newObserver() *observer {
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(metricPrefix+name, help, labels, nil)
	}
	o := &observer{
		reg: prometheus.NewRegistry(),
		applyTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: metricPrefix + "raft_apply_duration_seconds",
			Help: "Time from handing a command to raft on the leader until the leader applied it to the state machine, for commands that committed.",
			// 0.5 ms to about 8 s.
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 15),
		}),
		applyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "raft_apply_failures_total",
			Help: "Commands handed to raft that did not commit on this leader (leadership lost, timeout, shutdown).",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "api_requests_total",
			Help: "gRPC API calls finished, by method (Service/Method) and status code.",
		}, []string{"method", "code"}),
		requestTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: metricPrefix + "api_request_duration_seconds",
			Help: "Duration of gRPC API calls by method (for a stream, its whole life).",
			// 0.5 ms to about 16 s.
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"method"}),
		raftState:     desc("raft_state", "1 for the raft state this replica is in, 0 for the others.", "state"),
		isLeader:      desc("is_leader", "1 while this replica is the raft leader, else 0."),
		term:          desc("raft_term", "Current raft term."),
		lastIndex:     desc("raft_last_log_index", "Index of the last entry in this replica's raft log."),
		commitIndex:   desc("raft_commit_index", "Highest raft log index known to be committed."),
		appliedIndex:  desc("raft_applied_index", "Highest raft log index applied to this replica's state machine."),
		voters:        desc("raft_peers", "Voting servers in the latest raft configuration, this replica included."),
		leaderChanges: desc("raft_leader_changes_total", "Times this replica saw a new raft leader since it started."),
		jobs:          desc("jobs", "Jobs in the replicated state, by state.", "state"),
		workers:       desc("workers", "Workers in the replicated state, by state (alive: holding an etcd lease).", "state"),
	}
	o.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		o.applyTime, o.applyFailures, o.requests, o.requestTime,
		o,
	)
	return o
}

// setNode makes the raft node's state visible; until then the raft, job and
// worker series are absent.
func (o *observer) setNode(n *node.Node) { o.node.Store(n) }

// observeApply is the node's ApplyObserver.
func (o *observer) observeApply(took time.Duration, err error) {
	if err != nil {
		o.applyFailures.Inc()
		return
	}
	o.applyTime.Observe(took.Seconds())
}

// Describe implements prometheus.Collector.
func (o *observer) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{o.raftState, o.isLeader, o.term, o.lastIndex, o.commitIndex, o.appliedIndex, o.voters, o.leaderChanges, o.jobs, o.workers} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (o *observer) Collect(ch chan<- prometheus.Metric) {
	n := o.node.Load()
	if n == nil {
		return
	}
	st := n.RaftStats()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, s := range node.RaftStateNames() {
		gauge(o.raftState, b2f(st.State == s), s)
	}
	gauge(o.isLeader, b2f(st.State == node.StateLeader))
	gauge(o.term, float64(st.Term))
	gauge(o.lastIndex, float64(st.LastLogIndex))
	gauge(o.commitIndex, float64(st.CommitIndex))
	gauge(o.appliedIndex, float64(st.AppliedIndex))
	gauge(o.voters, float64(st.Voters))
	ch <- prometheus.MustNewConstMetric(o.leaderChanges, prometheus.CounterValue, float64(st.LeaderChanges))

	jobN, workerN := o.counts(n)
	for _, s := range jobStates {
		gauge(o.jobs, float64(jobN[s]), string(s))
	}
	for _, s := range workerStates {
		gauge(o.workers, float64(workerN[s]), string(s))
	}
}

func (o *observer) counts(n *node.Node) (map[fsm.JobState]int, map[fsm.WorkerState]int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	f := n.FSM()
	// The version is read before the state: a change in between makes the
	// next scrape count again.
	_, v := f.Changed()
	if o.counted && o.countedBy == n && v == o.version {
		return o.jobN, o.workerN
	}
	o.version = v
	o.jobN = map[fsm.JobState]int{}
	for _, j := range f.Jobs() {
		o.jobN[j.State]++
	}
	o.workerN = map[fsm.WorkerState]int{}
	for _, w := range f.Workers() {
		o.workerN[w.State]++
	}
	o.counted, o.countedBy = true, n
	return o.jobN, o.workerN
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// methodLabel shortens "/m2train.coordinator.v1.JobService/SubmitJob" to
// "JobService/SubmitJob".
func methodLabel(full string) string {
	full = strings.TrimPrefix(full, "/")
	svc, m, ok := strings.Cut(full, "/")
	if !ok {
		return full
	}
	if i := strings.LastIndexByte(svc, '.'); i >= 0 {
		svc = svc[i+1:]
	}
	return svc + "/" + m
}

// initMethods creates the OK series of every method the server registered,
// so that a rate over them exists before the first call.
func (o *observer) initMethods(g *grpc.Server) {
	for svc, info := range g.GetServiceInfo() {
		for _, m := range info.Methods {
			label := methodLabel("/" + svc + "/" + m.Name)
			o.requests.WithLabelValues(label, "OK")
			o.requestTime.WithLabelValues(label)
		}
	}
}

func (o *observer) record(method string, start time.Time, err error) {
	label := methodLabel(method)
	o.requests.WithLabelValues(label, status.Code(err).String()).Inc()
	o.requestTime.WithLabelValues(label).Observe(time.Since(start).Seconds())
}

// unary is the server's outermost unary interceptor.
func (o *observer) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	o.record(info.FullMethod, start, err)
	return resp, err
}

// stream is the server's outermost stream interceptor.
func (o *observer) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	start := time.Now()
	err := h(srv, ss)
	o.record(info.FullMethod, start, err)
	return err
}

// notReady returns why the replica should not receive client traffic, or
// "" when it should: its gRPC API serves and raft knows a leader (this
// replica or another, to which it redirects).
func (o *observer) notReady() string {
	if !o.serving.Load() {
		return "gRPC API not serving"
	}
	n := o.node.Load()
	if n == nil {
		return "raft not started"
	}
	if id, _ := n.Leader(); id == "" {
		return "no raft leader known"
	}
	return ""
}

// handler serves /metrics, /healthz and /readyz.
func (o *observer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{Registry: o.reg, ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		// Liveness: the process answers. It must not depend on raft, or a
		// replica waiting for its peers would be restarted for it.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if why := o.notReady(); why != "" {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, why)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// serveHTTP listens on addr and serves handler until the returned function
// is called.
func (o *observer) serveHTTP(addr string, log *slog.Logger) (stop func(), err error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr: %w", err)
	}
	srv := &http.Server{Handler: o.handler(), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(lis); !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	log.Info("metrics and health", "addr", lis.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			srv.Close()
		}
		<-done
	}, nil
}
