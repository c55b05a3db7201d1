// Command coordbench measures the coordinator on one machine, with every
// replica in-process on loopback TCP and the production raft timeouts:
//
//	coordbench failover [-trials 20]         leader kill → first successful submit on the new leader
//	coordbench submit   [-n 1000] [-c 1]     job submit latency through the leader-following client
//	coordbench workers  [-n 1000] [-d 20s]   worker registrations and lease keep-alives against etcd
//
// Each prints a distribution (min, p50, p90, p99, max, mean) of its
// latencies.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/coordtest"
	"github.com/m2train/m2train/coordinator/etcdembed"
	"github.com/m2train/m2train/coordinator/fsm"
	"github.com/m2train/m2train/coordinator/membership"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: coordbench failover|submit|workers [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "failover":
		err = failover(os.Args[2:])
	case "submit":
		err = submit(os.Args[2:])
	case "workers":
		err = workers(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "coordbench: unknown benchmark %q\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "coordbench:", err)
		os.Exit(1)
	}
}

func spec(name string) []byte {
	return fmt.Appendf(nil, `name: %s
model: {config: {d_model: 64, n_layer: 2, vocab_size: 256, d_state: 16, headdim: 16}}
data: {path: /data/tiny, seq_len: 64}
schedule: {total_steps: 100}
backend: cpu
`, name)
}

// summary prints a latency distribution.
func summary(what string, d []time.Duration) {
	if len(d) == 0 {
		fmt.Printf("%s: no samples\n", what)
		return
	}
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) time.Duration {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	var sum time.Duration
	for _, v := range s {
		sum += v
	}
	r := func(v time.Duration) string { return v.Round(10 * time.Microsecond).String() }
	fmt.Printf("%s (n=%d): min %s  p50 %s  p90 %s  p99 %s  max %s  mean %s\n",
		what, len(s), r(s[0]), r(q(0.5)), r(q(0.9)), r(q(0.99)), r(s[len(s)-1]), r(sum/time.Duration(len(s))))
}

func startCluster(replicas int, etcd []string) (*coordtest.Cluster, *client.Client, error) {
	c, err := coordtest.Start(coordtest.Options{Replicas: replicas, EtcdEndpoints: etcd})
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Leader(ctx); err != nil {
		c.Close()
		return nil, nil, err
	}
	cl, err := c.Client()
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, cl, nil
}

