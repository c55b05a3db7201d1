// Package checkpoint owns the on-storage format of training checkpoints
// (docs/DESIGN.md §5) and their retention. A checkpoint of step S lives
// under PREFIX/step-%08d/ and holds config.json and model.safetensors (a
// Hugging Face checkpoint that transformers loads), optimizer.safetensors
// (the AdamW moments and step), trainer.json (the job spec, data cursor and
// schedule position) and manifest.json, written last, with the size and
// SHA-256 of every other object. A checkpoint exists only once its manifest
// exists; resume verifies every checksum and falls back to an older
// checkpoint when one fails.
package checkpoint

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"

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
	manifestFormat  = "m2train-checkpoint/v1"
)

// Errors of the package.
var (
	ErrNotFound = errors.New("checkpoint: not found")
	ErrCorrupt  = errors.New("checkpoint: corrupt")
	ErrNone     = errors.New("checkpoint: no valid checkpoint")
)

// Store is where checkpoints live: a local directory or an S3 bucket prefix.
// Put must make an object visible whole or not at all.
type Store interface {
	Put(ctx context.Context, name string, data []byte) error
	Get(ctx context.Context, name string) ([]byte, error)
	// List returns the names under prefix, sorted.
	List(ctx context.Context, prefix string) ([]string, error)
	Delete(ctx context.Context, name string) error
	String() string
}

// Manifest lists the objects of a committed checkpoint.
type Manifest struct {
	Format  string   `json:"format"`
	Step    int      `json:"step"`
	Objects []Object `json:"objects"`
}

// Object is one file of a checkpoint with its size and SHA-256.
type Object struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// TrainerState is what the trainer needs besides the tensors to continue a
// run exactly where it stopped.
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

// Encode serialises s into the objects of a checkpoint, manifest last.
func Encode[T model.Float](s *State[T]) (names []string, blobs [][]byte, err error) {
	dt := dtypeOf[T]()
	cfgJSON, err := hf.MarshalHFConfig(s.Config)
	if err != nil {
		return nil, nil, err
	}
	tensors, err := hf.ParamTensors(s.Layout, s.Params, dt)
	if err != nil {
		return nil, nil, err
	}
	var mbuf bytes.Buffer
	if err := safetensors.Write(&mbuf, tensors, map[string]string{"format": "pt"}); err != nil {
		return nil, nil, err
	}
	var opt []safetensors.Tensor
	for _, mom := range []struct {
		prefix string
		buf    []T
	}{{"exp_avg.", s.M}, {"exp_avg_sq.", s.V}} {
		ts, err := hf.ParamTensors(s.Layout, mom.buf, dt)
		if err != nil {
			return nil, nil, err
		}
		for i := range ts {
			ts[i].Name = mom.prefix + ts[i].Name
		}
		opt = append(opt, ts...)
	}
	opt = append(opt, safetensors.FromInt64s("step", []int{1}, []int64{s.Trainer.OptimizerStep}))
	var obuf bytes.Buffer
	if err := safetensors.Write(&obuf, opt, nil); err != nil {
		return nil, nil, err
	}
	tj, err := json.MarshalIndent(s.Trainer, "", "  ")
	if err != nil {
		return nil, nil, err
	}
	names = []string{ConfigObject, ModelObject, OptimizerObject, TrainerObject}
	blobs = [][]byte{cfgJSON, mbuf.Bytes(), obuf.Bytes(), tj}
	man := Manifest{Format: manifestFormat, Step: s.Trainer.Step}
	for i, n := range names {
		sum := sha256.Sum256(blobs[i])
		man.Objects = append(man.Objects, Object{Name: n, Size: int64(len(blobs[i])), SHA256: hex.EncodeToString(sum[:])})
	}
	mj, err := json.MarshalIndent(man, "", "  ")
	if err != nil {
		return nil, nil, err
	}
	return append(names, ManifestObject), append(blobs, mj), nil
}

// Save writes s under prefix/step-N/ in store, the manifest last.
func Save[T model.Float](ctx context.Context, store Store, prefix string, s *State[T]) error {
	names, blobs, err := Encode(s)
	if err != nil {
		return err
	}
	dir := join(prefix, StepDir(s.Trainer.Step))
	for i, n := range names {
		if err := store.Put(ctx, join(dir, n), blobs[i]); err != nil {
			return fmt.Errorf("checkpoint: save %s: %w", join(dir, n), err)
		}
	}
	return nil
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return strings.TrimSuffix(a, "/") + "/" + b
}

