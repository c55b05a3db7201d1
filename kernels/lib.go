package kernels

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// ABIVersion is the M2K_ABI_VERSION of the m2kernels.h these bindings were
// written against; Open refuses a library reporting another.
const ABIVersion = 3

// LibName is the file name of the library.
const LibName = "libm2kernels.so"

// EnvLib names the environment variable that Default reads first.
const EnvLib = "M2K_LIB"

// DeviceInfo describes the CUDA device a Lib runs on.
type DeviceInfo struct {
	Index           int
	Name            string
	TotalMem        int64 // bytes
	Multiprocessors int
	CCMajor         int // compute capability
	CCMinor         int
}

// Lib is the opened library. Its methods may be called from any goroutine;
// kernels are ordered by the Stream they are launched on.
type Lib struct {
	path   string
	handle uintptr
	dev    DeviceInfo
	c      commonFuncs
	ssd    ssdFuncs
	ssdErr error // why the ssd section is unavailable (built without it), or nil
}

// commonFuncs are the bound functions of the header's common section.
type commonFuncs struct {
	abiVersion      func() int32
	errorString     func(code int32) string
	lastErrorDetail func() string
	deviceCount     func(count *int32) int32
	setDevice       func(dev int32) int32
	getDevice       func(dev *int32) int32
	deviceProps     func(dev int32, name *byte, nameLen int64, total *int64, sms, major, minor *int32) int32
	memGetInfo      func(free, total *int64) int32
	deviceSync      func() int32
	malloc          func(ptr *uintptr, bytes int64) int32
	free            func(ptr uintptr) int32
	memset          func(ptr uintptr, value int32, bytes int64, stream uintptr) int32
	memcpyH2D       func(dst uintptr, src unsafe.Pointer, bytes int64) int32
	memcpyD2H       func(dst unsafe.Pointer, src uintptr, bytes int64) int32
	memcpyD2D       func(dst, src uintptr, bytes int64) int32
	memcpyD2DAsync  func(dst, src uintptr, bytes int64, stream uintptr) int32
	memcpyD2HAsync  func(dst unsafe.Pointer, src uintptr, bytes int64, stream uintptr) int32
	hostAlloc       func(ptr *unsafe.Pointer, bytes int64) int32
	hostFree        func(ptr unsafe.Pointer) int32
	streamWaitEvent func(s, e uintptr) int32
	streamCreate    func(s *uintptr) int32
	streamDestroy   func(s uintptr) int32
	streamSync      func(s uintptr) int32
	eventCreate     func(e *uintptr) int32
	eventDestroy    func(e uintptr) int32
	eventRecord     func(e, s uintptr) int32
	eventSync       func(e uintptr) int32
	eventElapsed    func(ms *float32, start, end uintptr) int32
	f32ToBF16       func(dst, src uintptr, n int64, stream uintptr) int32
	bf16ToF32       func(dst, src uintptr, n int64, stream uintptr) int32
}

func (c *commonFuncs) bind(h uintptr) error {
	return bindAll(h, []binding{
		{&c.abiVersion, "m2k_abi_version"},
		{&c.errorString, "m2k_error_string"},
		{&c.lastErrorDetail, "m2k_last_error_detail"},
		{&c.deviceCount, "m2k_device_count"},
		{&c.setDevice, "m2k_set_device"},
		{&c.getDevice, "m2k_get_device"},
		{&c.deviceProps, "m2k_device_props"},
		{&c.memGetInfo, "m2k_mem_get_info"},
		{&c.deviceSync, "m2k_device_synchronize"},
		{&c.malloc, "m2k_malloc"},
		{&c.free, "m2k_free"},
		{&c.memset, "m2k_memset"},
		{&c.memcpyH2D, "m2k_memcpy_h2d"},
		{&c.memcpyD2H, "m2k_memcpy_d2h"},
		{&c.memcpyD2D, "m2k_memcpy_d2d"},
		{&c.memcpyD2DAsync, "m2k_memcpy_d2d_async"},
		{&c.streamCreate, "m2k_stream_create"},
		{&c.streamDestroy, "m2k_stream_destroy"},
		{&c.streamSync, "m2k_stream_synchronize"},
		{&c.eventCreate, "m2k_event_create"},
		{&c.eventDestroy, "m2k_event_destroy"},
		{&c.memcpyD2HAsync, "m2k_memcpy_d2h_async"},
		{&c.hostAlloc, "m2k_host_alloc"},
		{&c.hostFree, "m2k_host_free"},
		{&c.streamWaitEvent, "m2k_stream_wait_event"},
		{&c.eventRecord, "m2k_event_record"},
		{&c.eventSync, "m2k_event_synchronize"},
		{&c.eventElapsed, "m2k_event_elapsed_ms"},
		{&c.f32ToBF16, "m2k_f32_to_bf16"},
		{&c.bf16ToF32, "m2k_bf16_to_f32"},
	})
}

