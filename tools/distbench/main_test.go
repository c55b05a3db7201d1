package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/tools/internal/benchio"
)

// TestMain lets the test binary play the command's child roles: the
// parent in runParent re-executes os.Executable, which is this binary.
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" || os.Getenv(probeEnv) != "" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func parse(t *testing.T, args ...string) options {
	t.Helper()
	o, err := parseFlags(args, io.Discard)
	if err != nil {
		t.Fatalf("parseFlags(%q): %v", args, err)
	}
	return o
}

func TestParseFlagsDefaults(t *testing.T) {
	o := parse(t)
	if o.backend != backendCPU || o.precision != precF32 || o.procs != 1 || o.gpus != 0 {
		t.Errorf("cpu defaults: backend %q precision %q procs %d gpus %d; want cpu f32 1 0", o.backend, o.precision, o.procs, o.gpus)
	}
	if want := []layout{{1, 1, false}, {2, 1, false}, {1, 2, false}, {2, 2, false}}; !slices.Equal(o.grid, want) {
		t.Errorf("grid %v, want %v", o.grid, want)
	}
	if o.timeout != 30*time.Minute {
		t.Errorf("cpu timeout %v, want 30m", o.timeout)
	}
	if o = parse(t, "-backend", "cuda", "-timeout", "5m"); o.timeout != 5*time.Minute {
		t.Errorf("cuda -timeout 5m: %v", o.timeout)
	}
	o = parse(t, "-backend", "cuda")
	if o.timeout != cudaTimeout {
		t.Errorf("cuda timeout %v, want %v", o.timeout, cudaTimeout)
	}
	if o.precision != precBF16 || o.procs != 0 || o.longSP != nil || o.longStart != 16384 || o.longMax != 1<<21 || o.longRes != (resolution{frac: 16}) {
		t.Errorf("cuda defaults: precision %q procs %d long-sp %v start %d max %d res %+v", o.precision, o.procs, o.longSP, o.longStart, o.longMax, o.longRes)
	}
	o = parse(t, "-backend", "cuda", "-precision", "f32", "-procs", "2", "-long-sp", "1,4,2", "-long-res", "512")
	if o.precision != precF32 || o.procs != 2 || !slices.Equal(o.longSP, []int{1, 4, 2}) || o.longRes != (resolution{positions: 512}) {
		t.Errorf("cuda flags: precision %q procs %d long-sp %v res %+v", o.precision, o.procs, o.longSP, o.longRes)
	}
}

func TestPreset130m(t *testing.T) {
	o := parse(t, "-preset", "130m", "-backend", "cuda")
	got := []int{o.dModel, o.layers, o.vocab, o.dState, o.headDim, o.chunk, o.seqLen, o.micro, o.global}
	want := []int{768, 24, 50288, 128, 64, 256, 2048, 8, 256}
	if !slices.Equal(got, want) {
		t.Errorf("preset 130m: %v, want %v", got, want)
	}
	if tokens := o.global * o.seqLen; tokens != 524288 {
		t.Errorf("preset 130m: %d tokens per step, want 524288", tokens)
	}
	cfg, err := o.modelConfig()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NHeads != 24 {
		t.Errorf("preset 130m: %d heads, want 24", cfg.NHeads)
	}
	// Explicit flags win, in any order relative to -preset.
	o = parse(t, "-seq", "4096", "-preset", "130m", "-micro", "4", "-backend", "cuda")
	if o.seqLen != 4096 || o.micro != 4 || o.global != 256 || o.dModel != 768 {
		t.Errorf("preset with overrides: seq %d micro %d global %d d_model %d", o.seqLen, o.micro, o.global, o.dModel)
	}
}

func TestParseFlagsErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-backend", "tpu"}, "-backend must be cpu or cuda"},
		{[]string{"-precision", "bf16"}, "-precision bf16 needs -backend cuda"},
		{[]string{"-backend", "cuda", "-precision", "fp8"}, "-precision must be bf16 or f32"},
		{[]string{"-gpus", "2"}, "-gpus is for -backend cuda"},
		{[]string{"-lib", "/x.so"}, "-lib is for -backend cuda"},
		{[]string{"-long-sp", "1,2"}, "-long-sp is for -backend cuda"},
		{[]string{"-backend", "cuda", "-gpus", "-1"}, "-gpus must be at least 0"},
		{[]string{"-backend", "cuda", "-procs", "-2"}, "-procs must be at least 0"},
		{[]string{"-allreduce-dtype", "fp16"}, "-allreduce-dtype must be float32 or bf16"},
		{[]string{"-allreduce-dtype", "bf16", "-zero1"}, "-zero1 reduce-scatters in float32"},
		{[]string{"-backend", "cuda", "-budget-mib", "100"}, "-budget-mib is for -backend cpu"},
		{[]string{"-backend", "cuda", "-zero1"}, "-zero1"},
		{[]string{"-backend", "cuda", "-sp-mode", "prefix"}, "-sp-mode prefix"},
		{[]string{"-grid", "2x"}, `-grid: "2x" is not a layout`},
		{[]string{"-grid", "1x1,0x2"}, `-grid: "0x2" is not a layout`},
		{[]string{"-grid", "4x1", "-global", "6"}, "-global 6 must be a multiple of -micro·dp = 1·4 = 4"},
		{[]string{"-grid", "1x3"}, "-seq 1024 must be a multiple of sp = 3"},
		{[]string{"-preset", "7b"}, "-preset must be one of [130m]"},
		{[]string{"-backend", "cuda", "-long-sp", "1,x"}, `-long-sp: "x" is not a positive integer`},
		{[]string{"-backend", "cuda", "-long-sp", "2,2"}, "-long-sp: 2 is listed twice"},
		{[]string{"-backend", "cuda", "-long-res", "1/0"}, "-long-res"},
		{[]string{"-backend", "cuda", "-long-res", "-5"}, "-long-res"},
		{[]string{"-backend", "cuda", "-long-max", fmt.Sprint(1 << 23)}, "-long-max must be in [1, 4194304]"},
		{[]string{"-backend", "cuda", "-long-sp", "8", "-long-max", "256"}, "-long-max 256 is shorter than chunk·sp = 64·8 = 512"},
		{[]string{"-backend", "cuda", "-long-start", "0"}, "-long-start must be at least 1"},
		{[]string{"-backend", "cuda", "-chunk", "512", "-seq", "1024"}, "chunk_size: must be at most 256 for the CUDA kernels"},
		{[]string{"-steps", "0"}, "-steps must be at least 1"},
		{[]string{"-warmup", "-1"}, "-warmup must be at least 0"},
		{[]string{"extra"}, "unexpected arguments"},
	} {
		_, err := parseFlags(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseFlags(%q) = %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

func TestCheckGPUs(t *testing.T) {
	o := parse(t, "-backend", "cuda")
	if err := o.checkGPUs(2); err != nil || o.gpus != 2 || !slices.Equal(o.longSP, []int{1, 2}) {
		t.Errorf("2 visible: gpus %d long-sp %v err %v; want 2 [1 2] nil", o.gpus, o.longSP, err)
	}
	if want := cudaProcs(runtime.NumCPU(), 2); o.procs != want {
		t.Errorf("2 visible: -procs defaults to %d, want %d", o.procs, want)
	}
	o = parse(t, "-backend", "cuda", "-procs", "3")
	if err := o.checkGPUs(2); err != nil || o.procs != 3 {
		t.Errorf("-procs 3 given: %d (err %v)", o.procs, err)
	}
	for _, c := range [][3]int{{32, 2, 16}, {128, 8, 16}, {16, 1, 16}, {8, 4, 4}, {2, 8, 4}} {
		if got := cudaProcs(c[0], c[1]); got != c[2] {
			t.Errorf("cudaProcs(%d cores, %d GPUs) = %d, want %d", c[0], c[1], got, c[2])
		}
	}
	o = parse(t, "-backend", "cuda")
	if err := o.checkGPUs(8); err != nil || !slices.Equal(o.longSP, []int{1, 2, 4, 8}) {
		t.Errorf("8 visible: long-sp %v err %v; want [1 2 4 8]", o.longSP, err)
	}
	o = parse(t, "-backend", "cuda", "-gpus", "6")
	if err := o.checkGPUs(8); err != nil || o.gpus != 6 || !slices.Equal(o.longSP, []int{1, 2, 4}) {
		t.Errorf("-gpus 6 of 8: gpus %d long-sp %v err %v; want 6 [1 2 4]", o.gpus, o.longSP, err)
	}
	for _, tc := range []struct {
		args    []string
		visible int
		want    string
	}{
		{[]string{"-gpus", "3"}, 2, "-gpus 3: only 2 GPU(s) are visible"},
		{[]string{"-long-sp", "1,4"}, 2, "-long-sp 4"},
		{[]string{"-gpus", "1", "-long-sp", "2"}, 4, "-long-sp 2"},
		{nil, 0, "CUDA sees no GPU"},
	} {
		o := parse(t, append([]string{"-backend", "cuda"}, tc.args...)...)
		if err := o.checkGPUs(tc.visible); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q with %d visible: %v, want an error containing %q", tc.args, tc.visible, err, tc.want)
		}
	}
}

func TestGPUOf(t *testing.T) {
	for _, tc := range []struct {
		rank, gpus int
		parent     []string
		set        bool
		want       string
	}{
		{0, 2, nil, false, "0"},
		{3, 2, nil, false, "1"},
		{5, 8, nil, false, "5"},
		{1, 2, []string{"4", "5", "6"}, true, "5"},
		{2, 2, []string{"4", "5", "6"}, true, "4"},
		{1, 2, []string{"GPU-aaaa", "GPU-bbbb"}, true, "GPU-bbbb"},
	} {
		got, err := gpuOf(tc.rank, tc.gpus, tc.parent, tc.set)
		if err != nil || got != tc.want {
			t.Errorf("gpuOf(%d, %d, %q, %v) = %q, %v; want %q", tc.rank, tc.gpus, tc.parent, tc.set, got, err, tc.want)
		}
	}
	if _, err := gpuOf(1, 2, []string{"3"}, true); err == nil {
		t.Error("gpuOf with a parent list shorter than the GPU count: no error")
	}
	if _, err := gpuOf(0, 1, []string{""}, true); err == nil {
		t.Error("gpuOf with an empty parent list: no error")
	}
}

func TestVisibleList(t *testing.T) {
	t.Setenv(visibleEnv, "2, 3,GPU-abc")
	got, set := visibleList()
	if !set || !slices.Equal(got, []string{"2", "3", "GPU-abc"}) {
		t.Errorf("visibleList() = %q, %v", got, set)
	}
	os.Unsetenv(visibleEnv) // t.Setenv restores it after the test
	if got, set := visibleList(); set || got != nil {
		t.Errorf("unset: visibleList() = %q, %v", got, set)
	}
}

func TestWithVisible(t *testing.T) {
	env := []string{"PATH=/bin", "CUDA_VISIBLE_DEVICES=4,5", "NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1",
		"NVSHMEM_DISABLE_NVLS=1", "CUDA_VISIBLE_DEVICES_EXTRA=x", "DISTBENCH_RANK=1"}
	got := withVisible(env, "5")
	want := []string{"PATH=/bin", "NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1",
		"CUDA_VISIBLE_DEVICES_EXTRA=x", "DISTBENCH_RANK=1", "CUDA_VISIBLE_DEVICES=5"}
	if !slices.Equal(got, want) {
		t.Errorf("withVisible:\n got %q\nwant %q", got, want)
	}
	if env[1] != "CUDA_VISIBLE_DEVICES=4,5" {
		t.Errorf("withVisible changed its input: %q", env)
	}
}

func TestParseResolution(t *testing.T) {
	for s, want := range map[string]resolution{"1/16": {frac: 16}, " 1/4 ": {frac: 4}, "1/1": {frac: 1}, "4096": {positions: 4096}} {
		got, err := parseResolution(s)
		if err != nil || got != want {
			t.Errorf("parseResolution(%q) = %+v, %v; want %+v", s, got, err, want)
		}
	}
	for _, s := range []string{"", "1/", "1/x", "2/16", "0", "-3", "1/-2"} {
		if _, err := parseResolution(s); err == nil {
			t.Errorf("parseResolution(%q): no error", s)
		}
	}
	r := resolution{frac: 16}
	if got := r.at(100000, 256); got != 6144 {
		t.Errorf("1/16 of 100000 in multiples of 256 = %d, want 6144", got)
	}
	if got := r.at(1000, 256); got != 256 {
		t.Errorf("1/16 of 1000 in multiples of 256 = %d, want at least one quantum, 256", got)
	}
	if got := (resolution{positions: 1000}).at(1<<20, 256); got != 768 {
		t.Errorf("1000 positions in multiples of 256 = %d, want 768", got)
	}
}

// threshold is a fits function true up to limit, recording its calls and
// failing the test on a length outside the search's rules.
func threshold(t *testing.T, c searchConfig, limit int, calls *[]int) func(int) (bool, error) {
	return func(L int) (bool, error) {
		t.Helper()
		if L < c.quantum || L%c.quantum != 0 || L > c.max {
			t.Errorf("fits(%d): not a positive multiple of %d within %d", L, c.quantum, c.max)
		}
		if slices.Contains(*calls, L) {
			t.Errorf("fits(%d) called twice", L)
		}
		*calls = append(*calls, L)
		return L <= limit, nil
	}
}

func TestSearchLongestSequence(t *testing.T) {
	c := searchConfig{quantum: 256, start: 16384, max: 1 << 21, res: resolution{frac: 16}}
	var calls []int
	res, err := searchLongest(c, threshold(t, c, 100000, &calls))
	if err != nil {
		t.Fatal(err)
	}
	// Doubling: 16384, 32768, 65536 fit, 131072 does not; then bisection
	// between 65536 and 131072 until the gap is at most 1/16 of the
	// longest fitting length, in multiples of 256.
	want := []int{16384, 32768, 65536, 131072, 98304, 114688, 106496, 102400}
	if !slices.Equal(calls, want) {
		t.Errorf("trials %v, want %v", calls, want)
	}
	if res.longest != 98304 || res.capped {
		t.Errorf("longest %d capped %v, want 98304 false", res.longest, res.capped)
	}
	if len(res.trials) != len(calls) || res.trials[3] != (trial{L: 131072, fits: false}) || !res.trials[2].fits {
		t.Errorf("trials %+v do not record the calls %v", res.trials, calls)
	}
}

func TestSearchLongestInvariants(t *testing.T) {
	for _, c := range []searchConfig{
		{quantum: 256, start: 16384, max: 1 << 21, res: resolution{frac: 16}},
		{quantum: 512, start: 16384, max: 1 << 21, res: resolution{frac: 16}},
		{quantum: 2048, start: 1000, max: 3 << 19, res: resolution{frac: 4}},
		{quantum: 64, start: 64, max: 1 << 16, res: resolution{positions: 64}},
		{quantum: 256, start: 1 << 20, max: 1 << 21, res: resolution{positions: 5000}},
	} {
		for _, limit := range []int{c.quantum, c.quantum + 1, 3*c.quantum - 1, 12345, 77777, 100000, 500000, 1<<20 - 1, 1 << 20, 1<<21 - 1} {
			var calls []int
			res, err := searchLongest(c, threshold(t, c, limit, &calls))
			if err != nil {
				t.Fatalf("%+v limit %d: %v", c, limit, err)
			}
			top := c.max / c.quantum * c.quantum
			if res.longest > limit || res.longest%c.quantum != 0 || res.longest < c.quantum {
				t.Errorf("%+v limit %d: longest %d", c, limit, res.longest)
			}
			if res.capped != (res.longest == top && limit >= top) {
				t.Errorf("%+v limit %d: longest %d, capped %v", c, limit, res.longest, res.capped)
			}
			// The next length that did not fit is within the resolution.
			if !res.capped {
				hi := math.MaxInt
				for _, tr := range res.trials {
					if !tr.fits && tr.L > res.longest {
						hi = min(hi, tr.L)
					}
				}
				if gap := hi - res.longest; gap > c.res.at(res.longest, c.quantum) {
					t.Errorf("%+v limit %d: longest %d, shortest failing %d: gap beyond the resolution %d",
						c, limit, res.longest, hi, c.res.at(res.longest, c.quantum))
				}
			}
			if len(calls) > 40 {
				t.Errorf("%+v limit %d: %d trials", c, limit, len(calls))
			}
		}
	}
}

func TestSearchLongestEdges(t *testing.T) {
	c := searchConfig{quantum: 256, start: 16384, max: 100000, res: resolution{frac: 16}}
	var calls []int
	res, err := searchLongest(c, threshold(t, c, 1<<30, &calls))
	if err != nil || res.longest != 99840 || !res.capped {
		t.Errorf("everything fits: longest %d capped %v err %v; want 99840 (the largest multiple of 256 within 100000) capped", res.longest, res.capped, err)
	}
	if want := []int{16384, 32768, 65536, 99840}; !slices.Equal(calls, want) {
		t.Errorf("everything fits: trials %v, want %v", calls, want)
	}

	calls = nil
	res, err = searchLongest(c, threshold(t, c, 0, &calls))
	if err != nil || res.longest != 0 || res.capped {
		t.Errorf("nothing fits: longest %d capped %v err %v; want 0", res.longest, res.capped, err)
	}
	if want := []int{16384, 8192, 4096, 2048, 1024, 512, 256}; !slices.Equal(calls, want) {
		t.Errorf("nothing fits: trials %v, want %v", calls, want)
	}

	// The start does not fit: halve, then bisect.
	calls = nil
	res, err = searchLongest(c, threshold(t, c, 5000, &calls))
	if err != nil || res.longest > 5000 || 5000-res.longest >= max(256, res.longest/16/256*256) {
		t.Errorf("start too long: longest %d err %v", res.longest, err)
	}
	if calls[0] != 16384 || calls[1] != 8192 || calls[2] != 4096 {
		t.Errorf("start too long: trials %v, want 16384, 8192, 4096 first", calls)
	}

	// A start that is no multiple of the quantum is rounded up.
	calls = nil
	c2 := searchConfig{quantum: 3000, start: 1000, max: 1 << 20, res: resolution{frac: 16}}
	if _, err := searchLongest(c2, threshold(t, c2, 7000, &calls)); err != nil || calls[0] != 3000 {
		t.Errorf("start 1000, quantum 3000: trials %v err %v, want 3000 first", calls, err)
	}

	if _, err := searchLongest(searchConfig{quantum: 512, start: 1, max: 300, res: resolution{frac: 16}}, nil); err == nil {
		t.Error("max below one quantum: no error")
	}
}

var errBroken = errors.New("illegal memory access")

func TestSearchLongestError(t *testing.T) {
	c := searchConfig{quantum: 256, start: 16384, max: 1 << 21, res: resolution{frac: 16}}
	var calls []int
	res, err := searchLongest(c, func(L int) (bool, error) {
		calls = append(calls, L)
		if L == 65536 {
			return false, errBroken
		}
		return true, nil
	})
	if !errors.Is(err, errBroken) || !strings.Contains(err.Error(), "length 65536") {
		t.Errorf("error = %v, want errBroken naming length 65536", err)
	}
	if !slices.Equal(calls, []int{16384, 32768, 65536}) || len(res.trials) != 2 {
		t.Errorf("calls %v, recorded trials %+v: want the search to stop at the error", calls, res.trials)
	}
}

func TestIsOOM(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&kernels.Error{Op: "m2k_malloc", Code: 2, Msg: "out of memory"}, true},
		{fmt.Errorf("step 1: gpu: allocating activation x: %w", &kernels.Error{Op: "m2k_malloc", Code: 2, Msg: "out of memory"}), true},
		{fmt.Errorf("gemm: %w", &kernels.Error{Op: "m2k_gemm", Code: 1003, Msg: "cuBLAS: allocation failed"}), true},
		{&kernels.Error{Op: "m2k_ssd_fwd", Code: 700, Msg: "an illegal memory access was encountered"}, false},
		{&kernels.Error{Op: "m2k_ssd_fwd", Code: 2003, Msg: "m2k: workspace too small"}, false},
		{errors.New("connection reset"), false},
		{nil, false},
	} {
		if got := isOOM(tc.err); got != tc.want {
			t.Errorf("isOOM(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestCollect(t *testing.T) {
	killed := errors.New("signal: killed")
	tails := make([]tailBuffer, 3)
	// One rank out of memory, another failing because its peer left: OOM.
	out := []result{{Rank: 0, Error: "recv: connection reset"}, {Rank: 1, Error: "step 1: out of memory", OOM: true}, {}}
	_, err := collect(out, []bool{true, true, false}, []error{errors.New("exit status 1"), errors.New("exit status 3"), killed}, tails)
	var oom *oomError
	if !errors.As(err, &oom) || oom.rank != 1 {
		t.Errorf("collect with an OOM rank = %v, want *oomError of rank 1", err)
	}
	// A rank's own error wins over a rank that was stopped.
	out = []result{{}, {Rank: 1, Error: "step 2: training diverged"}, {}}
	_, err = collect(out, []bool{false, true, false}, []error{killed, errors.New("exit status 1"), killed}, tails)
	if err == nil || errors.As(err, &oom) || !strings.Contains(err.Error(), "rank 1 of 3: step 2: training diverged") {
		t.Errorf("collect with one failing rank = %v", err)
	}
	// No record at all: the exit status and the tail of stderr.
	_, _ = tails[2].Write([]byte("distbench rank 2: spec: bad\n"))
	_, err = collect(make([]result, 3), []bool{true, true, false}, []error{nil, nil, errors.New("exit status 2")}, tails)
	if err == nil || !strings.Contains(err.Error(), "rank 2 of 3: exit status 2: distbench rank 2: spec: bad") {
		t.Errorf("collect without a record = %v", err)
	}
	_, err = collect(make([]result, 2), []bool{true, false}, []error{nil, nil}, tails[:2])
	if err == nil || !strings.Contains(err.Error(), "rank 1 of 2 printed no result") {
		t.Errorf("collect with a silent rank = %v", err)
	}
	res, err := collect([]result{{Rank: 0}, {Rank: 1}}, []bool{true, true}, []error{nil, nil}, tails[:2])
	if err != nil || len(res) != 2 {
		t.Errorf("collect of two good ranks = %v, %v", res, err)
	}
}

func TestTailBuffer(t *testing.T) {
	var b tailBuffer
	_, _ = b.Write(bytes.Repeat([]byte("a"), tailBytes))
	_, _ = b.Write([]byte("the end"))
	if s := b.String(); len(s) != tailBytes || !strings.HasSuffix(s, "the end") {
		t.Errorf("tail of %d bytes ending %q", len(s), s[len(s)-10:])
	}
}

// keys returns the sorted keys of a JSON object.
func keys(t *testing.T, v any) []string {
	t.Helper()
	m, ok := v.(map[string]any)
	if !ok {
		t.Fatalf("%v is not a JSON object", v)
	}
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// The field names are what a driver script reads; renaming one breaks it.
var (
	reportKeys = []string{"allreduce_dtype", "backend", "bucket_mib", "cores", "global_batch", "global_batch_tokens", "gomaxprocs_per_rank", "layouts",
		"micro_batch", "model", "precision", "rounds", "seq_len", "sp_mode", "timed_steps", "tool", "warmup_steps", "zero1"}
	cudaReportKeys = []string{"device", "gpus", "library", "longest", "visible_gpus"}
	modelKeys      = []string{"chunk_size", "d_model", "d_state", "headdim", "n_layer", "nheads", "parameters", "vocab_size"}
	layoutKeys     = []string{"backend", "buckets", "buckets_overlapped", "comm_share", "cpu_s_per_step", "dp", "exposed_allreduce_ms",
		"global_batch_tokens", "layout", "loss", "mib_sent_per_rank_step", "overlap", "parameters", "precision", "pure_dp", "ranks",
		"scaling_efficiency", "sp", "speedup", "step_s", "tokens_per_s", "tokens_per_step"}
	cudaLayoutKeys = []string{"device_used_peak_bytes", "gpus_used"}
	longestKeys    = []string{"capped", "device_used_peak_bytes", "longest_seq_len", "loss_first", "positions_per_rank", "ratio_to_sp1",
		"sp", "step_s", "trials"}
)

func sorted(a ...[]string) []string {
	out := slices.Concat(a...)
	slices.Sort(out)
	return out
}

func TestJSONShapeCUDA(t *testing.T) {
	o := parse(t, "-backend", "cuda", "-preset", "130m")
	cfg, err := o.modelConfig()
	if err != nil {
		t.Fatal(err)
	}
	rep := newReport(o, cfg)
	rep.Device, rep.GPUs, rep.Visible, rep.Library = "NVIDIA H200", 2, 2, "/lib/libm2kernels.so"
	g := gpuPlan{count: 2}
	runs := []layout{{1, 1, false}, {2, 1, false}, {2, 1, true}}
	best := [][]result{
		{{StepSec: 2, Tokens: 524288, Loss: 10.8, DeviceUsed: 40 << 30}},
		{{StepSec: 1.25, Tokens: 524288, Loss: 10.8, DeviceUsed: 30 << 30, CommSec: 0.25, GradSec: 0.2, BytesSent: 1 << 29}, {StepSec: 1.2, Tokens: 524288, DeviceUsed: 31 << 30, CommSec: 0.2, GradSec: 0.1, BytesSent: 1 << 29}},
		{{StepSec: 1.5, Tokens: 524288}, {StepSec: 1.5, Tokens: 524288}},
	}
	rep.Layouts = layoutRows(o, g, runs, best)
	ratio := 2.0
	rep.Longest = []longestRow{{SP: 2, Longest: 1 << 20, PositionsPerRank: 1 << 19, RatioToSP1: &ratio, Trials: []trialJSON{{SeqLen: 1 << 20, Fits: true}}}}
	path := filepath.Join(t.TempDir(), "r.json")
	if err := benchio.WriteJSON(path, rep); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	if got, want := keys(t, doc), sorted(reportKeys, cudaReportKeys); !slices.Equal(got, want) {
		t.Errorf("report keys %v, want %v", got, want)
	}
	if got := keys(t, doc["model"]); !slices.Equal(got, modelKeys) {
		t.Errorf("model keys %v, want %v", got, modelKeys)
	}
	layouts := doc["layouts"].([]any)
	if got, want := keys(t, layouts[1]), sorted(layoutKeys, cudaLayoutKeys); !slices.Equal(got, want) {
		t.Errorf("layout keys %v, want %v", got, want)
	}
	l1 := layouts[1].(map[string]any)
	// 524288 tokens in 1.25 s against 524288 in 2 s: speedup 1.6 on 2
	// ranks, efficiency 0.8.
	near := func(k string, want float64) bool { v, ok := l1[k].(float64); return ok && math.Abs(v-want) < 1e-9*want }
	if l1["layout"] != "2x1" || !near("speedup", 1.6) || !near("scaling_efficiency", 0.8) || l1["overlap"] != true ||
		l1["gpus_used"] != 2.0 || l1["device_used_peak_bytes"] != float64(31<<30) || !near("mib_sent_per_rank_step", 512) ||
		!near("exposed_allreduce_ms", 100) || !near("comm_share", 0.5*(0.25/1.25+0.2/1.2)) ||
		l1["global_batch_tokens"] != 524288.0 || l1["backend"] != "cuda" || l1["precision"] != "bf16" {
		t.Errorf("layout 2x1: %v", l1)
	}
	if l2 := layouts[2].(map[string]any); l2["overlap"] != false {
		t.Errorf("no-overlap layout: overlap %v", l2["overlap"])
	}
	long := doc["longest"].([]any)
	if got := keys(t, long[0]); !slices.Equal(got, longestKeys) {
		t.Errorf("longest keys %v, want %v", got, longestKeys)
	}
}

// testTimeout bounds the runs of real rank processes; generous, for a
// loaded machine.
const testTimeout = 5 * time.Minute

func TestRunCPU(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.json")
	o := parse(t, "-grid", "1x1,2x1", "-d-model", "32", "-layers", "1", "-vocab", "64", "-seq", "64", "-chunk", "16",
		"-headdim", "16", "-d-state", "16", "-global", "2", "-steps", "1", "-warmup", "0", "-rounds", "1", "-mem=false", "-json", path)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	var out bytes.Buffer
	if err := runParent(ctx, o, &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{"CPU backend", "| dp1×sp1 | 1 | 1 |", "| dp2×sp1 no-overlap | 2 |", "scaling efficiency"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rep report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Backend != "cpu" || rep.Precision != "f32" || rep.GlobalBatchTokens != 128 || len(rep.Layouts) != 3 || rep.Longest != nil || rep.Error != "" {
		t.Fatalf("report: %+v", rep)
	}
	for i, r := range rep.Layouts {
		if r.TokensPerS <= 0 || r.StepSec <= 0 || r.Speedup == nil || r.Efficiency == nil ||
			math.Abs(*r.Efficiency-*r.Speedup/float64(r.Ranks)) > 1e-12 || math.IsNaN(r.Loss) || r.TokensPerStep != 128 {
			t.Errorf("layout %d: %+v", i, r)
		}
	}
	if *rep.Layouts[0].Speedup != 1 || rep.Layouts[0].Ranks != 1 || rep.Layouts[2].Overlap {
		t.Errorf("layouts: %+v", rep.Layouts)
	}
	// Every layout trains the same data from the same start: one loss.
	if l0, l1 := rep.Layouts[0].Loss, rep.Layouts[1].Loss; math.Abs(l0-l1) > 1e-4*l0 {
		t.Errorf("loss dp1 %v, dp2 %v", l0, l1)
	}
}

func TestCUDAWithoutLibrary(t *testing.T) {
	lib := filepath.Join(t.TempDir(), "libm2kernels.so")
	o := parse(t, "-backend", "cuda", "-lib", lib, "-json", filepath.Join(t.TempDir(), "r.json"))
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	var out bytes.Buffer
	err := runParent(ctx, o, &out)
	if err == nil {
		t.Fatalf("runParent with a missing library: no error\n%s", out.String())
	}
	for _, want := range []string{"-backend cuda: the CUDA kernel library is missing", lib, "kernels/build.sh kernels/build", "M2K_LIB"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	// The probe in this process says the same.
	if _, err := probeCUDA(lib); err == nil || !strings.Contains(err.Error(), "kernels/build.sh kernels/build") {
		t.Errorf("probeCUDA: %v", err)
	}
}

// TestLongestTableCPU runs the search's trials as real rank processes on
// the CPU backend, where every length fits: the search doubles up to
// -long-max and reports it as capped.
func TestLongestTableCPU(t *testing.T) {
	o := parse(t, "-d-model", "32", "-layers", "1", "-vocab", "64", "-chunk", "16", "-headdim", "16", "-d-state", "16")
	o.longSP, o.longStart, o.longMax, o.longSteps, o.longRes = []int{1, 2}, 100, 512, 2, resolution{frac: 16}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	var out bytes.Buffer
	rows, err := longestTable(ctx, o, gpuPlan{}, &out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if len(rows) != 2 {
		t.Fatalf("%d rows, want 2\n%s", len(rows), out.String())
	}
	for _, r := range rows {
		want := []int{112, 224, 448, 512} // sp 1: multiples of 16
		if r.SP == 2 {
			want = []int{128, 256, 512} // multiples of 32
		}
		var got []int
		for _, tr := range r.Trials {
			got = append(got, tr.SeqLen)
			if !tr.Fits || tr.StepSec <= 0 || tr.OOM != "" {
				t.Errorf("sp %d trial %+v", r.SP, tr)
			}
		}
		if !slices.Equal(got, want) {
			t.Errorf("sp %d: trials %v, want %v", r.SP, got, want)
		}
		// A fresh model on uniform tokens: the first loss is about ln 64.
		if r.Longest != 512 || !r.Capped || r.PositionsPerRank != 512/r.SP || r.StepSec <= 0 ||
			math.Abs(r.LossFirst-math.Log(64)) > 0.5 || r.RatioToSP1 == nil || *r.RatioToSP1 != 1 {
			t.Errorf("row %+v", r)
		}
	}
	if !strings.Contains(out.String(), "| 2 | ≥ 512 (-long-max) | 256 |") {
		t.Errorf("table lacks the sp 2 row:\n%s", out.String())
	}
}
