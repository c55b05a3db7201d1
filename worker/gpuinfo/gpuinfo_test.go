package gpuinfo

import (
	"errors"
	"strings"
	"testing"
)

func TestAssess(t *testing.T) {
	cases := []struct {
		name string
		d    Device
		want []string // substrings of the problems, in order
	}{
		{"healthy", Device{TemperatureC: 40, SlowdownC: 90}, nil},
		{"no threshold reported", Device{TemperatureC: 95}, nil},
		{"ecc", Device{ECCUncorrected: 3}, []string{"3 uncorrectable ECC"}},
		{"hot", Device{TemperatureC: 91, SlowdownC: 90}, []string{"91 °C at or above"}},
		{"remap", Device{RemapFailed: true, RemapPending: true}, []string{"remapping failed", "remapping pending"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := c.d
			d.assess()
			if d.Healthy() != (len(c.want) == 0) {
				t.Fatalf("Healthy() = %v with problems %q", d.Healthy(), d.Problems)
			}
			if len(d.Problems) != len(c.want) {
				t.Fatalf("problems %q, want %d", d.Problems, len(c.want))
			}
			for i, w := range c.want {
				if !strings.Contains(d.Problems[i], w) {
					t.Errorf("problem %d = %q, want it to contain %q", i, d.Problems[i], w)
				}
			}
			if s := d.String(); d.Healthy() != strings.Contains(s, "healthy") || (!d.Healthy() && !strings.Contains(s, "UNHEALTHY")) {
				t.Errorf("String() = %q does not say the health", s)
			}
		})
	}
}

func TestBusID(t *testing.T) {
	raw := make([]int8, 32)
	for i, c := range "00000000:19:00.0" {
		raw[i] = int8(c)
	}
	if got := busID(raw); got != "00000000:19:00.0" {
		t.Errorf("busID = %q", got)
	}
	if got := busID(nil); got != "" {
		t.Errorf("busID(nil) = %q", got)
	}
}

// On a machine without the NVIDIA driver (CI), Discover must report
// ErrUnavailable rather than fail otherwise or crash. With a GPU it must
// list at least one device with a name and memory; that case runs on the
// GPU machine through the gpu-tagged test binary.
func TestDiscoverWithoutOrWithGPU(t *testing.T) {
	r, err := Discover()
	if err != nil {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Discover error %v does not wrap ErrUnavailable", err)
		}
		return
	}
	if len(r.Devices) == 0 {
		t.Fatal("Discover succeeded with no devices")
	}
	for _, d := range r.Devices {
		if d.Name == "" || d.MemoryTotal == 0 || d.UUID == "" {
			t.Errorf("device %d incomplete: %+v", d.Index, d)
		}
		t.Log(d.String())
	}
}
