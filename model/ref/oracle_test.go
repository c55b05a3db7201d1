package ref

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/safetensors"
)

var oracleDir = filepath.Join("..", "testdata", "oracle", "tiny-mamba2")

// oracleBatch returns the oracle's input ids with the causal-LM targets of
// testdata/oracle/README.md: position t predicts token t+1; the last
// position of each row has no target.
func oracleBatch(t *testing.T, exp *safetensors.File) *model.Batch {
	t.Helper()
	ids, ok := exp.Get("input_ids")
	if !ok {
		t.Fatal("expected.safetensors has no input_ids")
	}
	vals, err := ids.Int64s()
	if err != nil {
		t.Fatal(err)
	}
	bt, l := ids.Shape[0], ids.Shape[1]
	b := &model.Batch{Batch: bt, SeqLen: l, Inputs: make([]int32, bt*l), Targets: make([]int32, bt*l)}
	for i, v := range vals {
		b.Inputs[i] = int32(v)
		b.Targets[i] = -1
		if i%l != l-1 {
			b.Targets[i] = int32(vals[i+1])
		}
	}
	return b
}

func expectTensor(t *testing.T, exp *safetensors.File, name string) []float64 {
	t.Helper()
	tn, ok := exp.Get(name)
	if !ok {
		t.Fatalf("expected.safetensors has no %s", name)
	}
	v, err := tn.Float64s()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func runOracle[T model.Float](t *testing.T, recurrent bool, tol float64) {
	cfg, _, err := hf.ReadConfigFile(filepath.Join(oracleDir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := New[T](cfg)
	if err != nil {
		t.Fatal(err)
	}
	m.Recurrent = recurrent
	params, err := hf.LoadParams[T](oracleDir, cfg, m.Layout())
	if err != nil {
		t.Fatal(err)
	}
	copy(m.Params(), params)
	exp, err := safetensors.ReadFile(filepath.Join(oracleDir, "expected.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	b := oracleBatch(t, exp)
	r, err := m.ForwardBackward(context.Background(), b, model.StepOptions{KeepLogits: true, KeepHidden: true})
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, got []float64) {
		t.Helper()
		want := expectTensor(t, exp, name)
		if len(got) != len(want) {
			t.Fatalf("%s: %d values, oracle has %d", name, len(got), len(want))
		}
		e := maxRelErr(got, want)
		t.Logf("%-55s max rel err %.3g", name, e)
		if e > tol {
			t.Errorf("%s: relative error %.3g exceeds %.0e", name, e, tol)
		}
	}
	check("logits", r.Logits)
	check("loss", []float64{r.Loss})
	for k, h := range r.Hidden {
		check(fmt.Sprintf("hidden_states.%d", k), h)
	}
	for _, tn := range m.Layout().Tensors {
		check("grad."+tn.Name, model.BoundaryFloat64s(model.View(m.Grads(), &tn)))
	}
}

func TestOracleFloat64(t *testing.T) {
	t.Run("chunked", func(t *testing.T) { runOracle[float64](t, false, 1e-9) })
	t.Run("recurrent", func(t *testing.T) { runOracle[float64](t, true, 1e-9) })
}

func TestOracleFloat32(t *testing.T) {
	runOracle[float32](t, false, 1e-4)
}