// failover kills the leader of a 3-replica cluster and times the first
// submit that succeeds afterwards; the killed replica is restarted and
// caught up before the next trial.
func failover(args []string) error {
	fs := flag.NewFlagSet("failover", flag.ExitOnError)
	trials := fs.Int("trials", 20, "number of leader kills")
	fs.Parse(args)
	c, cl, err := startCluster(3, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	defer cl.Close()
	var samples []time.Duration
	for i := range *trials {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		if _, err := cl.Submit(ctx, spec(fmt.Sprintf("warm%d", i))); err != nil {
			cancel()
			return fmt.Errorf("trial %d: warm-up submit: %w", i, err)
		}
		l, err := c.Leader(ctx)
		if err != nil {
			cancel()
			return err
		}
		start := time.Now()
		if err := c.Kill(l); err != nil {
			cancel()
			return err
		}
		if _, err := cl.Submit(ctx, spec(fmt.Sprintf("after%d", i))); err != nil {
			cancel()
			return fmt.Errorf("trial %d: submit after kill: %w", i, err)
		}
		d := time.Since(start)
		samples = append(samples, d)
		fmt.Printf("trial %2d: killed %s, first submit after %v\n", i, c.Replica(l).ID, d.Round(time.Millisecond))
		if err := c.Restart(l); err != nil {
			cancel()
			return err
		}
		// Wait until the restarted replica holds every job, so that each
		// trial starts from a healthy cluster of three.
		want := 2 * (i + 1)
		for len(c.Replica(l).Node.FSM().Jobs()) < want {
			if ctx.Err() != nil {
				cancel()
				return fmt.Errorf("trial %d: restarted replica did not catch up", i)
			}
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
	}
	summary("leader kill → first successful submit", samples)
	return nil
}

// submit times job submits through the client against a cluster.
func submit(args []string) error {
	fs := flag.NewFlagSet("submit", flag.ExitOnError)
	n := fs.Int("n", 1000, "number of submits")
	conc := fs.Int("c", 1, "concurrent submitters")
	replicas := fs.Int("replicas", 3, "replicas")
	fs.Parse(args)
	c, cl, err := startCluster(*replicas, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	defer cl.Close()
	lat := make([]time.Duration, *n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr error
	var mu sync.Mutex
	start := time.Now()
	for range *conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= *n {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				t := time.Now()
				_, err := cl.Submit(ctx, spec(fmt.Sprintf("j%d", i)))
				lat[i] = time.Since(t)
				cancel()
				if err != nil {
					mu.Lock()
					firstErr = errors.Join(firstErr, err)
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	el := time.Since(start)
	summary(fmt.Sprintf("submit latency, %d replicas, %d concurrent", *replicas, *conc), lat)
	fmt.Printf("throughput: %.0f submits/s\n", float64(*n)/el.Seconds())
	return nil
}

// workers registers n simulated workers (API registration, then an etcd
// lease with keep-alive), waits for the leader to see them all alive, keeps
// them alive for the duration, and reports registration latencies and any
// worker the leader lost.
func workers(args []string) error {
	fs := flag.NewFlagSet("workers", flag.ExitOnError)
	n := fs.Int("n", 1000, "simulated workers")
	dur := fs.Duration("d", 20*time.Second, "how long to sustain keep-alives")
	ttl := fs.Int("ttl", 5, "lease TTL in seconds (keep-alive every TTL/3)")
	perClient := fs.Int("per-client", 50, "workers sharing one etcd client connection")
	fs.Parse(args)

	dir, err := os.MkdirTemp("", "coordbench-etcd")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ctx := context.Background()
	e, err := etcdembed.Start(ctx, dir, "127.0.0.1")
	if err != nil {
		return err
	}
	defer e.Close()
	c, cl, err := startCluster(3, []string{e.Endpoint()})
	if err != nil {
		return err
	}
	defer c.Close()
	defer cl.Close()

	var clients []*clientv3.Client
	defer func() {
		for _, x := range clients {
			x.Close()
		}
	}()
	apiLat := make([]time.Duration, *n)
	leaseLat := make([]time.Duration, *n)
	sessions := make([]*membership.Session, *n)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, *n)
	sem := make(chan struct{}, 32)
	for i := range *n {
		if i%*perClient == 0 {
			ec, err := clientv3.New(clientv3.Config{Endpoints: []string{e.Endpoint()}, DialTimeout: 5 * time.Second})
			if err != nil {
				return err
			}
			clients = append(clients, ec)
		}
		ec := clients[len(clients)-1]
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := fmt.Sprintf("w%04d", i)
			rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			defer cancel()
			t := time.Now()
			if _, err := cl.RegisterWorker(rctx, &pb.RegisterWorkerRequest{WorkerId: id, Addr: id + ":9000", Gpus: 8}); err != nil {
				errs <- err
				return
			}
			apiLat[i] = time.Since(t)
			t = time.Now()
			s, err := membership.Register(rctx, ec, membership.WorkerInfo{ID: id, Addr: id + ":9000", GPUs: 8}, membership.Options{TTL: *ttl})
			if err != nil {
				errs <- err
				return
			}
			leaseLat[i] = time.Since(t)
			sessions[i] = s
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	regTime := time.Since(start)
	summary("RegisterWorker RPC (raft commit)", apiLat)
	summary("etcd lease grant + keep-alive start + record put", leaseLat)
	fmt.Printf("%d workers registered in %v (%.0f/s)\n", *n, regTime.Round(time.Millisecond), float64(*n)/regTime.Seconds())

	alive := func() (int, int) {
		lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		l, err := c.Leader(lctx)
		if err != nil {
			return -1, -1
		}
		a, lost := 0, 0
		for _, w := range c.Replica(l).Node.FSM().Workers() {
			switch w.State {
			case fsm.WorkerAlive:
				a++
			case fsm.WorkerLostState:
				lost++
			}
		}
		return a, lost
	}
	for {
		if a, _ := alive(); a == *n {
			break
		}
		if time.Since(start) > 5*time.Minute {
			a, _ := alive()
			return fmt.Errorf("leader sees %d of %d workers alive", a, *n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("leader saw all %d workers alive %v after the first registration\n", *n, time.Since(start).Round(time.Millisecond))

	sustain := time.Now()
	for time.Since(sustain) < *dur {
		time.Sleep(time.Second)
		if _, lost := alive(); lost > 0 {
			return fmt.Errorf("%d workers lost while keep-alives ran", lost)
		}
	}
	a, lost := alive()
	keepalives := float64(*n) * dur.Seconds() / (float64(*ttl) / 3)
	fmt.Printf("sustained %v: %d alive, %d lost (about %.0f keep-alives, %.0f/s)\n", *dur, a, lost, keepalives, keepalives/dur.Seconds())

	// Graceful leave: revoke every lease and time until the leader marks
	// them all lost.
	t := time.Now()
	for _, s := range sessions {
		s.Close()
	}
	for {
		if _, lost := alive(); lost == *n {
			break
		}
		if time.Since(t) > 2*time.Minute {
			_, lost := alive()
			return fmt.Errorf("leader marked %d of %d revoked workers lost", lost, *n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("all %d revoked workers marked lost after %v\n", *n, time.Since(t).Round(time.Millisecond))
	return nil
}
