package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/m2train/m2train/coordinator/jobspec"
)

func testSpec(t testing.TB, name string, dp, sp int) *jobspec.Spec {
	t.Helper()
	doc := fmt.Sprintf(`name: %s
model: {config: {d_model: 64, n_layer: 2, vocab_size: 256, d_state: 16, headdim: 16}}
data: {path: /data/tiny, seq_len: 64}
parallel: {dp: %d, sp: %d}
schedule: {total_steps: 100}
checkpoint: {location: /ckpt, every_steps: 10, keep: 2}
backend: cpu
max_restarts: 1
`, name, dp, sp)
	s, err := jobspec.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// apply encodes the command (as the proposer would), applies the bytes and
// returns the result.
func apply(t testing.TB, f *FSM, c Command) *Result {
	t.Helper()
	b, err := Encode(c)
	if err != nil {
		t.Fatalf("Encode(%T): %v", c, err)
	}
	return f.Apply(&raft.Log{Type: raft.LogCommand, Data: b}).(*Result)
}

func mustApply(t testing.TB, f *FSM, c Command) *Result {
	t.Helper()
	r := apply(t, f, c)
	if r.Err != nil {
		t.Fatalf("apply %T: %v", c, r.Err)
	}
	return r
}

// cluster builds an FSM with n alive CPU workers w0..w(n-1).
func cluster(t testing.TB, n int) *FSM {
	f := New()
	for i := range n {
		mustApply(t, f, &RegisterWorker{At: 1, WorkerID: fmt.Sprintf("w%d", i), Addr: fmt.Sprintf("10.0.0.%d:7000", i), Lease: int64(100 + i)})
	}
	return f
}

func cpuSlots(ids ...string) []Slot {
	out := make([]Slot, len(ids))
	for i, id := range ids {
		out[i] = Slot{WorkerID: id}
	}
	return out
}

func TestJobLifecycle(t *testing.T) {
	f := cluster(t, 3)
	id := mustApply(t, f, &SubmitJob{At: 10, RequestID: "r1", Spec: testSpec(t, "demo", 2, 1)}).JobID
	if id != "demo-1" {
		t.Fatalf("job id = %q", id)
	}
	// A retried submit returns the same job.
	if again := mustApply(t, f, &SubmitJob{At: 11, RequestID: "r1", Spec: testSpec(t, "demo", 2, 1)}).JobID; again != id || len(f.Jobs()) != 1 {
		t.Fatalf("retried submit made %q, %d jobs", again, len(f.Jobs()))
	}
	mustApply(t, f, &Assign{At: 20, JobID: id, Generation: 0, Slots: cpuSlots("w0", "w1")})
	j, _ := f.Job(id)
	if j.State != JobRunning || j.Generation != 1 || len(j.Assignments) != 2 || j.StartedAt != 20 {
		t.Fatalf("after assign: %+v", j)
	}
	mustApply(t, f, &ReportProgress{At: 30, JobID: id, Generation: 1, Rank: 0, Step: 10, Loss: 3.5, TokensPerSec: 1000})
	mustApply(t, f, &CommitCheckpoint{At: 31, JobID: id, Generation: 1, Step: 10, Location: "/ckpt/demo-1/step-10"})
	// w1 dies: the job goes back to the queue, keeping its checkpoint.
	mustApply(t, f, &WorkerLost{At: 40, WorkerID: "w1", Lease: 101})
	j, _ = f.Job(id)
	if j.State != JobQueued || j.Restarts != 1 || j.Assignments != nil || !strings.Contains(j.Message, "w1 lost") {
		t.Fatalf("after worker lost: %+v", j)
	}
	if ck, ok := j.LastCheckpoint(); !ok || ck.Step != 10 {
		t.Fatalf("checkpoint lost: %+v", j.Checkpoints)
	}
	// Reports of the old generation are stale now.
	if r := apply(t, f, &ReportProgress{At: 41, JobID: id, Generation: 1, Step: 11}); !errors.Is(r.Err, ErrStale) {
		t.Fatalf("stale progress: %v", r.Err)
	}
	mustApply(t, f, &Assign{At: 50, JobID: id, Generation: 1, Slots: cpuSlots("w0", "w2")})
	j, _ = f.Job(id)
	if j.Generation != 2 || j.State != JobRunning {
		t.Fatalf("after reassign: %+v", j)
	}
	mustApply(t, f, &ReportProgress{At: 60, JobID: id, Generation: 2, Rank: 0, Step: 100, Loss: 2.1, Done: true})
	j, _ = f.Job(id)
	if j.State != JobSucceeded || j.FinishedAt != 60 || j.Assignments != nil {
		t.Fatalf("after done: %+v", j)
	}
	var types []string
	for _, e := range f.Events(id, 0, 0) {
		types = append(types, e.Type)
	}
	want := []string{EventSubmitted, EventScheduled, EventCheckpoint, EventRequeued, EventScheduled, EventSucceeded}
	if !reflect.DeepEqual(types, want) {
		t.Errorf("events = %v, want %v", types, want)
	}
}

// TestApplyErrors checks that each bad command fails with the right sentinel
// and changes nothing.
func TestApplyErrors(t *testing.T) {
	setup := func(t *testing.T) (*FSM, string) {
		f := cluster(t, 3)
		id := mustApply(t, f, &SubmitJob{At: 10, Spec: testSpec(t, "demo", 2, 1)}).JobID
		mustApply(t, f, &Assign{At: 20, JobID: id, Slots: cpuSlots("w0", "w1")})
		mustApply(t, f, &SubmitJob{At: 21, Spec: testSpec(t, "other", 1, 1)})
		mustApply(t, f, &CommitCheckpoint{At: 22, JobID: id, Generation: 1, Step: 10, Location: "/c/10"})
		return f, id
	}
	bad := testSpec(t, "bad", 1, 1)
	bad.Parallel.SPMode = "diagonal"
	cases := []struct {
		name string
		cmd  func(id string) Command
		want error
	}{
		{"submit invalid spec", func(string) Command { return &SubmitJob{At: 1, Spec: bad} }, ErrInvalid},
		{"cancel unknown", func(string) Command { return &CancelJob{At: 1, JobID: "nope"} }, ErrNotFound},
		{"assign running job", func(id string) Command { return &Assign{At: 1, JobID: id, Generation: 1, Slots: cpuSlots("w2", "w2")} }, ErrConflict},
		{"assign stale generation", func(string) Command { return &Assign{At: 1, JobID: "other-2", Generation: 5, Slots: cpuSlots("w2")} }, ErrStale},
		{"assign busy slot", func(string) Command { return &Assign{At: 1, JobID: "other-2", Slots: cpuSlots("w0")} }, ErrConflict},
		{"assign unknown worker", func(string) Command { return &Assign{At: 1, JobID: "other-2", Slots: cpuSlots("w9")} }, ErrConflict},
		{"assign missing slot", func(string) Command {
			return &Assign{At: 1, JobID: "other-2", Slots: []Slot{{WorkerID: "w2", GPU: 3}}}
		}, ErrInvalid},
		{"assign wrong rank count", func(string) Command { return &Assign{At: 1, JobID: "other-2", Slots: cpuSlots("w2", "w2")} }, ErrInvalid},
		{"progress beyond total", func(id string) Command { return &ReportProgress{At: 1, JobID: id, Generation: 1, Step: 101} }, ErrInvalid},
		{"progress rank outside world", func(id string) Command { return &ReportProgress{At: 1, JobID: id, Generation: 1, Rank: 2} }, ErrInvalid},
		{"progress for queued job", func(string) Command { return &ReportProgress{At: 1, JobID: "other-2"} }, ErrStale},
		{"checkpoint not newer", func(id string) Command {
			return &CommitCheckpoint{At: 1, JobID: id, Generation: 1, Step: 10, Location: "/c/10b"}
		}, ErrStale},
		{"failure of wrong generation", func(id string) Command { return &ReportFailure{At: 1, JobID: id, Generation: 7} }, ErrStale},
		{"lost with replaced lease", func(string) Command { return &WorkerLost{At: 1, WorkerID: "w0", Lease: 5} }, ErrStale},
		{"lost unknown worker", func(string) Command { return &WorkerLost{At: 1, WorkerID: "zz"} }, ErrNotFound},
		{"gpu change while busy", func(string) Command { return &RegisterWorker{At: 1, WorkerID: "w0", GPUs: 4, Lease: 100} }, ErrConflict},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f, id := setup(t)
			before := snapshotBytes(t, f)
			r := apply(t, f, tc.cmd(id))
			if !errors.Is(r.Err, tc.want) {
				t.Fatalf("err = %v, want %v", r.Err, tc.want)
			}
			if after := snapshotBytes(t, f); !bytes.Equal(before, after) {
				t.Errorf("failed command changed the state")
			}
		})
	}
}

