package fsm

import (
	"cmp"
	"slices"

	"github.com/m2train/m2train/coordinator/scheduler"
)

// Changed returns a channel that is closed at the next state change, and the
// version it belongs to. Watchers read state after receiving from it and
// then call Changed again.
func (f *FSM) Changed() (<-chan struct{}, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.changed, f.version
}

// Job returns a copy of a job.
func (f *FSM) Job(id string) (*Job, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	j, ok := f.st.Jobs[id]
	if !ok {
		return nil, false
	}
	return j.clone(), true
}

// Jobs returns copies of the jobs in submit order, keeping those whose state
// is in states (all when states is empty).
func (f *FSM) Jobs(states ...JobState) []*Job {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*Job, 0, len(f.st.Jobs))
	for _, j := range f.st.Jobs {
		if len(states) == 0 || slices.Contains(states, j.State) {
			out = append(out, j.clone())
		}
	}
	slices.SortFunc(out, func(a, b *Job) int { return cmp.Compare(a.Seq, b.Seq) })
	return out
}

// Worker returns a copy of a worker.
func (f *FSM) Worker(id string) (*Worker, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	w, ok := f.st.Workers[id]
	if !ok {
		return nil, false
	}
	c := *w
	return &c, true
}

// Workers returns copies of all workers sorted by ID.
func (f *FSM) Workers() []*Worker {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*Worker, 0, len(f.st.Workers))
	for _, w := range f.st.Workers {
		c := *w
		out = append(out, &c)
	}
	slices.SortFunc(out, func(a, b *Worker) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Member returns the API address recorded for a coordinator replica.
func (f *FSM) Member(id string) (string, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	a, ok := f.st.Members[id]
	return a, ok
}

// Events returns events with Seq > after, of one job when jobID is set, at
// most limit of them (the newest; 0 means no limit), oldest first.
func (f *FSM) Events(jobID string, after uint64, limit int) []Event {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []Event
	for _, e := range f.st.Events {
		if e.Seq > after && (jobID == "" || e.JobID == jobID) {
			out = append(out, e)
		}
	}
	if limit > 0 && len(out) > limit {
		out = slices.Clone(out[len(out)-limit:])
	}
	return out
}

// RankAssignment is one rank of a running job placed on a worker.
type RankAssignment struct {
	Job        *Job
	Assignment Assignment
}

// WorkerAssignments lists the ranks of running jobs placed on a worker, by
// job submit order then rank.
func (f *FSM) WorkerAssignments(workerID string) []RankAssignment {
	var out []RankAssignment
	for _, j := range f.Jobs(JobRunning) {
		for _, a := range j.Assignments {
			if a.WorkerID == workerID {
				out = append(out, RankAssignment{Job: j, Assignment: a})
			}
		}
	}
	return out
}

// SchedulingInput is what the scheduler needs: the live workers with their
// busy slots, the queued jobs in submit order, and each queued job's current
// generation for the Assign command.
type SchedulingInput struct {
	Workers     []scheduler.Worker
	Queue       []scheduler.Job
	Generations map[string]uint64
}

// SchedulingInput captures the scheduler's input from one consistent view.
func (f *FSM) SchedulingInput() SchedulingInput {
	f.mu.RLock()
	defer f.mu.RUnlock()
	busy := map[string][]int{}
	var queued []*Job
	for _, j := range f.st.Jobs {
		switch j.State {
		case JobRunning:
			for _, a := range j.Assignments {
				busy[a.WorkerID] = append(busy[a.WorkerID], a.GPU)
			}
		case JobQueued:
			queued = append(queued, j)
		}
	}
	slices.SortFunc(queued, func(a, b *Job) int { return cmp.Compare(a.Seq, b.Seq) })
	in := SchedulingInput{Generations: map[string]uint64{}}
	for _, w := range f.st.Workers {
		if w.State == WorkerAlive {
			in.Workers = append(in.Workers, scheduler.Worker{ID: w.ID, GPUs: w.GPUs, Busy: busy[w.ID]})
		}
	}
	slices.SortFunc(in.Workers, func(a, b scheduler.Worker) int { return cmp.Compare(a.ID, b.ID) })
	for _, j := range queued {
		in.Queue = append(in.Queue, scheduler.Job{ID: j.ID, Ranks: j.World(), Backend: j.Spec.Backend})
		in.Generations[j.ID] = j.Generation
	}
	return in
}
