// Package gpuinfo discovers the GPUs of this machine and their health
// through NVIDIA's management library (NVML, via github.com/NVIDIA/go-nvml).
//
// The worker reports what Discover finds to the coordinator's scheduler and
// to its metrics, and uses it to decide between the CUDA and the CPU
// backend. NVML needs cgo: a build without cgo (or for another operating
// system than Linux) compiles a version whose Discover always reports
// ErrUnavailable, so that the CPU-only build never depends on it. Without
// the NVIDIA driver, Discover reports ErrUnavailable too, and nothing
// crashes.
package gpuinfo

import (
	"errors"
	"fmt"
	"strings"
)

// ErrUnavailable reports that no GPU can be queried: no NVML library (no
// NVIDIA driver), no device, or a build without cgo.
var ErrUnavailable = errors.New("gpuinfo: no GPU information available")

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

// assess fills Problems from the measured fields.
func (d *Device) assess() {
	d.Problems = nil
	if d.ECCUncorrected > 0 {
		d.Problems = append(d.Problems, fmt.Sprintf("%d uncorrectable ECC errors since the driver loaded", d.ECCUncorrected))
	}
	if d.RemapFailed {
		d.Problems = append(d.Problems, "HBM row remapping failed: the GPU needs replacing")
	}
	if d.RemapPending {
		d.Problems = append(d.Problems, "HBM row remapping pending: the GPU needs a reset")
	}
	if d.SlowdownC > 0 && d.TemperatureC >= d.SlowdownC {
		d.Problems = append(d.Problems, fmt.Sprintf("temperature %d °C at or above the slowdown threshold %d °C", d.TemperatureC, d.SlowdownC))
	}
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
