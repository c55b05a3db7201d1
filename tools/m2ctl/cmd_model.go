package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/model/safetensors"
	"github.com/m2train/m2train/worker/data"
)

func init() { root.AddCommand(newModelCmd()) }

func newModelCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "model", Short: "Inspect and check the numerics of a model"}
	cmd.AddCommand(newModelGradsCmd(), newModelLogitsCmd())
	return cmd
}

// gradsArgs are the inputs of `m2ctl model grads`.
type gradsArgs struct {
	modelDir, tokens, out, precision string
	normGroups                       int
}

func newModelGradsCmd() *cobra.Command {
	var a gradsArgs
	cmd := &cobra.Command{
		Use:   "grads --model DIR --tokens FILE --out FILE",
		Short: "Write logits, loss and every parameter gradient of a checkpoint on given tokens",
		Long: `Loads a Hugging Face Mamba-2 checkpoint directory (config.json + model.safetensors),
reads input_ids (int64, [batch, L]) from a safetensors file, runs the CPU reference
backend forward and backward, and writes a safetensors file holding logits
([batch, L, V]), loss ([1]: mean causal-LM cross-entropy over positions 0..L-2, each
predicting the next token), hidden_states.K (the residual stream after layer K, and
the final norm output for K = n_layer) and grad.<name> for every parameter, all in
the chosen precision. This is how the numerics are checked against another
implementation.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch a.precision {
			case "float64":
				return modelGrads[float64](cmd.Context(), a, safetensors.F64)
			case "float32":
				return modelGrads[float32](cmd.Context(), a, safetensors.F32)
			default:
				return usagef("--precision: must be float64 or float32, got %q", a.precision)
			}
		},
	}
	f := cmd.Flags()
	f.StringVar(&a.modelDir, "model", "", "Hugging Face checkpoint directory (required)")
	f.StringVar(&a.tokens, "tokens", "", "safetensors file with input_ids, int64 [batch, L] (required)")
	f.StringVar(&a.out, "out", "", "output safetensors file (required)")
	f.StringVar(&a.precision, "precision", "float64", "float64 or float32")
	f.IntVar(&a.normGroups, "gated-norm-groups", 0, "groups of the gated RMSNorm: 0 = n_groups (mamba_ssm); 1 = over all channels, as transformers' pure-PyTorch path does")
	for _, n := range []string{"model", "tokens", "out"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

// loadHFModel builds the CPU reference model of a Hugging Face checkpoint
// directory with its weights, the gated norm split into normGroups groups
// (0: n_groups).
func loadHFModel[T model.Float](dir string, normGroups int) (*ref.Model[T], error) {
	cfg, _, err := hf.ReadConfigFile(filepath.Join(dir, hf.ConfigFile))
	if err != nil {
		return nil, usageError{err}
	}
	cfg.GatedNormGroups = normGroups
	m, err := ref.New[T](cfg)
	if err != nil {
		return nil, usageError{err}
	}
	params, err := hf.LoadParams[T](dir, cfg, m.Layout())
	if err != nil {
		return nil, usageError{err}
	}
	copy(m.Params(), params)
	return m, nil
}

func modelGrads[T model.Float](ctx context.Context, a gradsArgs, dtype safetensors.DType) error {
	m, err := loadHFModel[T](a.modelDir, a.normGroups)
	if err != nil {
		return err
	}
	cfg := m.Config()
	b, err := readInputIDs(a.tokens)
	if err != nil {
		return err
	}
	if ctx == nil {
		ctx = context.Background()
	}
	r, err := m.ForwardBackward(ctx, b, model.StepOptions{KeepLogits: true, KeepHidden: true})
	if err != nil {
		return usageError{err}
	}
	var out []safetensors.Tensor
	add := func(name string, shape []int, v []float64) error {
		t, err := safetensors.FromFloat64s(name, shape, v, dtype)
		if err != nil {
			return err
		}
		out = append(out, t)
		return nil
	}
	bt, l, V, D := b.Batch, b.SeqLen, cfg.VocabSize, cfg.DModel
	if err := add("logits", []int{bt, l, V}, r.Logits); err != nil {
		return err
	}
	if err := add("loss", []int{1}, []float64{r.Loss}); err != nil {
		return err
	}
	for k, h := range r.Hidden {
		if err := add("hidden_states."+strconv.Itoa(k), []int{bt, l, D}, h); err != nil {
			return err
		}
	}
	g := m.Grads()
	for _, t := range m.Layout().Tensors {
		v := model.View(g, &t)
		f := make([]float64, len(v))
		for i, x := range v {
			f[i] = float64(x)
		}
		if err := add("grad."+t.Name, t.Shape, f); err != nil {
			return err
		}
	}
	meta := map[string]string{"backend": m.Name(), "loss": "mean causal-LM cross-entropy over positions 0..L-2"}
	if err := safetensors.WriteFile(a.out, out, meta); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "m2ctl: loss %.10g over %d positions; wrote %d tensors to %s\n", r.Loss, r.Count, len(out), a.out)
	return nil
}

// readInputIDs reads input_ids (integer, [batch, L]) and builds the batch
// with the causal-LM targets: position t predicts token t+1 and the last
// position of each row has no target.
func readInputIDs(path string) (*model.Batch, error) {
	f, err := safetensors.ReadFile(path)
	if err != nil {
		return nil, usageError{err}
	}
	t, ok := f.Get("input_ids")
	if !ok {
		return nil, usagef("%s: no tensor named input_ids", path)
	}
	if len(t.Shape) != 2 || t.Shape[0] <= 0 || t.Shape[1] <= 0 {
		return nil, usagef("%s: input_ids must have shape [batch, L] with both positive, got %v", path, t.Shape)
	}
	ids, err := t.Int64s()
	if err != nil {
		return nil, usagef("%s: input_ids: %v", path, err)
	}
	bt, l := t.Shape[0], t.Shape[1]
	b := &model.Batch{Batch: bt, SeqLen: l, Inputs: make([]int32, bt*l), Targets: make([]int32, bt*l)}
	for i, v := range ids {
		if v < 0 || v > 1<<31-1 {
			return nil, usagef("%s: input_ids[%d] = %d is not a valid token id", path, i, v)
		}
		b.Inputs[i] = int32(v)
		b.Targets[i] = -1
		if i%l != l-1 {
			b.Targets[i] = int32(ids[i+1])
		}
	}
	return b, nil
}

// logitsArgs are the inputs of `m2ctl model logits`.
type logitsArgs struct {
	modelDir, tokens, random, out, precision string
	seed                                     uint64
	normGroups                               int
}

func newModelLogitsCmd() *cobra.Command {
	var a logitsArgs
	cmd := &cobra.Command{
		Use:   "logits --model DIR (--tokens FILE | --random-tokens BxL [--seed N]) --out FILE",
		Short: "Write the logits of a checkpoint on given or seeded random tokens",
		Long: `Loads a Hugging Face Mamba-2 checkpoint directory (config.json +
model.safetensors, any float dtype), runs the CPU reference backend forward
(no gradients) on input_ids and writes a safetensors file holding input_ids
(int64, [batch, L]), logits ([batch, L, V]) and loss ([1]: mean causal-LM
cross-entropy over positions 0..L-2), the floats in the chosen precision.

The input ids come from a safetensors file (--tokens, a tensor named
input_ids, integer [batch, L]) or are drawn uniformly from [0, vocab_size) by
SplitMix64 seeded with --seed (--random-tokens 2x64: batch 2, L 64). Because
the output carries its input ids, another implementation can recompute the
same logits from the file alone: tools/hfcheck/export_check.sh does so with
transformers.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (a.tokens == "") == (a.random == "") {
				return usagef("--tokens, --random-tokens: give exactly one")
			}
			switch a.precision {
			case "float64":
				return modelLogits[float64](cmd.Context(), a, safetensors.F64, cmd.ErrOrStderr())
			case "float32":
				return modelLogits[float32](cmd.Context(), a, safetensors.F32, cmd.ErrOrStderr())
			default:
				return usagef("--precision: must be float64 or float32, got %q", a.precision)
			}
		},
	}
	f := cmd.Flags()
	f.StringVar(&a.modelDir, "model", "", "Hugging Face checkpoint directory (required)")
	f.StringVar(&a.tokens, "tokens", "", "safetensors file with input_ids, integer [batch, L]")
	f.StringVar(&a.random, "random-tokens", "", "draw input ids of shape BATCHxL (e.g. 2x64) uniformly from the vocabulary")
	f.Uint64Var(&a.seed, "seed", 0, "seed of --random-tokens")
	f.StringVar(&a.out, "out", "", "output safetensors file (required)")
	f.StringVar(&a.precision, "precision", "float64", "float64 or float32")
	f.IntVar(&a.normGroups, "gated-norm-groups", 0, "groups of the gated RMSNorm: 0 = n_groups (mamba_ssm); 1 = over all channels, as transformers' pure-PyTorch path does")
	for _, n := range []string{"model", "out"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

func modelLogits[T model.Float](ctx context.Context, a logitsArgs, dtype safetensors.DType, log io.Writer) error {
	m, err := loadHFModel[T](a.modelDir, a.normGroups)
	if err != nil {
		return err
	}
	cfg := m.Config()
	var b *model.Batch
	if a.tokens != "" {
		b, err = readInputIDs(a.tokens)
	} else {
		b, err = randomInputIDs(a.random, a.seed, cfg.VocabSize)
	}
	if err != nil {
		return err
	}
	if err := b.Validate(cfg.VocabSize); err != nil {
		return usageError{err}
	}
	if ctx == nil {
		ctx = context.Background()
	}
	r, err := m.Forward(ctx, b, model.StepOptions{KeepLogits: true})
	if err != nil {
		return err
	}
	ids := make([]int64, len(b.Inputs))
	for i, v := range b.Inputs {
		ids[i] = int64(v)
	}
	logits, err := safetensors.FromFloat64s("logits", []int{b.Batch, b.SeqLen, cfg.VocabSize}, r.Logits, dtype)
	if err != nil {
		return err
	}
	loss, err := safetensors.FromFloat64s("loss", []int{1}, []float64{r.Loss}, dtype)
	if err != nil {
		return err
	}
	out := []safetensors.Tensor{safetensors.FromInt64s("input_ids", []int{b.Batch, b.SeqLen}, ids), logits, loss}
	meta := map[string]string{
		"backend":           m.Name(),
		"gated_norm_groups": strconv.Itoa(cfg.NormGroups()),
		"loss":              "mean causal-LM cross-entropy over positions 0..L-2",
	}
	if err := safetensors.WriteFile(a.out, out, meta); err != nil {
		return err
	}
	fmt.Fprintf(log, "m2ctl: logits [%d, %d, %d] and loss %.10g of %s written to %s\n", b.Batch, b.SeqLen, cfg.VocabSize, r.Loss, a.modelDir, a.out)
	return nil
}

// randomInputIDs draws a batch of the shape "BATCHxL" with tokens uniform
// in [0, vocab) from a SplitMix64 stream seeded with seed, and the
// causal-LM targets readInputIDs would give it.
func randomInputIDs(shape string, seed uint64, vocab int) (*model.Batch, error) {
	bs, ls, ok := strings.Cut(strings.ToLower(shape), "x")
	bt, err1 := strconv.Atoi(bs)
	l, err2 := strconv.Atoi(ls)
	if !ok || err1 != nil || err2 != nil || bt <= 0 || l <= 0 {
		return nil, usagef("--random-tokens: %q, want BATCHxL with both positive, e.g. 2x64", shape)
	}
	if bt*l > 1<<24 {
		return nil, usagef("--random-tokens: %d×%d tokens, at most %d", bt, l, 1<<24)
	}
	g := data.SplitMix64{State: seed}
	b := &model.Batch{Batch: bt, SeqLen: l, Inputs: make([]int32, bt*l), Targets: make([]int32, bt*l)}
	for i := range b.Inputs {
		b.Inputs[i] = int32(g.Below(uint64(vocab)))
	}
	for i := range b.Targets {
		b.Targets[i] = -1
		if i%l != l-1 {
			b.Targets[i] = b.Inputs[i+1]
		}
	}
	return b, nil
}
