// Package membership owns the etcd side of the cluster: worker liveness and
// the per-generation rendezvous of a job's ranks.
//
// A worker calls Register: it grants a lease, keeps it alive, and puts its
// record under the lease at <prefix>workers/<id>. When the worker dies its
// lease expires, etcd deletes the record, and the coordinator leader, which
// lists and watches the prefix (ListWorkers, WatchWorkers), marks the worker
// lost. For each generation of a job the ranks meet at
// <prefix>rendezvous/<job>/<generation>/<rank> (Session.Rendezvous): each
// publishes its collective address under its lease and waits for all ranks.
//
// The package imports only the etcd client; workers use it as a library.
package membership

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// DefaultPrefix is the etcd key prefix of the system.
const DefaultPrefix = "/m2train/"

// DefaultTTL is the default worker lease TTL in seconds.
const DefaultTTL = 10

// Sentinel errors of the package.
var (
	// ErrInvalid marks a bad argument; the message names it.
	ErrInvalid = errors.New("membership: invalid argument")
	// ErrLeaseLost is returned when the session's lease expired or was
	// revoked.
	ErrLeaseLost = errors.New("membership: lease lost")
	// ErrRendezvous marks a rendezvous that cannot complete.
	ErrRendezvous = errors.New("membership: rendezvous failed")
)

// WorkerInfo is the record a worker publishes under its lease.
type WorkerInfo struct {
	ID       string `json:"id"`
	Addr     string `json:"addr,omitempty"`
	Hostname string `json:"hostname,omitempty"`
	// GPUs is the GPU count; 0 means a CPU worker with one slot.
	GPUs int `json:"gpus"`
}

func (w WorkerInfo) validate() error {
	if w.ID == "" || strings.ContainsAny(w.ID, "/\x00") || len(w.ID) > 128 {
		return fmt.Errorf("%w: worker ID %q must be 1-128 bytes without '/'", ErrInvalid, w.ID)
	}
	if w.GPUs < 0 || w.GPUs > 64 {
		return fmt.Errorf("%w: gpus must be in [0, 64], got %d", ErrInvalid, w.GPUs)
	}
	return nil
}

// Options tunes Register. Zero values take the defaults.
type Options struct {
	// TTL is the lease TTL in seconds (DefaultTTL when 0). etcd rounds it up
	// to its minimum (a few seconds).
	TTL int
	// Prefix is the key prefix (DefaultPrefix when empty); it ends in '/'.
	Prefix string
}

func (o Options) prefix() string { return NormalizePrefix(o.Prefix) }

// NormalizePrefix returns DefaultPrefix for "" and adds a trailing '/'.
func NormalizePrefix(p string) string {
	if p == "" {
		return DefaultPrefix
	}
	if !strings.HasSuffix(p, "/") {
		return p + "/"
	}
	return p
}

// WorkerKey is the key of a worker's record.
func WorkerKey(prefix, id string) string { return prefix + "workers/" + id }

func workersDir(prefix string) string { return prefix + "workers/" }

// RendezvousDir is the key directory of one generation of a job.
func RendezvousDir(prefix, job string, gen uint64) string {
	return fmt.Sprintf("%srendezvous/%s/%020d/", prefix, job, gen)
}

func rendezvousJobDir(prefix, job string) string { return prefix + "rendezvous/" + job + "/" }

// Session is a registered worker: its lease is kept alive until Close, until
// the client closes, or until etcd cannot be reached for a TTL.
type Session struct {
	cli    *clientv3.Client
	sess   *concurrency.Session
	info   WorkerInfo
	prefix string
	cancel context.CancelFunc
}

