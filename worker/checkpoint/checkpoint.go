// Package checkpoint owns the on-storage format of training checkpoints
// (docs/DESIGN.md §5), the stores they live in (a local directory or an
// S3 bucket), their asynchronous upload and their retention.
//
// A checkpoint of step S lives under PREFIX/step-%08d/ and holds
// config.json and model.safetensors (a Hugging Face checkpoint that
// transformers loads: the master weights under HF names, in the trainer's
// precision), optimizer.safetensors (the AdamW moments as exp_avg.NAME and
// exp_avg_sq.NAME, and the step), trainer.json (the job spec, the data
// cursor as a global sample index, the seed from which the data order
// follows, and the schedule position) and manifest.json, written last,
// with the size and SHA-256 of every other object, whole and in segments
// of a fixed size. A checkpoint exists only once its manifest exists: the
// manifest is the commit point. Resume verifies every byte against a
// SHA-256 of the manifest before it trusts it, and falls back to an older
// checkpoint when one fails or an object is missing. Nothing in a
// checkpoint depends on the number of workers that wrote it.
//
// Objects are encoded and hashed while they stream to the store, so a save
// holds no second copy of the tensors. A load fetches the segments of the
// tensor objects in parallel and verifies each on its own. This package is
// the only one that talks to S3 (through minio-go).
package checkpoint

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/safetensors"
)

// Object names inside a checkpoint.
const (
	ConfigObject    = "config.json"
	ModelObject     = "model.safetensors"
	OptimizerObject = "optimizer.safetensors"
	TrainerObject   = "trainer.json"
	ManifestObject  = "manifest.json"
	// ManifestFormat identifies the schema of the manifests Save writes:
	// objects with their segment digests.
	ManifestFormat = "m2train-checkpoint/v2"
	// ManifestFormatV1 is the schema of manifests without segments, which
	// Load still reads (verifying each object whole).
	ManifestFormatV1 = "m2train-checkpoint/v1"
)

// Errors of the package.
var (
	ErrNotFound = errors.New("checkpoint: not found")
	ErrCorrupt  = errors.New("checkpoint: corrupt")
	ErrNone     = errors.New("checkpoint: no valid checkpoint")
)

// Manifest lists the objects of a committed checkpoint.
type Manifest struct {
	Format string `json:"format"`
	Step   int    `json:"step"`
	// SegmentSize is the size in bytes of the segments whose digests each
	// object lists (every segment but an object's last has this size);
	// 0 in a v1 manifest, which has no segments.
	SegmentSize int64    `json:"segment_size,omitempty"`
	Objects     []Object `json:"objects"`
}

// Size returns the total size of the objects the manifest lists.
func (m *Manifest) Size() int64 {
	var n int64
	for _, o := range m.Objects {
		n += o.Size
	}
	return n
}

// Object is one file of a checkpoint with its size and SHA-256, the
// latter whole (what sha256sum prints) and of each segment.
type Object struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	// Segments are the SHA-256 digests of bytes [i·S, min((i+1)·S, Size))
	// for S the manifest's SegmentSize, in hex: ceil(Size/S) of them.
	Segments []string `json:"segments,omitempty"`
}

// TrainerState is what the trainer needs besides the tensors to continue a
// run exactly where it stopped. The data order is a pure function of Seed
// and Cursor, so they are the whole state of the data pipeline's random
// number generator; the learning-rate schedule's position is Step.
type TrainerState struct {
	Step          int             `json:"step"`           // optimizer steps done
	Cursor        uint64          `json:"cursor"`         // global sample index of the next step
	Seed          uint64          `json:"seed"`           // data order and initialisation seed
	OptimizerStep int64           `json:"optimizer_step"` // AdamW bias-correction step
	Loss          float64         `json:"loss"`           // loss of the last step
	Precision     string          `json:"precision"`
	Spec          json.RawMessage `json:"spec,omitempty"`
}

// State is a checkpoint's content in memory.
type State[T model.Float] struct {
	Config  model.Config
	Layout  *model.Layout
	Params  []T
	M, V    []T
	Trainer TrainerState
}

// StepDir is the name of step's checkpoint directory under a prefix.
func StepDir(step int) string { return fmt.Sprintf("step-%08d", step) }

func dtypeOf[T model.Float]() safetensors.DType {
	var z T
	if _, ok := any(z).(float64); ok {
		return safetensors.F64
	}
	return safetensors.F32
}

// source is one object of a checkpoint, ready to stream.
type source struct {
	name string
	size int64
	r    io.Reader
}

