package scheduler

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
)

func TestSchedule(t *testing.T) {
	s := func(w string, g int) Slot { return Slot{WorkerID: w, GPU: g} }
	cases := []struct {
		name    string
		workers []Worker
		queue   []Job
		want    []Placement
	}{
		{
			name:  "no workers queues everything",
			queue: []Job{{ID: "a", Ranks: 1}},
			want:  nil,
		},
		{
			name:    "cpu workers have one slot each",
			workers: []Worker{{ID: "w2"}, {ID: "w1"}, {ID: "w3"}},
			queue:   []Job{{ID: "a", Ranks: 2, Backend: BackendCPU}},
			want:    []Placement{{"a", []Slot{s("w1", 0), s("w2", 0)}}},
		},
		{
			name:    "gang: a job larger than the free slots is not partly placed",
			workers: []Worker{{ID: "w1", GPUs: 2}, {ID: "w2", GPUs: 2, Busy: []int{1}}},
			queue:   []Job{{ID: "big", Ranks: 4, Backend: BackendCUDA}},
			want:    nil,
		},
		{
			name:    "backfill: a later small job runs while a big one waits",
			workers: []Worker{{ID: "w1", GPUs: 2}},
			queue:   []Job{{ID: "big", Ranks: 4}, {ID: "small", Ranks: 2}},
			want:    []Placement{{"small", []Slot{s("w1", 0), s("w1", 1)}}},
		},
		{
			name:    "packs ranks onto the worker with the most free slots",
			workers: []Worker{{ID: "a", GPUs: 8, Busy: []int{0, 1, 2, 3, 4, 5}}, {ID: "b", GPUs: 4}},
			queue:   []Job{{ID: "j", Ranks: 5, Backend: BackendCUDA}},
			want:    []Placement{{"j", []Slot{s("b", 0), s("b", 1), s("b", 2), s("b", 3), s("a", 6)}}},
		},
		{
			name:    "busy slots are skipped",
			workers: []Worker{{ID: "w", GPUs: 4, Busy: []int{0, 2, 9, -1}}},
			queue:   []Job{{ID: "j", Ranks: 2}},
			want:    []Placement{{"j", []Slot{s("w", 1), s("w", 3)}}},
		},
		{
			name:    "two jobs share a worker without sharing a GPU",
			workers: []Worker{{ID: "w", GPUs: 4}},
			queue:   []Job{{ID: "a", Ranks: 2}, {ID: "b", Ranks: 2}, {ID: "c", Ranks: 1}},
			want:    []Placement{{"a", []Slot{s("w", 0), s("w", 1)}}, {"b", []Slot{s("w", 2), s("w", 3)}}},
		},
		{
			name:    "cuda jobs never land on cpu workers",
			workers: []Worker{{ID: "c1"}, {ID: "c2"}},
			queue:   []Job{{ID: "j", Ranks: 1, Backend: BackendCUDA}},
			want:    nil,
		},
		{
			name:    "cpu jobs never take GPUs",
			workers: []Worker{{ID: "g", GPUs: 8}},
			queue:   []Job{{ID: "j", Ranks: 1, Backend: BackendCPU}},
			want:    nil,
		},
		{
			name:    "auto prefers GPUs and falls back to CPU workers as a whole",
			workers: []Worker{{ID: "g", GPUs: 1}, {ID: "c1"}, {ID: "c2"}},
			queue:   []Job{{ID: "a", Ranks: 2, Backend: BackendAuto}, {ID: "b", Ranks: 1}},
			want:    []Placement{{"a", []Slot{s("c1", 0), s("c2", 0)}}, {"b", []Slot{s("g", 0)}}},
		},
		{
			name:    "duplicate and unnamed workers are ignored",
			workers: []Worker{{ID: "w"}, {ID: "w"}, {ID: ""}},
			queue:   []Job{{ID: "j", Ranks: 2}},
			want:    nil,
		},
		{
			name:    "jobs without ranks are skipped",
			workers: []Worker{{ID: "w"}},
			queue:   []Job{{ID: "zero"}, {ID: "neg", Ranks: -1}, {ID: "ok", Ranks: 1}},
			want:    []Placement{{"ok", []Slot{s("w", 0)}}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Schedule(tc.workers, tc.queue)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Schedule =\n %v\nwant\n %v", got, tc.want)
			}
		})
	}
}

// TestScheduleInvariants checks on random inputs that no slot is used twice,
// no busy or nonexistent slot is used, every placement is complete and
// backend pools are respected, and that the result is deterministic.
func TestScheduleInvariants(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	backends := []string{BackendCPU, BackendCUDA, BackendAuto}
	for trial := range 300 {
		t.Run(fmt.Sprint(trial), func(t *testing.T) {
			var workers []Worker
			for i := range rng.IntN(8) {
				w := Worker{ID: fmt.Sprintf("w%d", i), GPUs: rng.IntN(5)}
				for s := range w.Slots() {
					if rng.IntN(3) == 0 {
						w.Busy = append(w.Busy, s)
					}
				}
				workers = append(workers, w)
			}
			var queue []Job
			for i := range rng.IntN(6) {
				queue = append(queue, Job{ID: fmt.Sprintf("j%d", i), Ranks: 1 + rng.IntN(6), Backend: backends[rng.IntN(3)]})
			}
			got := Schedule(workers, queue)
			if again := Schedule(workers, queue); !reflect.DeepEqual(got, again) {
				t.Fatalf("not deterministic: %v vs %v", got, again)
			}
			byID := map[string]Worker{}
			for _, w := range workers {
				byID[w.ID] = w
			}
			jobs := map[string]Job{}
			for _, j := range queue {
				jobs[j.ID] = j
			}
			used := map[Slot]string{}
			for _, p := range got {
				j := jobs[p.JobID]
				if len(p.Slots) != j.Ranks {
					t.Fatalf("job %s got %d slots for %d ranks", j.ID, len(p.Slots), j.Ranks)
				}
				kind := -1
				for _, sl := range p.Slots {
					w, ok := byID[sl.WorkerID]
					if !ok || sl.GPU < 0 || sl.GPU >= w.Slots() {
						t.Fatalf("slot %v does not exist", sl)
					}
					for _, b := range w.Busy {
						if b == sl.GPU {
							t.Fatalf("busy slot %v reused by %s", sl, j.ID)
						}
					}
					if prev, dup := used[sl]; dup {
						t.Fatalf("slot %v holds ranks of %s and %s", sl, prev, j.ID)
					}
					used[sl] = j.ID
					isGPU := 0
					if w.GPUs > 0 {
						isGPU = 1
					}
					if kind >= 0 && kind != isGPU {
						t.Fatalf("job %s mixes CPU and GPU workers", j.ID)
					}
					kind = isGPU
					if j.Backend == BackendCUDA && isGPU == 0 || j.Backend == BackendCPU && isGPU == 1 {
						t.Fatalf("job %s (backend %s) placed on %v", j.ID, j.Backend, w)
					}
				}
			}
		})
	}
}
