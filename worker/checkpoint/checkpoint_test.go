package checkpoint

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/m2train/m2train/model"
)

func testState(step int) *State[float32] {
	cfg := model.DefaultConfig(16, 1, 32)
	cfg.HeadDim, cfg.NHeads, cfg.DState = 8, 4, 4
	l := model.NewLayout(cfg)
	s := &State[float32]{Config: cfg, Layout: l, Params: make([]float32, l.Total), M: make([]float32, l.Total), V: make([]float32, l.Total),
		Trainer: TrainerState{Step: step, Cursor: uint64(step * 8), Seed: 3, OptimizerStep: int64(step), Loss: 1.5, Precision: "float32"}}
	for i := range s.Params {
		s.Params[i] = float32(i) * 0.25
		s.M[i] = float32(i) * -0.5
		s.V[i] = float32(i) * 0.125
	}
	return s
}

func TestSaveLoadRoundTrip(t *testing.T) {
	ctx := context.Background()
	store := LocalStore{Root: t.TempDir()}
	want := testState(40)
	if _, err := Save(ctx, store, "job-1", want); err != nil {
		t.Fatal(err)
	}
	got, err := LoadLatest[float32](ctx, store, "job-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Params, want.Params) || !reflect.DeepEqual(got.M, want.M) || !reflect.DeepEqual(got.V, want.V) {
		t.Error("tensors differ after a round trip")
	}
	if !reflect.DeepEqual(got.Trainer, want.Trainer) {
		t.Errorf("trainer state %+v, want %+v", got.Trainer, want.Trainer)
	}
	if got.Config.DModel != 16 || got.Layout.Total != want.Layout.Total {
		t.Errorf("config %+v", got.Config)
	}
	// The checkpoint directory is a Hugging Face model directory.
	for _, f := range []string{ConfigObject, ModelObject} {
		if _, err := os.Stat(filepath.Join(store.Root, "job-1", StepDir(40), f)); err != nil {
			t.Error(err)
		}
	}
}

func TestUncommittedAndCorruptCheckpointsAreSkipped(t *testing.T) {
	ctx := context.Background()
	store := LocalStore{Root: t.TempDir()}
	for _, step := range []int{10, 20, 30} {
		if _, err := Save(ctx, store, "", testState(step)); err != nil {
			t.Fatal(err)
		}
	}
	// Step 30 lost its manifest (an upload that never finished): it does not exist.
	if err := store.Delete(ctx, StepDir(30)+"/"+ManifestObject); err != nil {
		t.Fatal(err)
	}
	// Step 20 has a corrupted optimizer state: it fails verification.
	p := filepath.Join(store.Root, StepDir(20), OptimizerObject)
	b, _ := os.ReadFile(p)
	b[100] ^= 1
	os.WriteFile(p, b, 0o644)

	steps, err := Steps(ctx, store, "")
	if err != nil || !reflect.DeepEqual(steps, []int{20, 10}) {
		t.Fatalf("committed steps %v (%v), want [20 10]", steps, err)
	}
	if _, _, err := ReadVerified(ctx, store, "", 20); !errors.Is(err, ErrCorrupt) {
		t.Errorf("corrupt checkpoint verified: %v", err)
	}
	s, err := LoadLatest[float32](ctx, store, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.Trainer.Step != 10 {
		t.Errorf("loaded step %d, want 10", s.Trainer.Step)
	}
}

func TestPruneKeepsNewest(t *testing.T) {
	ctx := context.Background()
	store := LocalStore{Root: t.TempDir()}
	for _, step := range []int{1, 2, 3, 4} {
		if _, err := Save(ctx, store, "p", testState(step)); err != nil {
			t.Fatal(err)
		}
	}
	if err := Prune(ctx, store, "p", 2); err != nil {
		t.Fatal(err)
	}
	steps, _ := Steps(ctx, store, "p")
	if !reflect.DeepEqual(steps, []int{4, 3}) {
		t.Errorf("kept %v, want [4 3]", steps)
	}
	names, _ := store.List(ctx, "p/"+StepDir(1))
	if len(names) != 0 {
		t.Errorf("pruned checkpoint left objects %v", names)
	}
}

func TestLoadLatestWithNothing(t *testing.T) {
	if _, err := LoadLatest[float32](context.Background(), LocalStore{Root: t.TempDir()}, "", nil); !errors.Is(err, ErrNone) {
		t.Errorf("got %v, want ErrNone", err)
	}
}

func TestLocalStoreRejectsEscapingNames(t *testing.T) {
	s := LocalStore{Root: t.TempDir()}
	if err := PutBytes(context.Background(), s, "../outside", []byte("x")); err == nil {
		t.Error("a name escaping the root was accepted")
	}
}

// TestLoadStreamsWhatDecodeReads checks the streaming Load against
// ReadVerified and Decode, in the buffers' own precision and in a wider
// one (float32 checkpoint into float64 buffers, exact).
func TestLoadStreamsWhatDecodeReads(t *testing.T) {
	ctx := context.Background()
	store := LocalStore{Root: t.TempDir()}
	want := testState(8)
	if _, err := Save(ctx, store, "", want); err != nil {
		t.Fatal(err)
	}
	got, man, err := Load[float32](ctx, store, "", 8)
	if err != nil {
		t.Fatal(err)
	}
	_, objs, err := ReadVerified(ctx, store, "", 8)
	if err != nil {
		t.Fatal(err)
	}
	dec, err := Decode[float32](objs)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, dec) || !reflect.DeepEqual(got.Params, want.Params) || !reflect.DeepEqual(got.V, want.V) {
		t.Error("Load and Decode disagree, or differ from what was saved")
	}
	if len(man.Objects) != 4 || man.Size() <= 0 {
		t.Errorf("manifest %+v", man)
	}
	wide, _, err := Load[float64](ctx, store, "", 8)
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range want.M {
		if wide.M[i] != float64(v) {
			t.Fatalf("exp_avg[%d] = %v in float64, %v saved", i, wide.M[i], v)
		}
	}
}

