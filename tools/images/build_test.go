package images

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// runBuild runs build.sh with args and extra environment and returns its
// stdout, stderr and exit code.
func runBuild(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("bash", append([]string{"build.sh"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

// fakeDocker writes a docker client stand-in that logs each call (with
// DOCKER_BUILDKIT) to a file; info fails when daemon is false, and buildx
// is not installed.
func fakeDocker(t *testing.T, daemon bool) (bin, log string) {
	t.Helper()
	dir := t.TempDir()
	log = filepath.Join(dir, "calls")
	info := `echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1`
	if daemon {
		info = `echo 28.2.2`
	}
	script := `#!/usr/bin/env bash
case "$1" in
info) ` + info + ` ;;
buildx) echo "docker: unknown command: docker buildx" >&2; exit 1 ;;
*) echo "BUILDKIT=${DOCKER_BUILDKIT:-} $*" >>"` + log + `" ;;
esac
`
	bin = filepath.Join(dir, "docker")
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, log
}

func TestBuildScriptDryRun(t *testing.T) {
	out, errOut, code := runBuild(t, nil, "--dry-run", "--tag", "1.2.3", "--registry", "registry.example.com/team/", "--push")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 6 {
		t.Fatalf("want 6 commands (build, push and inspect of each image), got:\n%s", out)
	}
	root, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []struct{ file, ref string }{
		{"coordinator.Dockerfile", "registry.example.com/team/m2coord:1.2.3"},
		{"worker.Dockerfile", "registry.example.com/team/m2worker:1.2.3"},
	} {
		build, push, inspect := strings.Fields(lines[3*i]), strings.Fields(lines[3*i+1]), strings.TrimSpace(lines[3*i+2])
		dockerfile := filepath.Join(root, "tools", "images", want.file)
		if _, err := os.Stat(dockerfile); err != nil {
			t.Fatal(err)
		}
		for _, w := range []string{"build", "-f", dockerfile, "-t", want.ref, "VERSION=1.2.3"} {
			if !slices.Contains(build, w) {
				t.Errorf("build command lacks %q: %s", w, lines[3*i])
			}
		}
		if build[len(build)-1] != root {
			t.Errorf("build context %s, want the repository root %s", build[len(build)-1], root)
		}
		if strings.Join(push, " ") != "docker push "+want.ref {
			t.Errorf("push command = %q", lines[3*i+1])
		}
		if !strings.HasPrefix(inspect, "docker image inspect ") || !strings.HasSuffix(inspect, " "+want.ref) {
			t.Errorf("inspect command = %q", inspect)
		}
	}
}

// TestBuildScriptWithoutDaemon: no daemon is a clear error, before any build.
func TestBuildScriptWithoutDaemon(t *testing.T) {
	bin, log := fakeDocker(t, false)
	_, errOut, code := runBuild(t, []string{"DOCKER=" + bin}, "--tag", "t1")
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if !strings.Contains(errOut, "no Docker daemon reachable") || !strings.Contains(errOut, "Cannot connect to the Docker daemon") {
		t.Errorf("stderr does not say the daemon is unreachable, and why:\n%s", errOut)
	}
	if _, err := os.Stat(log); err == nil {
		calls, _ := os.ReadFile(log)
		t.Errorf("docker was called beyond info: %s", calls)
	}
}

// TestBuildScriptBuildsWithBuildKit: with a daemon and no buildx, each image
// is built by docker build with BuildKit on, then pushed.
func TestBuildScriptBuildsWithBuildKit(t *testing.T) {
	bin, log := fakeDocker(t, true)
	_, errOut, code := runBuild(t, []string{"DOCKER=" + bin, "M2K_JOBS=3"}, "--tag", "t2", "--registry", "r.example", "--push", "--platform", "linux/amd64")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	calls := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(calls) != 6 {
		t.Fatalf("calls:\n%s", data)
	}
	for i, ref := range []string{"r.example/m2coord:t2", "r.example/m2worker:t2"} {
		b, p := calls[3*i], calls[3*i+1]
		if !strings.HasPrefix(b, "BUILDKIT=1 build ") || !strings.Contains(b, "-t "+ref) || !strings.Contains(b, "--platform linux/amd64") {
			t.Errorf("build call = %q", b)
		}
		if p != "BUILDKIT=1 push "+ref {
			t.Errorf("push call = %q", p)
		}
	}
	if strings.Contains(calls[0], "M2K_JOBS") || !strings.Contains(calls[3], "M2K_JOBS=3") {
		t.Errorf("M2K_JOBS should reach the worker build only: %q, %q", calls[0], calls[3])
	}
}

func TestBuildScriptBadUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--only", "scheduler"},
		{"--tag", "has space"},
		{"--tag", "-leading-dash"},
		{"--registry"},
		{"--frobnicate"},
	} {
		_, errOut, code := runBuild(t, nil, append([]string{"--dry-run"}, args...)...)
		if code != 2 || !strings.HasPrefix(errOut, "build.sh: ") {
			t.Errorf("%q: exit %d, stderr %q; want 2 and a build.sh: message", args, code, errOut)
		}
	}
}
