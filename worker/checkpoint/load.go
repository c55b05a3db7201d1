package checkpoint

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"slices"
	"sort"
	"sync"
	"unsafe"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/safetensors"
)

// littleEndian says whether float buffers already hold safetensors'
// byte order, so that tensors of the buffer's own dtype move as bytes.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// bytesOf views a float buffer as its bytes.
func bytesOf[T model.Float](v []T) []byte {
	if len(v) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), len(v)*int(unsafe.Sizeof(v[0])))
}

// asyncHasher hashes, on a goroutine of its own, chunks that the reader
// has finished with, so that hashing overlaps the next read.
type asyncHasher struct {
	h       hash.Hash
	chunks  chan []byte
	pending sync.WaitGroup
	done    chan struct{}
}

func newAsyncHasher() *asyncHasher {
	a := &asyncHasher{h: sha256.New(), chunks: make(chan []byte, 4), done: make(chan struct{})}
	go func() {
		defer close(a.done)
		for c := range a.chunks {
			a.h.Write(c)
			a.pending.Done()
		}
	}()
	return a
}

// add queues c, which must not change until flush returns.
func (a *asyncHasher) add(c []byte) {
	if len(c) > 0 {
		a.pending.Add(1)
		a.chunks <- c
	}
}

// flush waits until every queued chunk is hashed.
func (a *asyncHasher) flush() { a.pending.Wait() }

// sum ends the hasher and returns the digest in hex.
func (a *asyncHasher) sum() string {
	close(a.chunks)
	<-a.done
	return hex.EncodeToString(a.h.Sum(nil))
}

// stop ends the hasher without a digest.
func (a *asyncHasher) stop() {
	close(a.chunks)
	<-a.done
}

// objectStream reads one object of a checkpoint, hashing what it reads,
// and checks at the end that size and digest match the manifest.
type objectStream struct {
	r    io.Reader
	h    *asyncHasher
	obj  Object
	dir  string
	read int64
}

// readFull fills p from the object; p must not change until the stream
// is finished or flushed.
func (s *objectStream) readFull(p []byte) error {
	for len(p) > 0 {
		c := p[:min(len(p), readChunk)]
		n, err := io.ReadFull(s.r, c)
		s.h.add(c[:n])
		s.read += int64(n)
		p = p[n:]
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return fmt.Errorf("%w: %s: %s ends after %d bytes, the manifest says %d", ErrCorrupt, s.dir, s.obj.Name, s.read, s.obj.Size)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// finish checks that the object has no bytes left and that its digest is
// the manifest's.
func (s *objectStream) finish() error {
	var one [1]byte
	if n, _ := s.r.Read(one[:]); n > 0 || s.read != s.obj.Size {
		s.h.stop()
		return fmt.Errorf("%w: %s: %s is not the %d bytes the manifest says", ErrCorrupt, s.dir, s.obj.Name, s.obj.Size)
	}
	if sum := s.h.sum(); sum != s.obj.SHA256 {
		return fmt.Errorf("%w: %s: %s has sha256 %s, the manifest says %s", ErrCorrupt, s.dir, s.obj.Name, sum, s.obj.SHA256)
	}
	return nil
}

// stEntry is one tensor of a safetensors header.
type stEntry struct {
	name  string
	dtype safetensors.DType
	shape []int
	start int64
	end   int64
}

// readHeader reads and checks the header of a streamed safetensors object.
func readHeader(s *objectStream) ([]stEntry, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s: %s", ErrCorrupt, s.dir, s.obj.Name, fmt.Sprintf(format, args...))
	}
	var lenBuf [8]byte
	if err := s.readFull(lenBuf[:]); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > safetensors.MaxHeaderSize || int64(n) > s.obj.Size-8 {
		return nil, bad("header length %d does not fit", n)
	}
	header := make([]byte, n)
	if err := s.readFull(header); err != nil {
		return nil, err
	}
	entries, err := parseHeader(header, s.obj.Size)
	if err != nil {
		return nil, bad("%v", err)
	}
	return entries, nil
}

// parseHeader parses the JSON header of a safetensors object of size
// bytes and checks that its tensors, sorted by offset, tile the rest of
// the object.
func parseHeader(header []byte, size int64) ([]stEntry, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(header, &raw); err != nil {
		return nil, fmt.Errorf("header: %v", err)
	}
	var entries []stEntry
	for name, r := range raw {
		if name == "__metadata__" {
			continue
		}
		var e struct {
			DType       string  `json:"dtype"`
			Shape       []int   `json:"shape"`
			DataOffsets []int64 `json:"data_offsets"`
		}
		if err := json.Unmarshal(r, &e); err != nil || len(e.DataOffsets) != 2 {
			return nil, fmt.Errorf("tensor %s: malformed entry", name)
		}
		entries = append(entries, stEntry{name: name, dtype: safetensors.DType(e.DType), shape: e.Shape, start: e.DataOffsets[0], end: e.DataOffsets[1]})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].start < entries[j].start })
	var off int64
	for _, e := range entries {
		elems := int64(1)
		for _, d := range e.shape {
			if d < 0 || (d > 0 && elems > math.MaxInt64/int64(d)) {
				return nil, fmt.Errorf("tensor %s: shape %v", e.name, e.shape)
			}
			elems *= int64(d)
		}
		if !e.dtype.Valid() || e.start != off || elems > (math.MaxInt64-off)/int64(e.dtype.Size()) || e.end-e.start != elems*int64(e.dtype.Size()) {
			return nil, fmt.Errorf("tensor %s: dtype %s, shape %v and offsets [%d, %d] do not fit at offset %d", e.name, e.dtype, e.shape, e.start, e.end, off)
		}
		off = e.end
	}
	if end := 8 + int64(len(header)) + off; end != size {
		return nil, fmt.Errorf("tensors end at %d, the object has %d bytes", end, size)
	}
	return entries, nil
}

