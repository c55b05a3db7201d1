// Package agent owns the life cycle of a worker process: it registers the
// worker with the coordinator, keeps its etcd lease alive, polls for the
// ranks the coordinator places on it, and runs each rank of each job
// generation:
//
//  1. it listens on the rank's collective address, publishes it in the
//     generation's rendezvous (coordinator/membership) and waits for every
//     rank of the generation;
//  2. it builds the world communicator over collective/grpcnet (optionally
//     mutual TLS) and its data- and sequence-parallel sub-groups (Grid);
//  3. it hands the rank to a Runner, which trains it (TrainRunner: the
//     model, its data, the checkpoint store, the trainer) while the agent
//     reports progress after every step, commits checkpoints through the
//     coordinator, and reports the end of the job or the rank's failure.
//
// A rank stops when the coordinator withdraws its assignment (a new
// generation, a cancelled job), when a progress report is answered with
// stop, when a peer fails (the collective names it and the rank reports the
// failure, which ends the generation), when the lease is lost, or when the
// worker shuts down. The next generation starts from the checkpoint the
// coordinator committed last. A graceful shutdown (Run's context ends)
// revokes the lease, which the coordinator's leader sees at once (it ends
// the generations of the worker's jobs and places them elsewhere), then
// abandons the step in flight.
//
// The package knows nothing of flags or signals: worker/m2worker and
// `m2ctl up` configure it. It never imports the coordinator's server side,
// only its client, membership and jobspec packages.
package agent
