// Package coordinator is the control plane of the training system. Its
// subpackages own, from the bottom up:
//
//   - jobspec: the YAML job spec, its defaults and validation (shared with
//     the worker; no raft, no model imports);
//   - scheduler: the pure gang scheduler;
//   - fsm: the raft-replicated state machine of jobs, workers and events;
//   - node: one replica's raft wiring (stores, snapshots, transport);
//   - membership: etcd worker leases and the per-generation rendezvous (a
//     library the worker uses too); etcdembed: an in-process etcd;
//   - server: the gRPC job and worker services and the leader's work;
//   - client, cli: the leader-following API client and the m2ctl job
//     commands; security: mutual TLS and bearer tokens;
//   - m2coord: the server binary; coordtest: in-process clusters for tests
//     and benchmarks.
//
// The coordinator never imports the model, kernels, collective or worker
// packages and builds with CGO_ENABLED=0; deps_test.go keeps it so.
package coordinator
