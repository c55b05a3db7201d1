package train

import (
	"context"
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
)

// emulatedDevice is a model.DeviceBackend on the CPU, for testing the
// trainer's device path without a GPU. The "device" state is the reference
// model's own parameter and gradient buffers, which the passes use, and a
// private pair of optimizer moments; the host mirrors that Params and Grads
// return are separate slices that change only at SyncToHost and
// SyncFromHost, as on a GPU in explicit mode. A trainer that reads or writes
// the wrong copy therefore trains differently from the plain path.
type emulatedDevice[T model.Float] struct {
	dev                   *ref.Model[T]
	hostParams, hostGrads []T
	devM, devV            []T // nil until the first OptimizerStep or SyncFromHost(SyncMoments)
	scratch               []T
	auto                  bool
	closed                bool

	// Calls, for the tests' checks.
	optimizerSteps, toHost, fromHost int
}

var _ model.DeviceBackend[float32] = (*emulatedDevice[float32])(nil)

// newEmulatedDevice returns an emulated device for cfg with zero device
// parameters, starting in automatic mode when auto is set.
func newEmulatedDevice[T model.Float](t *testing.T, cfg model.Config, auto bool) *emulatedDevice[T] {
	t.Helper()
	m, err := ref.New[T](cfg)
	if err != nil {
		t.Fatal(err)
	}
	n := m.Layout().Total
	return &emulatedDevice[T]{dev: m, hostParams: make([]T, n), hostGrads: make([]T, n), scratch: make([]T, n), auto: auto}
}

var errEmulatedClosed = errors.New("emulated device: closed")

func (e *emulatedDevice[T]) Name() string          { return "emulated-" + e.dev.Name() }
func (e *emulatedDevice[T]) Config() model.Config  { return e.dev.Config() }
func (e *emulatedDevice[T]) Layout() *model.Layout { return e.dev.Layout() }
func (e *emulatedDevice[T]) Params() []T           { return e.hostParams }
func (e *emulatedDevice[T]) Grads() []T            { return e.hostGrads }
func (e *emulatedDevice[T]) Device() string        { return "host memory standing in for a device" }
func (e *emulatedDevice[T]) AutoSync() bool        { return e.auto }

func (e *emulatedDevice[T]) ZeroGrads() {
	if e.auto {
		clear(e.hostGrads)
		return
	}
	e.dev.ZeroGrads()
}

func (e *emulatedDevice[T]) ForwardBackward(ctx context.Context, b *model.Batch, o model.StepOptions) (model.StepResult, error) {
	if e.closed {
		return model.StepResult{}, errEmulatedClosed
	}
	if e.auto {
		return model.StepResult{}, errors.New("emulated device: passes in automatic mode are not emulated")
	}
	return e.dev.ForwardBackward(ctx, b, o)
}

func (e *emulatedDevice[T]) Forward(ctx context.Context, b *model.Batch, o model.StepOptions) (model.StepResult, error) {
	if e.closed {
		return model.StepResult{}, errEmulatedClosed
	}
	if e.auto {
		return model.StepResult{}, errors.New("emulated device: passes in automatic mode are not emulated")
	}
	return e.dev.Forward(ctx, b, o)
}

// SetAutoSync moves the state where it will be kept, as the GPU backend
// does: off uploads the host mirrors, on downloads them.
func (e *emulatedDevice[T]) SetAutoSync(on bool) error {
	if e.closed {
		return errEmulatedClosed
	}
	if on == e.auto {
		return nil
	}
	if on {
		copy(e.hostParams, e.dev.Params())
		copy(e.hostGrads, e.dev.Grads())
	} else {
		copy(e.dev.Params(), e.hostParams)
		copy(e.dev.Grads(), e.hostGrads)
	}
	e.auto = on
	return nil
}

func (e *emulatedDevice[T]) checkOpt(op string, opt *model.AdamW[T]) error {
	if opt == nil || len(opt.M) != len(e.hostParams) || len(opt.V) != len(e.hostParams) {
		return fmt.Errorf("emulated device: %s: optimizer moments missing or of the wrong length", op)
	}
	return nil
}