func TestCancelAndFailures(t *testing.T) {
	f := cluster(t, 2)
	a := mustApply(t, f, &SubmitJob{At: 1, Spec: testSpec(t, "a", 1, 1)}).JobID
	mustApply(t, f, &CancelJob{At: 2, JobID: a, Reason: "user"})
	if r := apply(t, f, &CancelJob{At: 3, JobID: a}); !errors.Is(r.Err, ErrConflict) {
		t.Fatalf("second cancel: %v", r.Err)
	}
	b := mustApply(t, f, &SubmitJob{At: 4, Spec: testSpec(t, "b", 1, 1)}).JobID
	mustApply(t, f, &Assign{At: 5, JobID: b, Slots: cpuSlots("w0")})
	// max_restarts is 1: one retryable failure requeues, the next fails.
	mustApply(t, f, &ReportFailure{At: 6, JobID: b, Generation: 1, Message: "nccl timeout"})
	if j, _ := f.Job(b); j.State != JobQueued || j.Restarts != 1 {
		t.Fatalf("after first failure: %+v", j)
	}
	mustApply(t, f, &Assign{At: 7, JobID: b, Generation: 1, Slots: cpuSlots("w1")})
	mustApply(t, f, &WorkerLost{At: 8, WorkerID: "w1"})
	if j, _ := f.Job(b); j.State != JobFailed || !strings.Contains(j.Message, "max_restarts 1 reached") {
		t.Fatalf("after restarts ran out: %+v", j)
	}
	c := mustApply(t, f, &SubmitJob{At: 9, Spec: testSpec(t, "c", 1, 1)}).JobID
	mustApply(t, f, &Assign{At: 10, JobID: c, Slots: cpuSlots("w0")})
	mustApply(t, f, &ReportFailure{At: 11, JobID: c, Generation: 1, Message: "bad data", Fatal: true})
	if j, _ := f.Job(c); j.State != JobFailed {
		t.Fatalf("fatal failure: %+v", j)
	}
	// A lost worker that comes back with a new lease is alive again.
	mustApply(t, f, &RegisterWorker{At: 12, WorkerID: "w1", Lease: 777})
	if w, _ := f.Worker("w1"); w.State != WorkerAlive || w.Lease != 777 {
		t.Fatalf("re-registered worker: %+v", w)
	}
	// An API registration without a lease keeps a live worker alive.
	mustApply(t, f, &RegisterWorker{At: 13, WorkerID: "w1", Addr: "new:1"})
	if w, _ := f.Worker("w1"); w.State != WorkerAlive || w.Addr != "new:1" {
		t.Fatalf("API re-registration: %+v", w)
	}
}

