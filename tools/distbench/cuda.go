package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/m2train/m2train/kernels"
)

// visibleEnv is the variable through which CUDA hides devices from a
// process.
const visibleEnv = "CUDA_VISIBLE_DEVICES"

// exitOOM is the exit status of a rank that ran out of GPU memory.
const exitOOM = 3

// isOOM reports whether err is a CUDA allocation failure.
func isOOM(err error) bool { return errors.Is(err, kernels.ErrOutOfMemory) }

// openLib opens the kernel library at path, or the one kernels.Default
// finds; a failure says how to get one.
func openLib(path string) (*kernels.Lib, error) {
	lib, err := kernels.Load(path)
	if err != nil {
		return nil, cudaUnavailable(err)
	}
	return lib, nil
}

// cudaUnavailable explains a failure to open the kernel library.
func cudaUnavailable(err error) error {
	switch {
	case errors.Is(err, kernels.ErrNoLibrary):
		return fmt.Errorf("-backend cuda: the CUDA kernel library is missing: %w\n"+
			"build it on a machine with nvcc (repository root): kernels/build.sh kernels/build\n"+
			"then export %s=$PWD/kernels/build/%s, pass -lib, or run from the repository root", err, kernels.EnvLib, kernels.LibName)
	case errors.Is(err, kernels.ErrABI):
		return fmt.Errorf("-backend cuda: the CUDA kernel library does not match this build: %w\nrebuild it: kernels/build.sh kernels/build", err)
	case errors.Is(err, kernels.ErrNoDevice):
		v, ok := os.LookupEnv(visibleEnv)
		if !ok {
			v = "(unset)"
		}
		return fmt.Errorf("-backend cuda: no usable GPU: %w (%s=%s)", err, visibleEnv, v)
	}
	return fmt.Errorf("-backend cuda: %w", err)
}

// probeInfo is what the probe child reports about the GPUs it sees.
type probeInfo struct {
	Count    int    `json:"count"`
	Name     string `json:"name"`
	TotalMem int64  `json:"total_mem"`
	Library  string `json:"library"`
	Error    string `json:"error,omitempty"`
}

// probeCUDA opens the library and counts the visible GPUs. It creates a
// CUDA context on the first of them, so the parent runs it in a child
// process of its own (runProbe): a context the parent kept would take
// memory from rank 0's GPU and show in its measurements.
func probeCUDA(lib string) (probeInfo, error) {
	l, err := openLib(lib)
	if err != nil {
		return probeInfo{}, err
	}
	var count func(n *int32) int32
	if err := kernels.Bind(l.Handle(), &count, "m2k_device_count"); err != nil {
		return probeInfo{}, cudaUnavailable(err)
	}
	var n int32
	if err := l.Call("m2k_device_count", func() int32 { return count(&n) }); err != nil {
		return probeInfo{}, fmt.Errorf("-backend cuda: counting the GPUs: %w", err)
	}
	d := l.Device()
	return probeInfo{Count: int(n), Name: d.Name, TotalMem: d.TotalMem, Library: l.Path()}, nil
}

// runProbeChild is the probe process: it prints probeInfo as JSON, with
// the error in it when the library or the GPUs are unavailable.
func runProbeChild(o options) {
	info, err := probeCUDA(o.lib)
	if err != nil {
		info.Error = err.Error()
	}
	if err := json.NewEncoder(os.Stdout).Encode(info); err != nil {
		fmt.Fprintln(os.Stderr, "distbench probe:", err)
		os.Exit(1)
	}
}

// runProbe runs the probe in a child process with this process's
// environment and returns what it saw.
func runProbe(ctx context.Context, o options) (probeInfo, error) {
	self, err := os.Executable()
	if err != nil {
		return probeInfo{}, err
	}
	args := []string{"-backend", backendCUDA}
	if o.lib != "" {
		args = append(args, "-lib", o.lib)
	}
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append(os.Environ(), probeEnv+"=1")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var info probeInfo
	if jerr := json.Unmarshal(out, &info); jerr != nil {
		if err == nil {
			err = jerr
		}
		return info, fmt.Errorf("-backend cuda: probing the GPUs: %v; %s", err, strings.TrimSpace(stderr.String()))
	}
	if info.Error != "" {
		return info, errors.New(info.Error)
	}
	return info, err
}

// visibleList is this process's CUDA_VISIBLE_DEVICES as a list of entries,
// and whether it is set.
func visibleList() ([]string, bool) {
	v, ok := os.LookupEnv(visibleEnv)
	if !ok {
		return nil, false
	}
	var out []string
	for _, e := range strings.Split(v, ",") {
		out = append(out, strings.TrimSpace(e))
	}
	return out, true
}

// gpuOf returns the CUDA_VISIBLE_DEVICES value of rank's process when the
// ranks share gpus GPUs: the device (rank mod gpus) of those this process
// sees, which is that entry of the parent's own list when it has one (an
// index or a UUID, passed on as written) and the index itself otherwise.
func gpuOf(rank, gpus int, parent []string, parentSet bool) (string, error) {
	if gpus < 1 {
		return "", fmt.Errorf("gpuOf: %d GPUs", gpus)
	}
	i := rank % gpus
	if !parentSet {
		return strconv.Itoa(i), nil
	}
	if i >= len(parent) || parent[i] == "" {
		return "", fmt.Errorf("%s=%q names fewer than %d GPUs", visibleEnv, strings.Join(parent, ","), gpus)
	}
	return parent[i], nil
}

// withVisible returns env with CUDA_VISIBLE_DEVICES set to dev and every
// other variable as it was.
func withVisible(env []string, dev string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if !strings.HasPrefix(kv, visibleEnv+"=") {
			out = append(out, kv)
		}
	}
	return append(out, visibleEnv+"="+dev)
}
