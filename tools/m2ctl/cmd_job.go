package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/coordinator/cli"
)

// The "job" command group (submit, ls, status, watch, events, cancel,
// checkpoints) lives in coordinator/cli; this file only registers it.
func init() {
	for _, c := range cli.Commands() {
		passJobExitCodes(c)
		root.AddCommand(c)
	}
}

// passJobExitCodes makes the job commands' exit codes reach the process:
// a usage error becomes m2ctl's usage error (exit 2), and the job-specific
// codes (3 no such job, 4 job failed, 5 unavailable, 6 unauthenticated)
// exit after printing the error the way main does.
func passJobExitCodes(c *cobra.Command) {
	mapErr := func(err error) error {
		switch code := cli.CodeOf(err); {
		case code == cli.ExitUsage:
			return usageError{err}
		case code > cli.ExitUsage:
			fmt.Fprintln(os.Stderr, "m2ctl:", err)
			os.Exit(code)
		}
		return err
	}
	if args := c.Args; args != nil {
		c.Args = func(cmd *cobra.Command, a []string) error { return mapErr(args(cmd, a)) }
	}
	if run := c.RunE; run != nil {
		c.RunE = func(cmd *cobra.Command, a []string) error { return mapErr(run(cmd, a)) }
	}
	for _, sub := range c.Commands() {
		passJobExitCodes(sub)
	}
}
