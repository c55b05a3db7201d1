// Command m2ctl is the user's command line for the Mamba-2 training system:
// model numerics checks, single-process training, datasets, and the job API of
// the coordinator. Each command group lives in its own file and registers
// itself on the root command in an init function.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// Exit codes: 0 success, 1 a failure of the operation, 2 bad usage or input;
// the job commands add 3-6 (coordinator/cli).
const (
	exitFailure = 1
	exitUsage   = 2
)

// usageError marks an error caused by the user's input (flags, files, specs);
// m2ctl exits with exitUsage for it.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// exitCode maps an error to the process's exit status: an error that
// carries its own code (ExitCode() int, as the job commands' errors do)
// keeps it; a usage error, or any error raised before a command started,
// is exitUsage; anything else is exitFailure.
func exitCode(err error) int {
	var coded interface{ ExitCode() int }
	var ue usageError
	switch {
	case errors.As(err, &coded):
		return coded.ExitCode()
	case errors.As(err, &ue) || !commandStarted:
		return exitUsage
	}
	return exitFailure
}

// commandStarted is set once flags and arguments have been accepted and a
// command's own hooks begin to run; an error before that is a usage error.
var commandStarted bool

var root = &cobra.Command{
	Use:           "m2ctl",
	Short:         "Train Mamba-2 language models on one machine or a cluster",
	SilenceUsage:  true,
	SilenceErrors: true,
	PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
		// cobra checks required flags only after the persistent hooks;
		// checking them here makes a missing flag a usage error.
		if err := cmd.ValidateRequiredFlags(); err != nil {
			return usageError{err}
		}
		if err := cmd.ValidateFlagGroups(); err != nil {
			return usageError{err}
		}
		commandStarted = true
		return nil
	},
}

func init() {
	// Every command's persistent hooks run, the root's included, so that
	// commandStarted is reliable whatever hooks the command groups add.
	cobra.EnableTraverseRunHooks = true
}

func main() {
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "m2ctl:", err)
		os.Exit(exitCode(err))
	}
}
