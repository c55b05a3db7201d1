package agent

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
)

func validConfig() Config {
	c := DefaultConfig()
	c.WorkerID, c.Coordinators, c.AdvertiseHost = "w0", []string{"127.0.0.1:7400"}, "127.0.0.1"
	c.Runner = RunnerFunc(func(context.Context, *Rank) (Result, error) { return Result{}, nil })
	return c
}

func TestConfigValidate(t *testing.T) {
	if err := validConfig().Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"no ID", func(c *Config) { c.WorkerID = "" }, `WorkerID "" must be 1-128 bytes without '/'`},
		{"slash", func(c *Config) { c.WorkerID = "a/b" }, `WorkerID "a/b"`},
		{"no coordinators", func(c *Config) { c.Coordinators = nil }, "Coordinators needs at least one address"},
		{"empty coordinator", func(c *Config) { c.Coordinators = []string{"a:1", ""} }, "Coordinators[1] is empty"},
		{"no host", func(c *Config) { c.AdvertiseHost = "" }, "AdvertiseHost is required"},
		{"port", func(c *Config) { c.CollectivePort = 70000 }, "CollectivePort must be in [0, 65535], got 70000"},
		{"last slot's port", func(c *Config) { c.CollectivePort, c.GPUs = 65535, 2 }, "CollectivePort 65535 leaves no port for slot 1"},
		{"gpus", func(c *Config) { c.GPUs = 65 }, "GPUs must be in [0, 64], got 65"},
		{"negative duration", func(c *Config) { c.PollInterval = -1 }, "durations must not be negative"},
		{"no runner", func(c *Config) { c.Runner = nil }, "Runner is required"},
		{"collective", func(c *Config) { c.Collective.ChunkSize = 3 }, "Collective: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
			tc.edit(&c)
			err := c.Validate()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want ErrConfig with %q", err, tc.want)
			}
		})
	}
}

func TestDetectDevice(t *testing.T) {
	gpuOK := func() (string, error) { return "GPU 0 healthy", nil }
	noGPU := func() (string, error) { return "", errors.New("no library") }
	for _, tc := range []struct {
		kind    string
		probe   Probe
		want    Device
		note    string
		wantErr string
	}{
		{"cpu", gpuOK, DeviceCPU, "the CPU reference backend", ""},
		{"cuda", gpuOK, DeviceCUDA, "GPU 0 healthy", ""},
		{"cuda", noGPU, "", "", "agent: backend cuda: no library"},
		{"auto", gpuOK, DeviceCUDA, "GPU 0 healthy", ""},
		{"auto", noGPU, DeviceCPU, "the CPU reference backend (CUDA unavailable: no library)", ""},
		{"", noGPU, DeviceCPU, "the CPU reference backend (CUDA unavailable: no library)", ""},
		{"tpu", gpuOK, "", "", "backend must be auto, cpu or cuda, got \"tpu\""},
	} {
		dev, note, err := DetectDevice(tc.kind, tc.probe)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("DetectDevice(%q) = %v, want error %q", tc.kind, err, tc.wantErr)
			}
			continue
		}
		if err != nil || dev != tc.want || note != tc.note {
			t.Errorf("DetectDevice(%q) = %q, %q, %v; want %q, %q", tc.kind, dev, note, err, tc.want, tc.note)
		}
	}
	if DeviceCUDA.GPUs() != 1 || DeviceCPU.GPUs() != 0 {
		t.Error("a CUDA worker has one slot per process, a CPU worker none")
	}
}

func TestDeviceOpenRefusesBF16OnTheCPU(t *testing.T) {
	_, _, err := DeviceCPU.open(jobspec.PrecisionBF16, model.DefaultConfig(64, 1, 256))
	if !IsFatal(err) || !strings.Contains(err.Error(), "precision bf16 needs the CUDA backend") {
		t.Fatalf("open = %v, want a fatal error about bf16", err)
	}
	b, release, err := DeviceCPU.open(jobspec.PrecisionFloat32, model.DefaultConfig(64, 1, 256))
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if b.Layout().Total == 0 {
		t.Fatal("empty model")
	}
}

func TestFatal(t *testing.T) {
	base := errors.New("boom")
	if Fatal(nil) != nil {
		t.Error("Fatal(nil) is not nil")
	}
	f := Fatal(base)
	if !IsFatal(f) || !errors.Is(f, base) || f.Error() != "boom" || IsFatal(base) {
		t.Errorf("Fatal wraps badly: %v", f)
	}
}
