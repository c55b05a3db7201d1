package grpcnet_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
)

// childEnv carries a child's orders (a JSON childSpec); its listener is
// file 3.
const childEnv = "GRPCNET_TEST_CHILD"

type childSpec struct {
	Rank    int           `json:"rank"`
	Addrs   []string      `json:"addrs"`
	Victim  int           `json:"victim"`
	Fault   string        `json:"fault"` // "kill" or "stall"
	Length  int           `json:"length"`
	Timeout time.Duration `json:"timeout"`
	// FaultAfter is how many bytes the victim receives before its fault.
	FaultAfter int64 `json:"fault_after"`
}

// childReport is what a child prints on stdout.
type childReport struct {
	Rank     int    `json:"rank"`
	FaultAt  int64  `json:"fault_at,omitempty"` // victim: unix nanos of its fault
	DoneAt   int64  `json:"done_at,omitempty"`  // survivors: unix nanos the all-reduce returned
	Err      string `json:"err,omitempty"`
	PeerRank int    `json:"peer_rank"`
	PeerAddr string `json:"peer_addr,omitempty"`
	Lost     bool   `json:"lost"`
	Timeout  bool   `json:"timeout"`
}

func runChild() int {
	var spec childSpec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	if err := child(spec); err != nil {
		fmt.Fprintf(os.Stderr, "child %d: %v\n", spec.Rank, err)
		return 1
	}
	return 0
}

func child(spec childSpec) error {
	lis, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		return err
	}
	cfg := collective.DefaultConfig()
	cfg.Timeout = spec.Timeout
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tr, err := grpcnet.Listen(cfg, spec.Rank, spec.Addrs, lis)
	if err != nil {
		return err
	}
	comm, err := collective.New(ctx, cfg, tr)
	if err != nil {
		return err
	}
	defer comm.Close()
	if err := comm.Barrier(ctx); err != nil {
		return err
	}
	out := json.NewEncoder(os.Stdout)
	buf := make([]float32, spec.Length)
	for i := range buf {
		buf[i] = float32(i % 5)
	}
	if spec.Rank == spec.Victim {
		go func() {
			for comm.Stats().BytesReceived < spec.FaultAfter {
				time.Sleep(100 * time.Microsecond)
			}
			_ = out.Encode(childReport{Rank: spec.Rank, FaultAt: time.Now().UnixNano()})
			sig := syscall.SIGKILL
			if spec.Fault == "stall" {
				sig = syscall.SIGSTOP
			}
			_ = syscall.Kill(os.Getpid(), sig)
		}()
	}
	err = comm.AllReduce(ctx, collective.Float32s(buf))
	rep := childReport{Rank: spec.Rank, DoneAt: time.Now().UnixNano(), PeerRank: -1}
	if err != nil {
		rep.Err = err.Error()
		var pe *collective.PeerError
		if errors.As(err, &pe) {
			rep.PeerRank, rep.PeerAddr = pe.Rank, pe.Addr
		}
		rep.Lost = errors.Is(err, collective.ErrPeerLost)
		rep.Timeout = errors.Is(err, collective.ErrPeerTimeout)
	}
	return out.Encode(rep)
}

// TestProcessFailures runs four ranks as processes, makes one of them die
// (SIGKILL) or freeze (SIGSTOP) in the middle of an all-reduce of 64 MiB,
// and checks that every other rank fails in time with an error that names
// it and its address.
func TestProcessFailures(t *testing.T) {
	const (
		n       = 4
		victim  = 2
		timeout = 2 * time.Second
	)
	cases := []struct {
		fault string
		// within bounds the time from the fault to each survivor's error.
		within time.Duration
		lost   bool
	}{
		// A dead process's connections break at once; the timeout is a
		// generous bound.
		{fault: "kill", within: timeout, lost: true},
		// A frozen one is suspected after 1.5s of silence and blamed after
		// the 0.5s settling period; the rest is slack for a loaded machine.
		{fault: "stall", within: timeout + 2*time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.fault, func(t *testing.T) {
			self, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			files := make([]*os.File, n)
			addrs := make([]string, n)
			for r := range n {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				addrs[r] = l.Addr().String()
				if files[r], err = l.(*net.TCPListener).File(); err != nil {
					t.Fatal(err)
				}
				_ = l.Close()
			}
			var (
				mu      sync.Mutex
				reports = map[int]childReport{}
				wg      sync.WaitGroup
				cmds    = make([]*exec.Cmd, n)
				exited  = make([]chan struct{}, n)
			)
			t.Cleanup(func() {
				for _, c := range cmds {
					if c != nil && c.Process != nil {
						_ = c.Process.Kill()
					}
				}
				wg.Wait()
			})
			for r := range n {
				spec, _ := json.Marshal(childSpec{Rank: r, Addrs: addrs, Victim: victim, Fault: tc.fault,
					Length: 16 << 20, Timeout: timeout, FaultAfter: 8 << 20})
				cmd := exec.Command(self, "-test.run=^$")
				cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
				cmd.ExtraFiles = []*os.File{files[r]}
				var stderr strings.Builder
				cmd.Stderr = &stderr
				stdout, err := cmd.StdoutPipe()
				if err != nil {
					t.Fatal(err)
				}
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				_ = files[r].Close()
				cmds[r] = cmd
				exited[r] = make(chan struct{})
				wg.Go(func() {
					defer close(exited[r])
					sc := bufio.NewScanner(stdout)
					for sc.Scan() {
						var rep childReport
						if json.Unmarshal(sc.Bytes(), &rep) == nil {
							mu.Lock()
							old := reports[rep.Rank]
							if rep.FaultAt == 0 {
								rep.FaultAt = old.FaultAt
							}
							reports[rep.Rank] = rep
							mu.Unlock()
						}
					}
					err := cmd.Wait()
					if r != victim && err != nil {
						t.Errorf("rank %d exited with %v; stderr:\n%s", r, err, stderr.String())
					}
				})
			}
			// Wait for the survivors; then the victim can go (a stopped one
			// needs the kill).
			deadline := time.After(90 * time.Second)
			for r := range n {
				if r == victim {
					continue
				}
				select {
				case <-exited[r]:
				case <-deadline:
					t.Fatalf("rank %d did not finish", r)
				}
			}
			_ = cmds[victim].Process.Kill()
			wg.Wait()

			mu.Lock()
			defer mu.Unlock()
			faultAt := reports[victim].FaultAt
			if faultAt == 0 {
				t.Fatalf("the victim never reached its fault: %+v", reports)
			}
			for r := range n {
				if r == victim {
					continue
				}
				rep, ok := reports[r]
				switch {
				case !ok:
					t.Errorf("rank %d reported nothing", r)
				case rep.Err == "":
					t.Errorf("rank %d: the all-reduce succeeded without rank %d", r, victim)
				case rep.PeerRank != victim || rep.PeerAddr != addrs[victim]:
					t.Errorf("rank %d: %s; want it to name rank %d at %s", r, rep.Err, victim, addrs[victim])
				case tc.lost && !rep.Lost, !tc.lost && !rep.Timeout:
					t.Errorf("rank %d: %s; want ErrPeerLost=%v, ErrPeerTimeout=%v", r, rep.Err, tc.lost, !tc.lost)
				default:
					took := time.Duration(rep.DoneAt - faultAt)
					t.Logf("rank %d failed %v after the fault: %s", r, took.Round(time.Millisecond), rep.Err)
					if took > tc.within {
						t.Errorf("rank %d failed %v after the fault, want within %v", r, took, tc.within)
					}
				}
			}
		})
	}
}