// Register grants a lease, starts its keep-alive and publishes the worker's
// record under it. ctx bounds the registration only; the keep-alive runs
// until Close.
func Register(ctx context.Context, cli *clientv3.Client, info WorkerInfo, opts Options) (*Session, error) {
	if err := info.validate(); err != nil {
		return nil, err
	}
	ttl := opts.TTL
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < 1 {
		return nil, fmt.Errorf("%w: TTL must be at least 1 second, got %d", ErrInvalid, ttl)
	}
	grant, err := cli.Grant(ctx, int64(ttl))
	if err != nil {
		return nil, fmt.Errorf("membership: grant lease: %w", err)
	}
	kctx, cancel := context.WithCancel(context.Background())
	sess, err := concurrency.NewSession(cli, concurrency.WithLease(grant.ID), concurrency.WithContext(kctx))
	if err != nil {
		cancel()
		return nil, fmt.Errorf("membership: keep lease alive: %w", err)
	}
	s := &Session{cli: cli, sess: sess, info: info, prefix: opts.prefix(), cancel: cancel}
	val, _ := json.Marshal(info)
	if _, err := cli.Put(ctx, WorkerKey(s.prefix, info.ID), string(val), clientv3.WithLease(grant.ID)); err != nil {
		s.Close()
		return nil, fmt.Errorf("membership: publish worker %s: %w", info.ID, err)
	}
	return s, nil
}

// Lease is the session's lease ID.
func (s *Session) Lease() clientv3.LeaseID { return s.sess.Lease() }

// Done is closed when the lease is lost or the session closed.
func (s *Session) Done() <-chan struct{} { return s.sess.Done() }

// Close revokes the lease, which deletes the worker's record and its
// rendezvous keys at once (a graceful leave), and stops the keep-alive.
func (s *Session) Close() error {
	err := s.sess.Close()
	s.cancel()
	if err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("membership: revoke lease: %w", err)
	}
	return nil
}

// Rendezvous publishes addr as rank's address for generation gen of job and
// waits until all world ranks have published theirs, then returns the
// addresses indexed by rank. Keys live under the session's lease, so a dead
// rank's address disappears with it. When ctx ends first, the error names
// the ranks still missing.
func (s *Session) Rendezvous(ctx context.Context, job string, gen uint64, rank, world int, addr string) ([]string, error) {
	switch {
	case job == "" || strings.ContainsAny(job, "/\x00"):
		return nil, fmt.Errorf("%w: job %q must be non-empty without '/'", ErrInvalid, job)
	case world < 1 || world > 1<<16:
		return nil, fmt.Errorf("%w: world must be in [1, 65536], got %d", ErrInvalid, world)
	case rank < 0 || rank >= world:
		return nil, fmt.Errorf("%w: rank must be in [0, %d), got %d", ErrInvalid, world, rank)
	case addr == "":
		return nil, fmt.Errorf("%w: addr is required", ErrInvalid)
	}
	dir := RendezvousDir(s.prefix, job, gen)
	if _, err := s.cli.Put(ctx, dir+strconv.Itoa(rank), addr, clientv3.WithLease(s.Lease())); err != nil {
		return nil, fmt.Errorf("membership: publish rank %d of %s/%d: %w", rank, job, gen, err)
	}
	addrs := make(map[int]string, world)
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	resp, err := s.cli.Get(wctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("membership: read rendezvous %s/%d: %w", job, gen, err)
	}
	for _, kv := range resp.Kvs {
		if err := record(addrs, dir, string(kv.Key), string(kv.Value), world); err != nil {
			return nil, err
		}
	}
	wch := s.cli.Watch(wctx, dir, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	for len(addrs) < world {
		select {
		case <-s.Done():
			return nil, fmt.Errorf("%w: rendezvous %s/%d", ErrLeaseLost, job, gen)
		case wr, ok := <-wch:
			if !ok || wr.Err() != nil {
				if ctx.Err() != nil {
					return nil, fmt.Errorf("%w: %s generation %d: waiting for ranks %v: %w", ErrRendezvous, job, gen, missing(addrs, world), ctx.Err())
				}
				return nil, fmt.Errorf("%w: %s generation %d: watch ended: %v", ErrRendezvous, job, gen, wr.Err())
			}
			for _, ev := range wr.Events {
				key := string(ev.Kv.Key)
				if ev.Type == clientv3.EventTypeDelete {
					if r, err := rankOf(dir, key, world); err == nil {
						delete(addrs, r)
					}
					continue
				}
				if err := record(addrs, dir, key, string(ev.Kv.Value), world); err != nil {
					return nil, err
				}
			}
		}
	}
	out := make([]string, world)
	for r, a := range addrs {
		out[r] = a
	}
	return out, nil
}

func rankOf(dir, key string, world int) (int, error) {
	r, err := strconv.Atoi(strings.TrimPrefix(key, dir))
	if err != nil || r < 0 || r >= world {
		return 0, fmt.Errorf("%w: key %q is not a rank of a world of %d (ranks disagree on the world size)", ErrRendezvous, key, world)
	}
	return r, nil
}

func record(addrs map[int]string, dir, key, val string, world int) error {
	r, err := rankOf(dir, key, world)
	if err != nil {
		return err
	}
	addrs[r] = val
	return nil
}

func missing(addrs map[int]string, world int) []int {
	var out []int
	for r := range world {
		if _, ok := addrs[r]; !ok {
			out = append(out, r)
		}
	}
	return out
}

// Member is a worker record seen in etcd with the lease that holds it.
type Member struct {
	Info  WorkerInfo
	Lease int64
}

// ListWorkers returns the registered workers sorted by ID and the etcd
// revision of the read, from which WatchWorkers continues.
func ListWorkers(ctx context.Context, cli *clientv3.Client, prefix string) ([]Member, int64, error) {
	prefix = NormalizePrefix(prefix)
	resp, err := cli.Get(ctx, workersDir(prefix), clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("membership: list workers: %w", err)
	}
	var out []Member
	for _, kv := range resp.Kvs {
		if m, ok := decodeMember(prefix, kv.Key, kv.Value, kv.Lease); ok {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Info.ID, b.Info.ID) })
	return out, resp.Header.Revision, nil
}

