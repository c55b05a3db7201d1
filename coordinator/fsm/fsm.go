// Package fsm owns the coordinator's replicated state machine: jobs (spec,
// state, generation, assignments, progress, committed checkpoints), workers,
// the API addresses of the coordinator replicas, and the event history.
//
// Commands are typed (command.go) and encoded with a version and op byte.
// Apply is deterministic: it reads no clock (commands carry the leader's
// time), iterates maps in sorted order, and never panics on bad input; errors
// come back in the Result returned through the raft future. The package does
// no network IO and knows nothing of gRPC or etcd.
package fsm

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"sync"

	"github.com/hashicorp/raft"
)

// Result is what Apply returns for a command log entry.
type Result struct {
	// JobID is the job the command created or changed, if any.
	JobID string
	// Err is nil on success, else an error wrapping one of the package's
	// sentinel errors.
	Err error
}

// FSM is the replicated state machine. It implements raft.FSM; its read
// methods return copies and are safe to call concurrently with Apply.
type FSM struct {
	mu      sync.RWMutex
	st      *state
	byReq   map[string]string // request ID → job ID
	version uint64
	changed chan struct{}
}

var _ raft.FSM = (*FSM)(nil)

// New returns an empty state machine.
func New() *FSM {
	return &FSM{st: newState(), byReq: map[string]string{}, changed: make(chan struct{})}
}

// Apply implements raft.FSM. It returns a *Result for command entries.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	return f.ApplyBytes(l.Data)
}

// ApplyBytes decodes and applies one encoded command; Apply calls it for
// every command entry of the log.
func (f *FSM) ApplyBytes(data []byte) *Result {
	c, err := Decode(data)
	if err != nil {
		return &Result{Err: err}
	}
	return f.ApplyCommand(c)
}