// sources returns the objects of s, except the manifest, as readers that
// encode the tensors while they are read.
func sources[T model.Float](s *State[T]) ([]source, error) {
	if s.Layout == nil {
		return nil, fmt.Errorf("checkpoint: state of step %d has no layout", s.Trainer.Step)
	}
	for _, b := range []struct {
		name string
		n    int
	}{{"params", len(s.Params)}, {"m", len(s.M)}, {"v", len(s.V)}} {
		if b.n != s.Layout.Total {
			return nil, fmt.Errorf("checkpoint: state of step %d: %s has %d elements, the layout %d", s.Trainer.Step, b.name, b.n, s.Layout.Total)
		}
	}
	dt := dtypeOf[T]()
	cfgJSON, err := hf.MarshalHFConfig(s.Config)
	if err != nil {
		return nil, err
	}
	weights := make([]tensorData[T], 0, len(s.Layout.Tensors))
	for i := range s.Layout.Tensors {
		t := &s.Layout.Tensors[i]
		weights = append(weights, tensorData[T]{name: t.Name, shape: t.Shape, vals: model.View(s.Params, t)})
	}
	weightsR, err := newTensorReader(weights, dt, map[string]string{"format": "pt"})
	if err != nil {
		return nil, err
	}
	var moments []tensorData[T]
	for _, mom := range []struct {
		prefix string
		buf    []T
	}{{"exp_avg.", s.M}, {"exp_avg_sq.", s.V}} {
		for i := range s.Layout.Tensors {
			t := &s.Layout.Tensors[i]
			moments = append(moments, tensorData[T]{name: mom.prefix + t.Name, shape: t.Shape, vals: model.View(mom.buf, t)})
		}
	}
	step := safetensors.FromInt64s("step", []int{1}, []int64{s.Trainer.OptimizerStep})
	moments = append(moments, tensorData[T]{name: step.Name, shape: step.Shape, raw: step.Data, dtype: step.DType})
	opt, err := newTensorReader(moments, dt, nil)
	if err != nil {
		return nil, err
	}
	tj, err := json.MarshalIndent(s.Trainer, "", "  ")
	if err != nil {
		return nil, err
	}
	return []source{
		{ConfigObject, int64(len(cfgJSON)), bytes.NewReader(cfgJSON)},
		{ModelObject, weightsR.size, weightsR},
		{OptimizerObject, opt.size, opt},
		{TrainerObject, int64(len(tj)), bytes.NewReader(tj)},
	}, nil
}

// Save writes s under prefix/step-N/ in store with the default options
// and returns its manifest; see SaveWith.
func Save[T model.Float](ctx context.Context, store Store, prefix string, s *State[T]) (*Manifest, error) {
	return SaveWith(ctx, store, prefix, s, SaveOptions{})
}

// SaveWith writes s under prefix/step-N/ in store and returns its
// manifest. The objects stream to the store as they are encoded, each
// hashed on the way, whole and per segment; the manifest goes last and
// commits the checkpoint. An earlier manifest of the same step is removed
// first, so that a checkpoint is never committed with objects of another
// save. When a write fails, SaveWith deletes what it wrote (best effort,
// even after ctx ended) and the step is left uncommitted.
func SaveWith[T model.Float](ctx context.Context, store Store, prefix string, s *State[T], opts SaveOptions) (*Manifest, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	segSize := opts.segmentSize()
	srcs, err := sources(s)
	if err != nil {
		return nil, err
	}
	dir := JoinKey(prefix, StepDir(s.Trainer.Step))
	if err := store.Delete(ctx, JoinKey(dir, ManifestObject)); err != nil {
		return nil, fmt.Errorf("checkpoint: save %s: remove the old manifest: %w", dir, err)
	}
	man := &Manifest{Format: ManifestFormat, Step: s.Trainer.Step, SegmentSize: segSize}
	var written []string
	fail := func(err error) (*Manifest, error) {
		removeObjects(store, append([]string{JoinKey(dir, ManifestObject)}, written...))
		return nil, fmt.Errorf("checkpoint: save %s: %w", dir, err)
	}
	for _, src := range srcs {
		key := JoinKey(dir, src.name)
		d := newDigester(src.r, segSize)
		written = append(written, key)
		if err := store.Put(ctx, key, d, src.size); err != nil {
			return fail(err)
		}
		if d.n != src.size {
			return fail(fmt.Errorf("%s: wrote %d bytes, encoded %d", src.name, d.n, src.size))
		}
		whole, segments := d.sums()
		man.Objects = append(man.Objects, Object{Name: src.name, Size: d.n, SHA256: whole, Segments: segments})
	}
	mj, err := json.MarshalIndent(man, "", "  ")
	if err != nil {
		return fail(err)
	}
	if err := PutBytes(ctx, store, JoinKey(dir, ManifestObject), mj); err != nil {
		return fail(err)
	}
	return man, nil
}

