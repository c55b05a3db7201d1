package train_test

import (
	"context"
	"log"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/train"
)

// A worker process of a dp×sp job: it joins the world communicator over
// gRPC, builds its rank's trainer on the CPU backend, resumes from the
// newest checkpoint if there is one and trains to the end. Every rank runs
// the same code with its own rank and the same spec, store and addresses.
func ExampleNewDistributed() {
	var (
		spec  *jobspec.Spec // parsed from the job's YAML; parallel.dp·sp = len(addrs)
		addrs []string      // every rank's host:port, in rank order
		rank  int           // this process's rank
		ds    *data.Dataset // the spec's data.path, opened (nil for data.mqar)
		store checkpoint.Store
	)
	ctx := context.Background()
	comm, err := grpcnet.New(ctx, collective.DefaultConfig(), rank, addrs)
	if err != nil {
		log.Fatal(err)
	}
	defer comm.Close()

	cfg, err := train.ConfigFromSpec(spec)
	if err != nil {
		log.Fatal(err)
	}
	m, err := ref.New[float32](cfg)
	if err != nil {
		log.Fatal(err)
	}
	// Rank 0's parameters are broadcast to the others by NewDistributed.
	if err := train.LoadInit(spec, cfg, m.Layout(), m.Params()); err != nil {
		log.Fatal(err)
	}
	opts := train.Options{Store: store, Prefix: "jobs/" + spec.Name}
	tr, err := train.NewDistributed(spec, m, ds, train.GridRank(comm, spec.Parallel.DP, spec.Parallel.SP), opts)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := tr.Resume(ctx); err != nil {
		log.Fatal(err)
	}
	if err := tr.Run(ctx); err != nil {
		log.Fatal(err)
	}
}
