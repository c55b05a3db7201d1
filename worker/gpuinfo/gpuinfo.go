// Package gpuinfo discovers the GPUs of this machine and their health
// through NVIDIA's management library (NVML, via github.com/NVIDIA/go-nvml).
//
// The worker uses what Discover finds to decide between the CUDA and the
// CPU backend, and samples its GPUs for its metrics with a Sampler. NVML needs cgo: a build without cgo (or for another operating
// system than Linux) compiles a version whose Discover always reports
// ErrUnavailable, so that the CPU-only build never depends on it. Without
// the NVIDIA driver, Discover reports ErrUnavailable too, and nothing
// crashes.
package gpuinfo

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrUnavailable reports that no GPU can be queried: no NVML library (no
// NVIDIA driver), no device, or a build without cgo.
var ErrUnavailable = errors.New("gpuinfo: no GPU information available")

// ErrClosed is returned by a Sampler's Sample after Close.
var ErrClosed = errors.New("gpuinfo: sampler closed")

// Sampler queries the GPUs again and again with NVML kept initialised, for
// metrics read at every scrape, where Discover would start and stop NVML
// each time. Get one from Open and Close it when done; it is safe for
// concurrent use.
type Sampler struct {
	closed bool // guarded by the package's NVML lock
}

// Report is what one Discover call found.
type Report struct {
	DriverVersion     string   `json:"driver_version"`
	CUDADriverVersion int      `json:"cuda_driver_version"` // e.g. 13000 for CUDA 13.0
	Devices           []Device `json:"devices"`
}

// Device is one GPU. Fields that NVML does not support on a device (for
// example ECC counters on consumer cards) are left at zero, and the
// reason goes to Notes.
type Device struct {
	Index        int    `json:"index"`
	UUID         string `json:"uuid"`
	Name         string `json:"name"`
	PCIBusID     string `json:"pci_bus_id"`
	ComputeMajor int    `json:"compute_major"`
	ComputeMinor int    `json:"compute_minor"`

	MemoryTotal uint64 `json:"memory_total_bytes"`
	MemoryUsed  uint64 `json:"memory_used_bytes"`
	MemoryFree  uint64 `json:"memory_free_bytes"`

	UtilizationGPU    uint32 `json:"utilization_gpu_percent"`    // over NVML's last sample period
	UtilizationMemory uint32 `json:"utilization_memory_percent"` // memory controller busy
	TemperatureC      uint32 `json:"temperature_c"`
	SlowdownC         uint32 `json:"slowdown_temperature_c"` // 0 when not reported
	PowerMilliwatts   uint32 `json:"power_milliwatts"`

	// ECCUncorrected counts uncorrectable ECC errors since the driver
	// loaded (volatile counter).
	ECCUncorrected uint64 `json:"ecc_uncorrected"`
	// RemapFailed and RemapPending are the HBM row-remapping flags: a
	// failed remap needs the GPU replaced, a pending one a GPU reset.
	RemapFailed  bool `json:"remap_failed"`
	RemapPending bool `json:"remap_pending"`

	// Problems lists what makes the device unhealthy; empty means healthy.
	Problems []string `json:"problems,omitempty"`
	// Notes lists queries the device did not answer (not problems).
	Notes []string `json:"notes,omitempty"`
}

// Healthy reports whether the device may be given work.
func (d *Device) Healthy() bool { return len(d.Problems) == 0 }

// Problem kinds: stable names of the conditions that make a device
// unhealthy, for metric labels and alerts (Problems holds the sentences).
const (
	ProblemECCUncorrected  = "ecc_uncorrected"
	ProblemRemapFailed     = "remap_failed"
	ProblemRemapPending    = "remap_pending"
	ProblemThermalSlowdown = "thermal_slowdown"
)

// problem is one unhealthy condition: its kind and its sentence.
type problem struct{ kind, text string }

// problems derives the unhealthy conditions from the measured fields; it
// is the one place that decides health, for Problems and ProblemKinds.
func (d *Device) problems() []problem {
	var ps []problem
	if d.ECCUncorrected > 0 {
		ps = append(ps, problem{ProblemECCUncorrected, fmt.Sprintf("%d uncorrectable ECC errors since the driver loaded", d.ECCUncorrected)})
	}
	if d.RemapFailed {
		ps = append(ps, problem{ProblemRemapFailed, "HBM row remapping failed: the GPU needs replacing"})
	}
	if d.RemapPending {
		ps = append(ps, problem{ProblemRemapPending, "HBM row remapping pending: the GPU needs a reset"})
	}
	if d.SlowdownC > 0 && d.TemperatureC >= d.SlowdownC {
		ps = append(ps, problem{ProblemThermalSlowdown, fmt.Sprintf("temperature %d °C at or above the slowdown threshold %d °C", d.TemperatureC, d.SlowdownC)})
	}
	return ps
}

// assess fills Problems from the measured fields.
func (d *Device) assess() {
	d.Problems = nil
	for _, p := range d.problems() {
		d.Problems = append(d.Problems, p.text)
	}
}

// ProblemKinds returns the kinds (ProblemECCUncorrected, ...) of the
// conditions the measured fields show, in the order of Problems.
func (d *Device) ProblemKinds() []string {
	var kinds []string
	for _, p := range d.problems() {
		kinds = append(kinds, p.kind)
	}
	return kinds
}

// Queries whose failure a device records in Notes, for Answered.
const (
	QueryMemory      = "memory"
	QueryUtilization = "utilization"
	QueryTemperature = "temperature"
	QueryPower       = "power"
)

// Answered reports whether the device answered query (QueryMemory, ...):
// a field whose query failed holds zero, which is no measurement.
func (d *Device) Answered(query string) bool {
	for _, n := range d.Notes {
		if strings.HasPrefix(n, query+": ") {
			return false
		}
	}
	return true
}

// Visible returns the devices of devs that a CUDA_VISIBLE_DEVICES value of
// list names, in the order listed: an entry is an NVML index or a device
// UUID, whole or abbreviated, with or without its "GPU-" prefix. Entries
// that name no device (a MIG instance, an index out of range) are
// skipped, and an empty list names none. NVML numbers devices in PCI bus
// order, which is CUDA's order when CUDA_DEVICE_ORDER is PCI_BUS_ID and,
// on hosts of identical GPUs, its default order too.
func Visible(devs []Device, list string) []Device {
	var out []Device
	seen := map[int]bool{}
	for _, e := range strings.Split(list, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		for _, d := range devs {
			if seen[d.Index] || !names(d, e) {
				continue
			}
			seen[d.Index] = true
			out = append(out, d)
			break
		}
	}
	return out
}

// names reports whether the CUDA_VISIBLE_DEVICES entry e names d.
func names(d Device, e string) bool {
	if i, err := strconv.Atoi(e); err == nil {
		return i == d.Index
	}
	uuid := strings.TrimPrefix(d.UUID, "GPU-")
	e = strings.TrimPrefix(e, "GPU-")
	return uuid != "" && strings.HasPrefix(uuid, e)
}

// String is a one-line summary of the device.
func (d *Device) String() string {
	health := "healthy"
	if !d.Healthy() {
		health = "UNHEALTHY: " + strings.Join(d.Problems, "; ")
	}
	return fmt.Sprintf("GPU %d %s (%s, sm_%d%d) %.1f/%.1f GiB used, %d%% busy, %d °C, %s",
		d.Index, d.Name, d.UUID, d.ComputeMajor, d.ComputeMinor,
		float64(d.MemoryUsed)/(1<<30), float64(d.MemoryTotal)/(1<<30), d.UtilizationGPU, d.TemperatureC, health)
}

// busID turns NVML's NUL-terminated C character array into a string.
func busID(b []int8) string {
	var sb strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		sb.WriteByte(byte(c))
	}
	return sb.String()
}
