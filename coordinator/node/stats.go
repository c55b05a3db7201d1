package node

import (
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/raft"
)

// Raft state names, as RaftStats.State reports them.
const (
	StateFollower  = "follower"
	StateCandidate = "candidate"
	StateLeader    = "leader"
	StateShutdown  = "shutdown"
)

// RaftStateNames returns every value RaftStats.State takes, so that a
// monitoring system can publish a series for each.
func RaftStateNames() []string {
	return []string{StateFollower, StateCandidate, StateLeader, StateShutdown}
}

// RaftStats is a point-in-time view of a replica's raft state, for
// monitoring. Reading it takes no lock that raft's main loop holds.
type RaftStats struct {
	// State is one of RaftStateNames.
	State string
	// Term is the current raft term.
	Term uint64
	// LastLogIndex is the index of the last entry in the local log.
	LastLogIndex uint64
	// CommitIndex is the highest index known to be committed.
	CommitIndex uint64
	// AppliedIndex is the highest index applied to the state machine.
	AppliedIndex uint64
	// Voters is the number of voting servers in the latest configuration,
	// this replica included.
	Voters int
	// LeaderID is the current leader's server ID, empty when none is known.
	LeaderID string
	// LeaderChanges counts the times this replica saw a new leader since it
	// started: the first election counts, and so does the same replica
	// winning again after a time without a leader.
	LeaderChanges uint64
}

// RaftStats returns the replica's raft counters. It works after Close too
// (the state is then "shutdown").
func (n *Node) RaftStats() RaftStats {
	st := RaftStats{
		State:         strings.ToLower(n.raft.State().String()),
		Term:          n.raft.CurrentTerm(),
		LastLogIndex:  n.raft.LastIndex(),
		CommitIndex:   n.raft.CommitIndex(),
		AppliedIndex:  n.raft.AppliedIndex(),
		LeaderChanges: n.leaders.count.Load(),
	}
	_, id := n.raft.LeaderWithID()
	st.LeaderID = string(id)
	// GetConfiguration answers from a copy raft keeps for readers; it does
	// not wait for the main loop.
	if f := n.raft.GetConfiguration(); f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			if s.Suffrage == raft.Voter {
				st.Voters++
			}
		}
	}
	return st
}

// leaderWatch counts the leader changes raft reports to an observer.
type leaderWatch struct {
	r     *raft.Raft
	obs   *raft.Observer
	ch    chan raft.Observation
	count atomic.Uint64
	quit  chan struct{}
	done  chan struct{}
	once  sync.Once
}

// watchLeaders registers an observer of leader changes on r. The leader
// known when it registers counts as the first change, so that one elected
// between the start of raft and the registration is not missed.
func watchLeaders(r *raft.Raft) *leaderWatch {
	w := &leaderWatch{r: r, ch: make(chan raft.Observation, 16), quit: make(chan struct{}), done: make(chan struct{})}
	w.obs = raft.NewObserver(w.ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	r.RegisterObserver(w.obs)
	_, prev := r.LeaderWithID()
	if prev != "" {
		w.count.Add(1)
	}
	go w.loop(prev)
	return w
}

func (w *leaderWatch) loop(prev raft.ServerID) {
	defer close(w.done)
	for {
		select {
		case <-w.quit:
			return
		case o := <-w.ch:
			id := o.Data.(raft.LeaderObservation).LeaderID
			if id != "" && id != prev {
				w.count.Add(1)
			}
			prev = id
		}
	}
}

// stop deregisters the observer and ends its goroutine.
func (w *leaderWatch) stop() {
	w.once.Do(func() {
		w.r.DeregisterObserver(w.obs)
		close(w.quit)
		<-w.done
	})
}
