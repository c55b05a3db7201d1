package gpu

import (
	"errors"
	"fmt"
	"sync"

	"github.com/m2train/m2train/kernels"
)

// gradCopier copies ranges of the device gradients into the host mirror on
// a stream of its own, so that the copies run beside the backward pass on
// the compute stream. The host mirror is pinned memory when the library can
// allocate it (else the copies still work, but the driver stages them).
type gradCopier struct {
	lib    *kernels.Lib
	s      kernels.Stream
	pinned *kernels.HostF32 // the host mirror's memory, or nil

	mu   sync.Mutex
	free []kernels.Event // recorded and waited for, ready for reuse
	all  []kernels.Event
}

// event returns an unused event.
func (c *gradCopier) event() (kernels.Event, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.free); n > 0 {
		e := c.free[n-1]
		c.free = c.free[:n-1]
		return e, nil
	}
	e, err := c.lib.NewEvent()
	if err != nil {
		return 0, err
	}
	c.all = append(c.all, e)
	return e, nil
}

func (c *gradCopier) release(es ...kernels.Event) {
	c.mu.Lock()
	c.free = append(c.free, es...)
	c.mu.Unlock()
}

// close waits for the copies in flight and releases the stream, the events
// and the pinned memory.
func (c *gradCopier) close() error {
	var errs []error
	if c.s != 0 {
		errs = append(errs, c.lib.Sync(c.s), c.lib.DestroyStream(c.s))
		c.s = 0
	}
	for _, e := range c.all {
		errs = append(errs, c.lib.DestroyEvent(e))
	}
	c.all, c.free = nil, nil
	errs = append(errs, c.pinned.Free())
	return errors.Join(errs...)
}

// allocHostGrads allocates the host mirror of the gradients in pinned
// memory. Where the library cannot pin that much (a locked-memory limit),
// the mirror is ordinary memory.
func (m *Model) allocHostGrads() {
	n := m.layout.Total
	if h, err := m.lib.AllocHostF32(n); err == nil {
		m.hostGrads = h.S
		m.copier = &gradCopier{lib: m.lib, pinned: h}
		return
	}
	m.hostGrads = make([]float32, n)
}

// GradsToHostAsync queues the copy of the device gradients [lo, hi) into
// the host mirror Grads()[lo:hi] on the model's copy stream, after the work
// queued so far on the compute stream, and returns at once; wait blocks
// until the copy is complete (see model.GradStreamer). It needs the
// explicit mode.
func (m *Model) GradsToHostAsync(lo, hi int) (wait func() error, err error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	if m.auto {
		return nil, fmt.Errorf("gpu: GradsToHostAsync needs explicit synchronisation (Options.ExplicitSync); automatic mode copies the gradients itself")
	}
	if lo < 0 || hi < lo || hi > len(m.hostGrads) {
		return nil, fmt.Errorf("gpu: GradsToHostAsync: [%d, %d) is not a range of the %d gradients", lo, hi, len(m.hostGrads))
	}
	if m.copier == nil {
		m.copier = &gradCopier{lib: m.lib}
	}
	c := m.copier
	if c.s == 0 {
		if c.s, err = m.lib.NewStream(); err != nil {
			return nil, fmt.Errorf("gpu: creating the gradient copy stream: %w", err)
		}
	}
	ready, err := c.event()
	if err != nil {
		return nil, err
	}
	done, err := c.event()
	if err != nil {
		c.release(ready)
		return nil, err
	}
	queue := func() error {
		if err := m.lib.Record(ready, stream); err != nil {
			return err
		}
		if err := m.lib.WaitEvent(c.s, ready); err != nil {
			return err
		}
		if err := m.grads.CopyRangeToHostAsyncF32(m.hostGrads[lo:hi], lo, c.s); err != nil {
			return err
		}
		return m.lib.Record(done, c.s)
	}
	if err := queue(); err != nil {
		// Whatever was queued completes on its own; the events are left
		// to Close rather than reused while they may be pending.
		return nil, fmt.Errorf("gpu: queueing the copy of gradients [%d, %d): %w", lo, hi, err)
	}
	var once sync.Once
	return func() error {
		err := fmt.Errorf("gpu: the wait for the copy of gradients [%d, %d) was called twice", lo, hi)
		once.Do(func() {
			err = m.lib.SyncEvent(done)
			if err != nil {
				err = fmt.Errorf("gpu: copying gradients [%d, %d) to the host: %w", lo, hi, err)
			}
			c.release(ready, done)
		})
		return err
	}, nil
}
