package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"os"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
)

// runChild is one rank: it builds the gRPC communicator and the TCP ring on
// the listeners its parent passed as files 3 and 4, checks both, and times
// every size.
func runChild(o options, rank int) error {
	n := o.world
	addrs := strings.Split(o.addrs, ",")
	tcpAddrs := strings.Split(o.tcpAddrs, ",")
	if len(addrs) != n || len(tcpAddrs) != n {
		return fmt.Errorf("%d ranks but %d and %d addresses", n, len(addrs), len(tcpAddrs))
	}
	glis, err := net.FileListener(os.NewFile(3, "grpc-listener"))
	if err != nil {
		return err
	}
	tlis, err := net.FileListener(os.NewFile(4, "tcp-listener"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()

	cfg := collective.DefaultConfig()
	cfg.ChunkSize, cfg.StreamsPerPeer, cfg.WindowSize = o.chunk, o.streams, o.window
	cfg.Timeout = 2 * time.Minute
	tr, err := grpcnet.Listen(cfg, rank, addrs, glis)
	if err != nil {
		return err
	}
	comm, err := collective.New(ctx, cfg, tr)
	if err != nil {
		return err
	}
	defer comm.Close()
	ring, err := dialRing(ctx, rank, n, tcpAddrs, tlis, o.streams, o.chunk/4)
	if err != nil {
		return err
	}
	defer ring.close()

	impls := []struct {
		name string
		run  func([]float32) error
	}{
		{"grpc", func(x []float32) error { return comm.AllReduce(ctx, collective.Float32s(x)) }},
		{"tcp", ring.allReduce},
	}
	if o.skipGRPC {
		impls = impls[1:]
	} else if o.skipTCP {
		impls = impls[:1]
	}
	for _, impl := range impls {
		if err := verify(rank, n, o.chunk/4, impl.run); err != nil {
			return fmt.Errorf("%s: %w", impl.name, err)
		}
	}

	buf := make([]float32, o.maxBytes/4)
	enc := json.NewEncoder(os.Stdout)
	for _, size := range sizes(o) {
		x := buf[:size/4]
		for _, impl := range impls {
			profiling := o.profile != "" && impl.name == "grpc" && size >= 64<<20
			iters, secs, err := timeRuns(ctx, comm, o, impl.run, x, profiling)
			if err != nil {
				return fmt.Errorf("%s, %d bytes: %w", impl.name, size, err)
			}
			if err := enc.Encode(result{Impl: impl.name, Bytes: size, Iters: iters, Seconds: secs}); err != nil {
				return err
			}
		}
	}
	return comm.Barrier(ctx)
}

// timeRuns runs one warm-up all-reduce, lets rank 0 pick the number of
// iterations that fills the time budget (all ranks must run as many), and
// returns the mean time of one all-reduce on this rank.
func timeRuns(ctx context.Context, comm *collective.Communicator, o options, run func([]float32) error, x []float32, profiling bool) (int, float64, error) {
	if err := comm.Barrier(ctx); err != nil {
		return 0, 0, err
	}
	start := time.Now()
	if err := run(x); err != nil {
		return 0, 0, err
	}
	once := time.Since(start).Seconds()
	iters := []float64{math.Min(math.Max(float64(o.minIters), o.budget.Seconds()/once), 2000)}
	if err := comm.Broadcast(ctx, collective.Float64s(iters), 0); err != nil {
		return 0, 0, err
	}
	k := int(iters[0])
	if err := comm.Barrier(ctx); err != nil {
		return 0, 0, err
	}
	if profiling {
		f, err := os.Create(fmt.Sprintf("%s.%d", o.profile, comm.Rank()))
		if err == nil {
			defer f.Close()
			if pprof.StartCPUProfile(f) == nil {
				defer pprof.StopCPUProfile()
			}
		}
	}
	start = time.Now()
	for range k {
		if err := run(x); err != nil {
			return 0, 0, err
		}
	}
	return k, time.Since(start).Seconds() / float64(k), nil
}

// verify checks an implementation on a buffer that spans several chunks
// and does not divide among the ranks.
func verify(rank, n, chunk int, run func([]float32) error) error {
	x := make([]float32, 3*chunk*n+5)
	for i := range x {
		x[i] = float32(rank + i%3)
	}
	if err := run(x); err != nil {
		return err
	}
	for i, v := range x {
		want := float32(n*(n-1)/2 + n*(i%3))
		if v != want {
			return fmt.Errorf("element %d is %v after the check all-reduce, want %v", i, v, want)
		}
	}
	return nil
}
