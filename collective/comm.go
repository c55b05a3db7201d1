package collective

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"sync"
	"unsafe"
)

// worldGroup is the group id of the world communicator.
const worldGroup uint64 = 1

// p2pBit marks the op ids of point-to-point messages, which are counted per
// pair of ranks rather than per group.
const p2pBit uint64 = 1 << 63

// Communicator runs collective and point-to-point operations among the ranks
// of a group: the world, or a sub-group made by Split or Grid. Its methods
// are safe for concurrent use, but collective operations must be issued in
// the same order on every rank of the group.
type Communicator struct {
	w       *world
	group   uint64
	members []int // world ranks, in group-rank order
	rank    int   // group rank of this process
	isWorld bool

	ctx    context.Context // ends when the communicator or its world ends
	cancel context.CancelCauseFunc

	mu      sync.Mutex
	nextOp  uint64
	splits  uint64
	sendSeq map[int]uint64 // next p2p op id to each group peer
	recvSeq map[int]uint64 // next p2p op id from each group peer
	closed  bool
}

// Stats counts the payload bytes an endpoint moved.
type Stats struct {
	BytesSent     int64
	BytesReceived int64
}

var littleEndian = func() bool {
	x := uint16(1)
	return *(*byte)(unsafe.Pointer(&x)) == 1
}()

// New builds the world communicator over t: it starts the transport, which
// waits (until ctx ends) for every peer to be reachable with the same
// generation, and starts the heartbeats. Close releases it and t.
func New(ctx context.Context, cfg Config, t Transport) (*Communicator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if !littleEndian {
		return nil, fmt.Errorf("%w: big-endian hosts are not supported", ErrInvalid)
	}
	if t.Size() < 1 || t.Size() > 64 || t.Rank() < 0 || t.Rank() >= t.Size() {
		return nil, invalidf("world of %d ranks with rank %d; the size must be 1 to 64", t.Size(), t.Rank())
	}
	w := newWorld(cfg, t)
	if err := t.Start(ctx, cfg.Generation, w); err != nil {
		_ = t.Close()
		return nil, err
	}
	w.start()
	members := make([]int, t.Size())
	for i := range members {
		members[i] = i
	}
	c := newCommunicator(w, w.ctx, worldGroup, members, t.Rank())
	c.isWorld = true
	w.log.Debug("communicator ready", "size", t.Size())
	return c, nil
}

func newCommunicator(w *world, parent context.Context, group uint64, members []int, rank int) *Communicator {
	c := &Communicator{w: w, group: group, members: members, rank: rank,
		sendSeq: make(map[int]uint64), recvSeq: make(map[int]uint64)}
	c.ctx, c.cancel = context.WithCancelCause(parent)
	return c
}

// Rank returns the rank of this process in the group.
func (c *Communicator) Rank() int { return c.rank }

// Size returns the number of ranks in the group.
func (c *Communicator) Size() int { return len(c.members) }

// WorldRank returns the world rank of group rank r.
func (c *Communicator) WorldRank(r int) int { return c.members[r] }

// Addr returns the transport address of group rank r.
func (c *Communicator) Addr(r int) string { return c.w.t.Addr(c.members[r]) }

// Stats returns the payload bytes this process has sent and received through
// the world communicator and all its sub-groups.
func (c *Communicator) Stats() Stats {
	return Stats{BytesSent: c.w.sent.Load(), BytesReceived: c.w.recv.Load()}
}

// Done returns a channel that is closed when the communicator can no longer
// run operations: it was closed, or it (or its world) failed.
func (c *Communicator) Done() <-chan struct{} { return c.ctx.Done() }

// Err returns nil while the communicator works, else the error its
// operations fail with: a *PeerError naming the culprit, or ErrClosed.
func (c *Communicator) Err() error {
	if c.ctx.Err() == nil {
		return nil
	}
	return c.w.opError("communicator", context.Cause(c.ctx))
}

// Close ends the communicator; pending operations fail with ErrClosed.
// Closing the world communicator also says goodbye to the peers and closes
// the transport, after every operation of every sub-group has returned;
// closing a sub-group leaves the world running.
func (c *Communicator) Close() error {
	c.mu.Lock()
	already := c.closed
	c.closed = true
	c.mu.Unlock()
	c.cancel(ErrClosed)
	if already || !c.isWorld {
		return nil
	}
	return c.w.close()
}

// Split divides the group into sub-groups: groups lists each sub-group as
// ranks of this group, and every rank of this group must call Split with the
// same list (it is collective, though it sends nothing). It returns the
// sub-group that contains the caller, ranked in the order listed. Ranks that
// are in no sub-group get ErrInvalid.
func (c *Communicator) Split(groups [][]int) (*Communicator, error) {
	seen := make(map[int]bool)
	mine := -1
	for gi, g := range groups {
		if len(g) == 0 {
			return nil, invalidf("Split: group %d is empty", gi)
		}
		for _, r := range g {
			if r < 0 || r >= c.Size() {
				return nil, invalidf("Split: group %d has rank %d; ranks are 0 to %d", gi, r, c.Size()-1)
			}
			if seen[r] {
				return nil, invalidf("Split: rank %d is in more than one group", r)
			}
			seen[r] = true
			if r == c.rank {
				mine = gi
			}
		}
	}
	if mine < 0 {
		return nil, invalidf("Split: rank %d is in none of the groups", c.rank)
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, fmt.Errorf("collective: split: %w", ErrClosed)
	}
	split := c.splits
	c.splits++
	c.mu.Unlock()

	h := fnv.New64a()
	var b [8]byte
	for _, v := range []uint64{c.group, split, uint64(mine)} {
		binary.LittleEndian.PutUint64(b[:], v)
		h.Write(b[:])
	}
	members := make([]int, len(groups[mine]))
	rank := 0
	for i, r := range groups[mine] {
		members[i] = c.members[r]
		binary.LittleEndian.PutUint64(b[:], uint64(r))
		h.Write(b[:])
		if r == c.rank {
			rank = i
		}
	}
	id := h.Sum64() &^ 1 // world is 1; keep sub-groups apart from it
	// The sub-group ends with its parent: a failure anywhere in the world
	// fails every group.
	return newCommunicator(c.w, c.ctx, id, members, rank), nil
}

// Grid splits a group of dp·sp ranks, laid out with the sequence-parallel
// rank fastest (rank = dpRank·sp + spRank), into the caller's data-parallel
// group (the dp ranks with its spRank) and sequence-parallel group (the sp
// ranks with its dpRank). Every rank must call it.
func (c *Communicator) Grid(dp, sp int) (dpComm, spComm *Communicator, err error) {
	if dp < 1 || sp < 1 || dp*sp != c.Size() {
		return nil, nil, invalidf("Grid: dp=%d × sp=%d must equal the group size %d", dp, sp, c.Size())
	}
	dpGroups := make([][]int, sp)
	for s := range sp {
		for d := range dp {
			dpGroups[s] = append(dpGroups[s], d*sp+s)
		}
	}
	spGroups := make([][]int, dp)
	for d := range dp {
		for s := range sp {
			spGroups[d] = append(spGroups[d], d*sp+s)
		}
	}
	if dpComm, err = c.Split(dpGroups); err != nil {
		return nil, nil, err
	}
	if spComm, err = c.Split(spGroups); err != nil {
		return nil, nil, err
	}
	return dpComm, spComm, nil
}
