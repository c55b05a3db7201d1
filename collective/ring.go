package collective

import (
	"fmt"
	"sync"
)

// recvMode is what a rank does with a received chunk.
type recvMode uint8

const (
	modeCopy       recvMode = iota // buf = received
	modeAdd                        // buf = received + buf
	modeAccBF16                    // scratch = received(f32) + f32(buf)
	modeFinishBF16                 // buf = bf16(received(f32) + f32(buf))
)

// step is one round of a ring schedule: the segment this rank sends to the
// next rank and the segment it receives from the previous one (-1: none).
// Whatever a rank sends at step s > 0 it received at step s-1, chunk by
// chunk, which is what pipelines the ring.
type step struct {
	send, recv  int
	mode        recvMode
	widen       bool // bf16: widen own values into scratch before sending
	fromScratch bool // send scratch (float32) instead of buf
}

// plan is the schedule of one operation on this rank.
type plan struct {
	c       *Communicator
	buf     Buffer
	scratch []float32 // float32 partial sums of a bfloat16 reduction
	wide    bool      // the plan needs scratch
	segs    []int     // segment i is elements [segs[i], segs[i+1])
	steps   []step
	chunk   int // elements per chunk
	lanes   int
	prev    int // group rank receiving from, or -1
	next    int // group rank sending to, or -1
	hdr     StreamHeader
}

func (c *Communicator) newPlan(kind OpKind, buf Buffer, root int) *plan {
	chunk := c.w.cfg.ChunkSize / max(buf.dtype.Size(), 1)
	return &plan{c: c, buf: buf, chunk: chunk, prev: -1, next: -1,
		hdr: StreamHeader{Group: c.group, Kind: kind, DType: buf.dtype, Count: buf.Len(), Root: root, ChunkElems: chunk}}
}

// schedule fills the segments and steps of a collective operation.
func (p *plan) schedule() {
	c := p.c
	n, r := c.Size(), c.rank
	if n == 1 {
		return
	}
	mod := func(i int) int { return ((i % n) + n) % n }
	p.prev, p.next = mod(r-1), mod(r+1)
	p.segs = make([]int, n+1)
	for i := range n {
		_, p.segs[i+1] = Segment(p.buf.Len(), n, i)
	}
	bf16 := p.buf.dtype == BFloat16
	reduceScatter := func() {
		for s := range n - 1 {
			st := step{send: mod(r - s - 1), recv: mod(r - s - 2), mode: modeAdd}
			if bf16 {
				st.fromScratch = true
				st.widen = s == 0
				st.mode = modeAccBF16
				if s == n-2 {
					st.mode = modeFinishBF16
				}
			}
			p.steps = append(p.steps, st)
		}
	}
	allGather := func() {
		for s := range n - 1 {
			p.steps = append(p.steps, step{send: mod(r - s), recv: mod(r - s - 1), mode: modeCopy})
		}
	}
	switch p.hdr.Kind {
	case OpAllReduce:
		reduceScatter()
		allGather()
	case OpReduceScatter:
		reduceScatter()
	case OpAllGather, OpBarrier:
		allGather()
	case OpBroadcast:
		root := p.hdr.Root
		p.segs = []int{0, p.buf.Len()}
		if r == root {
			p.prev = -1
			p.steps = []step{{send: 0, recv: -1}}
		} else {
			p.steps = []step{{send: -1, recv: 0, mode: modeCopy}}
			if p.next == root {
				p.next = -1
			} else {
				p.steps = append(p.steps, step{send: 0, recv: -1})
			}
		}
	}
	if bf16 && (p.hdr.Kind == OpAllReduce || p.hdr.Kind == OpReduceScatter) {
		p.wide = true
	}
	p.setLanes()
}

// chunks returns the number of chunks of segment i.
func (p *plan) chunks(i int) int {
	return (p.segs[i+1] - p.segs[i] + p.chunk - 1) / p.chunk
}

