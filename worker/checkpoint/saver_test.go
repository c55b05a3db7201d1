package checkpoint

import (
	"context"
	"errors"
	"io"
	"reflect"
	"strings"
	"sync"
	"testing"
)

// gateStore blocks the Puts under one step directory until released, and
// fails the Puts of names that contain failOn.
type gateStore struct {
	Store
	block   string
	gate    chan struct{}
	entered chan struct{}
	once    sync.Once
	failOn  string
}

func (g *gateStore) Put(ctx context.Context, name string, r io.Reader, size int64) error {
	if g.block != "" && strings.Contains(name, g.block) {
		g.once.Do(func() { close(g.entered) })
		select {
		case <-g.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if g.failOn != "" && strings.Contains(name, g.failOn) {
		return errors.New("injected failure")
	}
	return g.Store.Put(ctx, name, r, size)
}

func TestSaverCopiesAndKeepsOneSaveInFlight(t *testing.T) {
	ctx := context.Background()
	local := LocalStore{Root: t.TempDir()}
	g := &gateStore{Store: local, block: StepDir(1), gate: make(chan struct{}), entered: make(chan struct{})}
	var commits []int
	sv := NewSaver[float32](g, "job", SaverOptions{Keep: 5, Log: testLogger(t), OnCommit: func(c Commit) { commits = append(commits, c.Step) }})

	s := testState(1)
	want := append([]float32(nil), s.Params...)
	if _, err := sv.Save(ctx, s); err != nil {
		t.Fatal(err)
	}
	<-g.entered
	// The trainer moves on and changes its buffers; the save has its copy.
	for i := range s.Params {
		s.Params[i] = -1
	}
	if step, ok := sv.InFlight(); !ok || step != 1 {
		t.Fatalf("in flight: %d, %v; want step 1", step, ok)
	}
	// A second save waits for the first: with a context that ends, it
	// gives up without starting anything.
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := sv.Save(cancelled, testState(2)); !errors.Is(err, context.Canceled) {
		t.Fatalf("a save while one is in flight returned %v, want it to wait until its context ended", err)
	}
	close(g.gate)
	if err := sv.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := sv.Save(ctx, testState(2)); err != nil {
		t.Fatal(err)
	}
	if err := sv.Close(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(commits, []int{1, 2}) {
		t.Errorf("commits %v, want [1 2]", commits)
	}
	_, objs, err := ReadVerified(ctx, local, "job", 1)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode[float32](objs)
	if err != nil || !reflect.DeepEqual(got.Params, want) {
		t.Errorf("step 1 holds the buffers as changed after Save returned (%v)", err)
	}
}

func TestSaverReportsFailureAndGoesOn(t *testing.T) {
	ctx := context.Background()
	local := LocalStore{Root: t.TempDir()}
	g := &gateStore{Store: local, failOn: StepDir(2) + "/" + OptimizerObject}
	var reported []*SaveError
	sv := NewSaver[float32](g, "", SaverOptions{Keep: 2, Log: testLogger(t), OnError: func(e *SaveError) { reported = append(reported, e) }})
	for _, step := range []int{1, 2} {
		if _, err := sv.Save(ctx, testState(step)); err != nil {
			t.Fatalf("save %d: %v", step, err)
		}
	}
	// The failure of step 2 comes back from the next call, once.
	_, err := sv.Save(ctx, testState(3))
	var serr *SaveError
	if !errors.As(err, &serr) || serr.Step != 2 {
		t.Fatalf("the save after a failed one returned %v, want the SaveError of step 2", err)
	}
	if err := sv.Close(); err != nil {
		t.Errorf("close after a good save: %v", err)
	}
	if len(reported) != 1 || reported[0].Step != 2 {
		t.Errorf("OnError heard %v, want step 2", reported)
	}
	if steps, _ := Steps(ctx, local, ""); !reflect.DeepEqual(steps, []int{3, 1}) {
		t.Errorf("committed %v, want [3 1]", steps)
	}
	if left, _ := local.List(ctx, StepDir(2)); len(left) != 0 {
		t.Errorf("the failed save left %v", left)
	}
}
