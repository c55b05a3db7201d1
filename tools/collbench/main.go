// Command collbench measures the all-reduce of package collective over gRPC
// against the same ring over plain TCP sockets, with N ranks as separate
// processes on loopback, and prints a table in the manner of nccl-tests:
// for each size, the time of one all-reduce, the algorithm bandwidth
// (size/time) and the bus bandwidth (algbw·2(N-1)/N), for both.
//
// The baseline runs the same pipelined ring (reduce-scatter then all-gather,
// the same chunks, the same number of lanes, the same reduction kernel) over
// one plain TCP connection per lane, between the same processes, in the same
// run: it is what the machine and kernel allow without gRPC. The last line,
// busbw_ratio_64MiB=<ours/baseline>, is for the largest N.
//
//	go run ./tools/collbench -n 4
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// childEnv selects the child role and carries the rank.
const childEnv = "COLLBENCH_RANK"

type options struct {
	ranks    []int
	minBytes int
	maxBytes int
	chunk    int
	streams  int
	window   int
	minIters int
	rounds   int
	budget   time.Duration
	timeout  time.Duration
	addrs    string // child: the gRPC addresses of all ranks
	tcpAddrs string // child: the baseline addresses of all ranks
	world    int    // child: number of ranks
	skipTCP  bool
	skipGRPC bool
	profile  string
}

func parseFlags() (options, error) {
	var o options
	var ranks string
	flag.StringVar(&ranks, "n", "4", "comma-separated numbers of ranks to run, e.g. 2,4")
	flag.IntVar(&o.minBytes, "min", 4<<10, "smallest buffer in bytes")
	flag.IntVar(&o.maxBytes, "max", 256<<20, "largest buffer in bytes")
	flag.IntVar(&o.chunk, "chunk", 1<<20, "chunk size in bytes (Config.ChunkSize)")
	flag.IntVar(&o.streams, "streams", 2, "lanes per peer (Config.StreamsPerPeer), for both implementations")
	flag.IntVar(&o.window, "window", 16<<20, "gRPC stream flow-control window in bytes (Config.WindowSize)")
	flag.IntVar(&o.minIters, "iters", 2, "fewest timed iterations per size, implementation and round")
	flag.IntVar(&o.rounds, "rounds", 3, "rounds per size; each round times both implementations, and the best round counts")
	flag.DurationVar(&o.budget, "budget", 600*time.Millisecond, "target time per size and implementation, over all rounds; more iterations for small sizes")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Minute, "give up after this long")
	flag.BoolVar(&o.skipTCP, "no-baseline", false, "skip the TCP baseline")
	flag.BoolVar(&o.skipGRPC, "no-grpc", false, "skip the gRPC implementation")
	flag.StringVar(&o.profile, "cpuprofile", "", "write each rank's CPU profile of each run of 64 MiB and more to this file name plus .<impl>.<bytes>.<rank>")
	flag.StringVar(&o.addrs, "addrs", "", "internal: gRPC addresses of the ranks")
	flag.StringVar(&o.tcpAddrs, "tcp-addrs", "", "internal: baseline addresses of the ranks")
	flag.IntVar(&o.world, "world", 0, "internal: number of ranks")
	flag.Parse()
	for _, f := range strings.Split(ranks, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 || n > 64 {
			return o, fmt.Errorf("-n: %q is not a number of ranks between 2 and 64", f)
		}
		o.ranks = append(o.ranks, n)
	}
	switch {
	case o.minBytes < 4 || o.maxBytes < o.minBytes:
		return o, fmt.Errorf("-min %d and -max %d: want 4 <= min <= max", o.minBytes, o.maxBytes)
	case o.minIters < 1:
		return o, fmt.Errorf("-iters %d: want at least 1", o.minIters)
	case o.rounds < 1:
		return o, fmt.Errorf("-rounds %d: want at least 1", o.rounds)
	case o.skipTCP && o.skipGRPC:
		return o, errors.New("-no-baseline and -no-grpc leave nothing to run")
	}
	return o, nil
}

func main() {
	o, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "collbench:", err)
		os.Exit(2)
	}
	if r := os.Getenv(childEnv); r != "" {
		rank, _ := strconv.Atoi(r)
		if err := runChild(o, rank); err != nil {
			fmt.Fprintf(os.Stderr, "collbench rank %d: %v\n", rank, err)
			os.Exit(1)
		}
		return
	}
	if err := runParent(o); err != nil {
		fmt.Fprintln(os.Stderr, "collbench:", err)
		os.Exit(1)
	}
}

// result is one rank's timing of one size, printed by a child as JSON.
type result struct {
	Impl       string  `json:"impl"`
	Bytes      int     `json:"bytes"`
	Iters      int     `json:"iters"`
	Seconds    float64 `json:"seconds"`     // per all-reduce
	CPUSeconds float64 `json:"cpu_seconds"` // per all-reduce, this rank
}

func sizes(o options) []int {
	var s []int
	for b := o.minBytes; b <= o.maxBytes; b *= 2 {
		s = append(s, b/4*4)
	}
	return s
}