func TestCheckpointRetention(t *testing.T) {
	f := cluster(t, 1)
	id := mustApply(t, f, &SubmitJob{At: 1, Spec: testSpec(t, "k", 1, 1)}).JobID
	mustApply(t, f, &Assign{At: 2, JobID: id, Slots: cpuSlots("w0")})
	for step := int64(10); step <= 40; step += 10 {
		mustApply(t, f, &CommitCheckpoint{At: 3, JobID: id, Generation: 1, Step: step, Location: fmt.Sprint("/c/", step)})
	}
	j, _ := f.Job(id)
	if len(j.Checkpoints) != 2 || j.Checkpoints[0].Step != 30 || j.Checkpoints[1].Step != 40 {
		t.Fatalf("keep 2 retained %+v", j.Checkpoints)
	}
}

func TestEventsAreBounded(t *testing.T) {
	f := New()
	for i := range MaxEvents + 10 {
		mustApply(t, f, &RegisterWorker{At: int64(i + 1), WorkerID: "w", Lease: int64(i + 1)})
	}
	ev := f.Events("", 0, 0)
	if len(ev) != MaxEvents || ev[0].Seq != 11 {
		t.Fatalf("%d events, first seq %d", len(ev), ev[0].Seq)
	}
	if last := f.Events("", 0, 3); len(last) != 3 || last[2].Seq != MaxEvents+10 {
		t.Fatalf("limit 3 gave %+v", last)
	}
}