// Steps lists the steps that have a manifest under prefix, newest first.
func Steps(ctx context.Context, store Store, prefix string) ([]int, error) {
	names, err := store.List(ctx, join(prefix, "step-"))
	if err != nil {
		return nil, err
	}
	var steps []int
	for _, n := range names {
		rest := strings.TrimPrefix(n, join(prefix, "step-"))
		d, file, ok := strings.Cut(rest, "/")
		if !ok || file != ManifestObject {
			continue
		}
		if s, err := strconv.Atoi(d); err == nil {
			steps = append(steps, s)
		}
	}
	sort.Sort(sort.Reverse(sort.IntSlice(steps)))
	return steps, nil
}

// ReadVerified reads every object of step's checkpoint and checks it
// against the manifest.
func ReadVerified(ctx context.Context, store Store, prefix string, step int) (*Manifest, map[string][]byte, error) {
	dir := join(prefix, StepDir(step))
	mj, err := store.Get(ctx, join(dir, ManifestObject))
	if err != nil {
		return nil, nil, err
	}
	var man Manifest
	if err := json.Unmarshal(mj, &man); err != nil {
		return nil, nil, fmt.Errorf("%w: %s: manifest: %v", ErrCorrupt, dir, err)
	}
	if man.Format != manifestFormat || man.Step != step {
		return nil, nil, fmt.Errorf("%w: %s: manifest format %q step %d, want %q step %d", ErrCorrupt, dir, man.Format, man.Step, manifestFormat, step)
	}
	objs := map[string][]byte{}
	for _, o := range man.Objects {
		b, err := store.Get(ctx, join(dir, o.Name))
		if err != nil {
			return nil, nil, fmt.Errorf("%w: %s: %s: %v", ErrCorrupt, dir, o.Name, err)
		}
		sum := sha256.Sum256(b)
		if int64(len(b)) != o.Size || hex.EncodeToString(sum[:]) != o.SHA256 {
			return nil, nil, fmt.Errorf("%w: %s: %s: size %d sha256 %x, manifest says size %d sha256 %s",
				ErrCorrupt, dir, o.Name, len(b), sum, o.Size, o.SHA256)
		}
		objs[o.Name] = b
	}
	return &man, objs, nil
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
			v, err := st.Float64s()
			if err != nil {
				return nil, fmt.Errorf("%w: %s: %s%s: %v", ErrCorrupt, OptimizerObject, mom.prefix, t.Name, err)
			}
			dst := model.View(mom.buf, &t)
			for i, x := range v {
				dst[i] = T(x)
			}
		}
	}
	if err := json.Unmarshal(objs[TrainerObject], &s.Trainer); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, TrainerObject, err)
	}
	if st, ok := of.Get("step"); ok {
		if v, err := st.Int64s(); err == nil && len(v) == 1 && v[0] != s.Trainer.OptimizerStep {
			return nil, fmt.Errorf("%w: optimizer step %d disagrees with trainer.json's %d", ErrCorrupt, v[0], s.Trainer.OptimizerStep)
		}
	}
	return s, nil
}

// LoadLatest returns the newest checkpoint under prefix that verifies,
// logging every newer one it had to skip and why. It returns ErrNone when
// no checkpoint verifies.
func LoadLatest[T model.Float](ctx context.Context, store Store, prefix string, log *slog.Logger) (*State[T], error) {
	steps, err := Steps(ctx, store, prefix)
	if err != nil {
		return nil, err
	}
	for _, step := range steps {
		_, objs, err := ReadVerified(ctx, store, prefix, step)
		if err == nil {
			var s *State[T]
			if s, err = Decode[T](objs); err == nil {
				return s, nil
			}
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if log != nil {
			log.Warn("skipping checkpoint that does not verify; falling back to an older one", "store", store.String(), "step", step, "err", err)
		}
	}
	return nil, ErrNone
}

// Prune deletes all but the newest keep committed checkpoints under prefix
// (keep <= 0 keeps everything). The manifest goes first, so that a partly
// deleted checkpoint is never taken for a committed one.
func Prune(ctx context.Context, store Store, prefix string, keep int) error {
	if keep <= 0 {
		return nil
	}
	steps, err := Steps(ctx, store, prefix)
	if err != nil {
		return err
	}
	for _, step := range steps[min(keep, len(steps)):] {
		dir := join(prefix, StepDir(step))
		if err := store.Delete(ctx, join(dir, ManifestObject)); err != nil {
			return err
		}
		names, err := store.List(ctx, dir+"/")
		if err != nil {
			return err
		}
		for _, n := range names {
			if err := store.Delete(ctx, n); err != nil {
				return err
			}
		}
	}
	return nil
}