// removeObjects deletes names, manifests first, with a context of its own:
// it runs after a failure, often because the caller's context ended.
func removeObjects(store Store, names []string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, n := range names {
		if store.Delete(ctx, n) != nil && ctx.Err() != nil {
			return
		}
	}
}

// stepOf parses the step of a key under prefix/step-N/, and the name of
// the object below it.
func stepOf(prefix, key string) (step int, name string, ok bool) {
	rest, found := strings.CutPrefix(key, JoinKey(prefix, "step-"))
	if !found {
		return 0, "", false
	}
	d, name, found := strings.Cut(rest, "/")
	if !found || len(d) < 8 {
		return 0, "", false
	}
	step, err := strconv.Atoi(d)
	if err != nil || step < 0 {
		return 0, "", false
	}
	return step, name, true
}

// Steps lists the steps that have a manifest under prefix, newest first.
func Steps(ctx context.Context, store Store, prefix string) ([]int, error) {
	names, err := store.List(ctx, JoinKey(prefix, "step-"))
	if err != nil {
		return nil, err
	}
	var steps []int
	for _, n := range names {
		if s, file, ok := stepOf(prefix, n); ok && file == ManifestObject {
			steps = append(steps, s)
		}
	}
	sort.Sort(sort.Reverse(sort.IntSlice(steps)))
	return steps, nil
}

// ReadManifest reads and checks the manifest of step's checkpoint.
func ReadManifest(ctx context.Context, store Store, prefix string, step int) (*Manifest, error) {
	dir := JoinKey(prefix, StepDir(step))
	mj, err := GetBytes(ctx, store, JoinKey(dir, ManifestObject))
	if err != nil {
		return nil, err
	}
	var man Manifest
	if err := json.Unmarshal(mj, &man); err != nil {
		return nil, fmt.Errorf("%w: %s: manifest: %v", ErrCorrupt, dir, err)
	}
	if err := man.validate(step); err != nil {
		return nil, fmt.Errorf("%w: %s: manifest: %v", ErrCorrupt, dir, err)
	}
	return &man, nil
}

// validate checks a manifest read for step, naming the field and the rule
// a bad value breaks.
func (m *Manifest) validate(step int) error {
	switch m.Format {
	case ManifestFormat:
		if m.SegmentSize < MinSegmentSize || m.SegmentSize > MaxSegmentSize {
			return fmt.Errorf("segment_size must be between %d and %d, got %d", MinSegmentSize, MaxSegmentSize, m.SegmentSize)
		}
	case ManifestFormatV1:
		if m.SegmentSize != 0 {
			return fmt.Errorf("format %s has no segment_size, got %d", ManifestFormatV1, m.SegmentSize)
		}
	default:
		return fmt.Errorf("format %q is not %q or %q", m.Format, ManifestFormat, ManifestFormatV1)
	}
	if m.Step != step {
		return fmt.Errorf("step is %d, want %d", m.Step, step)
	}
	seen := map[string]bool{}
	for i, o := range m.Objects {
		switch {
		case o.Name == "" || strings.Contains(o.Name, "/") || o.Name == ManifestObject:
			return fmt.Errorf("objects[%d]: name %q must be a plain object name other than %s", i, o.Name, ManifestObject)
		case seen[o.Name]:
			return fmt.Errorf("objects[%d]: %s is listed twice", i, o.Name)
		case o.Size < 0:
			return fmt.Errorf("objects[%d]: %s: size %d is negative", i, o.Name, o.Size)
		case !isDigest(o.SHA256):
			return fmt.Errorf("objects[%d]: %s: sha256 %q is not 64 lowercase hex digits", i, o.Name, o.SHA256)
		}
		seen[o.Name] = true
		if m.SegmentSize == 0 {
			if o.Segments != nil {
				return fmt.Errorf("objects[%d]: %s: format %s has no segments", i, o.Name, ManifestFormatV1)
			}
			continue
		}
		if want := segmentCount(o.Size, m.SegmentSize); int64(len(o.Segments)) != want {
			return fmt.Errorf("objects[%d]: %s: %d segments, want %d for %d bytes in segments of %d", i, o.Name, len(o.Segments), want, o.Size, m.SegmentSize)
		}
		for j, d := range o.Segments {
			if !isDigest(d) {
				return fmt.Errorf("objects[%d]: %s: segments[%d] %q is not 64 lowercase hex digits", i, o.Name, j, d)
			}
		}
	}
	return nil
}

