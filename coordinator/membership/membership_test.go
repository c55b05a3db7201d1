package membership

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/m2train/m2train/coordinator/internal/etcdtest"
)

var endpoint string

func TestMain(m *testing.M) { os.Exit(etcdtest.Main(m, &endpoint)) }

func newClient(t *testing.T) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// testPrefix isolates each test's keys.
func testPrefix(t *testing.T) string { return "/test/" + strings.ReplaceAll(t.Name(), "/", "_") + "/" }

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestRegisterListWatch(t *testing.T) {
	cli := newClient(t)
	p := testPrefix(t)
	ctx := ctxT(t, 30*time.Second)
	a, err := Register(ctx, cli, WorkerInfo{ID: "a", Addr: "h:1", GPUs: 2}, Options{TTL: 5, Prefix: p})
	if err != nil {
		t.Fatal(err)
	}
	members, rev, err := ListWorkers(ctx, cli, p)
	if err != nil || len(members) != 1 || members[0].Info.GPUs != 2 || members[0].Lease != int64(a.Lease()) {
		t.Fatalf("ListWorkers = %+v, %v", members, err)
	}
	events := make(chan WorkerEvent, 8)
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- WatchWorkers(wctx, cli, p, rev, func(e WorkerEvent) { events <- e }) }()

	b, err := Register(ctx, cli, WorkerInfo{ID: "b", Addr: "h:2"}, Options{TTL: 5, Prefix: p})
	if err != nil {
		t.Fatal(err)
	}
	if e := next(t, events); !e.Up || e.Member.Info.ID != "b" || e.Member.Lease != int64(b.Lease()) {
		t.Fatalf("event = %+v", e)
	}
	// A graceful leave revokes the lease and deletes the record at once.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if e := next(t, events); e.Up || e.Member.Info.ID != "b" || e.Member.Lease != int64(b.Lease()) {
		t.Fatalf("event = %+v", e)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatalf("WatchWorkers = %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
}

func next(t *testing.T, ch <-chan WorkerEvent) WorkerEvent {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(20 * time.Second):
		t.Fatal("no worker event")
		return WorkerEvent{}
	}
}

// TestLeaseLapse stops a worker's keep-alive without revoking its lease (its
// client goes away, as when the process dies) and waits for the record to
// disappear within the TTL plus one second.
func TestLeaseLapse(t *testing.T) {
	cli := newClient(t)
	p := testPrefix(t)
	ctx := ctxT(t, 30*time.Second)
	_, rev, err := ListWorkers(ctx, cli, p)
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan WorkerEvent, 8)
	go WatchWorkers(ctx, cli, p, rev, func(e WorkerEvent) { events <- e })

	const ttl = 2
	wcli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s, err := Register(ctx, wcli, WorkerInfo{ID: "doomed"}, Options{TTL: ttl, Prefix: p})
	if err != nil {
		t.Fatal(err)
	}
	if e := next(t, events); !e.Up {
		t.Fatalf("event = %+v", e)
	}
	wcli.Close()
	stopped := time.Now()
	select {
	case e := <-events:
		if e.Up || e.Member.Info.ID != "doomed" || e.Member.Lease != int64(s.Lease()) {
			t.Fatalf("event = %+v", e)
		}
		t.Logf("record gone %v after the keep-alive stopped", time.Since(stopped))
	case <-time.After(ttl*time.Second + time.Second):
		t.Fatalf("record still present %v after the keep-alive stopped", time.Since(stopped))
	}
	<-s.Done()
}

func TestRendezvous(t *testing.T) {
	cli := newClient(t)
	p := testPrefix(t)
	ctx := ctxT(t, 30*time.Second)
	const world = 4
	sessions := make([]*Session, world)
	for r := range world {
		s, err := Register(ctx, cli, WorkerInfo{ID: fmt.Sprintf("w%d", r)}, Options{TTL: 5, Prefix: p})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		sessions[r] = s
	}
	results := make([][]string, world)
	errs := make([]error, world)
	var wg sync.WaitGroup
	for r := world - 1; r >= 0; r-- {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[r], errs[r] = sessions[r].Rendezvous(ctx, "job-1", 3, r, world, fmt.Sprintf("10.0.0.%d:9000", r))
		}()
	}
	wg.Wait()
	want := []string{"10.0.0.0:9000", "10.0.0.1:9000", "10.0.0.2:9000", "10.0.0.3:9000"}
	for r := range world {
		if errs[r] != nil || fmt.Sprint(results[r]) != fmt.Sprint(want) {
			t.Fatalf("rank %d: %v, %v", r, results[r], errs[r])
		}
	}

	t.Run("missing ranks are named", func(t *testing.T) {
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		_, err := sessions[0].Rendezvous(short, "job-1", 4, 0, 3, "a:1")
		if !errors.Is(err, ErrRendezvous) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "[1 2]") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("world size disagreement", func(t *testing.T) {
		_, err := sessions[3].Rendezvous(ctx, "job-1", 3, 1, 2, "a:1")
		if !errors.Is(err, ErrRendezvous) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("bad arguments", func(t *testing.T) {
		for _, c := range []struct {
			job         string
			rank, world int
			addr        string
		}{{"", 0, 1, "a"}, {"a/b", 0, 1, "a"}, {"j", 1, 1, "a"}, {"j", -1, 1, "a"}, {"j", 0, 0, "a"}, {"j", 0, 1, ""}} {
			if _, err := sessions[0].Rendezvous(ctx, c.job, 1, c.rank, c.world, c.addr); !errors.Is(err, ErrInvalid) {
				t.Errorf("%+v: err = %v", c, err)
			}
		}
	})
	t.Run("old generations are deleted", func(t *testing.T) {
		if err := DeleteRendezvous(ctx, cli, p, "job-1", 4); err != nil {
			t.Fatal(err)
		}
		resp, err := cli.Get(ctx, p+"rendezvous/job-1/", clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			if strings.HasPrefix(string(kv.Key), RendezvousDir(p, "job-1", 3)) {
				t.Fatalf("generation 3 key %s survived", kv.Key)
			}
		}
		if len(resp.Kvs) != 1 {
			t.Fatalf("want the generation 4 key kept, got %d keys", len(resp.Kvs))
		}
	})
}

func TestRegisterRejects(t *testing.T) {
	cli := newClient(t)
	ctx := ctxT(t, 10*time.Second)
	for _, info := range []WorkerInfo{{}, {ID: "a/b"}, {ID: "a", GPUs: -1}, {ID: "a", GPUs: 65}} {
		if _, err := Register(ctx, cli, info, Options{}); !errors.Is(err, ErrInvalid) {
			t.Errorf("Register(%+v) = %v", info, err)
		}
	}
	if _, err := Register(ctx, cli, WorkerInfo{ID: "a"}, Options{TTL: -1}); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative TTL: %v", err)
	}
}