// TestLoadRejectsDamage damages a checkpoint in ways a checksum alone
// would not name, and checks that Load reports each as ErrCorrupt.
func TestLoadRejectsDamage(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		damage func(dir string)
	}{
		{"weights truncated", func(dir string) {
			p := filepath.Join(dir, ModelObject)
			b, _ := os.ReadFile(p)
			os.WriteFile(p, b[:len(b)-4], 0o644)
		}},
		{"weights grown", func(dir string) {
			p := filepath.Join(dir, ModelObject)
			b, _ := os.ReadFile(p)
			os.WriteFile(p, append(b, 0), 0o644)
		}},
		{"header length", func(dir string) {
			p := filepath.Join(dir, OptimizerObject)
			b, _ := os.ReadFile(p)
			b[7] = 0x7f
			os.WriteFile(p, b, 0o644)
		}},
		{"trainer state missing", func(dir string) { os.Remove(filepath.Join(dir, TrainerObject)) }},
		{"manifest garbage", func(dir string) { os.WriteFile(filepath.Join(dir, ManifestObject), []byte("{"), 0o644) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := LocalStore{Root: t.TempDir()}
			if _, err := Save(ctx, store, "", testState(4)); err != nil {
				t.Fatal(err)
			}
			tc.damage(filepath.Join(store.Root, StepDir(4)))
			if _, _, err := Load[float32](ctx, store, "", 4); !errors.Is(err, ErrCorrupt) {
				t.Errorf("Load: %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestLoadLatestAtMost checks the bound a restarted generation resumes
// under: the newest checkpoint at or before the committed step, whatever
// newer ones the store holds.
func TestLoadLatestAtMost(t *testing.T) {
	ctx := context.Background()
	store := LocalStore{Root: t.TempDir()}
	for _, step := range []int{4, 8, 12} {
		if _, err := Save(ctx, store, "", testState(step)); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ max, want int }{{-1, 12}, {12, 12}, {11, 8}, {8, 8}, {4, 4}} {
		s, err := LoadLatestAtMost[float32](ctx, store, "", c.max, nil)
		if err != nil {
			t.Fatalf("at most %d: %v", c.max, err)
		}
		if s.Trainer.Step != c.want {
			t.Errorf("at most %d: loaded step %d, want %d", c.max, s.Trainer.Step, c.want)
		}
	}
	if _, err := LoadLatestAtMost[float32](ctx, store, "", 3, nil); !errors.Is(err, ErrNone) {
		t.Errorf("at most 3: %v, want ErrNone", err)
	}
}