// target is where one stored tensor goes.
type target[T model.Float] struct {
	shape []int
	vals  []T     // float tensors
	ints  []int64 // the optimizer step
}

// streamTensors reads a safetensors object of the manifest straight into
// the targets, verifying its size and digest. Every target must be in the
// object and the object must hold nothing else.
func streamTensors[T model.Float](ctx context.Context, store Store, dir string, obj Object, targets map[string]target[T]) error {
	r, err := store.Open(ctx, JoinKey(dir, obj.Name))
	if errors.Is(err, ErrNotFound) {
		return fmt.Errorf("%w: %s: %s is missing", ErrCorrupt, dir, obj.Name)
	}
	if err != nil {
		return err
	}
	defer r.Close()
	s := &objectStream{r: r, h: newAsyncHasher(), obj: obj, dir: dir}
	entries, err := readHeader(s)
	if err != nil {
		s.h.stop()
		return err
	}
	if err := checkTargets(entries, targets); err != nil {
		s.h.stop()
		return fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, dir, obj.Name, err)
	}
	var scratch []byte
	for _, e := range entries {
		t := targets[e.name]
		switch {
		case t.ints != nil:
			b := make([]byte, e.end-e.start)
			if err := s.readFull(b); err != nil {
				s.h.stop()
				return err
			}
			st := safetensors.Tensor{Name: e.name, DType: e.dtype, Shape: e.shape, Data: b}
			v, err := st.Int64s()
			if err != nil {
				s.h.stop()
				return fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, dir, obj.Name, err)
			}
			copy(t.ints, v)
		case littleEndian && e.dtype == dtypeOf[T]():
			// The stored bytes are the buffer's bytes: read them in place.
			if err := s.readFull(bytesOf(t.vals)); err != nil {
				s.h.stop()
				return err
			}
		default:
			size := e.dtype.Size()
			for done := 0; done < len(t.vals); {
				k := min(len(t.vals)-done, readChunk/size)
				// The scratch buffer is reused: its last chunk must be hashed first.
				s.h.flush()
				scratch = slices.Grow(scratch[:0], k*size)[:k*size]
				if err := s.readFull(scratch); err != nil {
					s.h.stop()
					return err
				}
				st := safetensors.Tensor{Name: e.name, DType: e.dtype, Shape: []int{k}, Data: scratch}
				if err := safetensors.DecodeFloats(&st, t.vals[done:done+k]); err != nil {
					s.h.stop()
					return fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, dir, obj.Name, err)
				}
				done += k
			}
		}
	}
	return s.finish()
}

func checkTargets[T model.Float](entries []stEntry, targets map[string]target[T]) error {
	seen := make(map[string]bool, len(entries))
	for _, e := range entries {
		t, ok := targets[e.name]
		if !ok {
			return fmt.Errorf("tensor %s is not part of the model", e.name)
		}
		seen[e.name] = true
		if !slices.Equal(e.shape, t.shape) {
			return fmt.Errorf("tensor %s has shape %v, the model %v", e.name, e.shape, t.shape)
		}
		if t.ints != nil && !e.dtype.IsInt() || t.ints == nil && !e.dtype.IsFloat() {
			return fmt.Errorf("tensor %s has dtype %s", e.name, e.dtype)
		}
	}
	for name := range targets {
		if !seen[name] {
			return fmt.Errorf("tensor %s is missing", name)
		}
	}
	return nil
}

