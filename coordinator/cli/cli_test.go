package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/m2train/m2train/coordinator/coordtest"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

const demoSpec = `name: demo
model:
  config: {d_model: 64, n_layer: 2, vocab_size: 256, d_state: 16, headdim: 16}
data: {path: /data/tiny, seq_len: 128}
batch: {micro_batch: 4}
schedule: {total_steps: 1000}
backend: cpu
`

// run executes "job ARGS..." and returns stdout, stderr and the exit code.
func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := Commands()[0]
	var out, errb bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SetArgs(args)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.ExecuteContext(context.Background())
	if err != nil {
		errb.WriteString(err.Error())
	}
	return out.String(), errb.String(), CodeOf(err)
}

func TestCommands(t *testing.T) {
	c, err := coordtest.Start(coordtest.Options{Replicas: 1, Dir: t.TempDir(), Node: coordtest.FastNode})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Leader(ctx); err != nil {
		t.Fatal(err)
	}
	coord := "--coordinator=" + c.Addrs()[0]
	dir := t.TempDir()
	good := filepath.Join(dir, "demo.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte(demoSpec), 0o600)
	os.WriteFile(bad, []byte(strings.Replace(demoSpec, "seq_len: 128", "seq_len: 0", 1)), 0o600)

	out, _, code := run(t, "submit", good, coord)
	if code != ExitOK || strings.TrimSpace(out) != "demo-1" {
		t.Fatalf("submit: %q, code %d", out, code)
	}

	cases := []struct {
		name    string
		args    []string
		code    int
		inOut   string
		inError string
	}{
		{"ls", []string{"ls", coord}, ExitOK, "demo-1  queued", ""},
		{"ls json", []string{"ls", "-o", "json", coord}, ExitOK, `"id":"demo-1"`, ""},
		{"ls bad state", []string{"ls", "--state", "sleeping", coord}, ExitUsage, "", "--state"},
		{"status", []string{"status", "demo-1", coord}, ExitOK, "State:       queued", ""},
		{"status json", []string{"status", "demo-1", "--output=json", coord}, ExitOK, `"world_size":1`, ""},
		{"status unknown", []string{"status", "nope-1", coord}, ExitNotFound, "", "nope-1"},
		{"status without job", []string{"status", coord}, ExitUsage, "", "expects one job ID"},
		{"checkpoints", []string{"checkpoints", "demo-1", coord}, ExitOK, "STEP", ""},
		{"submit invalid spec", []string{"submit", bad, coord}, ExitUsage, "", "data.seq_len: must be at least 1"},
		{"submit missing file", []string{"submit", filepath.Join(dir, "none.yaml"), coord}, ExitUsage, "", "no such file"},
		{"bad output flag", []string{"ls", "-o", "xml", coord}, ExitUsage, "", "--output"},
		{"cancel", []string{"cancel", "demo-1", "--reason", "test", coord}, ExitOK, "demo-1 cancelled", ""},
		{"cancel again", []string{"cancel", "demo-1", coord}, ExitFailure, "", "already cancelled"},
		{"events", []string{"events", "demo-1", coord}, ExitOK, "cancelled: test", ""},
		{"watch cancelled job", []string{"watch", "demo-1", coord}, ExitJobFailed, "demo-1 cancelled", "cancelled"},
		{"watch json", []string{"watch", "demo-1", "-o", "json", coord}, ExitJobFailed, `"state":"JOB_STATE_CANCELLED"`, ""},
		{"unreachable", []string{"ls", "--coordinator=127.0.0.1:1", "--timeout=300ms"}, ExitUnavailable, "", "unavailable"},
		{"submit and watch", []string{"submit", good, "--watch", "--timeout=1s", "--coordinator=127.0.0.1:1"}, ExitUnavailable, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, code := run(t, tc.args...)
			if strings.Contains(tc.inOut, `":`) {
				// protojson varies its spacing on purpose: compare without it.
				out, tc.inOut = strings.Join(strings.Fields(out), ""), strings.Join(strings.Fields(tc.inOut), "")
			}
			if code != tc.code || !strings.Contains(out, tc.inOut) || !strings.Contains(errs, tc.inError) {
				t.Fatalf("exit %d (want %d)\nstdout: %s\nstderr: %s", code, tc.code, out, errs)
			}
		})
	}

	t.Run("ls json parses", func(t *testing.T) {
		out, _, _ := run(t, "ls", "-o", "json", coord)
		var v struct {
			Jobs []struct{ ID, State string }
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil || len(v.Jobs) != 1 || v.Jobs[0].State != "JOB_STATE_CANCELLED" {
			t.Fatalf("%v: %s", err, out)
		}
	})
}

func TestProgressLine(t *testing.T) {
	spec := "name: x\ndata: {path: /d, seq_len: 100}\nbatch: {micro_batch: 10}\n"
	now := timestamppb.Now()
	cases := []struct {
		name  string
		job   *pb.Job
		width int
		want  string
	}{
		{"no progress yet", &pb.Job{Id: "x-1", State: pb.JobState_JOB_STATE_QUEUED, Progress: &pb.Progress{TotalSteps: 100}}, 10,
			"x-1 queued gen 0 [..........] 0/100   0.0%"},
		{"running with ETA", &pb.Job{Id: "x-1", State: pb.JobState_JOB_STATE_RUNNING, Generation: 2, SpecYaml: spec,
			Progress: &pb.Progress{Step: 50, TotalSteps: 100, Loss: 2.5, TokensPerSec: 1000, UpdatedAt: now}}, 10,
			// 50 steps · 10·100 tokens / 1000 tok/s = 50 s
			"x-1 running gen 2 [#####.....] 50/100  50.0%  loss 2.5000  1.0k tok/s  ETA 50s"},
		{"finished, no bar", &pb.Job{Id: "x-1", State: pb.JobState_JOB_STATE_SUCCEEDED, Generation: 1, SpecYaml: spec,
			Progress: &pb.Progress{Step: 100, TotalSteps: 100, Loss: 1, TokensPerSec: 2.5e6, UpdatedAt: now}}, 0,
			"x-1 succeeded gen 1 100/100 100.0%  loss 1.0000  2.5M tok/s"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := progressLine(tc.job, tc.width); got != tc.want {
				t.Fatalf("got  %q\nwant %q", got, tc.want)
			}
		})
	}
}
