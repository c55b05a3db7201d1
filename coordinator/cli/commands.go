package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/jobspec"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

var jsonOut = protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true}

func printJSON(w io.Writer, m proto.Message) error {
	b, err := jsonOut.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

// readSpec reads a spec file ("-" is standard input) within the size limit.
func readSpec(path string, stdin io.Reader) ([]byte, error) {
	var r io.Reader
	if path == "-" {
		r = stdin
	} else {
		f, err := os.Open(path)
		if err != nil {
			return nil, usagef("spec: %v", err)
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, jobspec.MaxSpecBytes+1))
	if err != nil {
		return nil, usagef("spec %s: %v", path, err)
	}
	if len(b) > jobspec.MaxSpecBytes {
		return nil, usagef("spec %s: larger than the limit of %d bytes", path, jobspec.MaxSpecBytes)
	}
	return b, nil
}

func oneJobArg(cmd *cobra.Command, args []string) error {
	if len(args) != 1 || args[0] == "" {
		return usagef("%s: expects one job ID, got %d arguments", cmd.CommandPath(), len(args))
	}
	return nil
}

func submitCmd(o *options) *cobra.Command {
	var watch bool
	cmd := &cobra.Command{
		Use:   "submit FILE.yaml",
		Short: "Validate a job spec and submit it (FILE - reads standard input)",
		Long: `Validates the spec locally (every violation is listed with its field and
rule, see docs/jobspec.md), submits it, and prints the new job's ID.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("submit: expects one spec file, got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			doc, err := readSpec(args[0], cmd.InOrStdin())
			if err != nil {
				return err
			}
			if _, err := jobspec.Parse(doc); err != nil {
				return &ExitError{Code: ExitUsage, Err: fmt.Errorf("%s: %w", args[0], err)}
			}
			var job *pb.Job
			err = o.run(cmd, func(ctx context.Context, cl *client.Client) error {
				job, err = cl.Submit(ctx, doc)
				return rpcError(err)
			})
			if err != nil {
				return err
			}
			if !watch {
				if o.json() {
					return printJSON(cmd.OutOrStdout(), job)
				}
				fmt.Fprintln(cmd.OutOrStdout(), job.GetId())
				return nil
			}
			if !o.json() {
				fmt.Fprintf(cmd.ErrOrStderr(), "submitted %s\n", job.GetId())
			}
			return o.watch(cmd, job.GetId())
		},
	}
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "watch the job after submitting it")
	return cmd
}

func lsCmd(o *options) *cobra.Command {
	var states []string
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List jobs in submit order",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var filter []pb.JobState
			for _, s := range states {
				v, ok := pb.JobState_value["JOB_STATE_"+strings.ToUpper(s)]
				if !ok || v == 0 {
					return usagef("--state: %q, must be one of queued, running, succeeded, failed, cancelled", s)
				}
				filter = append(filter, pb.JobState(v))
			}
			return o.run(cmd, func(ctx context.Context, cl *client.Client) error {
				jobs, err := cl.List(ctx, filter...)
				if err != nil {
					return rpcError(err)
				}
				if o.json() {
					return printJSON(cmd.OutOrStdout(), &pb.ListJobsResponse{Jobs: jobs})
				}
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tSTATE\tGEN\tRANKS\tSTEP\tLOSS\tAGE")
				for _, j := range jobs {
					p := j.GetProgress()
					loss := "-"
					if p.GetUpdatedAt() != nil {
						loss = fmt.Sprintf("%.4f", p.GetLoss())
					}
					fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d/%d\t%s\t%s\n", j.GetId(), stateName(j.GetState()), j.GetGeneration(),
						j.GetWorldSize(), p.GetStep(), p.GetTotalSteps(), loss, age(j.GetSubmittedAt()))
				}
				return tw.Flush()
			})
		},
	}
	cmd.Flags().StringSliceVar(&states, "state", nil, "only jobs in these states (queued, running, succeeded, failed, cancelled)")
	return cmd
}

func stateName(s pb.JobState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "JOB_STATE_"))
}

func age(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return shortDuration(time.Since(t.AsTime()))
}

func shortDuration(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func statusCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "status JOB",
		Short: "Show a job: state, generation, progress, checkpoint, placement",
		Args:  oneJobArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.run(cmd, func(ctx context.Context, cl *client.Client) error {
				j, err := cl.Get(ctx, args[0])
				if err != nil {
					return rpcError(err)
				}
				if o.json() {
					return printJSON(cmd.OutOrStdout(), j)
				}
				printStatus(cmd.OutOrStdout(), j)
				return nil
			})
		},
	}
}

func printStatus(w io.Writer, j *pb.Job) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Job:\t%s\n", j.GetId())
	fmt.Fprintf(tw, "State:\t%s\n", stateName(j.GetState()))
	if j.GetMessage() != "" {
		fmt.Fprintf(tw, "Message:\t%s\n", j.GetMessage())
	}
	fmt.Fprintf(tw, "Generation:\t%d (restarts %d)\n", j.GetGeneration(), j.GetRestarts())
	fmt.Fprintf(tw, "Ranks:\t%d\n", j.GetWorldSize())
	fmt.Fprintf(tw, "Submitted:\t%s\n", when(j.GetSubmittedAt()))
	fmt.Fprintf(tw, "Started:\t%s\n", when(j.GetStartedAt()))
	fmt.Fprintf(tw, "Finished:\t%s\n", when(j.GetFinishedAt()))
	fmt.Fprintf(tw, "Progress:\t%s\n", progressLine(j, 0))
	if ck := j.GetLastCheckpoint(); ck != nil {
		fmt.Fprintf(tw, "Checkpoint:\tstep %d at %s\n", ck.GetStep(), ck.GetLocation())
	} else {
		fmt.Fprintf(tw, "Checkpoint:\tnone\n")
	}
	for _, a := range j.GetAssignments() {
		fmt.Fprintf(tw, "Rank %d:\tdp %d sp %d on %s gpu %d %s\n", a.GetRank(), a.GetDpRank(), a.GetSpRank(), a.GetWorkerId(), a.GetGpu(), a.GetWorkerAddr())
	}
	tw.Flush()
}

func when(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().Local().Format(time.RFC3339) + " (" + age(t) + " ago)"
}

func eventsCmd(o *options) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "events JOB",
		Short: "Show a job's event history (scheduling, restarts, checkpoints, failures)",
		Args:  oneJobArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit < 0 {
				return usagef("--limit: must not be negative, got %d", limit)
			}
			return o.run(cmd, func(ctx context.Context, cl *client.Client) error {
				evs, err := cl.Events(ctx, args[0], 0, limit)
				if err != nil {
					return rpcError(err)
				}
				if o.json() {
					return printJSON(cmd.OutOrStdout(), &pb.ListEventsResponse{Events: evs})
				}
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "TIME\tTYPE\tWORKER\tMESSAGE")
				for _, e := range evs {
					worker := e.GetWorkerId()
					if worker == "" {
						worker = "-"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.GetTime().AsTime().Local().Format("2006-01-02 15:04:05"), e.GetType(), worker, e.GetMessage())
				}
				return tw.Flush()
			})
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 0, "show only the newest N events (0: up to the server's maximum)")
	return cmd
}

func cancelCmd(o *options) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "cancel JOB",
		Short: "Cancel a queued or running job",
		Args:  oneJobArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.run(cmd, func(ctx context.Context, cl *client.Client) error {
				j, err := cl.Cancel(ctx, args[0], reason)
				if err != nil {
					return rpcError(err)
				}
				if o.json() {
					return printJSON(cmd.OutOrStdout(), j)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s %s\n", j.GetId(), stateName(j.GetState()))
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded in the job's events")
	return cmd
}

func checkpointsCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "checkpoints JOB",
		Short: "List a job's committed checkpoints, oldest first",
		Args:  oneJobArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.run(cmd, func(ctx context.Context, cl *client.Client) error {
				cks, err := cl.Checkpoints(ctx, args[0])
				if err != nil {
					return rpcError(err)
				}
				if o.json() {
					return printJSON(cmd.OutOrStdout(), &pb.ListCheckpointsResponse{Checkpoints: cks})
				}
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "STEP\tGEN\tCOMMITTED\tLOCATION")
				for _, c := range cks {
					fmt.Fprintf(tw, "%d\t%d\t%s\t%s\n", c.GetStep(), c.GetGeneration(), c.GetCommittedAt().AsTime().Local().Format("2006-01-02 15:04:05"), c.GetLocation())
				}
				return tw.Flush()
			})
		},
	}
}

func watchCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "watch JOB",
		Short: "Follow a job's progress (step, loss, tokens/s, ETA) until it ends",
		Long: `Shows a live progress bar on a terminal and one line per update otherwise;
--output json prints each update as one JSON object per line. Ends when the
job ends: exit code 0 when it succeeded, 4 when it failed or was cancelled.
Follows the leader across coordinator failovers.`,
		Args: oneJobArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.watch(cmd, args[0])
		},
	}
}

// watch follows a job until it ends. It is not bounded by --timeout, which
// applies to reaching a leader only.
func (o *options) watch(cmd *cobra.Command, id string) error {
	cl, err := o.client()
	if err != nil {
		return err
	}
	defer cl.Close()
	// The first answer must come within --timeout; after that the watch
	// runs until the job ends.
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	first := time.AfterFunc(o.timeout, cancel)
	out := cmd.OutOrStdout()
	bar := newProgressBar(out, isTerminal(out))
	compact := protojson.MarshalOptions{UseProtoNames: true}
	final, err := cl.Watch(ctx, id, func(j *pb.Job) error {
		first.Stop()
		if o.json() {
			b, err := compact.Marshal(j)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(out, string(b))
			return err
		}
		bar.update(j)
		return nil
	})
	if !o.json() {
		bar.finish()
	}
	if err != nil {
		if errors.Is(err, context.Canceled) && cmd.Context().Err() == nil {
			return &ExitError{Code: ExitUnavailable, Err: fmt.Errorf("no coordinator leader answered within %v", o.timeout)}
		}
		return rpcError(err)
	}
	if final.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		return &ExitError{Code: ExitJobFailed, Err: fmt.Errorf("job %s %s: %s", final.GetId(), stateName(final.GetState()), final.GetMessage())}
	}
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