// ApplyCommand applies a decoded command. A command that fails changes
// nothing.
func (f *FSM) ApplyCommand(c Command) *Result {
	if c == nil {
		return &Result{Err: fmt.Errorf("%w: nil command", ErrBadCommand)}
	}
	if err := c.validate(); err != nil {
		return &Result{Err: err}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var r *Result
	switch c := c.(type) {
	case *SubmitJob:
		r = f.submit(c)
	case *CancelJob:
		r = f.cancel(c)
	case *RegisterWorker:
		r = f.registerWorker(c)
	case *WorkerLost:
		r = f.workerLost(c)
	case *Assign:
		r = f.assign(c)
	case *ReportProgress:
		r = f.progress(c)
	case *CommitCheckpoint:
		r = f.checkpoint(c)
	case *ReportFailure:
		r = f.failure(c)
	case *SetMember:
		r = f.setMember(c)
	default:
		r = &Result{Err: fmt.Errorf("%w: unhandled op %d", ErrBadCommand, c.Op())}
	}
	if r.Err == nil {
		f.bump()
	}
	return r
}

// bump records a change and wakes the watchers. Caller holds mu.
func (f *FSM) bump() {
	f.version++
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *FSM) event(at int64, job, worker, typ, msg string) {
	st := f.st
	st.Events = append(st.Events, Event{Seq: st.NextEventSeq, At: at, JobID: job, WorkerID: worker, Type: typ, Message: msg})
	st.NextEventSeq++
	if n := len(st.Events) - MaxEvents; n > 0 {
		st.Events = slices.Delete(st.Events, 0, n)
	}
}

func (f *FSM) job(id string) (*Job, error) {
	j, ok := f.st.Jobs[id]
	if !ok {
		return nil, fmt.Errorf("%w: job %q", ErrNotFound, id)
	}
	return j, nil
}

func (f *FSM) submit(c *SubmitJob) *Result {
	if c.RequestID != "" {
		if id, ok := f.byReq[c.RequestID]; ok {
			return &Result{JobID: id}
		}
	}
	if len(f.st.Jobs) >= MaxJobs {
		return &Result{Err: fmt.Errorf("%w: %d jobs are stored", ErrLimit, MaxJobs)}
	}
	spec := c.Spec.Clone()
	spec.Normalize()
	if err := spec.Validate(); err != nil {
		return &Result{Err: fmt.Errorf("%w: %w", ErrInvalid, err)}
	}
	seq := f.st.NextJobSeq
	id := fmt.Sprintf("%s-%d", spec.Name, seq)
	if _, dup := f.st.Jobs[id]; dup {
		return &Result{Err: fmt.Errorf("%w: job %q exists", ErrConflict, id)}
	}
	f.st.NextJobSeq++
	f.st.Jobs[id] = &Job{
		ID: id, Seq: seq, RequestID: c.RequestID, Spec: spec, State: JobQueued,
		Progress: Progress{}, SubmittedAt: c.At,
	}
	if c.RequestID != "" {
		f.byReq[c.RequestID] = id
	}
	f.event(c.At, id, "", EventSubmitted, fmt.Sprintf("%d ranks (dp %d × sp %d), %d steps",
		spec.Parallel.World(), spec.Parallel.DP, spec.Parallel.SP, spec.Schedule.TotalSteps))
	return &Result{JobID: id}
}

func (f *FSM) finish(j *Job, at int64, s JobState, typ, msg string) {
	j.State = s
	j.Assignments = nil
	j.FinishedAt = at
	j.Message = msg
	f.event(at, j.ID, "", typ, msg)
}

func (f *FSM) cancel(c *CancelJob) *Result {
	j, err := f.job(c.JobID)
	if err != nil {
		return &Result{Err: err}
	}
	if j.State.Terminal() {
		return &Result{JobID: j.ID, Err: fmt.Errorf("%w: job %q is already %s", ErrConflict, j.ID, j.State)}
	}
	msg := "cancelled"
	if c.Reason != "" {
		msg = "cancelled: " + c.Reason
	}
	f.finish(j, c.At, JobCancelled, EventCancelled, msg)
	return &Result{JobID: j.ID}
}

func (f *FSM) registerWorker(c *RegisterWorker) *Result {
	w, ok := f.st.Workers[c.WorkerID]
	if !ok {
		if len(f.st.Workers) >= MaxWorkers {
			return &Result{Err: fmt.Errorf("%w: %d workers are stored", ErrLimit, MaxWorkers)}
		}
		w = &Worker{ID: c.WorkerID, RegisteredAt: c.At, State: WorkerRegistered}
		f.st.Workers[c.WorkerID] = w
	}
	// A live worker that shows up with another lease is a new process
	// under the same ID (a restarted pod): the ranks its old process ran
	// are gone, although the old lease has not expired, and its record
	// now belongs to the new lease, so no expiry will ever report them.
	// Their jobs end their generation here, before the GPU check below.
	replaced := c.Lease != 0 && w.State == WorkerAlive && w.Lease != 0 && w.Lease != c.Lease
	if !replaced && w.State == WorkerAlive && w.GPUs != c.GPUs && f.busySlots(w.ID) > 0 {
		return &Result{Err: fmt.Errorf("%w: worker %q changes its GPU count from %d to %d while it runs ranks",
			ErrConflict, w.ID, w.GPUs, c.GPUs)}
	}
	if replaced {
		f.requeueWorkerJobs(w.ID, c.At, fmt.Sprintf("worker %s restarted (lease %x replaced by %x)", w.ID, w.Lease, c.Lease))
	}
	w.Addr, w.Hostname, w.GPUs, w.UpdatedAt = c.Addr, c.Hostname, c.GPUs, c.At
	switch {
	case c.Lease != 0 && (w.State != WorkerAlive || w.Lease != c.Lease):
		w.State, w.Lease = WorkerAlive, c.Lease
		f.event(c.At, "", w.ID, EventWorkerAlive, fmt.Sprintf("lease %x, %d GPUs, addr %s", c.Lease, c.GPUs, c.Addr))
	case c.Lease == 0 && w.State != WorkerAlive:
		w.State, w.Lease = WorkerRegistered, 0
		f.event(c.At, "", w.ID, EventWorkerRegistered, fmt.Sprintf("%d GPUs, addr %s", c.GPUs, c.Addr))
	}
	return &Result{}
}

// busySlots counts the ranks that running jobs place on the worker.
func (f *FSM) busySlots(workerID string) int {
	n := 0
	for _, j := range f.st.Jobs {
		if j.State != JobRunning {
			continue
		}
		for _, a := range j.Assignments {
			if a.WorkerID == workerID {
				n++
			}
		}
	}
	return n
}

func (f *FSM) workerLost(c *WorkerLost) *Result {
	w, ok := f.st.Workers[c.WorkerID]
	if !ok {
		return &Result{Err: fmt.Errorf("%w: worker %q", ErrNotFound, c.WorkerID)}
	}
	if c.Lease != 0 && w.Lease != c.Lease {
		return &Result{Err: fmt.Errorf("%w: lease %x of worker %q was replaced by %x", ErrStale, c.Lease, w.ID, w.Lease)}
	}
	if w.State == WorkerLostState {
		return &Result{}
	}
	w.State, w.Lease, w.UpdatedAt = WorkerLostState, 0, c.At
	reason := c.Reason
	if reason == "" {
		reason = "lease expired"
	}
	f.event(c.At, "", w.ID, EventWorkerLost, reason)
	f.requeueWorkerJobs(w.ID, c.At, fmt.Sprintf("worker %s lost (%s)", w.ID, reason))
	return &Result{}
}

// requeueWorkerJobs ends the current generation of every running job with a
// rank on the worker, in job ID order; why is completed with the
// generation.
func (f *FSM) requeueWorkerJobs(workerID string, at int64, why string) {
	for _, id := range f.sortedJobIDs() {
		j := f.st.Jobs[id]
		if j.State != JobRunning {
			continue
		}
		for _, a := range j.Assignments {
			if a.WorkerID == workerID {
				f.requeue(j, at, fmt.Sprintf("%s in generation %d", why, j.Generation))
				break
			}
		}
	}
}

// requeue ends the current generation of a running job: it waits for a new
// placement, or fails once its restarts are used up.
func (f *FSM) requeue(j *Job, at int64, why string) {
	if j.Restarts >= j.Spec.Restarts() {
		f.finish(j, at, JobFailed, EventFailed, fmt.Sprintf("%s; max_restarts %d reached", why, j.Spec.Restarts()))
		return
	}
	j.Restarts++
	j.State = JobQueued
	j.Assignments = nil
	j.Message = why
	resume := "from the start"
	if ck, ok := j.LastCheckpoint(); ok {
		resume = fmt.Sprintf("from the checkpoint of step %d", ck.Step)
	}
	f.event(at, j.ID, "", EventRequeued, fmt.Sprintf("%s; restart %d of %d will resume %s", why, j.Restarts, j.Spec.Restarts(), resume))
}

func (f *FSM) sortedJobIDs() []string {
	ids := make([]string, 0, len(f.st.Jobs))
	for id := range f.st.Jobs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

func (f *FSM) assign(c *Assign) *Result {
	j, err := f.job(c.JobID)
	if err != nil {
		return &Result{Err: err}
	}
	if j.State != JobQueued {
		return &Result{JobID: j.ID, Err: fmt.Errorf("%w: job %q is %s, not queued", ErrConflict, j.ID, j.State)}
	}
	if c.Generation != j.Generation {
		return &Result{JobID: j.ID, Err: fmt.Errorf("%w: assignment for generation %d, job %q is at %d", ErrStale, c.Generation, j.ID, j.Generation)}
	}
	if len(c.Slots) != j.World() {
		return &Result{JobID: j.ID, Err: fmt.Errorf("%w: %d slots for %d ranks", ErrInvalid, len(c.Slots), j.World())}
	}
	busy := map[Slot]string{}
	for _, o := range f.st.Jobs {
		if o.State == JobRunning {
			for _, a := range o.Assignments {
				busy[Slot{a.WorkerID, a.GPU}] = o.ID
			}
		}
	}
	sp := j.Spec.Parallel.SP
	as := make([]Assignment, len(c.Slots))
	for r, s := range c.Slots {
		w, ok := f.st.Workers[s.WorkerID]
		if !ok || w.State != WorkerAlive {
			return &Result{JobID: j.ID, Err: fmt.Errorf("%w: worker %q of rank %d is not alive", ErrConflict, s.WorkerID, r)}
		}
		if s.GPU >= w.Slots() {
			return &Result{JobID: j.ID, Err: fmt.Errorf("%w: rank %d: worker %q has no slot %d", ErrInvalid, r, s.WorkerID, s.GPU)}
		}
		if other, taken := busy[s]; taken {
			return &Result{JobID: j.ID, Err: fmt.Errorf("%w: rank %d: slot %d of worker %q is used by %s", ErrConflict, r, s.GPU, s.WorkerID, other)}
		}
		busy[s] = j.ID
		as[r] = Assignment{Rank: r, DPRank: r / sp, SPRank: r % sp, WorkerID: s.WorkerID, GPU: s.GPU}
	}
	j.State = JobRunning
	j.Generation++
	j.Assignments = as
	if j.StartedAt == 0 {
		j.StartedAt = c.At
	}
	j.Progress.Generation = j.Generation
	j.Message = ""
	workers := map[string]bool{}
	for _, a := range as {
		workers[a.WorkerID] = true
	}
	f.event(c.At, j.ID, "", EventScheduled, fmt.Sprintf("generation %d: %d ranks on %d workers", j.Generation, len(as), len(workers)))
	return &Result{JobID: j.ID}
}

// current returns the job if it runs generation gen.
func (f *FSM) current(id string, gen uint64, rank int) (*Job, error) {
	j, err := f.job(id)
	if err != nil {
		return nil, err
	}
	if j.State != JobRunning {
		return j, fmt.Errorf("%w: job %q is %s", ErrStale, j.ID, j.State)
	}
	if gen != j.Generation {
		return j, fmt.Errorf("%w: generation %d, job %q is at %d", ErrStale, gen, j.ID, j.Generation)
	}
	if rank >= j.World() {
		return j, fmt.Errorf("%w: rank %d is outside world size %d", ErrInvalid, rank, j.World())
	}
	return j, nil
}

func (f *FSM) progress(c *ReportProgress) *Result {
	j, err := f.current(c.JobID, c.Generation, c.Rank)
	if err != nil {
		return &Result{JobID: c.JobID, Err: err}
	}
	if c.Rank != 0 {
		return &Result{JobID: j.ID}
	}
	if total := int64(j.Spec.Schedule.TotalSteps); c.Step > total {
		return &Result{JobID: j.ID, Err: fmt.Errorf("%w: step %d beyond total_steps %d", ErrInvalid, c.Step, total)}
	}
	j.Progress = Progress{Generation: j.Generation, Step: c.Step, Loss: c.Loss, TokensPerSec: c.TokensPerSec,
		GradNorm: c.GradNorm, LR: c.LR, UpdatedAt: c.At}
	if c.Done {
		f.finish(j, c.At, JobSucceeded, EventSucceeded, fmt.Sprintf("finished at step %d, loss %.4g", c.Step, c.Loss))
	}
	return &Result{JobID: j.ID}
}

func (f *FSM) checkpoint(c *CommitCheckpoint) *Result {
	j, err := f.current(c.JobID, c.Generation, 0)
	if err != nil {
		return &Result{JobID: c.JobID, Err: err}
	}
	if last, ok := j.LastCheckpoint(); ok && c.Step <= last.Step {
		return &Result{JobID: j.ID, Err: fmt.Errorf("%w: checkpoint step %d is not after the last committed step %d", ErrStale, c.Step, last.Step)}
	}
	j.Checkpoints = append(j.Checkpoints, Checkpoint{Step: c.Step, Location: c.Location, Generation: c.Generation, CommittedAt: c.At})
	keep := max(j.Spec.Checkpoint.Keep, 1)
	if n := len(j.Checkpoints) - keep; n > 0 {
		j.Checkpoints = slices.Delete(j.Checkpoints, 0, n)
	}
	f.event(c.At, j.ID, "", EventCheckpoint, fmt.Sprintf("step %d at %s", c.Step, c.Location))
	return &Result{JobID: j.ID}
}

func (f *FSM) failure(c *ReportFailure) *Result {
	j, err := f.current(c.JobID, c.Generation, c.Rank)
	if err != nil {
		return &Result{JobID: c.JobID, Err: err}
	}
	why := fmt.Sprintf("rank %d failed in generation %d: %s", c.Rank, j.Generation, c.Message)
	f.event(c.At, j.ID, c.WorkerID, EventFailureReported, why)
	if c.Fatal {
		f.finish(j, c.At, JobFailed, EventFailed, why)
	} else {
		f.requeue(j, c.At, why)
	}
	return &Result{JobID: j.ID}
}

func (f *FSM) setMember(c *SetMember) *Result {
	if _, ok := f.st.Members[c.ID]; !ok && len(f.st.Members) >= MaxMembers {
		return &Result{Err: fmt.Errorf("%w: %d members are stored", ErrLimit, MaxMembers)}
	}
	f.st.Members[c.ID] = c.APIAddr
	return &Result{}
}

// Snapshot implements raft.FSM: it serializes a copy of the state; Persist
// only writes the bytes.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	b, err := json.Marshal(f.st)
	if err != nil {
		return nil, fmt.Errorf("fsm: snapshot: %w", err)
	}
	return &snapshot{data: b}, nil
}

// Restore implements raft.FSM: it replaces the state with a snapshot's.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st := newState()
	dec := json.NewDecoder(rc)
	dec.DisallowUnknownFields()
	if err := dec.Decode(st); err != nil {
		return fmt.Errorf("fsm: restore: %w", err)
	}
	byReq := map[string]string{}
	if st.Jobs == nil {
		st.Jobs = map[string]*Job{}
	}
	if st.Workers == nil {
		st.Workers = map[string]*Worker{}
	}
	if st.Members == nil {
		st.Members = map[string]string{}
	}
	for id, j := range st.Jobs {
		if j == nil || j.Spec == nil || j.ID != id || j.Spec.Parallel.DP < 1 || j.Spec.Parallel.SP < 1 {
			return fmt.Errorf("fsm: restore: job %q is malformed", id)
		}
		if j.RequestID != "" {
			byReq[j.RequestID] = id
		}
	}
	for id, w := range st.Workers {
		if w == nil || w.ID != id {
			return fmt.Errorf("fsm: restore: worker %q is malformed", id)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.st, f.byReq = st, byReq
	f.bump()
	return nil
}

type snapshot struct{ data []byte }

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s.data); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("fsm: persist snapshot: %w", err)
	}
	return sink.Close()
}

func (s *snapshot) Release() {}