func (e *emulatedDevice[T]) SyncToHost(what model.SyncSet, opt *model.AdamW[T]) error {
	if e.closed {
		return errEmulatedClosed
	}
	if what&model.SyncMoments != 0 {
		if err := e.checkOpt("SyncToHost", opt); err != nil {
			return err
		}
	}
	e.toHost++
	if what&model.SyncParams != 0 {
		copy(e.hostParams, e.dev.Params())
	}
	if what&model.SyncGrads != 0 {
		copy(e.hostGrads, e.dev.Grads())
	}
	if what&model.SyncMoments != 0 && e.devM != nil {
		copy(opt.M, e.devM)
		copy(opt.V, e.devV)
	}
	return nil
}

func (e *emulatedDevice[T]) SyncFromHost(what model.SyncSet, opt *model.AdamW[T]) error {
	if e.closed {
		return errEmulatedClosed
	}
	if what&model.SyncMoments != 0 {
		if err := e.checkOpt("SyncFromHost", opt); err != nil {
			return err
		}
	}
	e.fromHost++
	if what&model.SyncParams != 0 {
		copy(e.dev.Params(), e.hostParams)
	}
	if what&model.SyncGrads != 0 {
		copy(e.dev.Grads(), e.hostGrads)
	}
	if what&model.SyncMoments != 0 {
		e.devM, e.devV = append([]T(nil), opt.M...), append([]T(nil), opt.V...)
	}
	return nil
}

func (e *emulatedDevice[T]) GradNorm() (float64, error) {
	if e.closed {
		return 0, errEmulatedClosed
	}
	g := e.dev.Grads()
	if e.auto {
		g = e.hostGrads
	}
	return model.GradNorm(g), nil
}

// OptimizerStep scales a copy of the device gradients as ClipGrads would
// and applies AdamW.Update to the device parameters with the device
// moments, so that it equals the host's ClipGrads and Update bit for bit.
func (e *emulatedDevice[T]) OptimizerStep(opt *model.AdamW[T], lr, gradScale float64) error {
	if e.closed {
		return errEmulatedClosed
	}
	if err := e.checkOpt("OptimizerStep", opt); err != nil {
		return err
	}
	if e.auto {
		return errors.New("emulated device: OptimizerStep in automatic mode is not emulated")
	}
	if e.devM == nil {
		e.devM, e.devV = append([]T(nil), opt.M...), append([]T(nil), opt.V...)
	}
	copy(e.scratch, e.dev.Grads())
	if gradScale != 1 {
		c := T(gradScale)
		for i := range e.scratch {
			e.scratch[i] *= c
		}
	}
	onDevice := *opt
	onDevice.M, onDevice.V = e.devM, e.devV
	onDevice.Update(e.dev.Params(), e.scratch, lr)
	opt.Step = onDevice.Step
	e.optimizerSteps++
	return nil
}

func (e *emulatedDevice[T]) Close() error {
	e.closed = true
	return nil
}

// backendRun is a trainer on any backend whose losses are recorded.
type backendRun[T model.Float] struct {
	tr     *Trainer[T]
	b      model.Backend[T]
	losses []float64
}

// newBackendRun initialises b's (host) parameters from spec and builds a
// trainer on it that checkpoints to the spec's location; ds may be nil for
// an MQAR spec.
func newBackendRun[T model.Float](t *testing.T, spec *jobspec.Spec, b model.Backend[T], ds *data.Dataset) *backendRun[T] {
	t.Helper()
	if err := LoadInit(spec, b.Config(), b.Layout(), b.Params()); err != nil {
		t.Fatal(err)
	}
	r := &backendRun[T]{b: b}
	opts := Options{Log: testLogger(t), OnProgress: func(p Progress) { r.losses = append(r.losses, p.Loss) }}
	if spec.Checkpoint.Location != "" {
		opts.Store = checkpoint.LocalStore{Root: spec.Checkpoint.Location}
	}
	var err error
	if r.tr, err = New(spec, b, ds, opts); err != nil {
		t.Fatal(err)
	}
	return r
}

func openDataset(t *testing.T, dir string) *data.Dataset {
	t.Helper()
	ds, err := data.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ds.Close() })
	return ds
}

