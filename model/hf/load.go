package hf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/safetensors"
)

// File names of a checkpoint directory.
const (
	ConfigFile       = "config.json"
	WeightsFile      = "model.safetensors"
	WeightsIndexFile = "model.safetensors.index.json"
)

// nameEmbeddingSSM is mamba_ssm's spelling of the embedding; transformers
// renames it to model.NameEmbedding on load, and so do we.
const nameEmbeddingSSM = "backbone.embedding.weight"

// LoadParams reads the weights of dir (dir/model.safetensors, or the shards
// listed in dir/model.safetensors.index.json) into a new flat buffer laid
// out by layout (model.NewLayout(cfg) when nil). Files are memory-mapped, so
// a multi-GiB checkpoint is converted without a second copy. See
// LoadParamsFromFile for the matching rules.
func LoadParams[T model.Float](dir string, cfg model.Config, layout *model.Layout) ([]T, error) {
	single := filepath.Join(dir, WeightsFile)
	m, err := safetensors.Open(single)
	if err == nil {
		defer m.Close()
		params, err := LoadParamsFromFile[T](m.File, cfg, layout)
		return params, withSource(err, single)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	indexPath := filepath.Join(dir, WeightsIndexFile)
	if _, statErr := os.Stat(indexPath); statErr != nil {
		return nil, fmt.Errorf("hf: %s has neither %s nor %s: %w", dir, WeightsFile, WeightsIndexFile, err)
	}
	f, closeAll, err := openSharded(dir, indexPath)
	if err != nil {
		return nil, err
	}
	defer closeAll()
	params, err := LoadParamsFromFile[T](f, cfg, layout)
	return params, withSource(err, indexPath)
}

func withSource(err error, src string) error {
	var ce *CheckpointError
	if errors.As(err, &ce) && ce.Source == "" {
		ce.Source = src
	}
	return err
}

// openSharded maps every shard of a sharded checkpoint and merges their
// tensors, checking them against the index's weight_map.
func openSharded(dir, indexPath string) (*safetensors.File, func(), error) {
	data, err := os.ReadFile(indexPath)
	if err != nil {
		return nil, nil, fmt.Errorf("hf: %w", err)
	}
	var index struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	dec := json.NewDecoder(bytes.NewReader(quoteNonFinite(data)))
	if err := dec.Decode(&index); err != nil {
		return nil, nil, fmt.Errorf("%w: %s: weight_map: %v", ErrCheckpoint, indexPath, err)
	}
	if len(index.WeightMap) == 0 {
		return nil, nil, fmt.Errorf("%w: %s: weight_map is missing or empty", ErrCheckpoint, indexPath)
	}
	shardSet := map[string]bool{}
	for name, shard := range index.WeightMap {
		if shard == "" || filepath.Base(shard) != shard || shard == "." || shard == ".." {
			return nil, nil, fmt.Errorf("%w: %s: tensor %s maps to %q, which is not a file name in the checkpoint directory",
				ErrCheckpoint, indexPath, name, shard)
		}
		shardSet[shard] = true
	}
	shards := sortedKeys(shardSet)
	var opened []*safetensors.MappedFile
	closeAll := func() {
		for _, m := range opened {
			m.Close()
		}
	}
	merged := &safetensors.File{}
	where := map[string]string{}
	var problems []TensorProblem
	for _, shard := range shards {
		m, err := safetensors.Open(filepath.Join(dir, shard))
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		opened = append(opened, m)
		for _, t := range m.Tensors {
			switch {
			case where[t.Name] != "":
				problems = append(problems, TensorProblem{Name: t.Name, Actual: t.Shape,
					Problem: fmt.Sprintf("stored in both %s and %s", where[t.Name], shard)})
			case index.WeightMap[t.Name] != shard:
				problems = append(problems, TensorProblem{Name: t.Name, Actual: t.Shape,
					Problem: fmt.Sprintf("found in %s but the index maps it to %q", shard, index.WeightMap[t.Name])})
			default:
				merged.Tensors = append(merged.Tensors, t)
			}
			where[t.Name] = shard
		}
	}
	for _, name := range sortedKeys(index.WeightMap) {
		if where[name] == "" {
			problems = append(problems, TensorProblem{Name: name,
				Problem: fmt.Sprintf("listed in the index but absent from %s", index.WeightMap[name])})
		}
	}
	if len(problems) > 0 {
		closeAll()
		return nil, nil, &CheckpointError{Source: indexPath, Problems: problems}
	}
	return merged, closeAll, nil
}

// LoadParamsFromFile copies the tensors of f into a new flat buffer laid out
// by layout (model.NewLayout(cfg) when nil). Names are the Hugging Face
// ones; mamba_ssm's backbone.embedding.weight is accepted for the
// embedding. Any floating-point dtype is accepted and converted (exactly,
// except F64 into float32, which rounds to nearest even). With tied
// embeddings lm_head.weight may be absent or present; if present it must
// equal the embedding. Every missing, unexpected or mis-shaped tensor (and
// a non-float dtype) is reported in one *CheckpointError.
func LoadParamsFromFile[T model.Float](f *safetensors.File, cfg model.Config, layout *model.Layout) ([]T, error) {
	if layout == nil {
		layout = model.NewLayout(cfg)
	}
	byName := make(map[string]*safetensors.Tensor, len(f.Tensors))
	var problems []TensorProblem
	for i := range f.Tensors {
		t := &f.Tensors[i]
		name := t.Name
		if name == nameEmbeddingSSM {
			name = model.NameEmbedding
		}
		if prev, dup := byName[name]; dup {
			problems = append(problems, TensorProblem{Name: t.Name, Actual: t.Shape,
				Problem: fmt.Sprintf("duplicate of %s (both spellings of the embedding)", prev.Name)})
			continue
		}
		byName[name] = t
	}
	used := make(map[*safetensors.Tensor]bool, len(f.Tensors))
	params := make([]T, layout.Total)
	for i := range layout.Tensors {
		lt := &layout.Tensors[i]
		t, ok := byName[lt.Name]
		if !ok {
			problems = append(problems, TensorProblem{Name: lt.Name, Expected: lt.Shape, Problem: "missing"})
			continue
		}
		used[t] = true
		if !slices.Equal(t.Shape, lt.Shape) {
			problems = append(problems, TensorProblem{Name: t.Name, Expected: lt.Shape, Actual: t.Shape, Problem: "wrong shape"})
			continue
		}
		if !t.DType.IsFloat() {
			problems = append(problems, TensorProblem{Name: t.Name, Expected: lt.Shape, Actual: t.Shape,
				Problem: fmt.Sprintf("dtype %s is not a floating-point type", t.DType)})
			continue
		}
		if err := safetensors.DecodeFloats(t, model.View(params, lt)); err != nil {
			problems = append(problems, TensorProblem{Name: t.Name, Expected: lt.Shape, Actual: t.Shape, Problem: err.Error()})
		}
	}
	if _, inLayout := layout.Lookup(model.NameLMHead); !inLayout {
		if head, ok := byName[model.NameLMHead]; ok {
			used[head] = true
			if p, bad := checkTiedHead(head, byName[model.NameEmbedding], layout); bad {
				problems = append(problems, p)
			}
		}
	}
	var extra []TensorProblem
	for _, t := range byName {
		if !used[t] {
			extra = append(extra, TensorProblem{Name: t.Name, Actual: t.Shape, Problem: "unexpected (not part of the model)"})
		}
	}
	sort.Slice(extra, func(i, j int) bool { return extra[i].Name < extra[j].Name })
	problems = append(problems, extra...)
	if len(problems) > 0 {
		return nil, &CheckpointError{Problems: problems}
	}
	return params, nil
}

// checkTiedHead verifies that a stored lm_head.weight of a tied model equals
// the embedding, bit for bit when both have the same dtype and value for
// value otherwise.
func checkTiedHead(head, emb *safetensors.Tensor, layout *model.Layout) (TensorProblem, bool) {
	want := layout.Must(model.NameEmbedding).Shape
	p := TensorProblem{Name: head.Name, Expected: want, Actual: head.Shape}
	if !slices.Equal(head.Shape, want) {
		p.Problem = "wrong shape for the tied LM head"
		return p, true
	}
	if emb == nil || !slices.Equal(emb.Shape, want) || !emb.DType.IsFloat() {
		return p, false // the embedding's own problem is reported
	}
	if !head.DType.IsFloat() {
		p.Problem = fmt.Sprintf("dtype %s is not a floating-point type", head.DType)
		return p, true
	}
	if head.DType == emb.DType {
		if bytes.Equal(head.Data, emb.Data) {
			return p, false
		}
	} else {
		a, errA := head.Float64s()
		b, errB := emb.Float64s()
		if errA == nil && errB == nil && equalValues(a, b) {
			return p, false
		}
	}
	p.Problem = "differs from " + model.NameEmbedding + " although the embeddings are tied"
	return p, true
}

func equalValues(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] && !(a[i] != a[i] && b[i] != b[i]) { // NaN equals NaN here
			return false
		}
	}
	return true
}