// setLanes uses as many lanes as the largest segment has chunks, up to
// Config.StreamsPerPeer; zero lanes means the plan moves nothing.
func (p *plan) setLanes() {
	most := 0
	for i := 0; i+1 < len(p.segs); i++ {
		most = max(most, p.chunks(i))
	}
	if len(p.steps) == 0 {
		most = 0
	}
	p.lanes = min(most, p.c.w.cfg.StreamsPerPeer)
}

// laneChunks counts the chunks lane l sends (or receives) over the plan.
func (p *plan) laneChunks(l int, send bool) int {
	total := 0
	for _, st := range p.steps {
		seg := st.recv
		if send {
			seg = st.send
		}
		if seg < 0 {
			continue
		}
		if k := p.chunks(seg); k > l {
			total += (k - l + p.lanes - 1) / p.lanes
		}
	}
	return total
}

// run moves the plan's bytes: each lane runs a sender and a receiver.
func (o *opRun) run(p *plan) error {
	if p.wide {
		sp := o.c.w.getScratch(p.buf.Len())
		defer o.c.w.putScratch(sp)
		p.scratch = *sp
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	record := func(err error) {
		if err != nil {
			mu.Lock()
			if first == nil {
				first = err
			}
			mu.Unlock()
		}
	}
	for l := range p.lanes {
		ready := make(chan struct{}, p.laneChunks(l, false))
		if p.next >= 0 {
			wg.Go(func() { record(o.sendLane(p, l, ready)) })
		}
		if p.prev >= 0 {
			wg.Go(func() { record(o.recvLane(p, l, ready)) })
		}
	}
	wg.Wait()
	if first != nil {
		// The failure was reported; the operation's context ends when the
		// ranks have agreed on the culprit (or at once if it already did).
		<-o.ctx.Done()
	}
	return first
}

func (o *opRun) sendLane(p *plan, lane int, ready <-chan struct{}) error {
	if p.laneChunks(lane, true) == 0 {
		return nil
	}
	w := o.c.w
	h := p.hdr
	h.Lane, h.Src, h.Dst = lane, o.c.members[o.c.rank], o.c.members[p.next]
	wt := o.watch(p.next, "to")
	defer wt.disarm()
	wt.arm()
	s, err := w.t.OpenSend(o.ctx, h)
	wt.disarm()
	if err != nil {
		return o.fail(p.next, err)
	}
	defer s.Close()
	var seq uint32
	for si, st := range p.steps {
		if st.send < 0 {
			continue
		}
		wait := si > 0 && p.steps[si-1].recv >= 0
		lo0, hi0 := p.segs[st.send], p.segs[st.send+1]
		for lo := lo0 + lane*p.chunk; lo < hi0; lo += p.lanes * p.chunk {
			hi := min(lo+p.chunk, hi0)
			if wait {
				select {
				case <-ready:
				case <-o.ctx.Done():
					return errStopped
				}
			}
			var payload []byte
			if st.widen {
				widenBF16(p.scratch[lo:hi], p.buf.u16[lo:hi])
			}
			if st.fromScratch {
				payload = f32Bytes(p.scratch[lo:hi])
			} else {
				payload = p.buf.bytes(lo, hi)
			}
			wt.arm()
			err := s.Send(seq, payload)
			wt.disarm()
			if err != nil {
				return o.fail(p.next, err)
			}
			w.sent.Add(int64(len(payload)))
			seq++
		}
	}
	wt.arm()
	err = s.Finish()
	wt.disarm()
	if err != nil {
		return o.fail(p.next, err)
	}
	return nil
}

func (o *opRun) recvLane(p *plan, lane int, ready chan<- struct{}) error {
	if p.laneChunks(lane, false) == 0 {
		return nil
	}
	w := o.c.w
	h := p.hdr
	h.Lane, h.Src, h.Dst = lane, o.c.members[p.prev], o.c.members[o.c.rank]
	wt := o.watch(p.prev, "from")
	defer wt.disarm()
	wt.arm()
	rs, err := w.t.OpenRecv(o.ctx, h)
	wt.disarm()
	if err != nil {
		return o.fail(p.prev, err)
	}
	defer rs.Close()
	if err := h.Check(rs.Header()); err != nil {
		return o.fail(p.prev, err)
	}
	var (
		seq uint32
		sk  sink
	)
	for si, st := range p.steps {
		if st.recv < 0 {
			continue
		}
		forward := si+1 < len(p.steps) && p.steps[si+1].send >= 0
		lo0, hi0 := p.segs[st.recv], p.segs[st.recv+1]
		for lo := lo0 + lane*p.chunk; lo < hi0; lo += p.lanes * p.chunk {
			hi := min(lo+p.chunk, hi0)
			sk.reset(p, st.mode, lo, hi)
			wt.arm()
			got, n, err := rs.Recv(sk.write)
			wt.disarm()
			if err != nil {
				return o.fail(p.prev, err)
			}
			if err := sk.check(got, seq, n); err != nil {
				return o.fail(p.prev, fmt.Errorf("%w: stream from rank %d: %v", ErrMismatch, h.Src, err))
			}
			w.recv.Add(int64(n))
			if forward {
				ready <- struct{}{}
			}
			seq++
		}
	}
	wt.arm()
	err = rs.Finish()
	wt.disarm()
	if err != nil {
		return o.fail(p.prev, err)
	}
	return nil
}

// sink applies the pieces of one received chunk to elements [lo, hi).
// Pieces may split elements; a split element waits in carry.
type sink struct {
	p     *plan
	mode  recvMode
	lo    int
	want  int // bytes the chunk must have
	pos   int // bytes seen
	wsize int // bytes per element on the wire
	done  int // elements applied
	dst   []byte
	carry [8]byte
	nc    int
}

func (s *sink) reset(p *plan, mode recvMode, lo, hi int) {
	s.p, s.mode, s.lo, s.pos, s.done, s.nc = p, mode, lo, 0, 0, 0
	s.wsize = p.buf.dtype.Size()
	if mode == modeAccBF16 || mode == modeFinishBF16 {
		s.wsize = 4
	}
	s.want = (hi - lo) * s.wsize
	s.dst = nil
	if mode == modeCopy {
		s.dst = p.buf.bytes(lo, hi)
	}
}

func (s *sink) write(piece []byte) {
	if room := s.want - s.pos; len(piece) > room {
		s.pos += len(piece) - room // remembered as an overrun by check
		piece = piece[:room]
	}
	if s.mode == modeCopy {
		copy(s.dst[s.pos:], piece)
		s.pos += len(piece)
		return
	}
	s.pos += len(piece)
	if s.nc > 0 {
		t := copy(s.carry[s.nc:s.wsize], piece)
		s.nc += t
		piece = piece[t:]
		if s.nc < s.wsize {
			return
		}
		s.apply(s.carry[:s.wsize])
		s.nc = 0
	}
	whole := len(piece) - len(piece)%s.wsize
	if whole > 0 {
		s.apply(piece[:whole])
	}
	s.nc = copy(s.carry[:], piece[whole:])
}

// apply combines whole received elements with the next local elements.
func (s *sink) apply(b []byte) {
	e := s.lo + s.done
	m := len(b) / s.wsize
	buf := s.p.buf
	switch s.mode {
	case modeAdd:
		switch buf.dtype {
		case Float32:
			addF32(buf.f32[e:e+m], b)
		case Float64:
			addF64(buf.f64[e:e+m], b)
		case BFloat16Rounded:
			addBF16(buf.u16[e:e+m], b)
		}
	case modeAccBF16:
		accBF16(s.p.scratch[e:e+m], b, buf.u16[e:e+m])
	case modeFinishBF16:
		finishBF16(buf.u16[e:e+m], b)
	}
	s.done += m
}

func (s *sink) check(gotSeq, wantSeq uint32, n int) error {
	switch {
	case gotSeq != wantSeq:
		return fmt.Errorf("chunk %d arrived where chunk %d was due", gotSeq, wantSeq)
	case n != s.want || s.pos != s.want:
		return fmt.Errorf("chunk %d has %d bytes, want %d", gotSeq, n, s.want)
	}
	return nil
}
