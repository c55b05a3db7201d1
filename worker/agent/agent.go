package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/coordinator/membership"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// Agent is one worker process's life cycle. Create it with New and call Run
// once.
type Agent struct {
	cfg Config
	log *slog.Logger
	cl  *client.Client

	mu sync.Mutex
	// runs holds the rank running on each slot, including one that was
	// told to stop and has not returned yet.
	runs map[int]*run
	// ended holds the ranks that returned while their assignment was
	// still listed: they are not started again for the same generation.
	ended map[rankKey]bool
	// wake asks the poll loop to look again at once (a rank returned).
	wake chan struct{}

	// notReady is why the worker is not registered now; nil while it is.
	readyMu  sync.Mutex
	notReady error
}

// rankKey identifies a rank of a generation.
type rankKey struct {
	job  string
	gen  uint64
	rank int
}

func keyOf(a *pb.RankAssignment) rankKey {
	return rankKey{job: a.GetJobId(), gen: a.GetGeneration(), rank: int(a.GetRank())}
}

type run struct {
	key    rankKey
	cancel context.CancelCauseFunc
	done   chan struct{}
}

// New validates cfg and returns an agent.
func New(cfg Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cl, err := client.New(client.Config{Addrs: cfg.Coordinators, Creds: cfg.CoordinatorCreds, Token: cfg.Token})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return &Agent{cfg: cfg, log: log.With("worker", cfg.WorkerID), cl: cl, runs: map[int]*run{},
		ended: map[rankKey]bool{}, wake: make(chan struct{}, 1),
		notReady: fmt.Errorf("%w: Run has not registered it yet", ErrNotRegistered)}, nil
}

// Ready returns nil while the worker is registered with the coordinator
// and holds its lease, and otherwise an error that wraps ErrNotRegistered
// and says why (not yet registered, a registration failing and retried,
// the lease lost, the worker stopping). It is the worker's readiness.
func (a *Agent) Ready() error {
	a.readyMu.Lock()
	defer a.readyMu.Unlock()
	return a.notReady
}

func (a *Agent) setReady(why error) {
	if why != nil {
		why = fmt.Errorf("%w: %w", ErrNotRegistered, why)
	}
	a.readyMu.Lock()
	a.notReady = why
	a.readyMu.Unlock()
}

