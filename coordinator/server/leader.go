package server

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/m2train/m2train/coordinator/fsm"
	"github.com/m2train/m2train/coordinator/membership"
	"github.com/m2train/m2train/coordinator/scheduler"
)

// lead is the leader's work for one term: it makes reads current, records
// this replica's API address, follows worker leases in etcd, and schedules.
// It returns when ctx ends (leadership lost or node closing).
func (s *Server) lead(ctx context.Context) {
	log := s.log.With("role", "leader")
	for {
		err := s.node.Barrier(ctx)
		if err == nil {
			_, err = s.node.Propose(ctx, &fsm.SetMember{At: now(), ID: s.node.ID(), APIAddr: s.cfg.APIAddr})
		}
		if err == nil {
			break
		}
		log.Warn("leader setup failed; retrying", "err", err)
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return
		}
	}
	s.ready.Store(true)
	defer s.ready.Store(false)
	log.Info("leader ready", "api", s.cfg.APIAddr)

	var wg sync.WaitGroup
	if s.cfg.Etcd != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.followLeases(ctx)
		}()
	}
	s.scheduleLoop(ctx)
	wg.Wait()
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

// followLeases lists the workers registered in etcd, reconciles the
// replicated state with that list, then applies every change the watch
// reports; on a watch failure it lists again.
func (s *Server) followLeases(ctx context.Context) {
	log := s.log.With("role", "leader")
	for ctx.Err() == nil {
		members, rev, err := membership.ListWorkers(ctx, s.cfg.Etcd, s.cfg.EtcdPrefix)
		if err != nil {
			log.Warn("list workers", "err", err)
			sleepCtx(ctx, 500*time.Millisecond)
			continue
		}
		s.reconcile(ctx, members)
		err = membership.WatchWorkers(ctx, s.cfg.Etcd, s.cfg.EtcdPrefix, rev, func(e membership.WorkerEvent) {
			if e.Up {
				s.workerUp(ctx, e.Member)
			} else {
				s.workerDown(ctx, e.Member.Info.ID, e.Member.Lease)
			}
		})
		if err != nil && ctx.Err() == nil {
			log.Warn("watch workers; listing again", "err", err)
			sleepCtx(ctx, 200*time.Millisecond)
		}
	}
}

func (s *Server) reconcile(ctx context.Context, members []membership.Member) {
	live := map[string]membership.Member{}
	for _, m := range members {
		live[m.Info.ID] = m
	}
	for _, w := range s.node.FSM().Workers() {
		if _, ok := live[w.ID]; !ok && w.State == fsm.WorkerAlive {
			s.workerDown(ctx, w.ID, w.Lease)
		}
	}
	for _, m := range members {
		if w, ok := s.node.FSM().Worker(m.Info.ID); !ok || w.State != fsm.WorkerAlive || w.Lease != m.Lease {
			s.workerUp(ctx, m)
		}
	}
}

func (s *Server) workerUp(ctx context.Context, m membership.Member) {
	_, err := s.propose(ctx, &fsm.RegisterWorker{At: now(), WorkerID: m.Info.ID, Addr: m.Info.Addr,
		Hostname: m.Info.Hostname, GPUs: m.Info.GPUs, Lease: m.Lease})
	if err != nil {
		s.log.Warn("record live worker", "worker", m.Info.ID, "err", err)
	}
}

func (s *Server) workerDown(ctx context.Context, id string, lease int64) {
	r, err := s.node.Propose(ctx, &fsm.WorkerLost{At: now(), WorkerID: id, Lease: lease, Reason: "lease expired or revoked"})
	switch {
	case err != nil:
		s.log.Warn("record lost worker", "worker", id, "err", err)
	case r.Err != nil && !errors.Is(r.Err, fsm.ErrStale) && !errors.Is(r.Err, fsm.ErrNotFound):
		s.log.Warn("record lost worker", "worker", id, "err", r.Err)
	case r.Err == nil:
		s.log.Info("worker lost", "worker", id)
	}
}

// scheduleLoop runs the scheduler after every state change (and at least
// every ScheduleInterval) and commits its placements.
func (s *Server) scheduleLoop(ctx context.Context) {
	tick := time.NewTicker(s.cfg.ScheduleInterval)
	defer tick.Stop()
	cleaned := map[string]bool{}
	clean := s.cfg.Etcd != nil
	for {
		changed, _ := s.node.FSM().Changed()
		s.scheduleOnce(ctx)
		if clean {
			s.cleanRendezvous(ctx, cleaned)
		}
		// Cleaning scans every finished job: do it on the tick only, not
		// after each of the many progress commits.
		clean = false
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-tick.C:
			clean = s.cfg.Etcd != nil
		}
	}
}

func (s *Server) scheduleOnce(ctx context.Context) {
	in := s.node.FSM().SchedulingInput()
	for _, p := range scheduler.Schedule(in.Workers, in.Queue) {
		slots := make([]fsm.Slot, len(p.Slots))
		for i, sl := range p.Slots {
			slots[i] = fsm.Slot{WorkerID: sl.WorkerID, GPU: sl.GPU}
		}
		gen := in.Generations[p.JobID]
		r, err := s.node.Propose(ctx, &fsm.Assign{At: now(), JobID: p.JobID, Generation: gen, Slots: slots})
		if err != nil {
			s.log.Warn("assign", "job", p.JobID, "err", err)
			return
		}
		if r.Err != nil {
			// The state moved on since the input was read; the next pass
			// sees the new state.
			s.log.Info("assignment rejected", "job", p.JobID, "err", r.Err)
			continue
		}
		s.log.Info("job scheduled", "job", p.JobID, "generation", gen+1, "ranks", len(slots))
		if gen > 0 && s.cfg.Etcd != nil {
			if err := membership.DeleteRendezvous(ctx, s.cfg.Etcd, s.cfg.EtcdPrefix, p.JobID, gen+1); err != nil {
				s.log.Warn("delete old rendezvous", "job", p.JobID, "err", err)
			}
		}
	}
}

// cleanRendezvous deletes the rendezvous keys of jobs that ended, a bounded
// number per pass.
func (s *Server) cleanRendezvous(ctx context.Context, cleaned map[string]bool) {
	n := 0
	for _, j := range s.node.FSM().Jobs(fsm.JobSucceeded, fsm.JobFailed, fsm.JobCancelled) {
		if cleaned[j.ID] || j.Generation == 0 {
			continue
		}
		if n++; n > 100 {
			return
		}
		if err := membership.DeleteRendezvous(ctx, s.cfg.Etcd, s.cfg.EtcdPrefix, j.ID, 0); err != nil {
			s.log.Warn("delete rendezvous", "job", j.ID, "err", err)
			return
		}
		cleaned[j.ID] = true
	}
}
