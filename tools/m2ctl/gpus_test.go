package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/m2train/m2train/worker/gpuinfo"
)

// TestGPUs checks `m2ctl gpus --json` against what this machine has: with no
// NVIDIA driver (CI) it must exit 1 and say why in the JSON; with GPUs it
// must list each one with its memory.
func TestGPUs(t *testing.T) {
	out, code := m2ctl(t, "gpus", "--json")
	// The JSON document comes first; the error line (if any) follows it.
	var v struct {
		Devices []gpuinfo.Device `json:"devices"`
		Error   string           `json:"error"`
		Kernels string           `json:"kernels"`
	}
	dec := json.NewDecoder(strings.NewReader(out))
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if v.Kernels == "" {
		t.Errorf("no kernel library state in %s", out)
	}
	_, discoverErr := gpuinfo.Discover()
	if discoverErr != nil {
		if code != exitFailure || !strings.Contains(v.Error, "no GPU information available") {
			t.Errorf("without GPUs: exit %d, error %q; want exit %d and the reason", code, v.Error, exitFailure)
		}
		return
	}
	if len(v.Devices) == 0 || v.Devices[0].MemoryTotal == 0 {
		t.Errorf("with GPUs: devices %+v", v.Devices)
	}
}