type binding struct {
	fptr any
	name string
}

func bindAll(h uintptr, bs []binding) error {
	for _, b := range bs {
		if err := Bind(h, b.fptr, b.name); err != nil {
			return err
		}
	}
	return nil
}

// Bind looks up the C function name in the library handle h and makes
// *fptr (a pointer to a func variable whose signature mirrors the C
// declaration) call it. A missing symbol is an error wrapping ErrABI rather
// than a panic. Other packages use it from their RegisterSymbols hook.
func Bind(h uintptr, fptr any, name string) error {
	sym, err := purego.Dlsym(h, name)
	if err != nil || sym == 0 {
		return fmt.Errorf("%w: symbol %s not found: %v", ErrABI, name, err)
	}
	purego.RegisterFunc(fptr, sym)
	return nil
}

var (
	mu      sync.Mutex
	opened  *Lib
	hooks   []func(h uintptr) error
	dfltLib *Lib
)

// RegisterSymbols adds a hook that binds another package's functions when a
// library is opened: fn receives the library handle (see Bind) and returns
// an error naming any symbol it cannot bind, which then fails Open. Call it
// from an init function. If a library is already open, fn runs at once on
// it and a failure panics, since the caller has no error path.
func RegisterSymbols(fn func(h uintptr) error) {
	mu.Lock()
	defer mu.Unlock()
	hooks = append(hooks, fn)
	if opened != nil {
		if err := fn(opened.handle); err != nil {
			panic(fmt.Sprintf("kernels: RegisterSymbols after Open(%s): %v", opened.path, err))
		}
	}
}

// Open loads the library at path, binds its functions (and those of every
// RegisterSymbols hook), checks the ABI version and selects CUDA device 0.
// It fails with an error wrapping ErrNoLibrary when the file is missing or
// not loadable, ErrABI when it was built from another header, and
// ErrNoDevice when no GPU or driver is usable. One library is loaded per
// process: opening the same path again returns the same Lib, another path
// is an error.
func Open(path string) (*Lib, error) {
	if path == "" {
		return nil, fmt.Errorf("%w: empty path", ErrNoLibrary)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoLibrary, path, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if opened != nil {
		if opened.path == abs {
			return opened, nil
		}
		return nil, fmt.Errorf("%w: %s is already loaded; cannot also load %s (one library per process)", ErrNoLibrary, opened.path, abs)
	}
	st, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoLibrary, err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("%w: %s is a directory", ErrNoLibrary, abs)
	}
	h, err := purego.Dlopen(abs, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return nil, fmt.Errorf("%w: loading %s: %v", ErrNoLibrary, abs, err)
	}
	l := &Lib{path: abs, handle: h}
	if err := l.c.bind(h); err != nil {
		return nil, fmt.Errorf("%s: %w", abs, err)
	}
	if v := l.c.abiVersion(); v != ABIVersion {
		return nil, fmt.Errorf("%w: %s reports ABI version %d, these bindings expect %d", ErrABI, abs, v, ABIVersion)
	}
	// A library built with M2K_DIRS lacking ssd still serves the rest.
	if err := l.ssd.bind(h); err != nil {
		l.ssdErr = fmt.Errorf("%s was built without the ssd kernels: %w", abs, err)
	}
	var n int32
	if code := l.c.deviceCount(&n); code != 0 || n == 0 {
		reason := "no device"
		if code != 0 {
			reason = fmt.Sprintf("%s (status %d)", l.c.errorString(code), code)
		}
		return nil, fmt.Errorf("%w: %s loaded, but CUDA reports %s", ErrNoDevice, abs, reason)
	}
	if err := l.status("m2k_set_device", l.c.setDevice(0)); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoDevice, err)
	}
	if l.dev, err = l.deviceInfo(0); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoDevice, err)
	}
	for _, fn := range hooks {
		if err := fn(h); err != nil {
			return nil, fmt.Errorf("%s: %w", abs, err)
		}
	}
	opened = l
	return l, nil
}