func refBackend[T model.Float](t *testing.T, spec *jobspec.Spec) *ref.Model[T] {
	t.Helper()
	cfg, err := ConfigFromSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ref.New[T](cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func sameBits[T model.Float](t *testing.T, what string, got, want []T) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i := range got {
		if math.Float64bits(float64(got[i])) != math.Float64bits(float64(want[i])) {
			t.Fatalf("%s[%d] = %v, want %v", what, i, got[i], want[i])
		}
	}
}

// TestDevicePathMatchesPlainPath trains the same spec on the plain CPU
// backend and on the emulated device, straight through and (on the device)
// stopped at step 6 and resumed in a new trainer: the losses, the final
// parameters and the last checkpoint's parameters and moments must be the
// same in every bit. The device trainer must clip and update through
// GradNorm and OptimizerStep, download before every checkpoint and upload
// after resuming; skipping any of these changes the numbers.
func TestDevicePathMatchesPlainPath(t *testing.T) {
	ctx := context.Background()
	dataDir := writeDataset(t, 4000)
	// A clip low enough that most steps are clipped, so that the
	// coefficient's path is exercised.
	tight := func(s *jobspec.Spec) *jobspec.Spec { s.Optimizer.GradClip = 0.05; return s }

	plainCkpt := t.TempDir()
	spec := tight(testSpec(t, dataDir, plainCkpt, 9))
	plain := newBackendRun[float32](t, spec, refBackend[float32](t, spec), openDataset(t, dataDir))
	if err := plain.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}

	// The device starts in automatic mode: the trainer must switch it off.
	devCkpt := t.TempDir()
	spec = tight(testSpec(t, dataDir, devCkpt, 9))
	cfg, _ := ConfigFromSpec(spec)
	dev := newEmulatedDevice[float32](t, cfg, true)
	straight := newBackendRun[float32](t, spec, dev, openDataset(t, dataDir))
	if dev.AutoSync() {
		t.Fatal("the trainer left the device in automatic mode")
	}
	if err := straight.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}
	sameLosses(t, straight.losses, plain.losses)
	sameBits(t, "final parameters (host mirror)", dev.Params(), plain.b.Params())
	if dev.optimizerSteps != 9 {
		t.Errorf("%d device optimizer steps, want 9", dev.optimizerSteps)
	}

	want, err := checkpoint.LoadLatest[float32](ctx, checkpoint.LocalStore{Root: plainCkpt}, "", testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	got, err := checkpoint.LoadLatest[float32](ctx, checkpoint.LocalStore{Root: devCkpt}, "", testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if got.Trainer.Step != 9 || got.Trainer.OptimizerStep != want.Trainer.OptimizerStep || got.Trainer.Cursor != want.Trainer.Cursor {
		t.Errorf("device checkpoint's trainer state %+v, plain %+v", got.Trainer, want.Trainer)
	}
	sameBits(t, "checkpointed parameters", got.Params, want.Params)
	sameBits(t, "checkpointed first moment", got.M, want.M)
	sameBits(t, "checkpointed second moment", got.V, want.V)

	// Stop at 6, resume on a fresh device (zero device parameters).
	resCkpt := t.TempDir()
	spec = tight(testSpec(t, dataDir, resCkpt, 9))
	first := newBackendRun[float32](t, spec, newEmulatedDevice[float32](t, cfg, false), openDataset(t, dataDir))
	if err := first.tr.RunUntil(ctx, 6); err != nil {
		t.Fatal(err)
	}
	dev2 := newEmulatedDevice[float32](t, cfg, false)
	second := newBackendRun[float32](t, spec, dev2, openDataset(t, dataDir))
	ok, err := second.tr.Resume(ctx)
	if err != nil || !ok {
		t.Fatalf("resume: %v, %v", ok, err)
	}
	if err := second.tr.Run(ctx); err != nil {
		t.Fatal(err)
	}
	sameLosses(t, append(first.losses, second.losses...), plain.losses)
	sameBits(t, "parameters after resuming on the device", dev2.Params(), plain.b.Params())
}

// TestDevicePathDivergence: a NaN in the parameters makes the device step
// fail with ErrDiverged before the optimizer runs.
func TestDevicePathDivergence(t *testing.T) {
	dataDir := writeDataset(t, 1000)
	spec := testSpec(t, dataDir, t.TempDir(), 3)
	cfg, _ := ConfigFromSpec(spec)
	dev := newEmulatedDevice[float32](t, cfg, false)
	r := newBackendRun[float32](t, spec, dev, openDataset(t, dataDir))
	model.View(dev.dev.Params(), dev.Layout().Must(model.NameNormF))[0] = float32(math.NaN())
	_, err := r.tr.TrainStep(context.Background())
	if !errors.Is(err, ErrDiverged) {
		t.Fatalf("step with a NaN parameter: %v, want ErrDiverged", err)
	}
	if dev.optimizerSteps != 0 {
		t.Errorf("the optimizer ran %d times on a diverged step", dev.optimizerSteps)
	}
}
