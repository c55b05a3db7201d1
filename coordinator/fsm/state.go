package fsm

import (
	"slices"

	"github.com/m2train/m2train/coordinator/jobspec"
)

// JobState is a job's place in its life cycle.
type JobState string

// Job states. Succeeded, failed and cancelled are terminal.
const (
	JobQueued    JobState = "queued"
	JobRunning   JobState = "running"
	JobSucceeded JobState = "succeeded"
	JobFailed    JobState = "failed"
	JobCancelled JobState = "cancelled"
)

// Terminal reports whether the state never changes again.
func (s JobState) Terminal() bool {
	return s == JobSucceeded || s == JobFailed || s == JobCancelled
}

// WorkerState is what the coordinator knows of a worker's liveness.
type WorkerState string

// Worker states.
const (
	WorkerRegistered WorkerState = "registered"
	WorkerAlive      WorkerState = "alive"
	WorkerLostState  WorkerState = "lost"
)

// Limits of the replicated state.
const (
	// MaxEvents is the length of the event history; older events are dropped.
	MaxEvents = 10000
	// MaxJobs bounds the number of job records.
	MaxJobs = 100000
	// MaxWorkers bounds the number of worker records.
	MaxWorkers = 100000
	// MaxMembers bounds the number of coordinator replicas recorded.
	MaxMembers = 64
)

// Assignment places one rank of a job on a slot of a worker. Ranks are laid
// out sp-major: rank = dp_rank·sp + sp_rank, so the sp ranks of one replica
// are neighbours.
type Assignment struct {
	Rank     int    `json:"rank"`
	DPRank   int    `json:"dp_rank"`
	SPRank   int    `json:"sp_rank"`
	WorkerID string `json:"worker_id"`
	GPU      int    `json:"gpu"`
}

// Progress is the newest progress of a job, reported by rank 0.
type Progress struct {
	Generation   uint64  `json:"generation"`
	Step         int64   `json:"step"`
	Loss         float64 `json:"loss"`
	TokensPerSec float64 `json:"tokens_per_sec"`
	GradNorm     float64 `json:"grad_norm"`
	LR           float64 `json:"lr"`
	UpdatedAt    int64   `json:"updated_at"`
}

// Checkpoint is a committed checkpoint.
type Checkpoint struct {
	Step        int64  `json:"step"`
	Location    string `json:"location"`
	Generation  uint64 `json:"generation"`
	CommittedAt int64  `json:"committed_at"`
}

// Job is the replicated record of a job. Times are Unix nanoseconds; zero
// means not yet.
type Job struct {
	ID          string        `json:"id"`
	Seq         uint64        `json:"seq"`
	RequestID   string        `json:"request_id,omitempty"`
	Spec        *jobspec.Spec `json:"spec"`
	State       JobState      `json:"state"`
	Generation  uint64        `json:"generation"`
	Assignments []Assignment  `json:"assignments,omitempty"`
	Progress    Progress      `json:"progress"`
	// Checkpoints lists committed checkpoints, oldest first, at most the
	// spec's checkpoint.keep of them.
	Checkpoints []Checkpoint `json:"checkpoints,omitempty"`
	Restarts    int          `json:"restarts"`
	SubmittedAt int64        `json:"submitted_at"`
	StartedAt   int64        `json:"started_at,omitempty"`
	FinishedAt  int64        `json:"finished_at,omitempty"`
	Message     string       `json:"message,omitempty"`
}

// LastCheckpoint is the newest committed checkpoint, if any.
func (j *Job) LastCheckpoint() (Checkpoint, bool) {
	if len(j.Checkpoints) == 0 {
		return Checkpoint{}, false
	}
	return j.Checkpoints[len(j.Checkpoints)-1], true
}

// World is the job's rank count.
func (j *Job) World() int { return j.Spec.Parallel.World() }

func (j *Job) clone() *Job {
	c := *j
	c.Spec = j.Spec.Clone()
	c.Assignments = slices.Clone(j.Assignments)
	c.Checkpoints = slices.Clone(j.Checkpoints)
	return &c
}

// Worker is the replicated record of a worker.
type Worker struct {
	ID           string      `json:"id"`
	Addr         string      `json:"addr,omitempty"`
	Hostname     string      `json:"hostname,omitempty"`
	GPUs         int         `json:"gpus"`
	State        WorkerState `json:"state"`
	Lease        int64       `json:"lease,omitempty"`
	RegisteredAt int64       `json:"registered_at"`
	UpdatedAt    int64       `json:"updated_at"`
}

// Slots is the worker's slot count: its GPUs, or 1 for a CPU worker.
func (w *Worker) Slots() int { return max(w.GPUs, 1) }

// Event is one entry of the event history.
type Event struct {
	Seq      uint64 `json:"seq"`
	At       int64  `json:"at"`
	JobID    string `json:"job_id,omitempty"`
	WorkerID string `json:"worker_id,omitempty"`
	Type     string `json:"type"`
	Message  string `json:"message,omitempty"`
}

// Event types.
const (
	EventSubmitted        = "submitted"
	EventScheduled        = "scheduled"
	EventRequeued         = "requeued"
	EventCancelled        = "cancelled"
	EventSucceeded        = "succeeded"
	EventFailed           = "failed"
	EventCheckpoint       = "checkpoint"
	EventFailureReported  = "failure_reported"
	EventWorkerRegistered = "worker_registered"
	EventWorkerAlive      = "worker_alive"
	EventWorkerLost       = "worker_lost"
)

// state is everything the FSM replicates; it is also the snapshot format.
type state struct {
	Jobs         map[string]*Job    `json:"jobs"`
	Workers      map[string]*Worker `json:"workers"`
	Members      map[string]string  `json:"members"`
	Events       []Event            `json:"events"`
	NextJobSeq   uint64             `json:"next_job_seq"`
	NextEventSeq uint64             `json:"next_event_seq"`
}

func newState() *state {
	return &state{
		Jobs:         map[string]*Job{},
		Workers:      map[string]*Worker{},
		Members:      map[string]string{},
		NextJobSeq:   1,
		NextEventSeq: 1,
	}
}
