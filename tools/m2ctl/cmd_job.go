package main

import "github.com/m2train/m2train/coordinator/cli"

// The "job" command group (submit, ls, status, watch, events, cancel,
// checkpoints) lives in coordinator/cli, CGO-free like the rest of the
// coordinator; its errors carry their exit codes (3 no such job, 4 job
// failed, 5 unavailable, 6 unauthenticated), which main passes through.
func init() { root.AddCommand(cli.Commands()...) }
