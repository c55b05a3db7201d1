package kernels

import (
	"fmt"
	"unsafe"
)

// DType is the element type of activations (M2K_F32, M2K_BF16).
type DType int32

// Activation dtypes, with the values of m2kernels.h.
const (
	F32  DType = 0
	BF16 DType = 1
)

// Size returns the bytes of one element.
func (d DType) Size() int {
	if d == BF16 {
		return 2
	}
	return 4
}

func (d DType) String() string {
	switch d {
	case F32:
		return "f32"
	case BF16:
		return "bf16"
	}
	return fmt.Sprintf("DType(%d)", int32(d))
}

func (d DType) valid() bool { return d == F32 || d == BF16 }

// Stream is a CUDA stream; the zero value is the legacy default stream.
type Stream uintptr

// Event is a CUDA event, used for timing.
type Event uintptr

// Buffer is a device allocation of Len elements of DType. Ptr is the device
// address; Offset gives the address of an element.
type Buffer struct {
	Ptr   uintptr
	Len   int
	DType DType
	lib   *Lib
}

// Alloc allocates n elements of dt on the device. The contents are
// undefined; see Zero.
func (l *Lib) Alloc(dt DType, n int) (*Buffer, error) {
	if !dt.valid() {
		return nil, invalid("Alloc: unknown dtype %d", int32(dt))
	}
	if n < 0 {
		return nil, invalid("Alloc: n must be >= 0, got %d", n)
	}
	b := &Buffer{Len: n, DType: dt, lib: l}
	if err := l.Call("m2k_malloc", func() int32 { return l.c.malloc(&b.Ptr, b.Bytes()) }); err != nil {
		return nil, fmt.Errorf("allocating %d bytes: %w", b.Bytes(), err)
	}
	return b, nil
}

// Bytes returns the size of the buffer in bytes.
func (b *Buffer) Bytes() int64 { return int64(b.Len) * int64(b.DType.Size()) }

// Offset returns the device address of element i (0 <= i <= Len).
func (b *Buffer) Offset(i int) uintptr {
	if i < 0 || i > b.Len {
		panic(fmt.Sprintf("kernels: Buffer.Offset(%d) outside [0, %d]", i, b.Len))
	}
	return b.Ptr + uintptr(i*b.DType.Size())
}

// Free releases the allocation; a second Free is a no-op.
func (b *Buffer) Free() error {
	if b == nil || b.Ptr == 0 {
		return nil
	}
	p := b.Ptr
	b.Ptr = 0
	return b.lib.Call("m2k_free", func() int32 { return b.lib.c.free(p) })
}