func snapshotBytes(t testing.TB, f *FSM) []byte {
	t.Helper()
	s, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink := &memSink{}
	if err := s.Persist(sink); err != nil {
		t.Fatal(err)
	}
	s.Release()
	return sink.Bytes()
}

type memSink struct{ bytes.Buffer }

func (*memSink) ID() string    { return "mem" }
func (*memSink) Cancel() error { return nil }
func (*memSink) Close() error  { return nil }

// TestSnapshotRestore restores a snapshot into a fresh FSM and checks that
// both then evolve identically under the same commands.
func TestSnapshotRestore(t *testing.T) {
	f := cluster(t, 3)
	a := mustApply(t, f, &SubmitJob{At: 1, RequestID: "req-a", Spec: testSpec(t, "a", 2, 1)}).JobID
	mustApply(t, f, &Assign{At: 2, JobID: a, Slots: cpuSlots("w0", "w1")})
	mustApply(t, f, &CommitCheckpoint{At: 3, JobID: a, Generation: 1, Step: 10, Location: "/c"})
	mustApply(t, f, &SetMember{At: 4, ID: "c0", APIAddr: "127.0.0.1:9000"})
	snap := snapshotBytes(t, f)

	g := New()
	if err := g.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(snap, snapshotBytes(t, g)) {
		t.Fatal("restored state serializes differently")
	}
	next := []Command{
		&SubmitJob{At: 5, RequestID: "req-a", Spec: testSpec(t, "a", 2, 1)}, // dedup survives restore
		&SubmitJob{At: 6, Spec: testSpec(t, "b", 1, 1)},
		&WorkerLost{At: 7, WorkerID: "w1", Lease: 101},
		&Assign{At: 8, JobID: "b-2", Slots: cpuSlots("w2")},
	}
	for _, c := range next {
		rf, rg := apply(t, f, c), apply(t, g, c)
		if rf.JobID != rg.JobID || (rf.Err == nil) != (rg.Err == nil) {
			t.Fatalf("%T: original %+v, restored %+v", c, rf, rg)
		}
	}
	if !bytes.Equal(snapshotBytes(t, f), snapshotBytes(t, g)) {
		t.Fatal("original and restored FSMs diverged")
	}
	if len(f.Jobs()) != 2 {
		t.Fatalf("dedup after restore failed: %d jobs", len(f.Jobs()))
	}
	if addr, ok := g.Member("c0"); !ok || addr != "127.0.0.1:9000" {
		t.Fatalf("member after restore: %q %v", addr, ok)
	}
}

