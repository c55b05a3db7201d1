// Package dist owns the communication of one rank of a data- and
// sequence-parallel training job (docs/DESIGN.md §3): the model.Boundary
// that passes SSM states and conv halos between the ranks of a
// sequence-parallel group (the sequential pipeline and the parallel prefix
// of MAMBA2_SPEC.md §5), the gradient all-reduce in buckets that overlaps
// the backward pass, and the ZeRO-1 helpers that shard the optimizer state
// over the ranks.
//
// Everything here runs over a collective.Communicator and knows nothing of
// the training loop, the data or checkpoints: worker/train composes these
// pieces into a step. The package must not change what a backend computes
// for one rank; it only moves values between ranks.
//
// Determinism: every collective operation reduces in a fixed order, so all
// ranks hold identical bits after each reduction, and a run is bitwise
// reproducible for a fixed world size.
package dist
