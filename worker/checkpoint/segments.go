package checkpoint

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/safetensors"
)

// Segment sizes of a manifest.
const (
	// DefaultSegmentSize is the segment size of the manifests Save writes.
	DefaultSegmentSize = 32 << 20
	// MinSegmentSize is the smallest segment size a manifest may state.
	MinSegmentSize = 64 << 10
	// MaxSegmentSize is the largest segment size a manifest may state.
	MaxSegmentSize = 1 << 30
)

// segmentCount is the number of segments of size seg in size bytes.
func segmentCount(size, seg int64) int64 { return (size + seg - 1) / seg }

// SaveOptions tune SaveWith; the zero value takes the defaults.
type SaveOptions struct {
	// SegmentSize is the size of the segments whose SHA-256 the manifest
	// lists, between MinSegmentSize and MaxSegmentSize
	// (DefaultSegmentSize when 0). A load fetches and verifies segments
	// in parallel, so smaller segments spread a small checkpoint over more
	// requests and cores, at the cost of a longer manifest.
	SegmentSize int64
}

// Validate names the field and the rule that a bad value breaks.
func (o SaveOptions) Validate() error {
	if o.SegmentSize != 0 && (o.SegmentSize < MinSegmentSize || o.SegmentSize > MaxSegmentSize) {
		return fmt.Errorf("checkpoint: save: segment size must be between %d and %d bytes (0 for the default), got %d", MinSegmentSize, MaxSegmentSize, o.SegmentSize)
	}
	return nil
}

func (o SaveOptions) segmentSize() int64 {
	if o.SegmentSize == 0 {
		return DefaultSegmentSize
	}
	return o.SegmentSize
}

// parallelDigestMin is the smallest read whose two digests are computed
// on two goroutines; below it the hand-off costs more than it saves.
const parallelDigestMin = 256 << 10

// digester hashes what is read through it twice: whole, for the
// manifest's sha256, and in segments. The two run at once on large reads,
// so that the second pass takes a core rather than time where one is
// free; both finish before Read returns, as the caller owns p after that.
type digester struct {
	r        io.Reader
	n        int64
	whole    hash.Hash
	seg      hash.Hash
	segSize  int64
	inSeg    int64
	segments []string
}

func newDigester(r io.Reader, segSize int64) *digester {
	return &digester{r: r, whole: sha256.New(), seg: sha256.New(), segSize: segSize}
}

func (d *digester) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	c := p[:n]
	d.n += int64(n)
	if n >= parallelDigestMin {
		done := make(chan struct{})
		go func() {
			defer close(done)
			d.addSegments(c)
		}()
		d.whole.Write(c)
		<-done
	} else {
		d.whole.Write(c)
		d.addSegments(c)
	}
	return n, err
}

func (d *digester) addSegments(c []byte) {
	for len(c) > 0 {
		k := min(int64(len(c)), d.segSize-d.inSeg)
		d.seg.Write(c[:k])
		d.inSeg += k
		c = c[k:]
		if d.inSeg == d.segSize {
			d.segments = append(d.segments, hex.EncodeToString(d.seg.Sum(nil)))
			d.seg.Reset()
			d.inSeg = 0
		}
	}
}

// sums returns the whole digest and those of the segments; the last
// segment is what is left after the full ones.
func (d *digester) sums() (whole string, segments []string) {
	if d.inSeg > 0 {
		d.segments = append(d.segments, hex.EncodeToString(d.seg.Sum(nil)))
		d.seg.Reset()
		d.inSeg = 0
	}
	return hex.EncodeToString(d.whole.Sum(nil)), d.segments
}

// LoadOptions tune LoadWith; the zero value takes the defaults.
type LoadOptions struct {
	// Concurrency is the number of segments fetched and verified at once,
	// over all the objects of a checkpoint, between 1 and
	// MaxLoadConcurrency (DefaultLoadConcurrency() when 0). Each segment
	// in flight is one range request and holds at most fetchChunk bytes of
	// scratch memory: the bytes of tensors in the buffers' own encoding go
	// straight to the buffers.
	Concurrency int
}

// MaxLoadConcurrency bounds LoadOptions.Concurrency.
const MaxLoadConcurrency = 256

// DefaultLoadConcurrency is twice GOMAXPROCS, at least 4 and at most 64:
// enough requests in flight to keep every core hashing while others wait
// on the network.
func DefaultLoadConcurrency() int { return min(64, max(4, 2*runtime.GOMAXPROCS(0))) }

// Validate names the field and the rule that a bad value breaks.
func (o LoadOptions) Validate() error {
	if o.Concurrency < 0 || o.Concurrency > MaxLoadConcurrency {
		return fmt.Errorf("checkpoint: load: concurrency must be between 1 and %d (0 for the default), got %d", MaxLoadConcurrency, o.Concurrency)
	}
	return nil
}

