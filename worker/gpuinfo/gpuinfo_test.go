package gpuinfo

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestAssess(t *testing.T) {
	cases := []struct {
		name  string
		d     Device
		want  []string // substrings of the problems, in order
		kinds []string
	}{
		{"healthy", Device{TemperatureC: 40, SlowdownC: 90}, nil, nil},
		{"no threshold reported", Device{TemperatureC: 95}, nil, nil},
		{"ecc", Device{ECCUncorrected: 3}, []string{"3 uncorrectable ECC"}, []string{ProblemECCUncorrected}},
		{"hot", Device{TemperatureC: 91, SlowdownC: 90}, []string{"91 °C at or above"}, []string{ProblemThermalSlowdown}},
		{"remap", Device{RemapFailed: true, RemapPending: true}, []string{"remapping failed", "remapping pending"},
			[]string{ProblemRemapFailed, ProblemRemapPending}},
		{"all", Device{ECCUncorrected: 1, RemapFailed: true, RemapPending: true, TemperatureC: 90, SlowdownC: 90},
			[]string{"1 uncorrectable", "failed", "pending", "90 °C"},
			[]string{ProblemECCUncorrected, ProblemRemapFailed, ProblemRemapPending, ProblemThermalSlowdown}},
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
			if k := d.ProblemKinds(); !slices.Equal(k, c.kinds) {
				t.Errorf("ProblemKinds() = %q, want %q", k, c.kinds)
			}
			if s := d.String(); d.Healthy() != strings.Contains(s, "healthy") || (!d.Healthy() && !strings.Contains(s, "UNHEALTHY")) {
				t.Errorf("String() = %q does not say the health", s)
			}
		})
	}
}

func TestAnswered(t *testing.T) {
	d := Device{Notes: []string{"utilization: Not Supported", "power: Not Supported"}}
	for _, c := range []struct {
		query string
		want  bool
	}{{QueryUtilization, false}, {QueryPower, false}, {QueryMemory, true}, {QueryTemperature, true}} {
		if got := d.Answered(c.query); got != c.want {
			t.Errorf("Answered(%q) = %v, want %v", c.query, got, c.want)
		}
	}
}

func TestVisible(t *testing.T) {
	devs := []Device{
		{Index: 0, UUID: "GPU-0b6e2a53-1111-2222-3333-444455556666"},
		{Index: 1, UUID: "GPU-7f00aa10-1111-2222-3333-444455556666"},
		{Index: 2, UUID: "GPU-7f11bb20-1111-2222-3333-444455556666"},
	}
	for _, c := range []struct {
		list string
		want []int
	}{
		{"", nil},
		{"1", []int{1}},
		{"2,0", []int{2, 0}},
		{" 0 , 1 ", []int{0, 1}},
		{"3,1", []int{1}},
		{"-1", nil},
		{"1,1", []int{1}},
		{"GPU-7f11bb20-1111-2222-3333-444455556666", []int{2}},
		{"GPU-7f00", []int{1}},
		{"0b6e2a53", []int{0}},
		{"GPU-7f", []int{1}}, // an ambiguous abbreviation takes the first match
		{"MIG-5c2f9d2e-1111", nil},
	} {
		var got []int
		for _, d := range Visible(devs, c.list) {
			got = append(got, d.Index)
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("Visible(%q) = %v, want %v", c.list, got, c.want)
		}
	}
}

// A Sampler reports ErrUnavailable where Discover does (no NVIDIA driver,
// a build without cgo); with a GPU it samples the devices Discover lists,
// until Close, after which Sample reports ErrClosed.
func TestSamplerWithoutOrWithGPU(t *testing.T) {
	s, err := Open()
	_, discoverErr := Discover()
	if err != nil {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Open error %v does not wrap ErrUnavailable", err)
		}
		if discoverErr == nil {
			t.Fatalf("Open reports %v, but Discover finds GPUs", err)
		}
		return
	}
	if discoverErr != nil {
		t.Fatalf("Open succeeded, but Discover reports %v", discoverErr)
	}
	for i := range 2 {
		r, err := s.Sample()
		if err != nil {
			t.Fatalf("sample %d: %v", i, err)
		}
		if len(r.Devices) == 0 || r.Devices[0].MemoryTotal == 0 {
			t.Fatalf("sample %d: %+v", i, r)
		}
		t.Log(r.Devices[0].String())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sample(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Sample after Close: %v, want ErrClosed", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
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
