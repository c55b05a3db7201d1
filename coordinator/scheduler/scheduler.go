// Package scheduler decides where the ranks of queued jobs run. It is a pure
// function of its inputs: no IO, no clocks, no randomness, so the raft leader
// can run it on a copy of the replicated state and commit its result.
//
// Placement is gang scheduling: either every rank of a job gets a slot or the
// job stays queued. A slot is one GPU of a worker; a CPU worker (zero GPUs)
// has exactly one slot. No slot ever holds two ranks.
package scheduler

import (
	"cmp"
	"slices"
)

// Backend values understood by the scheduler (the job spec's backend field).
const (
	BackendCPU  = "cpu"
	BackendCUDA = "cuda"
	BackendAuto = "auto"
)

// Worker is a live worker and the slots it already gives to running jobs.
type Worker struct {
	ID string
	// GPUs is the worker's GPU count; 0 means a CPU worker with one slot.
	GPUs int
	// Busy lists the slot indexes in use. Out-of-range entries are ignored.
	Busy []int
}

// Slots is the worker's slot count: its GPUs, or 1 for a CPU worker.
func (w Worker) Slots() int { return max(w.GPUs, 1) }

// Job is a queued job: Ranks = dp·sp slots are needed at once.
type Job struct {
	ID    string
	Ranks int
	// Backend restricts the pool: cuda needs GPU workers, cpu needs CPU
	// workers, auto takes GPU workers when the job fits there and CPU
	// workers otherwise. Anything else is treated as auto.
	Backend string
}

// Slot is one GPU (or the single slot of a CPU worker) of one worker.
type Slot struct {
	WorkerID string
	GPU      int
}

// Placement gives each rank of a job its slot: Slots[r] runs rank r.
type Placement struct {
	JobID string
	Slots []Slot
}

// Schedule places the jobs of queue, in order, onto the free slots of
// workers. A job that does not fit is skipped and later, smaller jobs may
// still be placed (backfill). Ranks of one job are packed onto as few workers
// as the free slots allow: workers with more free slots first, ties by ID.
// The result lists placements in queue order and is deterministic.
func Schedule(workers []Worker, queue []Job) []Placement {
	gpu, cpu := freeSlots(workers)
	var out []Placement
	for _, j := range queue {
		if j.Ranks <= 0 {
			continue
		}
		var slots []Slot
		switch j.Backend {
		case BackendCUDA:
			slots = take(gpu, j.Ranks)
		case BackendCPU:
			slots = take(cpu, j.Ranks)
		default:
			if slots = take(gpu, j.Ranks); slots == nil {
				slots = take(cpu, j.Ranks)
			}
		}
		if slots != nil {
			out = append(out, Placement{JobID: j.ID, Slots: slots})
		}
	}
	return out
}

// pool is the free slots of one kind of worker.
type pool []*free

type free struct {
	id    string
	slots []int // free slot indexes, ascending
}

func freeSlots(workers []Worker) (gpu, cpu pool) {
	seen := make(map[string]bool, len(workers))
	for _, w := range workers {
		if w.ID == "" || seen[w.ID] {
			continue
		}
		seen[w.ID] = true
		n := w.Slots()
		busy := make([]bool, n)
		for _, b := range w.Busy {
			if b >= 0 && b < n {
				busy[b] = true
			}
		}
		f := &free{id: w.ID}
		for s := 0; s < n; s++ {
			if !busy[s] {
				f.slots = append(f.slots, s)
			}
		}
		if w.GPUs > 0 {
			gpu = append(gpu, f)
		} else {
			cpu = append(cpu, f)
		}
	}
	return gpu, cpu
}

// take removes n slots from the pool and returns them, or returns nil and
// leaves the pool unchanged when fewer than n are free.
func take(p pool, n int) []Slot {
	total := 0
	for _, f := range p {
		total += len(f.slots)
	}
	if total < n {
		return nil
	}
	order := slices.Clone(p)
	slices.SortStableFunc(order, func(a, b *free) int {
		if c := cmp.Compare(len(b.slots), len(a.slots)); c != 0 {
			return c
		}
		return cmp.Compare(a.id, b.id)
	})
	out := make([]Slot, 0, n)
	for _, f := range order {
		k := min(n-len(out), len(f.slots))
		for _, s := range f.slots[:k] {
			out = append(out, Slot{WorkerID: f.id, GPU: s})
		}
		f.slots = f.slots[k:]
		if len(out) == n {
			break
		}
	}
	return out
}
