package model

// SyncSet names the parts of a DeviceBackend's state that SyncToHost and
// SyncFromHost copy.
type SyncSet uint8

// The parts of a device backend's state.
const (
	// SyncParams is the parameter buffer (host mirror: Backend.Params).
	SyncParams SyncSet = 1 << iota
	// SyncGrads is the gradient buffer (host mirror: Backend.Grads).
	SyncGrads
	// SyncMoments is the optimizer's two moments (host mirror: the M and V
	// of the *AdamW passed to the call).
	SyncMoments
	// SyncAll is every part.
	SyncAll = SyncParams | SyncGrads | SyncMoments
)

// DeviceBackend is a Backend whose parameters, gradients and optimizer
// moments live in device memory (the CUDA backend, kernels/gpu). The slices
// that Params and Grads return are host mirrors of the device buffers, with
// the layout of Layout, and the training loop moves state between the two
// explicitly, so that a step copies nothing it does not need:
//
//	init or load:   write Params(), opt.M, opt.V; SyncFromHost(SyncParams|SyncMoments, opt)
//	each step:      ZeroGrads; ForwardBackward per micro-batch
//	                data parallelism: SyncToHost(SyncGrads, nil); all-reduce Grads(); SyncFromHost(SyncGrads, nil)
//	                norm := GradNorm(); OptimizerStep(opt, lr, ClipScale(norm, maxNorm))
//	checkpoint:     SyncToHost(SyncParams|SyncMoments, opt); save Params(), opt.M, opt.V, opt.Step
//
// That is the explicit mode. A backend may also offer an automatic mode
// (AutoSync true) in which it keeps the host mirrors of the parameters and
// gradients coherent at every call, as the Backend interface describes for
// code that knows nothing of devices: each pass first uploads Params() (and
// for ForwardBackward Grads()), ForwardBackward downloads the gradients
// afterwards, and ZeroGrads clears the host mirror. That is correct for any
// Backend user but copies the parameters at every pass; a training loop that
// knows about DeviceBackend switches it off with SetAutoSync(false).
//
// The optimizer moments are never synchronised automatically: they live on
// the device from the first OptimizerStep (which initialises them from
// opt.M and opt.V) or SyncFromHost(SyncMoments, opt), and opt.M and opt.V
// are current only after SyncToHost(SyncMoments, opt). opt.Step is kept on
// the host and advanced by OptimizerStep.
//
// A DeviceBackend is not safe for concurrent use.
type DeviceBackend[T Float] interface {
	Backend[T]

	// Device describes the device the backend runs on, for logs.
	Device() string

	// AutoSync reports whether the backend keeps the host mirrors of the
	// parameters and gradients coherent at every call.
	AutoSync() bool
	// SetAutoSync switches the automatic mode on or off. The switch itself
	// keeps the state: turning it off uploads the host mirrors (until then
	// the host held the state), turning it on downloads them.
	SetAutoSync(on bool) error

	// SyncToHost copies the parts of the device state named by what into
	// their host mirrors: Params(), Grads(), and opt.M and opt.V (opt may
	// be nil unless what includes SyncMoments).
	SyncToHost(what SyncSet, opt *AdamW[T]) error
	// SyncFromHost copies the host mirrors named by what to the device.
	// Call it after writing Params() (initialisation, loading, resuming
	// from a checkpoint), after changing Grads() on the host (an
	// all-reduce), and after loading opt.M and opt.V.
	SyncFromHost(what SyncSet, opt *AdamW[T]) error

	// GradNorm returns the L2 norm of the device gradients, summed in
	// float64 in a fixed order as model.GradNorm does.
	GradNorm() (float64, error)
	// OptimizerStep applies one AdamW update to the device parameters with
	// learning rate lr, using opt's hyperparameters and moments (on the
	// device; see the type's comment) and the device gradients multiplied
	// by gradScale (the clipping coefficient, 1 for none; see ClipScale).
	// It increments opt.Step as AdamW.Update does and leaves the gradients
	// unchanged. The result equals ClipGrads followed by AdamW.Update on
	// the host.
	OptimizerStep(opt *AdamW[T], lr, gradScale float64) error

	// Close releases the device memory. The backend is unusable after it;
	// a second Close is a no-op.
	Close() error
}

// GradStreamer is implemented by a DeviceBackend that can copy part of its
// device gradients into the host mirror while the device computes on, so
// that data parallelism reduces the gradients of the upper layers while the
// backward pass runs through the lower ones:
//
//	last micro-batch:  after layer ℓ's gradients are final (the boundary hook),
//	                   wait := GradsToHostAsync(lo, hi) and hand wait to the reducer
//	after the backward: GradsToHostAsync(0, lo) for the rest; all-reduce; SyncFromHost(SyncGrads, nil)
//
// It needs the explicit mode (AutoSync false).
type GradStreamer interface {
	// GradsToHostAsync queues the copy of the device gradients [lo, hi)
	// into Grads()[lo:hi], ordered after all the work queued on the
	// device so far, and returns without waiting for it. wait blocks until
	// the copy has completed; it must be called exactly once, and may be
	// called from another goroutine. The host mirror of [lo, hi) must not
	// be read or written before wait returns.
	GradsToHostAsync(lo, hi int) (wait func() error, err error)
}

// ClipScale returns the factor by which ClipGrads would scale gradients of
// global norm norm for the limit maxNorm: PyTorch's clip_grad_norm_
// coefficient maxNorm/(norm+1e-6), capped at 1; 1 when maxNorm <= 0
// (clipping disabled). A DeviceBackend passes it to OptimizerStep instead of
// scaling the gradients in place.
func ClipScale(norm, maxNorm float64) float64 {
	if maxNorm <= 0 {
		return 1
	}
	if coef := maxNorm / (norm + 1e-6); coef < 1 {
		return coef
	}
	return 1
}
