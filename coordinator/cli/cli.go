// Package cli builds the "m2ctl job" commands: submit, ls, status, watch,
// events, cancel and checkpoints, talking to the coordinator through the
// leader-following client. It owns the commands' flags, output formats
// (text tables and --output json) and exit codes; m2ctl only registers the
// commands. It builds without cgo and imports no model code.
//
// Exit codes (ExitError carries them):
//
//	0  success (watch: the job succeeded)
//	1  the operation failed (internal error, unexpected answer)
//	2  bad usage or input: flags, a spec that does not validate
//	3  the job does not exist
//	4  watch: the job ended failed or cancelled
//	5  no coordinator reachable or no leader within --timeout
//	6  authentication failed (token or certificate)
package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/security"
)

// Exit codes of the job commands.
const (
	ExitOK              = 0
	ExitFailure         = 1
	ExitUsage           = 2
	ExitNotFound        = 3
	ExitJobFailed       = 4
	ExitUnavailable     = 5
	ExitUnauthenticated = 6
)

// ExitError is an error with the process exit code it calls for.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string { return e.Err.Error() }

// Unwrap returns the underlying error.
func (e *ExitError) Unwrap() error { return e.Err }

// ExitCode returns the exit code.
func (e *ExitError) ExitCode() int { return e.Code }

// CodeOf returns the exit code an error calls for: an ExitError's code, 0
// for nil, else 1.
func CodeOf(err error) int {
	if err == nil {
		return ExitOK
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	return ExitFailure
}

func usagef(format string, args ...any) error {
	return &ExitError{Code: ExitUsage, Err: fmt.Errorf(format, args...)}
}

// rpcError maps a call's error to an ExitError with a message for people.
func rpcError(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.DeadlineExceeded) {
			return &ExitError{Code: ExitUnavailable, Err: fmt.Errorf("no coordinator answered in time: %w", err)}
		}
		return &ExitError{Code: ExitFailure, Err: err}
	}
	msg := st.Message()
	switch st.Code() {
	case codes.InvalidArgument:
		return &ExitError{Code: ExitUsage, Err: errors.New(msg)}
	case codes.NotFound:
		return &ExitError{Code: ExitNotFound, Err: errors.New(msg)}
	case codes.Unavailable, codes.DeadlineExceeded:
		return &ExitError{Code: ExitUnavailable, Err: fmt.Errorf("coordinator unavailable: %s", msg)}
	case codes.Unauthenticated, codes.PermissionDenied:
		return &ExitError{Code: ExitUnauthenticated, Err: fmt.Errorf("not authenticated: %s (set --token or M2_TOKEN)", msg)}
	case codes.FailedPrecondition, codes.Aborted:
		return &ExitError{Code: ExitFailure, Err: errors.New(msg)}
	}
	return &ExitError{Code: ExitFailure, Err: fmt.Errorf("%s: %s", st.Code(), msg)}
}

// options are the flags shared by every job command.
type options struct {
	coordinators []string
	output       string
	timeout      time.Duration
	token        string
	tokenFile    string
	tlsFiles     security.Files
	tlsServer    string
}

// Environment variables read as flag defaults.
const (
	EnvCoordinator = "M2_COORDINATOR"
	EnvToken       = "M2_TOKEN"
)

func (o *options) register(cmd *cobra.Command) {
	f := cmd.PersistentFlags()
	var def []string
	if v := os.Getenv(EnvCoordinator); v != "" {
		def = splitList(v)
	} else {
		def = []string{"127.0.0.1:7400"}
	}
	f.StringSliceVar(&o.coordinators, "coordinator", def, "coordinator API addresses, any replica (comma-separated; env "+EnvCoordinator+")")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	f.DurationVar(&o.timeout, "timeout", 30*time.Second, "how long to keep trying to reach the coordinator leader")
	f.StringVar(&o.token, "token", "", "bearer token of the job API (default: env "+EnvToken+")")
	f.StringVar(&o.tokenFile, "token-file", "", "file holding the bearer token")
	f.StringVar(&o.tlsFiles.Cert, "tls-cert", "", "client certificate (PEM) for mutual TLS")
	f.StringVar(&o.tlsFiles.Key, "tls-key", "", "client key (PEM) for mutual TLS")
	f.StringVar(&o.tlsFiles.CA, "tls-ca", "", "CA certificate (PEM) that signs the coordinator's certificate")
	f.StringVar(&o.tlsServer, "tls-server-name", "", "expected server name in the coordinator's certificate (default: the dialed host)")
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func (o *options) validate() error {
	if o.output != "text" && o.output != "json" {
		return usagef("--output: %q, must be text or json", o.output)
	}
	if len(o.coordinators) == 0 {
		return usagef("--coordinator: at least one address is required")
	}
	if o.timeout <= 0 {
		return usagef("--timeout: must be positive, got %v", o.timeout)
	}
	return nil
}

func (o *options) client() (*client.Client, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	tokVal := o.token
	if tokVal == "" {
		tokVal = os.Getenv(EnvToken)
	}
	tok, err := security.ReadToken(tokVal, o.tokenFile)
	if err != nil {
		return nil, &ExitError{Code: ExitUsage, Err: err}
	}
	creds, err := o.tlsFiles.ClientCredentials(o.tlsServer)
	if err != nil {
		return nil, &ExitError{Code: ExitUsage, Err: err}
	}
	cl, err := client.New(client.Config{Addrs: splitList(strings.Join(o.coordinators, ",")), Creds: creds, Token: tok})
	if err != nil {
		return nil, &ExitError{Code: ExitUsage, Err: err}
	}
	return cl, nil
}

func (o *options) json() bool { return o.output == "json" }

// Commands returns the commands to add to m2ctl's root: the "job" group.
func Commands() []*cobra.Command {
	o := &options{}
	job := &cobra.Command{
		Use:   "job",
		Short: "Submit, inspect and cancel training jobs on a coordinator cluster",
		Long: `Talks to the coordinator's job API. Give any replica's address with
--coordinator (or M2_COORDINATOR); calls follow the raft leader.

Exit codes: 0 ok, 1 failure, 2 bad usage or invalid spec, 3 no such job,
4 the watched job failed or was cancelled, 5 no coordinator reachable,
6 authentication failed.`,
	}
	o.register(job)
	job.AddCommand(
		submitCmd(o), lsCmd(o), statusCmd(o), watchCmd(o), eventsCmd(o), cancelCmd(o), checkpointsCmd(o),
	)
	return []*cobra.Command{job}
}

// run gives a command a client and a context bounded by --timeout.
func (o *options) run(cmd *cobra.Command, fn func(ctx context.Context, cl *client.Client) error) error {
	cl, err := o.client()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
	defer cancel()
	return fn(ctx, cl)
}