// Load reads step's checkpoint under prefix straight into new buffers
// with the default options; see LoadWith.
func Load[T model.Float](ctx context.Context, store Store, prefix string, step int) (*State[T], *Manifest, error) {
	return LoadWith[T](ctx, store, prefix, step, LoadOptions{})
}

// LoadWith reads step's checkpoint under prefix straight into new
// buffers, checking every byte against a SHA-256 of the manifest; only
// the buffers of the state are held in memory. A missing or mismatched
// object is ErrCorrupt, and the state is then not returned.
//
// With a manifest that lists segments and a store that reads ranges (a
// RangeStore), the tensor objects are fetched segment by segment,
// opts.Concurrency segments at once, and each segment is verified against
// its own digest as it arrives; a mismatch names the object and the
// segment. Otherwise each object streams whole and is verified against
// its whole digest.
func LoadWith[T model.Float](ctx context.Context, store Store, prefix string, step int, opts LoadOptions) (*State[T], *Manifest, error) {
	if err := opts.Validate(); err != nil {
		return nil, nil, err
	}
	man, err := ReadManifest(ctx, store, prefix, step)
	if err != nil {
		return nil, nil, err
	}
	dir := JoinKey(prefix, StepDir(step))
	byName := map[string]Object{}
	for _, o := range man.Objects {
		byName[o.Name] = o
	}
	for _, n := range []string{ConfigObject, ModelObject, OptimizerObject, TrainerObject} {
		if _, ok := byName[n]; !ok {
			return nil, nil, fmt.Errorf("%w: %s: the manifest does not list %s", ErrCorrupt, dir, n)
		}
	}
	small := map[string][]byte{}
	for _, o := range man.Objects {
		if o.Name == ModelObject || o.Name == OptimizerObject {
			continue
		}
		// Every listed object is verified, those this version does not use too.
		b, err := readObject(ctx, store, dir, o)
		if errors.Is(err, ErrNotFound) {
			err = fmt.Errorf("%w: %s: %s is missing", ErrCorrupt, dir, o.Name)
		}
		if err != nil {
			return nil, nil, err
		}
		small[o.Name] = b
	}
	cfg, _, err := hf.ParseConfig(small[ConfigObject])
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, dir, ConfigObject, err)
	}
	layout := model.NewLayout(cfg)
	s := &State[T]{Config: cfg, Layout: layout, Params: make([]T, layout.Total), M: make([]T, layout.Total), V: make([]T, layout.Total)}
	if err := json.Unmarshal(small[TrainerObject], &s.Trainer); err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, dir, TrainerObject, err)
	}
	weights := map[string]target[T]{}
	moments := map[string]target[T]{}
	for i := range layout.Tensors {
		t := &layout.Tensors[i]
		weights[t.Name] = target[T]{shape: t.Shape, vals: model.View(s.Params, t)}
		moments["exp_avg."+t.Name] = target[T]{shape: t.Shape, vals: model.View(s.M, t)}
		moments["exp_avg_sq."+t.Name] = target[T]{shape: t.Shape, vals: model.View(s.V, t)}
	}
	optStep := make([]int64, 1)
	moments["step"] = target[T]{shape: []int{1}, ints: optStep}
	if rs, ok := store.(RangeStore); ok && man.SegmentSize > 0 {
		err = loadSegmented(ctx, rs, dir, man.SegmentSize, opts.concurrency(), []tensorObject[T]{
			{byName[ModelObject], weights}, {byName[OptimizerObject], moments}})
	} else {
		err = streamBoth(ctx, store, dir, byName[ModelObject], weights, byName[OptimizerObject], moments)
	}
	if err != nil {
		return nil, nil, err
	}
	if optStep[0] != s.Trainer.OptimizerStep {
		return nil, nil, fmt.Errorf("%w: %s: %s: step %d disagrees with %s's optimizer_step %d", ErrCorrupt, dir, OptimizerObject, optStep[0], TrainerObject, s.Trainer.OptimizerStep)
	}
	if s.Trainer.Step != step {
		return nil, nil, fmt.Errorf("%w: %s: %s says step %d", ErrCorrupt, dir, TrainerObject, s.Trainer.Step)
	}
	return s, man, nil
}

// streamBoth streams two tensor objects at once, each verified whole: the
// hashing, the bulk of the work, then runs on two cores.
func streamBoth[T model.Float](ctx context.Context, store Store, dir string, a Object, ta map[string]target[T], b Object, tb map[string]target[T]) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, 1)
	go func() {
		err := streamTensors(ctx, store, dir, b, tb)
		if err != nil {
			cancel()
		}
		errs <- err
	}()
	err := streamTensors(ctx, store, dir, a, ta)
	if err != nil {
		cancel()
	}
	if berr := <-errs; err == nil || (errors.Is(err, context.Canceled) && berr != nil) {
		err = berr
	}
	return err
}
