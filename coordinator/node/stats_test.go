package node

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/m2train/m2train/coordinator/fsm"
)

func TestRaftStatsFollowElectionsAndCommits(t *testing.T) {
	c := newTestCluster(t, 3)
	l := c.leader()
	waitFor(t, 20*time.Second, "every replica to know the leader", func() bool {
		for _, n := range c.nodes {
			if n.RaftStats().LeaderID != c.peers[l].ID {
				return false
			}
		}
		return true
	})
	for i, n := range c.nodes {
		st := n.RaftStats()
		want := StateFollower
		if i == l {
			want = StateLeader
		}
		if st.State != want || st.Voters != 3 || st.Term == 0 || st.LeaderChanges == 0 {
			t.Errorf("replica %d: %+v, want state %s, 3 voters, a term and a leader change", i, st, want)
		}
	}

	id := c.submit("stats")
	c.converged(id)
	waitFor(t, 20*time.Second, "every replica to apply the whole log", func() bool {
		for _, n := range c.nodes {
			st := n.RaftStats()
			if st.AppliedIndex != st.LastLogIndex || st.CommitIndex != st.LastLogIndex {
				return false
			}
		}
		return true
	})

	// A failover is one more leader change seen by the survivors.
	survivor := (l + 1) % 3
	before := c.nodes[survivor].RaftStats()
	c.stop(l)
	next := c.leader(l)
	waitFor(t, 20*time.Second, "the survivor to see the new leader", func() bool {
		return c.nodes[survivor].RaftStats().LeaderID == c.peers[next].ID
	})
	after := c.nodes[survivor].RaftStats()
	if after.LeaderChanges <= before.LeaderChanges || after.Term <= before.Term {
		t.Errorf("after failover: %+v, before: %+v; want more leader changes and a later term", after, before)
	}

	n := c.nodes[survivor]
	c.stop(survivor)
	if st := n.RaftStats(); st.State != StateShutdown {
		t.Errorf("closed replica reports state %q", st.State)
	}
}

func TestApplyObserverSeesEveryProposal(t *testing.T) {
	var mu sync.Mutex
	var ok, failed int
	var longest time.Duration
	n, err := Start(Config{ID: "solo", DataDir: t.TempDir(), BindAddr: "127.0.0.1:0", Logger: testLogger(t),
		ApplyObserver: func(d time.Duration, err error) {
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
			} else {
				ok++
			}
			longest = max(longest, d)
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	waitFor(t, 10*time.Second, "the single replica to lead", n.IsLeader)
	for range 3 {
		if _, err := n.Propose(context.Background(), &fsm.SubmitJob{At: 1, Spec: spec(t, "obs")}); err != nil {
			t.Fatal(err)
		}
	}
	// An invalid command fails in the state machine, not in raft: it is
	// committed like any other.
	if r, err := n.Propose(context.Background(), &fsm.CancelJob{At: 1, JobID: "missing-1"}); err != nil || !errors.Is(r.Err, fsm.ErrNotFound) {
		t.Fatalf("cancel of a missing job: %+v, %v", r, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if ok != 4 || failed != 0 || longest <= 0 {
		t.Fatalf("observer saw %d committed, %d failed, longest %v; want 4, 0 and a positive duration", ok, failed, longest)
	}
}
