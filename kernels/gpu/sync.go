package gpu

import (
	"fmt"
	"math"

	"github.com/m2train/m2train/kernels/ops"
	"github.com/m2train/m2train/model"
)

// AutoSync reports whether the host mirrors of the parameters and gradients
// are kept coherent at every call (see model.DeviceBackend).
func (m *Model) AutoSync() bool { return m.auto }

// SetAutoSync switches automatic synchronisation on or off, moving the state
// to where it will be kept: switching off uploads the host mirrors of the
// parameters and gradients, switching on downloads them.
func (m *Model) SetAutoSync(on bool) error {
	if err := m.check(); err != nil {
		return err
	}
	if on == m.auto {
		return nil
	}
	var err error
	if on {
		err = m.pull(model.SyncParams | model.SyncGrads)
	} else {
		err = m.push(model.SyncParams | model.SyncGrads)
	}
	if err != nil {
		return err
	}
	m.auto = on
	return nil
}

// push uploads the host mirrors of the parameters and gradients named by
// what.
func (m *Model) push(what model.SyncSet) error {
	if what&model.SyncParams != 0 {
		if err := m.params.CopyFromHostF32(m.hostParams); err != nil {
			return fmt.Errorf("gpu: uploading the parameters: %w", err)
		}
		m.copiesStale = true
	}
	if what&model.SyncGrads != 0 {
		if err := m.grads.CopyFromHostF32(m.hostGrads); err != nil {
			return fmt.Errorf("gpu: uploading the gradients: %w", err)
		}
	}
	return nil
}

// pull downloads the parameters and gradients named by what into their
// host mirrors.
func (m *Model) pull(what model.SyncSet) error {
	if what&model.SyncParams != 0 {
		if err := m.params.CopyToHostF32(m.hostParams); err != nil {
			return fmt.Errorf("gpu: downloading the parameters: %w", err)
		}
	}
	if what&model.SyncGrads != 0 {
		if err := m.grads.CopyToHostF32(m.hostGrads); err != nil {
			return fmt.Errorf("gpu: downloading the gradients: %w", err)
		}
	}
	return nil
}

func (m *Model) checkOpt(op string, opt *model.AdamW[float32]) error {
	if opt == nil {
		return fmt.Errorf("gpu: %s: the optimizer is nil", op)
	}
	total := m.layout.Total
	if len(opt.M) != total || len(opt.V) != total {
		return fmt.Errorf("gpu: %s: optimizer moments have %d and %d values, the model %d parameters", op, len(opt.M), len(opt.V), total)
	}
	return nil
}

// SyncToHost copies the device state named by what into the host mirrors:
// Params(), Grads(), and opt.M and opt.V. Before the device holds moments
// (no OptimizerStep or SyncFromHost(SyncMoments) yet) opt's are the
// optimizer's state and are left as they are.
func (m *Model) SyncToHost(what model.SyncSet, opt *model.AdamW[float32]) error {
	if err := m.check(); err != nil {
		return err
	}
	if what&model.SyncMoments != 0 {
		if err := m.checkOpt("SyncToHost", opt); err != nil {
			return err
		}
	}
	if err := m.pull(what); err != nil {
		return err
	}
	if what&model.SyncMoments != 0 && m.mom != nil {
		if err := m.mom.m.CopyToHostF32(opt.M); err != nil {
			return fmt.Errorf("gpu: downloading the first moment: %w", err)
		}
		if err := m.mom.v.CopyToHostF32(opt.V); err != nil {
			return fmt.Errorf("gpu: downloading the second moment: %w", err)
		}
	}
	return nil
}

// SyncFromHost copies the host mirrors named by what to the device.
func (m *Model) SyncFromHost(what model.SyncSet, opt *model.AdamW[float32]) error {
	if err := m.check(); err != nil {
		return err
	}
	if what&model.SyncMoments != 0 {
		if err := m.checkOpt("SyncFromHost", opt); err != nil {
			return err
		}
	}
	if err := m.push(what); err != nil {
		return err
	}
	if what&model.SyncMoments != 0 {
		return m.uploadMoments(opt)
	}
	return nil
}

