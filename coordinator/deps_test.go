package coordinator_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/m2train/m2train/"

// forbidden are the packages the control plane must never depend on: the
// model and its kernels, the collective, and the worker.
var forbidden = []string{"model", "kernels", "collective", "worker"}

func goCmd(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestNoForbiddenImports lists every package that a coordinator package or
// its tests import, directly or not, and fails on a forbidden one.
func TestNoForbiddenImports(t *testing.T) {
	out := goCmd(t, nil, "list", "-deps", "-test", "-f", "{{.ImportPath}}", "./...")
	pkgs := strings.Fields(out)
	if len(pkgs) < 10 {
		t.Fatalf("go list found only %d packages: %v", len(pkgs), pkgs)
	}
	for _, p := range pkgs {
		for _, f := range forbidden {
			if p == module+f || strings.HasPrefix(p, module+f+"/") {
				t.Errorf("coordinator depends on %s", p)
			}
		}
	}
}

// TestBuildsWithoutCgo builds every coordinator package with cgo disabled.
func TestBuildsWithoutCgo(t *testing.T) {
	goCmd(t, []string{"CGO_ENABLED=0"}, "build", "./...")
	out := goCmd(t, []string{"CGO_ENABLED=0"}, "list", "-deps", "-f", "{{if .CgoFiles}}{{.ImportPath}}{{end}}", "./...")
	if s := strings.TrimSpace(out); s != "" {
		t.Errorf("packages with cgo files in a CGO_ENABLED=0 build: %s", s)
	}
}