func TestRestoreRejectsGarbage(t *testing.T) {
	cases := map[string]string{
		"not json":         "}{",
		"unknown field":    `{"jobz": {}}`,
		"job id differs":   `{"jobs": {"a": {"id": "b", "spec": {}}}}`,
		"job without spec": `{"jobs": {"a": {"id": "a"}}}`,
		"null worker":      `{"workers": {"w": null}}`,
		"zero sp":          `{"jobs": {"a": {"id": "a", "spec": {"parallel": {"dp": 1, "sp": 0}}}}}`,
	}
	for name, doc := range cases {
		t.Run(name, func(t *testing.T) {
			f := cluster(t, 1)
			before := snapshotBytes(t, f)
			if err := f.Restore(io.NopCloser(strings.NewReader(doc))); err == nil {
				t.Fatal("Restore accepted garbage")
			}
			if !bytes.Equal(before, snapshotBytes(t, f)) {
				t.Fatal("failed restore changed the state")
			}
		})
	}
}

func TestDecodeRejects(t *testing.T) {
	good, err := Encode(&CancelJob{At: 1, JobID: "x"})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"one byte", []byte{1}},
		{"bad version", append([]byte{2}, good[1:]...)},
		{"unknown op", append([]byte{1, 99}, good[2:]...)},
		{"unknown field", []byte("\x01\x02{\"at\":1,\"job_id\":\"x\",\"extra\":1}")},
		{"trailing data", append(append([]byte{}, good...), []byte(" {}")...)},
		{"missing required field", []byte("\x01\x02{\"at\":1}")},
		{"zero time", []byte("\x01\x02{\"job_id\":\"x\"}")},
		{"negative gpus", []byte("\x01\x03{\"at\":1,\"worker_id\":\"w\",\"gpus\":-1}")},
		{"wrong type", []byte("\x01\x05{\"at\":1,\"job_id\":\"x\",\"slots\":\"all\"}")},
		{"too large", append([]byte{1, 2}, bytes.Repeat([]byte(" "), MaxCommandBytes)...)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if c, err := Decode(tc.data); err == nil {
				t.Fatalf("Decode accepted %T", c)
			}
			r := New().Apply(&raft.Log{Type: raft.LogCommand, Data: tc.data}).(*Result)
			if r.Err == nil {
				t.Fatal("Apply accepted bad data")
			}
		})
	}
}

func TestNonCommandEntriesAreIgnored(t *testing.T) {
	f := New()
	if r := f.Apply(&raft.Log{Type: raft.LogNoop}); r != nil {
		t.Fatalf("Apply(noop) = %v", r)
	}
}

// fuzzState seeds an FSM with workers and jobs so that fuzzed commands reach
// deep paths.
func fuzzState(t testing.TB) *FSM {
	f := cluster(t, 3)
	id := mustApply(t, f, &SubmitJob{At: 1, Spec: testSpec(t, "a", 2, 1)}).JobID
	mustApply(t, f, &Assign{At: 2, JobID: id, Slots: cpuSlots("w0", "w1")})
	mustApply(t, f, &SubmitJob{At: 3, Spec: testSpec(t, "b", 1, 1)})
	return f
}

func FuzzDecode(f *testing.F) {
	seeds := []Command{
		&SubmitJob{At: 1, RequestID: "r", Spec: testSpec(f, "a", 1, 1)},
		&CancelJob{At: 1, JobID: "a-1"},
		&RegisterWorker{At: 1, WorkerID: "w0", GPUs: 2, Lease: 9},
		&WorkerLost{At: 1, WorkerID: "w0", Lease: 100},
		&Assign{At: 1, JobID: "b-2", Slots: cpuSlots("w2")},
		&ReportProgress{At: 1, JobID: "a-1", Generation: 1, Step: 5, Loss: 1.5},
		&CommitCheckpoint{At: 1, JobID: "a-1", Generation: 1, Step: 5, Location: "/c"},
		&ReportFailure{At: 1, JobID: "a-1", Generation: 1, Message: "x"},
		&SetMember{At: 1, ID: "c0", APIAddr: "a:1"},
	}
	for _, c := range seeds {
		b, err := Encode(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Decode(data)
		if err != nil {
			if !errors.Is(err, ErrBadCommand) && !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
		} else {
			// A decoded command re-encodes to a command that decodes equal.
			b, err := Encode(c)
			if err != nil {
				t.Fatalf("re-encode: %v", err)
			}
			c2, err := Decode(b)
			if err != nil || !reflect.DeepEqual(c, c2) {
				t.Fatalf("round trip: %v\n%#v\n%#v", err, c, c2)
			}
		}
		// Apply never panics, and a rejected entry changes nothing.
		st := fuzzState(t)
		before := snapshotBytes(t, st)
		r := st.Apply(&raft.Log{Type: raft.LogCommand, Data: data}).(*Result)
		if r.Err != nil && !bytes.Equal(before, snapshotBytes(t, st)) {
			t.Fatalf("failed command %v changed the state", r.Err)
		}
		checkNoDoubleBooking(t, st)
	})
}