func (o LoadOptions) concurrency() int {
	if o.Concurrency == 0 {
		return DefaultLoadConcurrency()
	}
	return o.Concurrency
}

// fetchChunk is the unit in which a segment is read and hashed: small
// enough that the hash finds the bytes the read just wrote in the cache.
const fetchChunk = 512 << 10

// headProbe is how much of a tensor object is read to find its header;
// what follows the header in it is not read again.
const headProbe = 256 << 10

// sinkKind says where the bytes of a span go.
type sinkKind uint8

const (
	sinkSkip   sinkKind = iota // hashed only: the header, parsed already
	sinkBytes                  // the buffer's own encoding: read in place
	sinkFloats                 // converted into vals
	sinkInts                   // kept in dst, decoded once verified
)

// span is the stretch [start, end) of a tensor object that holds one
// tensor, or the header, and where its bytes go.
type span[T model.Float] struct {
	start, end int64
	kind       sinkKind
	name       string
	dtype      safetensors.DType
	dst        []byte  // sinkBytes: the bytes of vals; sinkInts: the tensor's bytes
	vals       []T     // sinkBytes, sinkFloats
	ints       []int64 // sinkInts
}

// cut is an element of a converted tensor that a segment boundary splits:
// the fetches of the two segments each write their part of its bytes
// here, and it is decoded once both are verified.
type cut struct {
	span int // index in spans
	elem int // element index in the tensor
	raw  [8]byte
}

// segmentedObject is a tensor object being loaded segment by segment.
type segmentedObject[T model.Float] struct {
	dir     string
	obj     Object
	segSize int64
	rr      RangeReader
	head    []byte // the object's first bytes, read to find the header; the source of those bytes
	spans   []span[T]
	cuts    map[int64]*cut // by the object offset of the split element
}

// tensorObject is a safetensors object of a checkpoint and the buffers
// its tensors go to.
type tensorObject[T model.Float] struct {
	obj     Object
	targets map[string]target[T]
}

