package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
)

// job is one run of a set of rank processes: a layout at a batch shape.
type job struct {
	l                  layout
	seq, micro, global int
	warmup, steps      int
	quiet              bool    // keep the ranks' stderr, for the error, instead of passing it on
	gpu                gpuPlan // with -backend cuda: rank r runs on GPU r mod gpu.count
}

// layoutJob is the job of layout l at the flags' batch shape.
func (o options) layoutJob(l layout, g gpuPlan) job {
	return job{l: l, seq: o.seqLen, micro: o.micro, global: o.global, warmup: o.warmup, steps: o.steps, gpu: g}
}

// gpuPlan is how the ranks map onto GPUs: count GPUs (0 with the CPU
// backend) of those the parent's CUDA_VISIBLE_DEVICES list names when
// visibleSet, else of all.
type gpuPlan struct {
	count      int
	visible    []string
	visibleSet bool
}

// args are the command line of the ranks of j.
func (o options) args(j job, addrs []string) []string {
	noOverlap := 0
	if j.l.noOverlap {
		noOverlap = 1
	}
	a := []string{"-backend", o.backend, "-precision", o.precision,
		"-d-model", fmt.Sprint(o.dModel), "-layers", fmt.Sprint(o.layers), "-d-state", fmt.Sprint(o.dState),
		"-headdim", fmt.Sprint(o.headDim), "-chunk", fmt.Sprint(o.chunk), "-vocab", fmt.Sprint(o.vocab), "-seq", fmt.Sprint(j.seq),
		"-micro", fmt.Sprint(j.micro), "-global", fmt.Sprint(j.global), "-sp-mode", o.mode, "-zero1=" + strconv.FormatBool(o.zero), "-allreduce-dtype", o.allreduce,
		"-steps", fmt.Sprint(j.steps), "-warmup", fmt.Sprint(j.warmup), "-procs", fmt.Sprint(o.procs), "-bucket-mib", fmt.Sprint(o.bucketMiB),
		"-timeout", o.timeout.String(), "-grid", fmt.Sprintf("%dx%d", j.l.dp, j.l.sp), "-cpuprofile", o.profile,
		"-dp", fmt.Sprint(j.l.dp), "-sp", fmt.Sprint(j.l.sp), "-no-overlap", fmt.Sprint(noOverlap), "-addrs", strings.Join(addrs, ",")}
	if o.lib != "" {
		a = append(a, "-lib", o.lib)
	}
	return a
}

// oomError reports that a rank ran out of GPU memory.
type oomError struct {
	rank int
	msg  string
}

func (e *oomError) Error() string {
	return fmt.Sprintf("rank %d: out of GPU memory: %s", e.rank, e.msg)
}

// runRanks starts the ranks of j as child processes with their listeners
// already open (passed as files, so that no port is taken in between) and
// returns their results by rank. When a rank fails, the others are
// stopped; the error is an *oomError when some rank reported a CUDA
// out-of-memory error, else the first failing rank's own error (a rank
// that failed because a peer went away comes after one that failed by
// itself).
func runRanks(ctx context.Context, o options, j job) ([]result, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	n := j.l.dp * j.l.sp
	var files []*os.File
	defer func() {
		for _, f := range files {
			_ = f.Close()
		}
	}()
	var addrs []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		f, err := ln.(*net.TCPListener).File()
		_ = ln.Close()
		if err != nil {
			return nil, err
		}
		files = append(files, f)
		addrs = append(addrs, ln.Addr().String())
	}
	args := o.args(j, addrs)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu     sync.Mutex
		out    = make([]result, n)
		seen   = make([]bool, n)
		errs   = make([]error, n)
		stderr = make([]tailBuffer, n)
		wg     sync.WaitGroup
	)
	envs := make([][]string, n)
	for r := range n {
		envs[r] = append(os.Environ(), fmt.Sprintf("%s=%d", childEnv, r))
		if o.backend == backendCUDA {
			dev, err := gpuOf(r, j.gpu.count, j.gpu.visible, j.gpu.visibleSet)
			if err != nil {
				return nil, err
			}
			envs[r] = withVisible(envs[r], dev)
		}
	}
	// start starts rank r; a failure stops the ranks already started.
	start := func(r int) error {
		cmd := exec.CommandContext(ctx, self, args...)
		cmd.Env = envs[r]
		cmd.ExtraFiles = []*os.File{files[r]}
		cmd.Stderr = os.Stderr
		if j.quiet {
			cmd.Stderr = &stderr[r]
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		wg.Go(func() {
			sc := bufio.NewScanner(stdout)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				var res result
				if json.Unmarshal(sc.Bytes(), &res) == nil {
					mu.Lock()
					out[r], seen[r] = res, true
					mu.Unlock()
				}
			}
			_, _ = io.Copy(io.Discard, stdout)
			if errs[r] = cmd.Wait(); errs[r] != nil {
				cancel() // one rank failing takes the others down
			}
		})
		return nil
	}
	for r := range n {
		if err := start(r); err != nil {
			cancel()
			wg.Wait()
			return nil, fmt.Errorf("starting rank %d of %d: %w", r, n, err)
		}
	}
	for _, f := range files {
		_ = f.Close()
	}
	files = nil
	wg.Wait()
	return collect(out, seen, errs, stderr)
}

// collect turns the ranks' records and exit statuses into runRanks's
// answer.
func collect(out []result, seen []bool, errs []error, stderr []tailBuffer) ([]result, error) {
	n := len(out)
	for r := range n {
		if seen[r] && out[r].OOM {
			return nil, &oomError{rank: r, msg: out[r].Error}
		}
	}
	// A rank's own error first, then a rank stopped without one.
	for r := range n {
		if seen[r] && out[r].Error != "" {
			return nil, fmt.Errorf("rank %d of %d: %s", r, n, out[r].Error)
		}
	}
	for r, err := range errs {
		if err != nil {
			msg := fmt.Sprintf("rank %d of %d: %v", r, n, err)
			if t := strings.TrimSpace(stderr[r].String()); t != "" {
				msg += ": " + t
			}
			return nil, errors.New(msg)
		}
		if !seen[r] {
			return nil, fmt.Errorf("rank %d of %d printed no result", r, n)
		}
	}
	return out, nil
}

// tailBuffer keeps the last 4 KiB written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

const tailBytes = 4 << 10

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > tailBytes {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-tailBytes:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
