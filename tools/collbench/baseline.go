package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"time"
	"unsafe"

	"github.com/m2train/m2train/collective"
)

// tcpRing is the baseline: the ring all-reduce of package collective
// (reduce-scatter then all-gather, the same chunks and lanes, pipelined by
// chunk) over plain TCP connections, with no framing at all.
type tcpRing struct {
	rank, n, lanes, chunk int
	next, prev            []net.Conn // by lane
	scratch               [][]byte   // by lane, one chunk
}

// dialRing connects lane connections to the next rank and accepts them from
// the previous one; the dialler's first byte names the lane.
func dialRing(ctx context.Context, rank, n int, addrs []string, lis net.Listener, lanes, chunk int) (*tcpRing, error) {
	r := &tcpRing{rank: rank, n: n, lanes: lanes, chunk: chunk,
		next: make([]net.Conn, lanes), prev: make([]net.Conn, lanes), scratch: make([][]byte, lanes)}
	for l := range r.scratch {
		r.scratch[l] = make([]byte, 4*chunk)
	}
	accepted := make(chan error, 1)
	go func() {
		defer lis.Close()
		for range lanes {
			c, err := lis.Accept()
			if err != nil {
				accepted <- err
				return
			}
			var b [1]byte
			if _, err := io.ReadFull(c, b[:]); err != nil || int(b[0]) >= lanes {
				accepted <- fmt.Errorf("bad lane greeting: %v", err)
				return
			}
			r.prev[b[0]] = c
		}
		accepted <- nil
	}()
	next := addrs[(rank+1)%n]
	for l := range lanes {
		var d net.Dialer
		for {
			c, err := d.DialContext(ctx, "tcp", next)
			if err == nil {
				if _, err = c.Write([]byte{byte(l)}); err != nil {
					return nil, err
				}
				r.next[l] = c
				break
			}
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("dial %s: %w", next, err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	select {
	case err := <-accepted:
		if err != nil {
			return nil, err
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return r, nil
}

func (r *tcpRing) close() {
	for _, c := range append(r.next, r.prev...) {
		if c != nil {
			_ = c.Close()
		}
	}
}

func f32bytes(s []float32) []byte {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), 4*len(s))
}

// addInto sets dst[i] = src[i] + dst[i], decoding src as package collective
// does.
func addInto(dst []float32, src []byte) {
	src = src[:4*len(dst)]
	for i := range dst {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:])) + dst[i]
	}
}

type ringStep struct{ send, recv int }

func (r *tcpRing) allReduce(x []float32) error {
	n, rank := r.n, r.rank
	mod := func(i int) int { return ((i % n) + n) % n }
	segs := make([]int, n+1)
	for i := range n {
		_, segs[i+1] = collective.Segment(len(x), n, i)
	}
	var steps []ringStep
	for s := range n - 1 {
		steps = append(steps, ringStep{send: mod(rank - s - 1), recv: mod(rank - s - 2)})
	}
	for s := range n - 1 {
		steps = append(steps, ringStep{send: mod(rank - s), recv: mod(rank - s - 1)})
	}
	reduceSteps := n - 1
	var wg sync.WaitGroup
	errs := make([]error, 2*r.lanes)
	for l := range r.lanes {
		ready := make(chan struct{}, 4*len(x)/r.chunk+2*n)
		wg.Go(func() {
			for si, st := range steps {
				lo0, hi0 := segs[st.send], segs[st.send+1]
				for lo := lo0 + l*r.chunk; lo < hi0; lo += r.lanes * r.chunk {
					if si > 0 {
						<-ready
					}
					if _, err := r.next[l].Write(f32bytes(x[lo:min(lo+r.chunk, hi0)])); err != nil {
						errs[2*l] = err
						return
					}
				}
			}
		})
		wg.Go(func() {
			for si, st := range steps {
				lo0, hi0 := segs[st.recv], segs[st.recv+1]
				for lo := lo0 + l*r.chunk; lo < hi0; lo += r.lanes * r.chunk {
					hi := min(lo+r.chunk, hi0)
					if si < reduceSteps {
						b := r.scratch[l][:4*(hi-lo)]
						if _, err := io.ReadFull(r.prev[l], b); err != nil {
							errs[2*l+1] = err
							return
						}
						addInto(x[lo:hi], b)
					} else if _, err := io.ReadFull(r.prev[l], f32bytes(x[lo:hi])); err != nil {
						errs[2*l+1] = err
						return
					}
					if si+1 < len(steps) {
						ready <- struct{}{}
					}
				}
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