// isDigest says whether s is a SHA-256 digest as hex.EncodeToString
// writes it, the form the verifications compare against.
func isDigest(s string) bool {
	if len(s) != 2*sha256.Size {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// readChunk is the size of the reads of ReadVerified, whose hashing
// overlaps the next read.
const readChunk = 4 << 20

// readObject reads an object of the size the manifest gives while hashing
// it, and fails unless both match.
func readObject(ctx context.Context, store Store, dir string, o Object) ([]byte, error) {
	r, err := store.Open(ctx, JoinKey(dir, o.Name))
	if err != nil {
		return nil, err
	}
	defer r.Close()
	buf := make([]byte, o.Size)
	h := sha256.New()
	// The hash of one chunk runs while the next is read.
	chunks := make(chan []byte, 2)
	hashed := make(chan struct{})
	go func() {
		for c := range chunks {
			h.Write(c)
		}
		close(hashed)
	}()
	var n int
	for n < len(buf) && err == nil {
		var k int
		k, err = io.ReadFull(r, buf[n:min(n+readChunk, len(buf))])
		if k > 0 {
			chunks <- buf[n : n+k]
		}
		n += k
	}
	close(chunks)
	<-hashed
	if err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return nil, fmt.Errorf("%w: %s: %s has %d bytes, the manifest says %d", ErrCorrupt, dir, o.Name, n, o.Size)
		}
		return nil, err
	}
	var one [1]byte
	if k, _ := r.Read(one[:]); k > 0 {
		return nil, fmt.Errorf("%w: %s: %s is longer than the %d bytes the manifest says", ErrCorrupt, dir, o.Name, o.Size)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != o.SHA256 {
		return nil, fmt.Errorf("%w: %s: %s has sha256 %s, the manifest says %s", ErrCorrupt, dir, o.Name, sum, o.SHA256)
	}
	return buf, nil
}

// ReadVerified reads every object of step's checkpoint and checks its
// size and SHA-256 against the manifest. A missing object is ErrCorrupt:
// the checkpoint is unusable, not absent.
func ReadVerified(ctx context.Context, store Store, prefix string, step int) (*Manifest, map[string][]byte, error) {
	man, err := ReadManifest(ctx, store, prefix, step)
	if err != nil {
		return nil, nil, err
	}
	dir := JoinKey(prefix, StepDir(step))
	objs := map[string][]byte{}
	for _, o := range man.Objects {
		b, err := readObject(ctx, store, dir, o)
		if errors.Is(err, ErrNotFound) {
			err = fmt.Errorf("%w: %s: %s is missing", ErrCorrupt, dir, o.Name)
		}
		if err != nil {
			return nil, nil, err
		}
		objs[o.Name] = b
	}
	return man, objs, nil
}

// Decode rebuilds a State from verified objects; the configuration comes
// from the checkpoint's config.json.
func Decode[T model.Float](objs map[string][]byte) (*State[T], error) {
	for _, n := range []string{ConfigObject, ModelObject, OptimizerObject, TrainerObject} {
		if _, ok := objs[n]; !ok {
			return nil, fmt.Errorf("%w: object %s is missing", ErrCorrupt, n)
		}
	}
	cfg, _, err := hf.ParseConfig(objs[ConfigObject])
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, ConfigObject, err)
	}
	layout := model.NewLayout(cfg)
	mf, err := safetensors.Read(objs[ModelObject])
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, ModelObject, err)
	}
	params, err := hf.LoadParamsFromFile[T](mf, cfg, layout)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, ModelObject, err)
	}
	s := &State[T]{Config: cfg, Layout: layout, Params: params, M: make([]T, layout.Total), V: make([]T, layout.Total)}
	of, err := safetensors.Read(objs[OptimizerObject])
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, OptimizerObject, err)
	}
	for _, mom := range []struct {
		prefix string
		buf    []T
	}{{"exp_avg.", s.M}, {"exp_avg_sq.", s.V}} {
		for _, t := range layout.Tensors {
			st, ok := of.Get(mom.prefix + t.Name)
			if !ok {
				return nil, fmt.Errorf("%w: %s: tensor %s%s is missing", ErrCorrupt, OptimizerObject, mom.prefix, t.Name)
			}
			if st.NumElements() != t.Size {
				return nil, fmt.Errorf("%w: %s: tensor %s%s has %d elements, want %d", ErrCorrupt, OptimizerObject, mom.prefix, t.Name, st.NumElements(), t.Size)
			}
			if err := safetensors.DecodeFloats(st, model.View(mom.buf, &t)); err != nil {
				return nil, fmt.Errorf("%w: %s: %s%s: %v", ErrCorrupt, OptimizerObject, mom.prefix, t.Name, err)
			}
		}
	}
	if err := json.Unmarshal(objs[TrainerObject], &s.Trainer); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, TrainerObject, err)
	}
	st, ok := of.Get("step")
	if !ok {
		return nil, fmt.Errorf("%w: %s: tensor step is missing", ErrCorrupt, OptimizerObject)
	}
	if v, err := st.Int64s(); err != nil || len(v) != 1 || v[0] != s.Trainer.OptimizerStep {
		return nil, fmt.Errorf("%w: %s: step %v (%v) disagrees with %s's optimizer_step %d", ErrCorrupt, OptimizerObject, v, err, TrainerObject, s.Trainer.OptimizerStep)
	}
	return s, nil
}

