// Package collective owns the communication between the ranks of a training
// job: ring all-reduce (reduce-scatter then all-gather), reduce-scatter,
// all-gather, broadcast, barrier and point-to-point send and receive, on
// float32, float64 and bfloat16 buffers, for groups of 1 to 64 ranks and their
// data- and sequence-parallel sub-groups.
//
// A Communicator runs the algorithms over a Transport. This package holds the
// in-memory transport used by tests (MemNetwork); the gRPC transport lives in
// collective/grpcnet.
//
// # Failure semantics
//
// No operation hangs. Every operation honours its context, and a rank that
// dies, disconnects, closes or stops making progress for longer than
// Config.Timeout makes the pending operations of every rank fail with a
// *PeerError that names it. Ranks agree on the culprit: a rank that suspects a
// peer broadcasts a report, and after a short settling period every rank picks
// the same one: among the blamed ranks that reported nobody themselves (a
// rank waiting on a silent predecessor is a victim, not the cause), the one
// that went silent first. A failure is sticky: once a
// communicator has failed, every later operation on it and on its sub-groups
// fails with the same error, and the job builds a new communicator with the
// next generation number (on the same addresses if it likes).
//
// # Ordering and determinism
//
// Collective operations on one communicator must be issued in the same order
// on every rank of its group (Async forms are issued when called). Sums are
// computed in a fixed order: for segment c of the buffer the chain starts at
// group rank c+1 and adds the contributions of the following ranks around the
// ring, each rank computing received + local; the finished segment is then
// copied to every rank, so all ranks hold bit-identical results. bfloat16
// partial sums travel as float32 and are rounded to bfloat16 once, by the
// segment's owner.
//
// The package assumes a little-endian host (amd64, arm64): buffers go on the
// wire as their in-memory bytes.
package collective
