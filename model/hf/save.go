package hf

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/safetensors"
)

// encodeChunk is the number of elements converted per write when streaming
// a tensor, bounding the scratch memory of SaveCheckpoint.
const encodeChunk = 1 << 16

// ParamTensors returns the named tensors of a flat buffer laid out by
// layout, encoded in dtype (F32, F64, F16 or BF16; narrowing rounds to
// nearest even). Each tensor owns a copy of its bytes.
func ParamTensors[T model.Float](layout *model.Layout, params []T, dtype safetensors.DType) ([]safetensors.Tensor, error) {
	if err := checkBuffer(layout, len(params), dtype); err != nil {
		return nil, err
	}
	out := make([]safetensors.Tensor, len(layout.Tensors))
	for i := range layout.Tensors {
		lt := &layout.Tensors[i]
		t, err := safetensors.FromFloats(lt.Name, lt.Shape, model.View(params, lt), dtype)
		if err != nil {
			return nil, err
		}
		out[i] = t
	}
	return out, nil
}

// streamTensors is ParamTensors without the copy: each tensor is encoded in
// chunks while the file is written.
func streamTensors[T model.Float](layout *model.Layout, params []T, dtype safetensors.DType) []safetensors.StreamTensor {
	out := make([]safetensors.StreamTensor, len(layout.Tensors))
	var scratch []byte
	for i := range layout.Tensors {
		lt := &layout.Tensors[i]
		vals := model.View(params, lt)
		out[i] = safetensors.StreamTensor{Name: lt.Name, DType: dtype, Shape: lt.Shape, WriteData: func(w io.Writer) error {
			for start := 0; start < len(vals); start += encodeChunk {
				end := min(start+encodeChunk, len(vals))
				var err error
				if scratch, err = safetensors.AppendFloats(scratch[:0], vals[start:end], dtype); err != nil {
					return err
				}
				if _, err := w.Write(scratch); err != nil {
					return err
				}
			}
			return nil
		}}
	}
	return out
}

func checkBuffer(layout *model.Layout, n int, dtype safetensors.DType) error {
	if layout == nil {
		return fmt.Errorf("%w: layout is nil", ErrCheckpoint)
	}
	if n != layout.Total {
		return fmt.Errorf("%w: parameter buffer has %d elements, the layout %d", ErrCheckpoint, n, layout.Total)
	}
	if !dtype.IsFloat() {
		return fieldErr(ErrUnsupported, "dtype", "checkpoints store F32, F64, F16 or BF16, got %q", string(dtype))
	}
	return nil
}

// SaveCheckpoint writes a Hugging Face checkpoint directory that
// transformers' Mamba2ForCausalLM.from_pretrained loads: model.safetensors
// (the tensors of params under HF names in dtype, metadata format "pt";
// lm_head.weight is absent when the embeddings are tied, as the layout
// omits it) and config.json (MarshalHFConfig). layout nil means
// model.NewLayout(cfg). Both files are replaced atomically, the weights
// first, so a config.json never describes weights that are not complete.
func SaveCheckpoint[T model.Float](dir string, cfg model.Config, layout *model.Layout, params []T, dtype safetensors.DType) error {
	if layout == nil {
		layout = model.NewLayout(cfg)
	}
	cfgJSON, err := MarshalHFConfig(cfg)
	if err != nil {
		return err
	}
	if err := checkBuffer(layout, len(params), dtype); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("hf: %w", err)
	}
	meta := map[string]string{"format": "pt"}
	if err := safetensors.WriteStreamFile(filepath.Join(dir, WeightsFile), streamTensors(layout, params, dtype), meta); err != nil {
		return err
	}
	return safetensors.AtomicWrite(filepath.Join(dir, ConfigFile), func(w io.Writer) error {
		_, err := w.Write(cfgJSON)
		return err
	})
}