func runParent(o options) error {
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	var lastRatio, lastMin float64
	lastN := 0
	for _, n := range o.ranks {
		res, err := runRanks(ctx, o, n)
		if err != nil {
			return err
		}
		ratio, minRatio := printTable(o, n, res)
		if n >= lastN {
			lastN, lastRatio, lastMin = n, ratio, minRatio
		}
	}
	if !o.skipTCP && !o.skipGRPC && o.maxBytes >= 64<<20 {
		fmt.Printf("# N=%d: smallest ratio at 64 MiB and above: %.3f\n", lastN, lastMin)
		fmt.Printf("busbw_ratio_64MiB=%.3f\n", lastRatio)
	}
	return nil
}

// runRanks starts n children with their listeners already open (passed as
// files, so no port can be taken in between) and gathers their results:
// for each size and implementation, the slowest rank's time.
func runRanks(ctx context.Context, o options, n int) (map[string]map[int]result, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	var files [][]*os.File
	var addrs, tcpAddrs []string
	for range n {
		var fs []*os.File
		for i := range 2 {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return nil, err
			}
			f, err := l.(*net.TCPListener).File()
			if err != nil {
				return nil, err
			}
			_ = l.Close()
			fs = append(fs, f)
			if i == 0 {
				addrs = append(addrs, l.Addr().String())
			} else {
				tcpAddrs = append(tcpAddrs, l.Addr().String())
			}
		}
		files = append(files, fs)
	}
	args := []string{
		"-min", strconv.Itoa(o.minBytes), "-max", strconv.Itoa(o.maxBytes), "-chunk", strconv.Itoa(o.chunk),
		"-streams", strconv.Itoa(o.streams), "-window", strconv.Itoa(o.window), "-iters", strconv.Itoa(o.minIters), "-rounds", strconv.Itoa(o.rounds),
		"-budget", o.budget.String(), "-addrs", strings.Join(addrs, ","), "-tcp-addrs", strings.Join(tcpAddrs, ","),
		"-world", strconv.Itoa(n), "-no-baseline=" + strconv.FormatBool(o.skipTCP), "-no-grpc=" + strconv.FormatBool(o.skipGRPC),
		"-cpuprofile", o.profile,
	}
	// Ending ctx kills every child, so a child that cannot start takes the
	// others down with it.
	var (
		mu  sync.Mutex
		all = map[string]map[int]result{}
		wg  sync.WaitGroup
	)
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make([]error, n)
	for r := range n {
		cmd := exec.CommandContext(ctx, self, args...)
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", childEnv, r))
		cmd.ExtraFiles = files[r]
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		wg.Go(func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				var res result
				if json.Unmarshal(sc.Bytes(), &res) != nil {
					continue
				}
				mu.Lock()
				if all[res.Impl] == nil {
					all[res.Impl] = map[int]result{}
				}
				prev, ok := all[res.Impl][res.Bytes]
				cpu := res.CPUSeconds + prev.CPUSeconds
				if !ok || res.Seconds > prev.Seconds {
					prev = res
				}
				prev.CPUSeconds = cpu
				all[res.Impl][res.Bytes] = prev
				mu.Unlock()
			}
			errs[r] = cmd.Wait()
		})
	}
	for _, fs := range files {
		for _, f := range fs {
			_ = f.Close()
		}
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("rank %d of %d: %w", r, n, err)
		}
	}
	return all, nil
}

func printTable(o options, n int, res map[string]map[int]result) (ratio64, minRatio float64) {
	factor := 2 * float64(n-1) / float64(n)
	fmt.Printf("# collbench: all-reduce, float32 sum, %d ranks as processes on loopback\n", n)
	fmt.Printf("# chunk %d B, %d lane(s) per peer, gRPC window %d B; baseline: the same ring over plain TCP\n", o.chunk, o.streams, o.window)
	fmt.Printf("# time: per all-reduce, slowest rank, best of %d rounds; algbw = size/time; busbw = algbw*2(N-1)/N; GB = 1e9 B\n", o.rounds)
	fmt.Printf("# cpu: user+system seconds per all-reduce summed over the ranks; ratio = busbw(grpc)/busbw(tcp); cpu ratio = cpu(tcp)/cpu(grpc)\n")
	fmt.Printf("#%12s %10s | %10s %8s %8s %8s | %10s %8s %8s %8s | %6s %6s\n",
		"size(B)", "count", "grpc(us)", "algbw", "busbw", "cpu(ms)", "tcp(us)", "algbw", "busbw", "cpu(ms)", "ratio", "cpu")
	minRatio = 0
	for _, b := range sizes(o) {
		g, gok := res["grpc"][b]
		c, cok := res["tcp"][b]
		line := fmt.Sprintf(" %12d %10d |", b, b/4)
		cols := func(r result, ok bool) string {
			if !ok {
				return fmt.Sprintf(" %10s %8s %8s %8s |", "-", "-", "-", "-")
			}
			alg := float64(b) / r.Seconds / 1e9
			return fmt.Sprintf(" %10.1f %8.3f %8.3f %8.2f |", r.Seconds*1e6, alg, alg*factor, r.CPUSeconds*1e3)
		}
		line += cols(g, gok) + cols(c, cok)
		if gok && cok {
			ratio := c.Seconds / g.Seconds
			line += fmt.Sprintf(" %6.3f %6.3f", ratio, c.CPUSeconds/g.CPUSeconds)
			if b == 64<<20 {
				ratio64 = ratio
			}
			if b >= 64<<20 && (minRatio == 0 || ratio < minRatio) {
				minRatio = ratio
			}
		}
		fmt.Println(line)
	}
	return ratio64, minRatio
}