// loadSegmented reads the tensor objects of a v2 checkpoint into their
// targets: the header of each first, then every segment with a range
// request, concurrency at once over all objects, each segment hashed as
// it arrives and checked against the manifest. Bytes may reach a target
// before their segment is verified; the targets are the caller's to trust
// only when loadSegmented returns nil.
func loadSegmented[T model.Float](ctx context.Context, rs RangeStore, dir string, segSize int64, concurrency int, objs []tensorObject[T]) error {
	sos := make([]*segmentedObject[T], len(objs))
	errs := make([]error, len(objs))
	var wg sync.WaitGroup
	for i, o := range objs {
		wg.Go(func() { sos[i], errs[i] = planObject(ctx, rs, dir, o.obj, segSize, o.targets) })
	}
	wg.Wait()
	defer func() {
		for _, so := range sos {
			if so != nil {
				so.rr.Close()
			}
		}
	}()
	if err := firstError(errs); err != nil {
		return err
	}
	type task struct {
		so  *segmentedObject[T]
		seg int
	}
	var tasks []task
	for _, so := range sos {
		for i := range so.obj.Segments {
			tasks = append(tasks, task{so, i})
		}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var next atomic.Int64
	for range min(concurrency, len(tasks)) {
		wg.Go(func() {
			chunk := make([]byte, fetchChunk)
			for ctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= int64(len(tasks)) {
					return
				}
				if err := tasks[i].so.fetch(ctx, tasks[i].seg, chunk); err != nil {
					cancel(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return err
	}
	for _, so := range sos {
		if err := so.finish(); err != nil {
			return err
		}
	}
	return nil
}

// firstError returns the first error of errs that is not a cancellation,
// or else the first error.
func firstError(errs []error) error {
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	return errors.Join(errs...)
}

// planObject opens a tensor object for range reads, checks its size
// against the manifest, reads and parses its header, and maps every byte
// of it to where it goes.
func planObject[T model.Float](ctx context.Context, rs RangeStore, dir string, obj Object, segSize int64, targets map[string]target[T]) (*segmentedObject[T], error) {
	rr, err := rs.OpenRanges(ctx, JoinKey(dir, obj.Name))
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w: %s: %s is missing", ErrCorrupt, dir, obj.Name)
	}
	if err != nil {
		return nil, err
	}
	so := &segmentedObject[T]{dir: dir, obj: obj, segSize: segSize, rr: rr}
	if rr.Size() != obj.Size {
		rr.Close()
		return nil, fmt.Errorf("%w: %s: %s has %d bytes, the manifest says %d", ErrCorrupt, dir, obj.Name, rr.Size(), obj.Size)
	}
	if err := so.plan(ctx, targets); err != nil {
		rr.Close()
		return nil, err
	}
	return so, nil
}

func (so *segmentedObject[T]) plan(ctx context.Context, targets map[string]target[T]) error {
	bad := func(format string, args ...any) error {
		return so.blame(ctx, fmt.Errorf("%w: %s: %s: %s", ErrCorrupt, so.dir, so.obj.Name, fmt.Sprintf(format, args...)))
	}
	if so.obj.Size < 8 {
		return bad("%d bytes cannot hold a safetensors header", so.obj.Size)
	}
	var err error
	if so.head, err = readRange(ctx, so.rr, 0, min(so.obj.Size, headProbe)); err != nil {
		return so.readError(-1, err)
	}
	n := binary.LittleEndian.Uint64(so.head)
	if n > safetensors.MaxHeaderSize || int64(n) > so.obj.Size-8 {
		return bad("header length %d does not fit", n)
	}
	headerEnd := 8 + int64(n)
	if have := int64(len(so.head)); headerEnd > have {
		rest, err := readRange(ctx, so.rr, have, headerEnd-have)
		if err != nil {
			return so.readError(-1, err)
		}
		so.head = append(so.head, rest...)
	}
	entries, err := parseHeader(so.head[8:headerEnd], so.obj.Size)
	if err != nil {
		return bad("%v", err)
	}
	if err := checkTargets(entries, targets); err != nil {
		return bad("%v", err)
	}
	so.spans = append(so.spans, span[T]{start: 0, end: headerEnd, kind: sinkSkip, name: "header"})
	for _, e := range entries {
		t := targets[e.name]
		sp := span[T]{start: headerEnd + e.start, end: headerEnd + e.end, name: e.name, dtype: e.dtype, vals: t.vals}
		switch {
		case t.ints != nil:
			sp.kind, sp.ints, sp.dst = sinkInts, t.ints, make([]byte, e.end-e.start)
		case littleEndian && e.dtype == dtypeOf[T]():
			sp.kind, sp.dst = sinkBytes, bytesOf(t.vals)
		default:
			sp.kind = sinkFloats
		}
		so.spans = append(so.spans, sp)
	}
	// Elements of converted tensors that a segment boundary splits.
	so.cuts = map[int64]*cut{}
	for b := so.segSize; b < so.obj.Size; b += so.segSize {
		i := so.spanAt(b)
		sp := &so.spans[i]
		if sp.kind != sinkFloats {
			continue
		}
		es := int64(sp.dtype.Size())
		if rel := b - sp.start; rel%es != 0 {
			so.cuts[sp.start+rel/es*es] = &cut{span: i, elem: int(rel / es)}
		}
	}
	return nil
}

// spanAt returns the index of the first span that ends after off.
func (so *segmentedObject[T]) spanAt(off int64) int {
	return sort.Search(len(so.spans), func(i int) bool { return so.spans[i].end > off })
}

// blame replaces an error found in the object's first bytes by the
// mismatch of the segment that holds them, if one of those segments does
// not verify: a damaged byte is then named by its segment however it
// shows in the header.
func (so *segmentedObject[T]) blame(ctx context.Context, err error) error {
	check := &segmentedObject[T]{dir: so.dir, obj: so.obj, segSize: so.segSize, rr: so.rr, head: so.head,
		spans: []span[T]{{start: 0, end: so.obj.Size, kind: sinkSkip}}}
	chunk := make([]byte, fetchChunk)
	for i := int64(0); i < segmentCount(int64(len(so.head)), so.segSize); i++ {
		if serr := check.fetch(ctx, int(i), chunk); serr != nil {
			if errors.Is(serr, ErrCorrupt) {
				return serr
			}
			break
		}
	}
	return err
}

// readRange reads n bytes of rr from off.
func readRange(ctx context.Context, rr RangeReader, off, n int64) ([]byte, error) {
	r, err := rr.ReadRange(ctx, off, n)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return b, nil
}

// readError describes a failed read of segment seg (-1: the header).
func (so *segmentedObject[T]) readError(seg int, err error) error {
	what := "header"
	if seg >= 0 {
		what = fmt.Sprintf("segment %d", seg)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %s: %s %s ends early: %v", ErrCorrupt, so.dir, so.obj.Name, what, err)
	}
	return fmt.Errorf("checkpoint: %s: %s %s: %w", so.dir, so.obj.Name, what, err)
}

// fetch reads segment seg into the targets, hashing it as it goes, and
// checks its digest. chunk is scratch memory of fetchChunk bytes.
func (so *segmentedObject[T]) fetch(ctx context.Context, seg int, chunk []byte) error {
	a := int64(seg) * so.segSize
	b := min(a+so.segSize, so.obj.Size)
	h := sha256.New()
	var parts []io.Reader
	headEnd := int64(len(so.head))
	if a < headEnd {
		parts = append(parts, bytes.NewReader(so.head[a:min(b, headEnd)]))
	}
	if b > headEnd {
		from := max(a, headEnd)
		body, err := so.rr.ReadRange(ctx, from, b-from)
		if err != nil {
			return so.readError(seg, err)
		}
		defer body.Close()
		parts = append(parts, body)
	}
	src := io.MultiReader(parts...)
	for i := so.spanAt(a); i < len(so.spans) && so.spans[i].start < b; i++ {
		sp := &so.spans[i]
		if err := so.read(src, h, sp, max(a, sp.start), min(b, sp.end), chunk); err != nil {
			return so.readError(seg, err)
		}
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != so.obj.Segments[seg] {
		return fmt.Errorf("%w: %s: %s segment %d of %d (bytes %d to %d) has sha256 %s, the manifest says %s",
			ErrCorrupt, so.dir, so.obj.Name, seg, len(so.obj.Segments), a, b, sum, so.obj.Segments[seg])
	}
	return nil
}

// read moves the bytes [lo, hi) of the object, which lie in sp, from src
// to where they go, hashing them into h.
func (so *segmentedObject[T]) read(src io.Reader, h hash.Hash, sp *span[T], lo, hi int64, chunk []byte) error {
	into := func(p []byte) error {
		for len(p) > 0 {
			c := p[:min(len(p), len(chunk))]
			if _, err := io.ReadFull(src, c); err != nil {
				return err
			}
			h.Write(c)
			p = p[len(c):]
		}
		return nil
	}
	switch sp.kind {
	case sinkSkip:
		for n := hi - lo; n > 0; {
			k := min(n, int64(len(chunk)))
			if err := into(chunk[:k]); err != nil {
				return err
			}
			n -= k
		}
		return nil
	case sinkBytes, sinkInts:
		return into(sp.dst[lo-sp.start : hi-sp.start])
	}
	// A converted tensor: whole elements through chunk, the parts of an
	// element that a segment boundary splits into its cut.
	es := int64(sp.dtype.Size())
	rel, relEnd := lo-sp.start, hi-sp.start
	headEnd := min((rel+es-1)/es*es, relEnd)
	if headEnd > rel {
		c, ok := so.cuts[sp.start+rel/es*es]
		if !ok {
			return fmt.Errorf("tensor %s: no cut at element %d", sp.name, rel/es)
		}
		if err := into(c.raw[rel%es : rel%es+headEnd-rel]); err != nil {
			return err
		}
	}
	tailStart := max(relEnd/es*es, headEnd)
	per := int64(len(chunk)) / es * es
	for off := headEnd; off < tailStart; {
		k := min(per, tailStart-off)
		if err := into(chunk[:k]); err != nil {
			return err
		}
		st := safetensors.Tensor{Name: sp.name, DType: sp.dtype, Shape: []int{int(k / es)}, Data: chunk[:k]}
		if err := safetensors.DecodeFloats(&st, sp.vals[off/es:(off+k)/es]); err != nil {
			return err
		}
		off += k
	}
	if relEnd > tailStart {
		c, ok := so.cuts[sp.start+tailStart]
		if !ok {
			return fmt.Errorf("tensor %s: no cut at element %d", sp.name, tailStart/es)
		}
		if err := into(c.raw[:relEnd-tailStart]); err != nil {
			return err
		}
	}
	return nil
}

// finish decodes what waited for every segment to be verified: the
// elements that segment boundaries split, and integer tensors.
func (so *segmentedObject[T]) finish() error {
	for _, c := range so.cuts {
		sp := &so.spans[c.span]
		es := sp.dtype.Size()
		st := safetensors.Tensor{Name: sp.name, DType: sp.dtype, Shape: []int{1}, Data: c.raw[:es]}
		if err := safetensors.DecodeFloats(&st, sp.vals[c.elem:c.elem+1]); err != nil {
			return fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, so.dir, so.obj.Name, err)
		}
	}
	for i := range so.spans {
		sp := &so.spans[i]
		if sp.kind != sinkInts {
			continue
		}
		st := safetensors.Tensor{Name: sp.name, DType: sp.dtype, Shape: []int{len(sp.ints)}, Data: sp.dst}
		v, err := st.Int64s()
		if err != nil {
			return fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, so.dir, so.obj.Name, err)
		}
		copy(sp.ints, v)
	}
	return nil
}