func (b *Buffer) check(op string, dt DType, n int) error {
	if b.Ptr == 0 && b.Len > 0 {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if b.DType != dt {
		return invalid("%s: buffer holds %s, not %s", op, b.DType, dt)
	}
	if n != b.Len {
		return invalid("%s: host slice has %d elements, buffer %d", op, n, b.Len)
	}
	return nil
}

// Zero sets every byte to zero and waits for it.
func (b *Buffer) Zero() error {
	if b.Ptr == 0 && b.Len > 0 {
		return fmt.Errorf("Zero: %w", ErrClosed)
	}
	l := b.lib
	if err := l.Call("m2k_memset", func() int32 { return l.c.memset(b.Ptr, 0, b.Bytes(), 0) }); err != nil {
		return err
	}
	return l.Sync(0)
}

// ZeroAsync queues setting every byte to zero on stream s and returns
// without waiting; work queued after it on s sees the zeros.
func (b *Buffer) ZeroAsync(s Stream) error {
	if b.Ptr == 0 && b.Len > 0 {
		return fmt.Errorf("ZeroAsync: %w", ErrClosed)
	}
	l := b.lib
	return l.Call("m2k_memset", func() int32 { return l.c.memset(b.Ptr, 0, b.Bytes(), uintptr(s)) })
}

func (b *Buffer) h2d(op string, src unsafe.Pointer) error {
	if b.Len == 0 {
		return nil
	}
	return b.lib.Call("m2k_memcpy_h2d", func() int32 { return b.lib.c.memcpyH2D(b.Ptr, src, b.Bytes()) })
}

func (b *Buffer) d2h(op string, dst unsafe.Pointer) error {
	if b.Len == 0 {
		return nil
	}
	return b.lib.Call("m2k_memcpy_d2h", func() int32 { return b.lib.c.memcpyD2H(dst, b.Ptr, b.Bytes()) })
}

// CopyFromHostF32 copies src (len(src) == Len) into an F32 buffer.
func (b *Buffer) CopyFromHostF32(src []float32) error {
	if err := b.check("CopyFromHostF32", F32, len(src)); err != nil {
		return err
	}
	if len(src) == 0 {
		return nil
	}
	return b.h2d("CopyFromHostF32", unsafe.Pointer(&src[0]))
}

// CopyToHostF32 copies an F32 buffer into dst (len(dst) == Len).
func (b *Buffer) CopyToHostF32(dst []float32) error {
	if err := b.check("CopyToHostF32", F32, len(dst)); err != nil {
		return err
	}
	if len(dst) == 0 {
		return nil
	}
	return b.d2h("CopyToHostF32", unsafe.Pointer(&dst[0]))
}

// CopyFromHostBF16 copies bf16 bit patterns (len(src) == Len) into a BF16
// buffer.
func (b *Buffer) CopyFromHostBF16(src []uint16) error {
	if err := b.check("CopyFromHostBF16", BF16, len(src)); err != nil {
		return err
	}
	if len(src) == 0 {
		return nil
	}
	return b.h2d("CopyFromHostBF16", unsafe.Pointer(&src[0]))
}

// CopyToHostBF16 copies a BF16 buffer into dst (len(dst) == Len) as bit
// patterns.
func (b *Buffer) CopyToHostBF16(dst []uint16) error {
	if err := b.check("CopyToHostBF16", BF16, len(dst)); err != nil {
		return err
	}
	if len(dst) == 0 {
		return nil
	}
	return b.d2h("CopyToHostBF16", unsafe.Pointer(&dst[0]))
}

// SetF32 writes vals into the buffer whatever its dtype, rounding to bf16
// on the host (to nearest even) for a BF16 buffer.
func (b *Buffer) SetF32(vals []float32) error {
	if b.DType == BF16 {
		h := make([]uint16, len(vals))
		BF16FromF32Slice(h, vals)
		return b.CopyFromHostBF16(h)
	}
	return b.CopyFromHostF32(vals)
}

// GetF32 reads the buffer as float32 whatever its dtype.
func (b *Buffer) GetF32() ([]float32, error) {
	out := make([]float32, b.Len)
	if b.DType == BF16 {
		h := make([]uint16, b.Len)
		if err := b.CopyToHostBF16(h); err != nil {
			return nil, err
		}
		F32FromBF16Slice(out, h)
		return out, nil
	}
	return out, b.CopyToHostF32(out)
}

// CopyFrom copies src into b on the device (same dtype and length).
func (b *Buffer) CopyFrom(src *Buffer) error {
	if err := b.check("CopyFrom", src.DType, src.Len); err != nil {
		return err
	}
	return b.lib.Call("m2k_memcpy_d2d", func() int32 { return b.lib.c.memcpyD2D(b.Ptr, src.Ptr, b.Bytes()) })
}

// ConvertF32ToBF16 writes dst[i] = bf16(src[i]) on stream s.
func (l *Lib) ConvertF32ToBF16(dst, src *Buffer, s Stream) error {
	if dst.DType != BF16 || src.DType != F32 || dst.Len != src.Len {
		return invalid("ConvertF32ToBF16: want BF16 dst and F32 src of one length, got %s[%d] and %s[%d]", dst.DType, dst.Len, src.DType, src.Len)
	}
	return l.Call("m2k_f32_to_bf16", func() int32 { return l.c.f32ToBF16(dst.Ptr, src.Ptr, int64(src.Len), uintptr(s)) })
}

// ConvertBF16ToF32 writes dst[i] = float(src[i]) on stream s.
func (l *Lib) ConvertBF16ToF32(dst, src *Buffer, s Stream) error {
	if dst.DType != F32 || src.DType != BF16 || dst.Len != src.Len {
		return invalid("ConvertBF16ToF32: want F32 dst and BF16 src of one length, got %s[%d] and %s[%d]", dst.DType, dst.Len, src.DType, src.Len)
	}
	return l.Call("m2k_bf16_to_f32", func() int32 { return l.c.bf16ToF32(dst.Ptr, src.Ptr, int64(src.Len), uintptr(s)) })
}

// NewStream creates a stream that does not synchronise with the default
// stream.
func (l *Lib) NewStream() (Stream, error) {
	var s uintptr
	err := l.Call("m2k_stream_create", func() int32 { return l.c.streamCreate(&s) })
	return Stream(s), err
}

// DestroyStream destroys a stream made by NewStream.
func (l *Lib) DestroyStream(s Stream) error {
	return l.Call("m2k_stream_destroy", func() int32 { return l.c.streamDestroy(uintptr(s)) })
}

// Sync waits for all work queued on s.
func (l *Lib) Sync(s Stream) error {
	return l.Call("m2k_stream_synchronize", func() int32 { return l.c.streamSync(uintptr(s)) })
}

// NewEvent creates an event for timing.
func (l *Lib) NewEvent() (Event, error) {
	var e uintptr
	err := l.Call("m2k_event_create", func() int32 { return l.c.eventCreate(&e) })
	return Event(e), err
}

// DestroyEvent destroys an event made by NewEvent.
func (l *Lib) DestroyEvent(e Event) error {
	return l.Call("m2k_event_destroy", func() int32 { return l.c.eventDestroy(uintptr(e)) })
}

// Record records e on stream s.
func (l *Lib) Record(e Event, s Stream) error {
	return l.Call("m2k_event_record", func() int32 { return l.c.eventRecord(uintptr(e), uintptr(s)) })
}

// ElapsedMs waits for end and returns the milliseconds between two recorded
// events.
func (l *Lib) ElapsedMs(start, end Event) (float32, error) {
	if err := l.Call("m2k_event_synchronize", func() int32 { return l.c.eventSync(uintptr(end)) }); err != nil {
		return 0, err
	}
	var ms float32
	err := l.Call("m2k_event_elapsed_ms", func() int32 { return l.c.eventElapsed(&ms, uintptr(start), uintptr(end)) })
	return ms, err
}

// HostF32 is a float32 slice in pinned (page-locked) host memory, which
// asynchronous copies need to run beside kernels. Free it with Free; the
// slice must not be used after.
type HostF32 struct {
	lib *Lib
	ptr unsafe.Pointer
	// S is the memory, of the length asked for.
	S []float32
}

// AllocHostF32 allocates n float32 values of pinned host memory, zeroed.
func (l *Lib) AllocHostF32(n int) (*HostF32, error) {
	if n < 0 {
		return nil, invalid("AllocHostF32: n must be >= 0, got %d", n)
	}
	h := &HostF32{lib: l}
	if n == 0 {
		return h, nil
	}
	if err := l.Call("m2k_host_alloc", func() int32 { return l.c.hostAlloc(&h.ptr, int64(n)*4) }); err != nil {
		return nil, err
	}
	h.S = unsafe.Slice((*float32)(h.ptr), n)
	clear(h.S)
	return h, nil
}

// Free releases the memory; a second Free is a no-op.
func (h *HostF32) Free() error {
	if h == nil || h.ptr == nil {
		return nil
	}
	p := h.ptr
	h.ptr, h.S = nil, nil
	return h.lib.Call("m2k_host_free", func() int32 { return h.lib.c.hostFree(p) })
}

// CopyRangeToHostAsyncF32 queues on stream s the copy of the F32 buffer's
// elements [lo, lo+len(dst)) into dst, which should be pinned memory (a
// HostF32's) for the copy to run beside kernels. dst must not be read
// before the copy has completed (an event recorded on s after it).
func (b *Buffer) CopyRangeToHostAsyncF32(dst []float32, lo int, s Stream) error {
	if b.Ptr == 0 && b.Len > 0 {
		return fmt.Errorf("CopyRangeToHostAsyncF32: %w", ErrClosed)
	}
	if b.DType != F32 || lo < 0 || lo+len(dst) > b.Len {
		return invalid("CopyRangeToHostAsyncF32: [%d, %d) of a %s buffer of %d values", lo, lo+len(dst), b.DType, b.Len)
	}
	if len(dst) == 0 {
		return nil
	}
	return b.lib.Call("m2k_memcpy_d2h_async", func() int32 {
		return b.lib.c.memcpyD2HAsync(unsafe.Pointer(&dst[0]), b.Offset(lo), int64(len(dst))*4, uintptr(s))
	})
}

// WaitEvent makes the work queued on s after the call wait until e has
// completed.
func (l *Lib) WaitEvent(s Stream, e Event) error {
	return l.Call("m2k_stream_wait_event", func() int32 { return l.c.streamWaitEvent(uintptr(s), uintptr(e)) })
}

// SyncEvent blocks until e has completed.
func (l *Lib) SyncEvent(e Event) error {
	return l.Call("m2k_event_synchronize", func() int32 { return l.c.eventSync(uintptr(e)) })
}