// Run registers the worker and runs the ranks the coordinator places on it
// until ctx ends, then shuts down gracefully: it revokes the lease, so that
// the coordinator ends the generations of the worker's jobs at once and
// places them elsewhere, then stops the ranks (each abandons its step and
// closes its communicator) and waits for them up to
// Config.ShutdownTimeout. A lost lease stops the ranks too, and the worker
// registers again. Run
// returns nil after a shutdown, or an error the coordinator gave that
// retrying cannot cure (a rejected worker ID, a missing token).
func (a *Agent) Run(ctx context.Context) error {
	defer a.cl.Close()
	backoff := 200 * time.Millisecond
	for {
		sess, etcd, err := a.register(ctx)
		if err != nil {
			if ctx.Err() != nil {
				a.setReady(ErrShutdown)
				return nil
			}
			if permanent(err) {
				a.setReady(err)
				return err
			}
			a.setReady(fmt.Errorf("%w (retrying)", err))
			a.log.Warn("registration failed; retrying", "in", backoff, "err", err)
			if !sleepCtx(ctx, backoff) {
				return nil
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 200 * time.Millisecond
		a.setReady(nil)
		a.log.Info("registered", "lease", fmt.Sprintf("%x", int64(sess.Lease())), "slots", a.cfg.slots())
		// The ranks' contexts end with the agent's own causes, never
		// directly with ctx, so that a rank tells a stop from a failure and
		// a shutdown can release the lease before the ranks stop.
		ranks, stopRanks := context.WithCancelCause(context.WithoutCancel(ctx))
		watch := make(chan struct{})
		watched := make(chan struct{})
		go func() {
			defer close(watched)
			select {
			case <-sess.Done():
				stopRanks(ErrLeaseLost)
			case <-watch:
			}
		}()
		cause := a.serve(ctx, sess, ranks)
		a.setReady(cause)
		close(watch)
		<-watched
		if errors.Is(cause, ErrShutdown) {
			// Release the lease before the ranks stop: the coordinator
			// marks the worker lost and ends the generation at once.
			// Stopping a rank first would abort its peers' operations,
			// they would report the failure, and the job could be placed
			// again on this worker, still alive, only to be requeued once
			// more when the lease goes.
			if err := sess.Close(); err != nil {
				a.log.Warn("revoking the lease failed; the coordinator notices when it expires", "err", err)
			}
			a.stopAll(cause)
		} else {
			a.stopAll(cause)
			sess.Close()
		}
		stopRanks(cause)
		etcd.Close()
		if ctx.Err() != nil {
			a.log.Info("worker stopped; lease released")
			return nil
		}
		a.log.Warn("lease lost: the ranks were stopped; registering again")
	}
}

// permanent reports whether a coordinator error will not go away by
// retrying.
func permanent(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.Unauthenticated, codes.PermissionDenied:
		return true
	}
	return errors.Is(err, membership.ErrInvalid)
}

// register announces the worker to the coordinator, connects to the etcd
// it names and takes a lease there.
func (a *Agent) register(ctx context.Context) (*membership.Session, *clientv3.Client, error) {
	addr := a.cfg.AdvertiseHost
	if a.cfg.CollectivePort > 0 {
		addr = net.JoinHostPort(a.cfg.AdvertiseHost, strconv.Itoa(a.cfg.CollectivePort))
	}
	rctx, cancel := context.WithTimeout(ctx, a.cfg.ReportTimeout)
	defer cancel()
	resp, err := a.cl.RegisterWorker(rctx, &pb.RegisterWorkerRequest{WorkerId: a.cfg.WorkerID, Addr: addr,
		Gpus: int32(a.cfg.GPUs), Hostname: a.cfg.Hostname})
	if err != nil {
		return nil, nil, fmt.Errorf("agent: register with the coordinator: %w", err)
	}
	if len(resp.GetEtcdEndpoints()) == 0 {
		return nil, nil, errors.New("agent: the coordinator names no etcd endpoint for worker leases")
	}
	etcd, err := clientv3.New(clientv3.Config{Endpoints: resp.GetEtcdEndpoints(), DialTimeout: 5 * time.Second,
		TLS: a.cfg.EtcdTLS, Logger: zap.NewNop(), Context: ctx})
	if err != nil {
		return nil, nil, fmt.Errorf("agent: etcd client for %v: %w", resp.GetEtcdEndpoints(), err)
	}
	sess, err := membership.Register(rctx, etcd, membership.WorkerInfo{ID: a.cfg.WorkerID, Addr: addr,
		Hostname: a.cfg.Hostname, GPUs: a.cfg.GPUs}, membership.Options{TTL: int(resp.GetLeaseTtlSeconds()), Prefix: a.cfg.EtcdPrefix})
	if err != nil {
		etcd.Close()
		return nil, nil, err
	}
	return sess, etcd, nil
}

// serve polls the assignments and starts and stops ranks, whose contexts
// derive from ranks, until ctx ends (ErrShutdown) or the lease is lost
// (ErrLeaseLost); it returns the cause. A poll that fails (an election at
// the coordinator) changes nothing: the ranks go on.
func (a *Agent) serve(ctx context.Context, sess *membership.Session, ranks context.Context) error {
	// Polls end with the shutdown or the lease; the ranks (whose contexts
	// derive from ranks) are stopped by Run.
	pctxBase, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := context.AfterFunc(ranks, func() { cancel(context.Cause(ranks)) })
	defer stop()
	tick := time.NewTicker(a.cfg.PollInterval)
	defer tick.Stop()
	failing := false
	for {
		pctx, pcancel := context.WithTimeout(pctxBase, a.cfg.ReportTimeout)
		as, err := a.cl.GetAssignment(pctx, a.cfg.WorkerID)
		pcancel()
		switch {
		case pctxBase.Err() != nil:
		case err != nil:
			if !failing {
				a.log.Warn("polling the assignments failed; the ranks go on", "err", err)
			}
			failing = true
		default:
			if failing {
				a.log.Info("the coordinator answers again")
			}
			failing = false
			a.reconcile(ranks, sess, as)
		}
		select {
		case <-ctx.Done():
			return ErrShutdown
		case <-sess.Done():
			return ErrLeaseLost
		case <-ranks.Done():
			return context.Cause(ranks)
		case <-tick.C:
		case <-a.wake:
		}
	}
}

// reconcile stops the ranks whose assignment is gone or changed and starts
// the new ones. A slot whose previous rank is still returning gets its new
// rank at a later poll.
func (a *Agent) reconcile(ctx context.Context, sess *membership.Session, as []*pb.RankAssignment) {
	a.mu.Lock()
	defer a.mu.Unlock()
	want := map[int]*pb.RankAssignment{}
	listed := map[rankKey]bool{}
	for _, x := range as {
		k := keyOf(x)
		listed[k] = true
		slot := int(x.GetGpu())
		if slot < 0 || slot >= a.cfg.slots() {
			if !a.ended[k] {
				a.ended[k] = true
				go a.refuse(ctx, x, fmt.Errorf("worker %s has %d slots; the coordinator placed rank %d on slot %d", a.cfg.WorkerID, a.cfg.slots(), x.GetRank(), slot))
			}
			continue
		}
		want[slot] = x
	}
	for slot, r := range a.runs {
		if x, ok := want[slot]; !ok || keyOf(x) != r.key {
			r.cancel(ErrWithdrawn)
		}
	}
	for slot, x := range want {
		k := keyOf(x)
		if a.ended[k] || a.runs[slot] != nil {
			continue
		}
		rctx, cancel := context.WithCancelCause(ctx)
		r := &run{key: k, cancel: cancel, done: make(chan struct{})}
		a.runs[slot] = r
		go func() {
			defer close(r.done)
			defer cancel(nil)
			a.runRank(rctx, cancel, sess, x)
			a.mu.Lock()
			if a.runs[slot] == r {
				delete(a.runs, slot)
			}
			a.ended[k] = true
			a.mu.Unlock()
			select {
			case a.wake <- struct{}{}:
			default:
			}
		}()
	}
	for k := range a.ended {
		if !listed[k] {
			delete(a.ended, k)
		}
	}
}

// refuse reports an assignment the worker cannot run.
func (a *Agent) refuse(ctx context.Context, x *pb.RankAssignment, why error) {
	a.log.Error("refusing an assignment", "job", x.GetJobId(), "generation", x.GetGeneration(), "rank", x.GetRank(), "err", why)
	rep := newReporter(a.cl, x.GetJobId(), x.GetGeneration(), int(x.GetRank()), a.cfg.WorkerID, a.cfg.ReportTimeout, a.log, func(error) {}, nil)
	if err := rep.failure(ctx, why, false); err != nil {
		a.log.Warn("reporting the refusal failed", "err", err)
	}
}

// stopAll stops every rank with cause and waits for them, at most
// ShutdownTimeout.
func (a *Agent) stopAll(cause error) {
	a.mu.Lock()
	var done []chan struct{}
	for _, r := range a.runs {
		r.cancel(cause)
		done = append(done, r.done)
	}
	a.mu.Unlock()
	if len(done) == 0 {
		return
	}
	a.log.Info("stopping the ranks", "ranks", len(done), "cause", cause)
	deadline := time.NewTimer(a.cfg.ShutdownTimeout)
	defer deadline.Stop()
	for _, d := range done {
		select {
		case <-d:
		case <-deadline.C:
			a.log.Error("ranks did not stop in time; leaving them", "timeout", a.cfg.ShutdownTimeout)
			return
		}
	}
}

// runRank runs one rank of one generation and reports how it ended: the
// end of the job (rank 0), or a failure, unless the agent stopped it.
func (a *Agent) runRank(ctx context.Context, stop context.CancelCauseFunc, sess *membership.Session, x *pb.RankAssignment) {
	log := a.log.With("job", x.GetJobId(), "generation", x.GetGeneration(), "rank", x.GetRank())
	ev := RankEvent{JobID: x.GetJobId(), Generation: x.GetGeneration(), Rank: int(x.GetRank()), World: int(x.GetWorldSize())}
	a.event(ev, RankStarted)
	// comm is the rank's world communicator once connected: the events
	// carry what it has moved.
	var comm atomic.Pointer[collective.Communicator]
	moved := func() collective.Stats {
		if c := comm.Load(); c != nil {
			return c.Stats()
		}
		return collective.Stats{}
	}
	onProgress := func(p Progress) {
		e := ev
		e.Progress, e.Collective = p, moved()
		a.event(e, RankProgress)
	}
	onCheckpoint := func(k RankEventKind, c CheckpointInfo, err error) {
		e := ev
		e.Checkpoint, e.Err = c, err
		a.event(e, k)
	}
	rep := newReporter(a.cl, x.GetJobId(), x.GetGeneration(), int(x.GetRank()), a.cfg.WorkerID, a.cfg.ReportTimeout, log, stop, onProgress)
	log.Info("rank starting", "world", x.GetWorldSize(), "dp_rank", x.GetDpRank(), "sp_rank", x.GetSpRank(),
		"slot", x.GetGpu(), "resume_from", x.GetResumeFrom().GetStep())
	res, err := a.execRank(ctx, sess, x, rep, log, func(c *collective.Communicator) {
		comm.Store(c)
		a.event(ev, RankConnected)
	}, onCheckpoint)
	cause := context.Cause(ctx)
	switch {
	case ctx.Err() != nil:
		log.Info("rank stopped", "step", res.Step, "cause", cause)
		err = cause
	case err == nil:
		log.Info("rank finished", "step", res.Step, "loss", res.Loss)
		if x.GetRank() == 0 {
			if ferr := rep.finish(ctx, res); ferr != nil {
				log.Error("the end of the job could not be reported", "err", ferr)
			}
		}
	default:
		fatal := IsFatal(err)
		switch rerr := rep.failure(ctx, err, fatal); {
		case rerr == nil:
			log.Error("rank failed; the generation ends", "step", res.Step, "fatal", fatal, "err", err)
		case errors.Is(rerr, ErrStale):
			// Another rank or the coordinator ended the generation first;
			// this rank's error is the echo of it (a peer that stopped).
			log.Info("rank stopped: its generation had already ended", "step", res.Step, "err", err)
			err = fmt.Errorf("%w (%v)", ErrStale, err)
		case ctx.Err() != nil:
			// The agent stopped the rank while the report was under way
			// (the job was cancelled, and a peer withdrawn first aborted
			// the step): the stop is why the rank ended.
			log.Info("rank stopped while reporting its failure", "step", res.Step, "cause", context.Cause(ctx), "err", err)
			err = fmt.Errorf("%w (%v)", context.Cause(ctx), err)
		default:
			log.Error("rank failed, and the failure could not be reported; the coordinator learns of it from the other ranks or the lease",
				"step", res.Step, "fatal", fatal, "err", err, "report_err", rerr)
		}
	}
	ev.Progress = rep.lastProgress()
	ev.Progress.Step, ev.Progress.Loss = res.Step, res.Loss
	ev.Collective = moved()
	ev.Err = err
	a.event(ev, RankEnded)
}

func (a *Agent) event(e RankEvent, k RankEventKind) {
	if a.cfg.OnRankEvent != nil {
		e.Kind = k
		a.cfg.OnRankEvent(e)
	}
}

// execRank checks the assignment, meets the other ranks, builds the
// communicators and runs the rank; connected is called with the world
// communicator once it is up, and onCheckpoint receives the rank's
// checkpoint events.
func (a *Agent) execRank(ctx context.Context, sess *membership.Session, x *pb.RankAssignment, rep *reporter, log *slog.Logger,
	connected func(*collective.Communicator), onCheckpoint func(RankEventKind, CheckpointInfo, error)) (Result, error) {
	spec, err := jobspec.Parse([]byte(x.GetSpecYaml()))
	if err != nil {
		return Result{}, Fatal(fmt.Errorf("agent: the assignment's spec: %w", err))
	}
	world, rank := int(x.GetWorldSize()), int(x.GetRank())
	dp, sp := spec.Parallel.DP, spec.Parallel.SP
	switch {
	case world != dp*sp:
		return Result{}, Fatal(fmt.Errorf("agent: world_size %d is not dp %d × sp %d", world, dp, sp))
	case rank < 0 || rank >= world:
		return Result{}, Fatal(fmt.Errorf("agent: rank %d is outside a world of %d", rank, world))
	case int(x.GetDpRank()) != rank/sp || int(x.GetSpRank()) != rank%sp:
		return Result{}, Fatal(fmt.Errorf("agent: rank %d has dp_rank %d and sp_rank %d; with sp %d it must be %d and %d",
			rank, x.GetDpRank(), x.GetSpRank(), sp, rank/sp, rank%sp))
	}
	lis, err := a.listen(ctx, int(x.GetGpu()))
	if err != nil {
		return Result{}, err
	}
	_, port, _ := net.SplitHostPort(lis.Addr().String())
	addr := net.JoinHostPort(a.cfg.AdvertiseHost, port)

	rctx, cancel := context.WithTimeout(ctx, a.cfg.RendezvousTimeout)
	defer cancel()
	addrs, err := sess.Rendezvous(rctx, x.GetJobId(), x.GetGeneration(), rank, world, addr)
	if err != nil {
		lis.Close()
		return Result{}, fmt.Errorf("agent: rendezvous of generation %d: %w", x.GetGeneration(), err)
	}
	log.Debug("rendezvous complete", "addrs", addrs)
	ccfg := a.cfg.Collective
	ccfg.Generation = x.GetGeneration()
	ccfg.Logger = log
	t, err := grpcnet.Listen(ccfg, rank, addrs, lis)
	if err != nil {
		lis.Close()
		return Result{}, err
	}
	comm, err := collective.New(rctx, ccfg, t)
	if err != nil {
		return Result{}, fmt.Errorf("agent: connecting the ranks of generation %d: %w", x.GetGeneration(), err)
	}
	defer comm.Close()
	dpc, spc, err := comm.Grid(dp, sp)
	if err != nil {
		return Result{}, Fatal(err)
	}
	cancel()
	connected(comm)

	r := &Rank{JobID: x.GetJobId(), Generation: x.GetGeneration(), Rank: rank, DPRank: rank / sp, SPRank: rank % sp,
		World: world, Slot: int(x.GetGpu()), Spec: spec, Comm: comm, DP: dpc, SP: spc, Log: log, rep: rep,
		onCheckpoint: onCheckpoint}
	if ck := x.GetResumeFrom(); ck != nil {
		r.ResumeFrom = &Checkpoint{Step: ck.GetStep(), Location: ck.GetLocation()}
	}
	rctx2, stopReports := context.WithCancel(ctx)
	defer stopReports()
	go rep.loop(rctx2)
	return a.cfg.Runner.Run(ctx, r)
}

// listen opens the collective listener of a slot: on CollectivePort+slot,
// retrying while the previous generation's listener releases the port, or
// on a free port.
func (a *Agent) listen(ctx context.Context, slot int) (net.Listener, error) {
	port := 0
	if a.cfg.CollectivePort > 0 {
		port = a.cfg.CollectivePort + slot
	}
	addr := net.JoinHostPort(a.cfg.ListenHost, strconv.Itoa(port))
	for attempt := 0; ; attempt++ {
		lis, err := net.Listen("tcp", addr)
		if err == nil {
			return lis, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || attempt >= 50 {
			return nil, fmt.Errorf("agent: collective listener on %s: %w", addr, err)
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return nil, ctx.Err()
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