// LoadLatest returns the newest checkpoint under prefix that verifies,
// logging every newer one it had to skip and why. It returns ErrNone when
// no checkpoint verifies.
func LoadLatest[T model.Float](ctx context.Context, store Store, prefix string, log *slog.Logger) (*State[T], error) {
	return LoadLatestAtMost[T](ctx, store, prefix, -1, log)
}

// LoadLatestAtMost is LoadLatest among the checkpoints of step maxStep or
// earlier (maxStep < 0: any step). A job restarted by its coordinator
// resumes with it from the checkpoint the coordinator committed, even when
// a newer one was written but its commit never happened.
func LoadLatestAtMost[T model.Float](ctx context.Context, store Store, prefix string, maxStep int, log *slog.Logger) (*State[T], error) {
	steps, err := Steps(ctx, store, prefix)
	if err != nil {
		return nil, err
	}
	if maxStep >= 0 {
		steps = slices.DeleteFunc(steps, func(s int) bool { return s > maxStep })
	}
	for i, step := range steps {
		s, _, err := Load[T](ctx, store, prefix, step)
		if err == nil {
			return s, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if log != nil {
			next := "none is left"
			if i+1 < len(steps) {
				next = "trying step " + strconv.Itoa(steps[i+1])
			}
			log.Warn("checkpoint does not verify; falling back to the previous one", "store", store.String(),
				"dir", JoinKey(prefix, StepDir(step)), "step", step, "err", err, "fallback", next)
		}
	}
	return nil, ErrNone
}

// Prune deletes all but the newest keep committed checkpoints under prefix
// (keep <= 0 keeps everything), and the objects of uncommitted steps older
// than the newest committed one: leftovers of saves that failed. The
// manifest goes first, so that a partly deleted checkpoint is never taken
// for a committed one. Steps newer than the newest committed one are left
// alone: a save may be writing them.
func Prune(ctx context.Context, store Store, prefix string, keep int) error {
	names, err := store.List(ctx, JoinKey(prefix, "step-"))
	if err != nil {
		return err
	}
	objects := map[int][]string{}
	committed := map[int]bool{}
	for _, n := range names {
		if s, file, ok := stepOf(prefix, n); ok {
			objects[s] = append(objects[s], n)
			committed[s] = committed[s] || file == ManifestObject
		}
	}
	var steps []int
	for s := range committed {
		if committed[s] {
			steps = append(steps, s)
		}
	}
	if len(steps) == 0 {
		return nil
	}
	sort.Sort(sort.Reverse(sort.IntSlice(steps)))
	newest := steps[0]
	drop := map[int]bool{}
	if keep > 0 {
		for _, s := range steps[min(keep, len(steps)):] {
			drop[s] = true
		}
	}
	for s := range objects {
		if !committed[s] && s < newest {
			drop[s] = true
		}
	}
	for s := range drop {
		dir := JoinKey(prefix, StepDir(s))
		if err := store.Delete(ctx, JoinKey(dir, ManifestObject)); err != nil {
			return err
		}
		for _, n := range objects[s] {
			if err := store.Delete(ctx, n); err != nil {
				return err
			}
		}
	}
	return nil
}

// Cleanup removes what writers that died left under prefix: incomplete
// multipart uploads (on stores that have them) and uncommitted steps older
// than the newest committed one. Run it before the first save of a job,
// never while another process may be saving under the same prefix.
func Cleanup(ctx context.Context, store Store, prefix string, log *slog.Logger) error {
	if j, ok := store.(UploadJanitor); ok {
		n, err := j.AbortIncomplete(ctx, JoinKey(prefix, "step-"))
		if err != nil {
			return err
		}
		if n > 0 && log != nil {
			log.Info("aborted incomplete uploads of an earlier run", "store", store.String(), "prefix", prefix, "uploads", n)
		}
	}
	return Prune(ctx, store, prefix, 0)
}