// Load opens the library at path, or with an empty path the one Default
// finds.
func Load(path string) (*Lib, error) {
	if path == "" {
		return Default()
	}
	return Open(path)
}

// Default opens the library named by $M2K_LIB if set; otherwise the first
// libm2kernels.so found next to the executable or in kernels/build/ of the
// current directory or one of its parents. The error says where it looked.
// A successful result is remembered.
func Default() (*Lib, error) {
	mu.Lock()
	if dfltLib != nil {
		l := dfltLib
		mu.Unlock()
		return l, nil
	}
	mu.Unlock()
	var tried []string
	if p := os.Getenv(EnvLib); p != "" {
		tried = append(tried, p)
	} else {
		tried = candidates()
		found := ""
		for _, c := range tried {
			if st, err := os.Stat(c); err == nil && !st.IsDir() {
				found = c
				break
			}
		}
		if found == "" {
			return nil, fmt.Errorf("%w: %s not found (set %s; looked in %s)", ErrNoLibrary, LibName, EnvLib, strings.Join(tried, ", "))
		}
		tried = []string{found}
	}
	l, err := Open(tried[0])
	if err != nil {
		return nil, err
	}
	mu.Lock()
	dfltLib = l
	mu.Unlock()
	return l, nil
}

func candidates() []string {
	var out []string
	if exe, err := os.Executable(); err == nil {
		out = append(out, filepath.Join(filepath.Dir(exe), LibName))
	}
	if wd, err := os.Getwd(); err == nil {
		for d, i := wd, 0; i < 8; i++ {
			if filepath.Base(d) == "kernels" {
				out = append(out, filepath.Join(d, "build", LibName))
			}
			out = append(out, filepath.Join(d, "kernels", "build", LibName))
			parent := filepath.Dir(d)
			if parent == d {
				break
			}
			d = parent
		}
	}
	return out
}

// Path returns the absolute path the library was loaded from.
func (l *Lib) Path() string { return l.path }

// Handle returns the dlopen handle, for packages binding further symbols.
func (l *Lib) Handle() uintptr { return l.handle }

// Device describes the device the library runs on.
func (l *Lib) Device() DeviceInfo { return l.dev }

// status turns the int returned by a library function into an error (nil
// for 0). op names the C function. It must run on the host thread that made
// the call for Detail to be right; Call arranges that.
func (l *Lib) status(op string, code int32) error {
	if code == 0 {
		return nil
	}
	e := &Error{Op: op, Code: int(code), Msg: l.c.errorString(code)}
	if code >= statusInvalidArg {
		e.Detail = l.c.lastErrorDetail()
	}
	return e
}

// Call runs f, a call of the C function op, on a locked host thread and
// returns its status as an error (nil on success), with the library's
// detail message for its own status codes. Binding packages use it for
// every call.
func (l *Lib) Call(op string, f func() int32) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return l.status(op, f())
}

func (l *Lib) deviceInfo(dev int) (DeviceInfo, error) {
	var name [256]byte
	var total int64
	var sms, major, minor int32
	err := l.Call("m2k_device_props", func() int32 {
		return l.c.deviceProps(int32(dev), &name[0], int64(len(name)), &total, &sms, &major, &minor)
	})
	if err != nil {
		return DeviceInfo{}, err
	}
	n := 0
	for n < len(name) && name[n] != 0 {
		n++
	}
	return DeviceInfo{Index: dev, Name: string(name[:n]), TotalMem: total, Multiprocessors: int(sms), CCMajor: int(major), CCMinor: int(minor)}, nil
}

// MemInfo returns the free and total memory of the current device in bytes.
func (l *Lib) MemInfo() (free, total int64, err error) {
	err = l.Call("m2k_mem_get_info", func() int32 { return l.c.memGetInfo(&free, &total) })
	return
}

// Synchronize waits for all work on the device.
func (l *Lib) Synchronize() error {
	return l.Call("m2k_device_synchronize", l.c.deviceSync)
}