// uploadMoments copies opt's moments to the device, allocating the device
// moments at the first call.
func (m *Model) uploadMoments(opt *model.AdamW[float32]) error {
	if m.mom == nil {
		mm, err := m.lib.Alloc(m.params.DType, m.layout.Total)
		if err != nil {
			return fmt.Errorf("gpu: allocating the optimizer moments: %w", err)
		}
		vv, err := m.lib.Alloc(m.params.DType, m.layout.Total)
		if err != nil {
			mm.Free()
			return fmt.Errorf("gpu: allocating the optimizer moments: %w", err)
		}
		m.mom = &moments{m: mm, v: vv}
	}
	if err := m.mom.m.CopyFromHostF32(opt.M); err != nil {
		return fmt.Errorf("gpu: uploading the first moment: %w", err)
	}
	if err := m.mom.v.CopyFromHostF32(opt.V); err != nil {
		return fmt.Errorf("gpu: uploading the second moment: %w", err)
	}
	return nil
}

// GradNorm returns the L2 norm of the gradients, summed in float64 in a
// fixed order as model.GradNorm does. With automatic synchronisation it is
// the norm of the host mirror.
func (m *Model) GradNorm() (float64, error) {
	if err := m.check(); err != nil {
		return 0, err
	}
	if m.auto {
		if err := m.push(model.SyncGrads); err != nil {
			return 0, err
		}
	}
	if err := m.ops.GradNorm(m.grads, m.normOut, m.normWS, m.layout.Total, stream); err != nil {
		return 0, err
	}
	v, err := ops.ReadFloat64(m.normOut)
	if err != nil {
		return 0, err
	}
	return v[0], nil
}

// OptimizerStep applies one AdamW update on the device (see
// model.DeviceBackend): the parameters move by the gradients times
// gradScale, with opt's hyperparameters and the device moments, which the
// first call initialises from opt.M and opt.V; opt.Step is incremented.
// With automatic synchronisation the host mirrors of the parameters and
// gradients are uploaded first and the parameters downloaded after.
func (m *Model) OptimizerStep(opt *model.AdamW[float32], lr, gradScale float64) error {
	if err := m.check(); err != nil {
		return err
	}
	if err := m.checkOpt("OptimizerStep", opt); err != nil {
		return err
	}
	if err := opt.Config.Validate(); err != nil {
		return err
	}
	if !(lr >= 0) || math.IsInf(lr, 0) {
		return fmt.Errorf("gpu: OptimizerStep: learning rate must be finite and >= 0, got %g", lr)
	}
	if !(gradScale >= 0) || math.IsInf(gradScale, 0) {
		return fmt.Errorf("gpu: OptimizerStep: gradient scale must be finite and >= 0, got %g", gradScale)
	}
	if m.auto {
		if err := m.push(model.SyncParams | model.SyncGrads); err != nil {
			return err
		}
	}
	if m.mom == nil {
		if err := m.uploadMoments(opt); err != nil {
			return err
		}
	}
	ac := opt.Config
	step := opt.Step + 1
	err := m.ops.AdamW(&ops.AdamWArgs{Params: m.params, Grads: m.grads, M: m.mom.m, V: m.mom.v, N: m.layout.Total,
		NoDecay: m.noDecay, NRanges: m.nRanges, LR: lr, Beta1: ac.Beta1, Beta2: ac.Beta2, Eps: ac.Eps,
		WeightDecay: ac.WeightDecay, Step: step, GradScale: float32(gradScale)}, stream)
	if err != nil {
		return fmt.Errorf("gpu: OptimizerStep: %w", err)
	}
	opt.Step = step
	m.copiesStale = true
	if m.auto {
		return m.pull(model.SyncParams)
	}
	return nil
}
