//go:build amd64 && !purego

package linalg

import (
	"os"
	"slices"
	"strings"
	"testing"
)

// TestKernelSelection checks the CPUID-based detection against the flags
// that the Linux kernel reports for the same CPU, and that the matching
// micro-kernels were installed.
func TestKernelSelection(t *testing.T) {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Skipf("no /proc/cpuinfo to compare with: %v", err)
	}
	var flags []string
	for line := range strings.Lines(string(info)) {
		if name, value, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "flags" {
			flags = strings.Fields(value)
			break
		}
	}
	if flags == nil {
		t.Fatal("/proc/cpuinfo has no flags line")
	}
	want := slices.Contains(flags, "avx2") && slices.Contains(flags, "fma")
	if got := hasAVX2FMA(); got != want {
		t.Fatalf("hasAVX2FMA() = %v, /proc/cpuinfo says avx2 and fma: %v", got, want)
	}
	wantNames := [2]string{"scalar-4x2", "scalar-4x2"}
	if want {
		wantNames = [2]string{"avx2-6x16", "avx2-6x8"}
	}
	if f32, f64 := KernelName(); f32 != wantNames[0] || f64 != wantNames[1] {
		t.Fatalf("KernelName() = %q, %q, want %q, %q", f32, f64, wantNames[0], wantNames[1])
	}
}