func checkNoDoubleBooking(t *testing.T, f *FSM) {
	used := map[Slot]string{}
	for _, j := range f.Jobs(JobRunning) {
		for _, a := range j.Assignments {
			s := Slot{a.WorkerID, a.GPU}
			if other, ok := used[s]; ok {
				t.Fatalf("slot %v used by %s and %s", s, other, j.ID)
			}
			used[s] = j.ID
		}
	}
}

// TestWorkerRestartWithNewLease checks that a live worker seen with another
// lease (its process restarted under the same ID before the old lease
// expired) ends the generation of the jobs it ran, and that the old lease's
// expiry afterwards changes nothing.
func TestWorkerRestartWithNewLease(t *testing.T) {
	f := cluster(t, 2)
	id := mustApply(t, f, &SubmitJob{At: 1, Spec: testSpec(t, "r", 2, 1)}).JobID
	mustApply(t, f, &Assign{At: 2, JobID: id, Slots: cpuSlots("w0", "w1")})
	mustApply(t, f, &CommitCheckpoint{At: 3, JobID: id, Generation: 1, Step: 10, Location: "/ckpt/r-1/step-10"})
	// The same lease again (a reconcile after a leader change) is not a
	// restart.
	mustApply(t, f, &RegisterWorker{At: 4, WorkerID: "w1", Addr: "10.0.0.1:7000", Lease: 101})
	if j, _ := f.Job(id); j.State != JobRunning || j.Generation != 1 {
		t.Fatalf("same lease requeued the job: %+v", j)
	}
	// A new lease with another GPU count: the job is requeued first, so
	// the change is accepted.
	mustApply(t, f, &RegisterWorker{At: 5, WorkerID: "w1", Addr: "10.0.0.1:7001", GPUs: 1, Lease: 555})
	j, _ := f.Job(id)
	if j.State != JobQueued || j.Restarts != 1 || len(j.Assignments) != 0 ||
		!strings.Contains(j.Message, "worker w1 restarted (lease 65 replaced by 22b) in generation 1") {
		t.Fatalf("after the restart: %+v", j)
	}
	if w, _ := f.Worker("w1"); w.State != WorkerAlive || w.Lease != 555 || w.GPUs != 1 {
		t.Fatalf("restarted worker: %+v", w)
	}
	evs := f.Events(id, 0, 0)
	if last := evs[len(evs)-1]; last.Type != EventRequeued || !strings.Contains(last.Message, "resume from the checkpoint of step 10") {
		t.Fatalf("last event %+v", last)
	}
	// The expiry of the replaced lease is stale.
	if r := apply(t, f, &WorkerLost{At: 6, WorkerID: "w1", Lease: 101}); !errors.Is(r.Err, ErrStale) {
		t.Fatalf("expiry of the old lease: %v", r.Err)
	}
	// A worker that is not alive (lost, or only registered) comes back
	// without requeuing anything.
	mustApply(t, f, &Assign{At: 7, JobID: id, Generation: 1, Slots: cpuSlots("w0", "w1")})
	mustApply(t, f, &RegisterWorker{At: 8, WorkerID: "w2", Lease: 900})
	if j, _ := f.Job(id); j.State != JobRunning || j.Generation != 2 {
		t.Fatalf("a new worker changed the job: %+v", j)
	}
}
