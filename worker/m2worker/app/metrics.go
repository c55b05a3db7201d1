package app

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/m2train/m2train/worker/agent"
)

// metrics keeps the worker's numbers for the Prometheus text format: the
// ranks it runs and their last step, and counts of the ranks' endings.
type metrics struct {
	worker, device string

	mu     sync.Mutex
	ranks  map[rankID]*rankState
	ended  map[string]int // by outcome: finished, stopped, failed
	starts int
}

type rankID struct {
	job  string
	rank int
}

type rankState struct {
	generation uint64
	connected  bool
	progress   agent.Progress
	updated    time.Time
}

func newMetrics(worker, device string) *metrics {
	return &metrics{worker: worker, device: device, ranks: map[rankID]*rankState{}, ended: map[string]int{}}
}

// observe is the agent's OnRankEvent.
func (m *metrics) observe(e agent.RankEvent) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := rankID{job: e.JobID, rank: e.Rank}
	switch e.Kind {
	case agent.RankStarted:
		m.starts++
		m.ranks[id] = &rankState{generation: e.Generation}
	case agent.RankConnected:
		if s := m.ranks[id]; s != nil {
			s.connected = true
		}
	case agent.RankProgress:
		if s := m.ranks[id]; s != nil {
			s.progress, s.updated = e.Progress, time.Now()
		}
	case agent.RankEnded:
		delete(m.ranks, id)
		outcome := "failed"
		switch {
		case e.Err == nil:
			outcome = "finished"
		case errors.Is(e.Err, agent.ErrWithdrawn) || errors.Is(e.Err, agent.ErrStale) ||
			errors.Is(e.Err, agent.ErrShutdown) || errors.Is(e.Err, agent.ErrLeaseLost):
			outcome = "stopped"
		}
		m.ended[outcome]++
	}
}

// ServeHTTP writes the metrics in the Prometheus text format.
func (m *metrics) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	m.write(w)
}

func (m *metrics) write(w io.Writer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	base := fmt.Sprintf("worker=%q,device=%q", m.worker, m.device)
	gauge := func(name, help string) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name)
	}
	gauge("m2worker_ranks", "Ranks this worker runs now.")
	fmt.Fprintf(w, "m2worker_ranks{%s} %d\n", base, len(m.ranks))
	fmt.Fprintf(w, "# HELP m2worker_rank_starts_total Ranks started (one per rank and generation).\n# TYPE m2worker_rank_starts_total counter\n")
	fmt.Fprintf(w, "m2worker_rank_starts_total{%s} %d\n", base, m.starts)
	fmt.Fprintf(w, "# HELP m2worker_rank_ends_total Ranks that returned, by outcome (finished, stopped, failed).\n# TYPE m2worker_rank_ends_total counter\n")
	for _, o := range []string{"finished", "stopped", "failed"} {
		fmt.Fprintf(w, "m2worker_rank_ends_total{%s,outcome=%q} %d\n", base, o, m.ended[o])
	}
	ids := make([]rankID, 0, len(m.ranks))
	for id := range m.ranks {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, func(a, b rankID) int {
		if c := strings.Compare(a.job, b.job); c != 0 {
			return c
		}
		return a.rank - b.rank
	})
	series := []struct {
		name, help string
		value      func(*rankState) string
	}{
		{"m2worker_rank_generation", "Generation of the job the rank runs.", func(s *rankState) string { return strconv.FormatUint(s.generation, 10) }},
		{"m2worker_rank_connected", "1 once the rank's communicator is connected.", func(s *rankState) string { return boolNum(s.connected) }},
		{"m2worker_rank_step", "Last optimizer step of the rank.", func(s *rankState) string { return strconv.Itoa(s.progress.Step) }},
		{"m2worker_rank_loss", "Loss of the rank's last step.", func(s *rankState) string { return num(s.progress.Loss) }},
		{"m2worker_rank_tokens_per_second", "Smoothed target tokens per second of the rank.", func(s *rankState) string { return num(s.progress.TokensPerSec) }},
		{"m2worker_rank_grad_norm", "Gradient norm of the rank's last step.", func(s *rankState) string { return num(s.progress.GradNorm) }},
		{"m2worker_rank_learning_rate", "Learning rate of the rank's last step.", func(s *rankState) string { return num(s.progress.LR) }},
	}
	for _, s := range series {
		gauge(s.name, s.help)
		for _, id := range ids {
			fmt.Fprintf(w, "%s{%s,job=%q,rank=\"%d\"} %s\n", s.name, base, id.job, id.rank, s.value(m.ranks[id]))
		}
	}
}

func num(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }

func boolNum(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// serve starts the metrics endpoint: /metrics and /healthz.
func (m *metrics) serve(addr string) (*http.Server, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(lis)
	return srv, nil
}