func decodeMember(prefix string, key, val []byte, lease int64) (Member, bool) {
	var info WorkerInfo
	if json.Unmarshal(val, &info) != nil || info.validate() != nil {
		return Member{}, false
	}
	if WorkerKey(prefix, info.ID) != string(key) {
		return Member{}, false
	}
	return Member{Info: info, Lease: lease}, true
}

// WorkerEvent is a change of the registered workers: Up with the new record,
// or Down with the ID and the lease of the record that disappeared.
type WorkerEvent struct {
	Up     bool
	Member Member
}

// ErrCompacted is returned by WatchWorkers when the start revision was
// compacted away; list again and watch from the new revision.
var ErrCompacted = errors.New("membership: watch revision compacted")

// WatchWorkers reports worker changes after revision rev to fn, in order,
// until ctx ends (nil is returned then) or the watch fails. Records that do
// not decode are skipped.
func WatchWorkers(ctx context.Context, cli *clientv3.Client, prefix string, rev int64, fn func(WorkerEvent)) error {
	prefix = NormalizePrefix(prefix)
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	dir := workersDir(prefix)
	for wr := range cli.Watch(wctx, dir, clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithPrevKV()) {
		if wr.CompactRevision != 0 {
			return ErrCompacted
		}
		if err := wr.Err(); err != nil {
			return fmt.Errorf("membership: watch workers: %w", err)
		}
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypePut {
				if m, ok := decodeMember(prefix, ev.Kv.Key, ev.Kv.Value, ev.Kv.Lease); ok {
					fn(WorkerEvent{Up: true, Member: m})
				}
				continue
			}
			id := strings.TrimPrefix(string(ev.Kv.Key), dir)
			m := Member{Info: WorkerInfo{ID: id}}
			if ev.PrevKv != nil {
				m.Lease = ev.PrevKv.Lease
			}
			fn(WorkerEvent{Up: false, Member: m})
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("membership: watch workers closed")
}

// DeleteRendezvous removes the rendezvous keys of job's generations before
// gen (all generations when gen is 0).
func DeleteRendezvous(ctx context.Context, cli *clientv3.Client, prefix, job string, gen uint64) error {
	prefix = NormalizePrefix(prefix)
	from := rendezvousJobDir(prefix, job)
	var err error
	if gen == 0 {
		_, err = cli.Delete(ctx, from, clientv3.WithPrefix())
	} else {
		_, err = cli.Delete(ctx, from, clientv3.WithRange(RendezvousDir(prefix, job, gen)))
	}
	if err != nil {
		return fmt.Errorf("membership: delete rendezvous of %s: %w", job, err)
	}
	return nil
}
