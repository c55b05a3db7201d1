package agent

import (
	"errors"
	"fmt"
	"strings"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/kernels/gpu"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/gpuinfo"
)

// Device is the backend a worker trains on.
type Device string

// Devices.
const (
	// DeviceCPU is the CPU reference backend (model/ref) in float32.
	DeviceCPU Device = "cpu"
	// DeviceCUDA is the CUDA backend (kernels/gpu) on the process's first
	// visible GPU, in the spec's precision.
	DeviceCUDA Device = "cuda"
)

// GPUs is the slot count a worker with this device announces: one GPU per
// process (the CUDA backend drives the first visible device; run one
// worker per GPU with CUDA_VISIBLE_DEVICES), or 0 for the CPU.
func (d Device) GPUs() int {
	if d == DeviceCUDA {
		return 1
	}
	return 0
}

// Probe reports whether this process can train on the CUDA backend: the
// kernel library loads and finds a device, and NVML (when this build can
// reach it) reports that device healthy. The error says why not.
type Probe func() (string, error)

// ProbeCUDA is the Probe of this machine.
func ProbeCUDA() (string, error) {
	lib, err := kernels.Default()
	if err != nil {
		return "", fmt.Errorf("the CUDA kernels do not load: %w", err)
	}
	desc := lib.Path()
	rep, err := gpuinfo.Discover()
	switch {
	case errors.Is(err, gpuinfo.ErrUnavailable):
		return desc + " (NVML unavailable: device health not checked)", nil
	case err != nil:
		return "", fmt.Errorf("NVML: %w", err)
	case len(rep.Devices) == 0:
		return "", errors.New("NVML reports no GPU")
	}
	d := &rep.Devices[0]
	if !d.Healthy() {
		return "", fmt.Errorf("GPU %d is unhealthy: %s", d.Index, strings.Join(d.Problems, "; "))
	}
	return d.String() + ", kernels " + desc, nil
}

// DetectDevice resolves a worker's backend choice: "cpu"; "cuda", which
// fails when probe says the GPU cannot be used; or "auto" (also ""), the
// GPU when probe allows it and else the CPU. note describes the choice
// (the GPU, or why auto fell back to the CPU).
func DetectDevice(kind string, probe Probe) (dev Device, note string, err error) {
	switch kind {
	case "cpu":
		return DeviceCPU, "the CPU reference backend", nil
	case "cuda", "auto", "":
	default:
		return "", "", fmt.Errorf("%w: backend must be auto, cpu or cuda, got %q", ErrConfig, kind)
	}
	desc, perr := probe()
	switch {
	case perr == nil:
		return DeviceCUDA, desc, nil
	case kind == "cuda":
		return "", "", fmt.Errorf("agent: backend cuda: %w", perr)
	}
	return DeviceCPU, "the CPU reference backend (CUDA unavailable: " + perr.Error() + ")", nil
}

// open returns the backend of cfg on the device in the spec's precision,
// and its release function.
func (d Device) open(precision string, cfg model.Config) (model.Backend[float32], func(), error) {
	switch d {
	case DeviceCPU:
		if precision == jobspec.PrecisionBF16 {
			return nil, nil, Fatal(fmt.Errorf("agent: precision bf16 needs the CUDA backend; this worker trains on the CPU (float32)"))
		}
		m, err := ref.New[float32](cfg)
		if err != nil {
			return nil, nil, Fatal(err)
		}
		return m, func() {}, nil
	case DeviceCUDA:
		prec := gpu.F32
		if precision == jobspec.PrecisionBF16 {
			prec = gpu.BF16
		}
		g, err := gpu.Open("", cfg, gpu.Options{Precision: prec, ExplicitSync: true})
		if errors.Is(err, gpu.ErrUnsupported) {
			return nil, nil, Fatal(err)
		}
		if err != nil {
			return nil, nil, err
		}
		return g, func() { g.Close() }, nil
	}
	return nil, nil, fmt.Errorf("agent: unknown device %q", d)
}
