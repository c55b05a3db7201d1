//go:build cgo && linux

package gpuinfo

import (
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// mu serialises every use of NVML (Discover, Open, a Sampler): its Init
// and Shutdown are reference counted process-wide, and one query at a time
// is plenty.
var mu sync.Mutex

// Discover queries every GPU NVML sees. It returns ErrUnavailable (wrapped
// with NVML's reason) when NVML cannot start or finds no device.
func Discover() (*Report, error) {
	mu.Lock()
	defer mu.Unlock()
	if ret := nvml.Init(); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("%w: NVML init: %s", ErrUnavailable, nvml.ErrorString(ret))
	}
	defer nvml.Shutdown()
	return read()
}

// Open starts NVML for a Sampler. It returns ErrUnavailable (wrapped with
// NVML's reason) when NVML cannot start or finds no device.
func Open() (*Sampler, error) {
	mu.Lock()
	defer mu.Unlock()
	if ret := nvml.Init(); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("%w: NVML init: %s", ErrUnavailable, nvml.ErrorString(ret))
	}
	n, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS || n == 0 {
		nvml.Shutdown()
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("%w: NVML device count: %s", ErrUnavailable, nvml.ErrorString(ret))
		}
		return nil, fmt.Errorf("%w: NVML sees no device", ErrUnavailable)
	}
	return &Sampler{}, nil
}

// Sample queries every GPU, as Discover does, on the NVML that Open
// started.
func (s *Sampler) Sample() (*Report, error) {
	mu.Lock()
	defer mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	return read()
}

// Close releases the sampler's hold on NVML; later Samples return
// ErrClosed. Closing twice is harmless.
func (s *Sampler) Close() error {
	mu.Lock()
	defer mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if ret := nvml.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("gpuinfo: NVML shutdown: %s", nvml.ErrorString(ret))
	}
	return nil
}

// read queries the driver and every device; NVML must be initialised and
// mu held.
func read() (*Report, error) {
	r := &Report{}
	if v, ret := nvml.SystemGetDriverVersion(); ret == nvml.SUCCESS {
		r.DriverVersion = v
	}
	if v, ret := nvml.SystemGetCudaDriverVersion(); ret == nvml.SUCCESS {
		r.CUDADriverVersion = v
	}
	n, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("%w: NVML device count: %s", ErrUnavailable, nvml.ErrorString(ret))
	}
	if n == 0 {
		return nil, fmt.Errorf("%w: NVML sees no device", ErrUnavailable)
	}
	for i := 0; i < n; i++ {
		h, ret := nvml.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("gpuinfo: device %d: handle: %s", i, nvml.ErrorString(ret))
		}
		r.Devices = append(r.Devices, query(i, h))
	}
	return r, nil
}

// query reads one device. Queries a device does not support become Notes.
func query(i int, h nvml.Device) Device {
	d := Device{Index: i}
	note := func(what string, ret nvml.Return) bool {
		if ret == nvml.SUCCESS {
			return true
		}
		d.Notes = append(d.Notes, fmt.Sprintf("%s: %s", what, nvml.ErrorString(ret)))
		return false
	}
	if v, ret := h.GetUUID(); note("uuid", ret) {
		d.UUID = v
	}
	if v, ret := h.GetName(); note("name", ret) {
		d.Name = v
	}
	if p, ret := h.GetPciInfo(); note("pci", ret) {
		d.PCIBusID = busID(p.BusId[:])
	}
	if ma, mi, ret := h.GetCudaComputeCapability(); note("compute capability", ret) {
		d.ComputeMajor, d.ComputeMinor = ma, mi
	}
	if m, ret := h.GetMemoryInfo(); note(QueryMemory, ret) {
		d.MemoryTotal, d.MemoryUsed, d.MemoryFree = m.Total, m.Used, m.Free
	}
	if u, ret := h.GetUtilizationRates(); note(QueryUtilization, ret) {
		d.UtilizationGPU, d.UtilizationMemory = u.Gpu, u.Memory
	}
	if t, ret := h.GetTemperature(nvml.TEMPERATURE_GPU); note(QueryTemperature, ret) {
		d.TemperatureC = t
	}
	if t, ret := h.GetTemperatureThreshold(nvml.TEMPERATURE_THRESHOLD_SLOWDOWN); note("slowdown threshold", ret) {
		d.SlowdownC = t
	}
	if p, ret := h.GetPowerUsage(); note(QueryPower, ret) {
		d.PowerMilliwatts = p
	}
	if e, ret := h.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC); note("ecc", ret) {
		d.ECCUncorrected = e
	}
	if _, _, pending, failed, ret := h.GetRemappedRows(); note("row remapping", ret) {
		d.RemapPending, d.RemapFailed = pending, failed
	}
	d.assess()
	return d
}
