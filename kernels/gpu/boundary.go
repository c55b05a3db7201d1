package gpu

import (
	"context"
	"fmt"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/model"
)

// This file moves the values of sequence parallelism between the device and
// the model.Boundary, which carries them as []float64 on the host: per
// layer the SSM state (Batch, H, P, N) and the conv halo (Batch, W−1, C_d) in
// the forward pass, and their gradients in the backward pass, with
// model/ref's conventions (a nil slice means zeros or nothing to send).

// checkSPMode rejects the sequence-parallel modes the kernels do not run
// yet: only the sequential pipeline is implemented on the device.
func checkSPMode(bd model.Boundary) error {
	if mode := model.ModeOf(bd); mode != model.SPSequential {
		return fmt.Errorf("%w: sequence parallelism in the %v mode (model.PrefixBoundary) is not implemented by the CUDA backend; use the %v mode",
			ErrUnsupported, mode, model.SPSequential)
	}
	return nil
}

// download copies a whole buffer to the host as float64.
func download(b *kernels.Buffer) ([]float64, error) {
	v, err := b.GetF32()
	if err != nil {
		return nil, err
	}
	return model.BoundaryFloat64s(v), nil
}

// upload writes vals into the whole buffer b, rounding to its dtype.
func upload(b *kernels.Buffer, vals []float64) error {
	f := make([]float32, len(vals))
	for i, x := range vals {
		f[i] = float32(x)
	}
	return b.SetF32(f)
}

func (m *Model) stateLen() int {
	c := m.cfg
	return m.ws.bt * c.NHeads * c.HeadDim * c.DState
}

func (m *Model) haloLen() int {
	c := m.cfg
	return m.ws.bt * (c.DConv - 1) * c.ConvDim()
}

func checkLen(i int, what string, got, want int) error {
	if got != want {
		return fmt.Errorf("gpu: layer %d: received %s of %d values, want %d", i, what, got, want)
	}
	return nil
}

// recvForward receives layer i's initial state and halo into the layer's
// buffers and records whether they are present.
func (m *Model) recvForward(ctx context.Context, i int, bd model.Boundary) error {
	a := &m.ws.acts[i]
	st, halo, err := bd.RecvForward(ctx, i)
	if err != nil {
		return fmt.Errorf("gpu: layer %d: receive state: %w", i, err)
	}
	if st != nil {
		if err := checkLen(i, "state", len(st), m.stateLen()); err != nil {
			return err
		}
		if err := upload(a.state, st); err != nil {
			return err
		}
		a.hasState = true
	}
	if halo != nil {
		if err := checkLen(i, "halo", len(halo), m.haloLen()); err != nil {
			return err
		}
		a.gotHalo = true
		if len(halo) > 0 {
			if err := upload(a.halo, halo); err != nil {
				return err
			}
			a.hasHalo = true
		}
	}
	return nil
}

// sendForward sends layer i's final state and the halo of the next shard:
// the last W−1 rows of each sequence's pre-conv xBC.
func (m *Model) sendForward(ctx context.Context, i int, bd model.Boundary) error {
	st, err := download(m.ws.final)
	if err != nil {
		return err
	}
	halo, err := m.haloOut(i)
	if err != nil {
		return err
	}
	if err := bd.SendForward(ctx, i, st, halo); err != nil {
		return fmt.Errorf("gpu: layer %d: send state: %w", i, err)
	}
	return nil
}

// haloOut gathers the last W−1 rows of the xBC columns of layer i's in_proj
// output, per sequence, into (Batch, W−1, C_d). The rows are strided, so
// each sequence's span of them (junk columns between included) is staged
// in one device copy and one download.
func (m *Model) haloOut(i int) ([]float64, error) {
	c, ws := m.cfg, m.ws
	W, Cd, F, E := c.DConv, c.ConvDim(), c.InProjDim(), c.DInner()
	out := make([]float64, m.haloLen())
	if W == 1 {
		return out, nil
	}
	src := ws.acts[i].zxbcdt
	for b := 0; b < ws.bt; b++ {
		r0 := b*ws.l + ws.l - (W - 1)
		if err := ws.span.CopyFrom(view(src, r0*F+E, ws.span.Len)); err != nil {
			return nil, fmt.Errorf("gpu: layer %d: staging the halo: %w", i, err)
		}
		v, err := ws.span.GetF32()
		if err != nil {
			return nil, err
		}
		for j := 0; j < W-1; j++ {
			dst := out[(b*(W-1)+j)*Cd : (b*(W-1)+j+1)*Cd]
			for k, x := range v[j*F : j*F+Cd] {
				dst[k] = float64(x)
			}
		}
	}
	return out, nil
}

// recvBackward receives the gradients of layer i's final state and of the
// halo it sent, into ws.dFinal and ws.dHaloNext, and reports which came.
func (m *Model) recvBackward(ctx context.Context, i int, bd model.Boundary) (dFinal, dHalo bool, err error) {
	ws := m.ws
	st, halo, err := bd.RecvBackward(ctx, i)
	if err != nil {
		return false, false, fmt.Errorf("gpu: layer %d: receive state gradient: %w", i, err)
	}
	if st != nil {
		if err := checkLen(i, "state gradient", len(st), m.stateLen()); err != nil {
			return false, false, err
		}
		if err := upload(ws.dFinal, st); err != nil {
			return false, false, err
		}
		dFinal = true
	}
	if halo != nil {
		if err := checkLen(i, "halo gradient", len(halo), m.haloLen()); err != nil {
			return false, false, err
		}
		if len(halo) > 0 {
			if err := upload(ws.dHaloNext, halo); err != nil {
				return false, false, err
			}
			dHalo = true
		}
	}
	return dFinal, dHalo, nil
}

// sendBackward sends the gradients of layer i's initial state and of the
// halo it received, each only when it received that value.
func (m *Model) sendBackward(ctx context.Context, i int, bd model.Boundary) error {
	a, ws := &m.ws.acts[i], m.ws
	var dInit, dHalo []float64
	var err error
	if a.hasState {
		if dInit, err = download(ws.dInit); err != nil {
			return err
		}
	}
	if a.hasHalo {
		if dHalo, err = download(ws.dHalo); err != nil {
			return err
		}
	} else if a.gotHalo {
		dHalo = []float64{} // a conv of width 1: an empty halo, and its empty gradient
	}
	if err := bd.SendBackward(ctx, i, dInit, dHalo); err != nil {
		return fmt.Errorf("gpu: layer %d: send state gradient: %w", i, err)
	}
	return nil
}
