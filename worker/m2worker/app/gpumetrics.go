package app

import (
	"log/slog"
	"os"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2train/m2train/worker/gpuinfo"
)

// gpuCollector samples the worker's GPUs through NVML at every scrape. It
// is registered only when NVML answers, so that a worker without a GPU
// has no GPU series at all rather than zeros. A query a device does not
// answer leaves its series out for that device.
type gpuCollector struct {
	sample  func() (*gpuinfo.Report, error)
	visible func([]gpuinfo.Device) []gpuinfo.Device
	log     *slog.Logger

	util, memUtil, memUsed, memTotal, temp, power, healthy, problem, sampleErrs *prometheus.Desc

	mu      sync.Mutex
	errs    int
	failing bool
}

// newGPUCollector returns a collector of the devices that visible keeps
// of what sample reports.
func newGPUCollector(sample func() (*gpuinfo.Report, error), visible func([]gpuinfo.Device) []gpuinfo.Device, log *slog.Logger) *gpuCollector {
	labels := []string{"gpu", "uuid", "name"}
	desc := func(name, help string, extra ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "gpu", name), help, append(labels, extra...), nil)
	}
	return &gpuCollector{sample: sample, visible: visible, log: log,
		util:     desc("utilization_ratio", "Fraction of NVML's last sample period (0 to 1) during which a kernel ran on the GPU."),
		memUtil:  desc("memory_utilization_ratio", "Fraction of NVML's last sample period (0 to 1) during which device memory was read or written."),
		memUsed:  desc("memory_used_bytes", "Device memory in use."),
		memTotal: desc("memory_total_bytes", "Device memory installed."),
		temp:     desc("temperature_celsius", "GPU core temperature."),
		power:    desc("power_watts", "Power draw of the GPU."),
		healthy:  desc("healthy", "1 when NVML shows no problem on the GPU, else 0 (gpu_problem names it)."),
		problem: desc("problem", "1 for each problem NVML shows on the GPU: ecc_uncorrected, remap_failed, remap_pending or thermal_slowdown.",
			"problem"),
		sampleErrs: prometheus.NewDesc(prometheus.BuildFQName(namespace, "gpu", "sample_errors_total"),
			"Scrapes at which NVML could not be queried (the GPU series are then absent).", nil, nil),
	}
}

// cudaVisible keeps the devices that CUDA_VISIBLE_DEVICES names, when it
// is set: a worker pinned to one GPU reports that one.
func cudaVisible(devs []gpuinfo.Device) []gpuinfo.Device {
	if list, ok := os.LookupEnv("CUDA_VISIBLE_DEVICES"); ok {
		return gpuinfo.Visible(devs, list)
	}
	return devs
}

// Describe implements prometheus.Collector.
func (c *gpuCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.util, c.memUtil, c.memUsed, c.memTotal, c.temp, c.power, c.healthy, c.problem, c.sampleErrs} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: it samples the GPUs now.
func (c *gpuCollector) Collect(ch chan<- prometheus.Metric) {
	r, err := c.sample()
	c.mu.Lock()
	if err != nil {
		c.errs++
		if !c.failing {
			c.log.Warn("sampling the GPUs failed; their series are left out until it works again", "err", err)
		}
	} else if c.failing {
		c.log.Info("sampling the GPUs works again")
	}
	c.failing = err != nil
	errs := c.errs
	c.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(c.sampleErrs, prometheus.CounterValue, float64(errs))
	if err != nil {
		return
	}
	for _, d := range c.visible(r.Devices) {
		lv := []string{strconv.Itoa(d.Index), d.UUID, d.Name}
		gauge := func(desc *prometheus.Desc, v float64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, append(lv, extra...)...)
		}
		if d.Answered(gpuinfo.QueryUtilization) {
			gauge(c.util, float64(d.UtilizationGPU)/100)
			gauge(c.memUtil, float64(d.UtilizationMemory)/100)
		}
		if d.Answered(gpuinfo.QueryMemory) {
			gauge(c.memUsed, float64(d.MemoryUsed))
			gauge(c.memTotal, float64(d.MemoryTotal))
		}
		if d.Answered(gpuinfo.QueryTemperature) {
			gauge(c.temp, float64(d.TemperatureC))
		}
		if d.Answered(gpuinfo.QueryPower) {
			gauge(c.power, float64(d.PowerMilliwatts)/1000)
		}
		health := 0.0
		if d.Healthy() {
			health = 1
		}
		gauge(c.healthy, health)
		for _, k := range d.ProblemKinds() {
			gauge(c.problem, 1, k)
		}
	}
}
