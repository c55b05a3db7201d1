// Command m2worker runs one training worker: it registers with the
// coordinator (any replica's address), keeps an etcd lease, trains the ranks
// the coordinator places on it on the CUDA backend (one GPU per process) or
// the CPU reference backend, reports progress every step, checkpoints
// through the checkpoint store, and resumes from the last committed
// checkpoint when its job gets a new generation. SIGTERM stops it
// gracefully: the step in flight is abandoned, a checkpoint upload in
// flight finishes, and the lease is released.
//
// Every flag has an environment variable (M2_ plus the flag name in upper
// case with '-' as '_'), read when the flag is not given; `m2worker -help`
// lists them.
package main

import (
	"os"

	"github.com/m2train/m2train/worker/checkpoint/s3gw"
	"github.com/m2train/m2train/worker/m2worker/app"
)

func main() {
	// Tests start an S3 gateway as a child of this binary.
	s3gw.RunIfChild()
	os.Exit(app.Main(os.Args[1:], os.Stderr))
}
