// Package s3gw runs an S3-compatible server (the Versity S3 gateway over a
// POSIX directory) for local training, the demo and tests, so that
// checkpoints take the same network path to a local directory as they do to
// a cloud bucket. Buckets are subdirectories of Options.Dir and objects are
// plain files under them.
//
// The gateway can run in the calling process (Start) or in a child process
// that re-executes the current binary (StartProcess together with
// RunIfChild). Two properties of the underlying gateway shape the API:
// only one gateway may run per process, and its POSIX backend resolves
// paths against the process's working directory, which it changes to
// Options.Dir. A program that embeds the gateway with Start must therefore
// have made every other path it uses absolute beforehand; tests and tools
// that cannot promise that use StartProcess.
//
// The package never logs the secret key.
package s3gw

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/versity/versitygw/auth"
	"github.com/versity/versitygw/backend/meta"
	"github.com/versity/versitygw/backend/posix"
	"github.com/versity/versitygw/embedgw"
	"github.com/versity/versitygw/s3api"
)

// Defaults of Options.
const (
	DefaultMaxConnections    = 256
	DefaultMaxRequests       = 128
	DefaultMultipartMaxParts = 10000
	// DefaultCopyObjectThreshold is the S3 limit on a CopyObject source, 5 GiB.
	DefaultCopyObjectThreshold = 5 << 30
	// DefaultRegion is the region the gateway reports.
	DefaultRegion = "us-east-1"
)

// childEnv names the environment variable through which StartProcess hands
// the options to the child; RunIfChild looks for it.
const childEnv = "M2_S3GW_CHILD"

// readyLine starts the line the child prints on stdout once it listens.
const readyLine = "s3gw ready "

// Errors of the package.
var (
	// ErrRunning is returned by Start when a gateway already runs in this
	// process (the gateway library supports one per process).
	ErrRunning = errors.New("s3gw: a gateway already runs in this process")
	// ErrExited is returned when the gateway stopped before it listened.
	ErrExited = errors.New("s3gw: the gateway exited before it listened")
)

// Options configure a gateway. Dir is required; zero values of the other
// fields take the documented defaults.
type Options struct {
	// Dir is the directory that holds the buckets. It is created if missing.
	Dir string `json:"dir"`
	// Addr is the host:port to listen on; empty or a port of 0 picks a free
	// port on 127.0.0.1.
	Addr string `json:"addr"`
	// AccessKey and SecretKey are the root credentials clients sign with.
	// When both are empty Start generates a random pair and returns it in
	// Gateway. Setting one without the other is an error.
	AccessKey string `json:"access_key"`
	SecretKey string `json:"secret_key"`
	// Region is the region the gateway reports (DefaultRegion when empty).
	Region string `json:"region,omitempty"`
	// MaxConnections and MaxRequests bound the concurrent connections and
	// in-flight requests (DefaultMaxConnections, DefaultMaxRequests).
	MaxConnections int `json:"max_connections,omitempty"`
	MaxRequests    int `json:"max_requests,omitempty"`
	// MultipartMaxParts bounds the parts of one multipart upload
	// (DefaultMultipartMaxParts).
	MultipartMaxParts int `json:"multipart_max_parts,omitempty"`
	// CopyObjectThreshold is the largest CopyObject source in bytes
	// (DefaultCopyObjectThreshold).
	CopyObjectThreshold int64 `json:"copy_object_threshold,omitempty"`
	// Buckets are created when the gateway starts, if missing.
	Buckets []string `json:"buckets,omitempty"`
}

// String describes the options without the secret key.
func (o Options) String() string {
	return fmt.Sprintf("s3gw{dir=%s addr=%s access_key=%s}", o.Dir, o.Addr, o.AccessKey)
}

func (o *Options) withDefaults() error {
	if o.Dir == "" {
		return errors.New("s3gw: options: dir is required")
	}
	abs, err := filepath.Abs(o.Dir)
	if err != nil {
		return fmt.Errorf("s3gw: options: dir %q: %w", o.Dir, err)
	}
	o.Dir = abs
	if (o.AccessKey == "") != (o.SecretKey == "") {
		return errors.New("s3gw: options: access_key and secret_key must be set together or both left empty")
	}
	if o.AccessKey == "" {
		o.AccessKey, o.SecretKey = "m2"+randomHex(9), randomHex(20)
	}
	if len(o.SecretKey) < 8 {
		return errors.New("s3gw: options: secret_key must have at least 8 characters")
	}
	if o.Region == "" {
		o.Region = DefaultRegion
	}
	for _, f := range []struct {
		name string
		v    *int
		def  int
	}{{"max_connections", &o.MaxConnections, DefaultMaxConnections}, {"max_requests", &o.MaxRequests, DefaultMaxRequests},
		{"multipart_max_parts", &o.MultipartMaxParts, DefaultMultipartMaxParts}} {
		if *f.v < 0 {
			return fmt.Errorf("s3gw: options: %s must not be negative, got %d", f.name, *f.v)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if o.MaxRequests > o.MaxConnections {
		return fmt.Errorf("s3gw: options: max_requests (%d) must not exceed max_connections (%d)", o.MaxRequests, o.MaxConnections)
	}
	if o.CopyObjectThreshold < 0 {
		return fmt.Errorf("s3gw: options: copy_object_threshold must not be negative, got %d", o.CopyObjectThreshold)
	}
	if o.CopyObjectThreshold == 0 {
		o.CopyObjectThreshold = DefaultCopyObjectThreshold
	}
	for _, b := range o.Buckets {
		if !validBucket(b) {
			return fmt.Errorf("s3gw: options: bucket %q must be 3 to 63 lowercase letters, digits, dots or hyphens, starting and ending with a letter or digit", b)
		}
	}
	if o.Addr == "" {
		o.Addr = "127.0.0.1:0"
	}
	if _, _, err := net.SplitHostPort(o.Addr); err != nil {
		return fmt.Errorf("s3gw: options: addr %q must be host:port: %v", o.Addr, err)
	}
	return nil
}

func validBucket(b string) bool {
	if len(b) < 3 || len(b) > 63 {
		return false
	}
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !ok && (i == 0 || i == len(b)-1 || (c != '-' && c != '.')) {
			return false
		}
	}
	return true
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// freeAddr resolves a port of 0 to a port that is free now. The gateway
// library binds by address string only, so the port is found by binding
// and releasing it; Start retries if another process takes it meanwhile.
func freeAddr(addr string) (string, error) {
	host, port, _ := net.SplitHostPort(addr)
	if port != "0" {
		return addr, nil
	}
	if host == "" {
		host = "127.0.0.1"
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", fmt.Errorf("s3gw: find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Gateway is a running gateway.
type Gateway struct {
	// Endpoint is the http:// URL clients use.
	Endpoint string
	// AccessKey, SecretKey and Region are what clients sign with.
	AccessKey, SecretKey, Region string
	// Dir is the absolute directory that holds the buckets.
	Dir string

	cancel context.CancelFunc
	done   chan struct{}
	err    error
	once   sync.Once
}

// Done is closed when the gateway has stopped.
func (g *Gateway) Done() <-chan struct{} { return g.done }

// Err returns why the gateway stopped, once Done is closed; nil after Stop.
func (g *Gateway) Err() error {
	select {
	case <-g.done:
		return g.err
	default:
		return nil
	}
}

// Stop shuts the gateway down and waits for it.
func (g *Gateway) Stop() error {
	g.once.Do(g.cancel)
	<-g.done
	if errors.Is(g.err, context.Canceled) {
		return nil
	}
	return g.err
}

// Start runs a gateway in this process until ctx ends or Stop is called,
// and returns once it accepts connections. It changes the process's
// working directory to o.Dir (see the package documentation).
func Start(ctx context.Context, o Options) (*Gateway, error) {
	if err := o.withDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("s3gw: dir: %w", err)
	}
	wantFree := strings.HasSuffix(o.Addr, ":0")
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		g, err := start(ctx, o)
		if err == nil {
			return g, nil
		}
		lastErr = err
		// Only a port picked here may be taken by a race; anything else is final.
		if !wantFree || !strings.Contains(err.Error(), "bind") {
			break
		}
	}
	return nil, lastErr
}

func start(ctx context.Context, o Options) (*Gateway, error) {
	addr, err := freeAddr(o.Addr)
	if err != nil {
		return nil, err
	}
	var ms meta.MetadataStorer = meta.XattrMeta{}
	popts := posix.PosixOpts{CopyObjectThreshold: o.CopyObjectThreshold, ValidateBucketNames: true}
	if (meta.XattrMeta{}).Test(o.Dir) != nil {
		// Filesystems without user xattrs keep the metadata in a sidecar
		// directory, which the backend wants outside the bucket root.
		side := o.Dir + ".meta"
		if err := os.MkdirAll(side, 0o755); err != nil {
			return nil, fmt.Errorf("s3gw: metadata dir: %w", err)
		}
		sc, err := meta.NewSideCar(side)
		if err != nil {
			return nil, fmt.Errorf("s3gw: metadata dir %s: %w", side, err)
		}
		ms, popts.SideCarDir = sc, side
	}
	be, err := posix.New(o.Dir, ms, popts)
	if err != nil {
		return nil, fmt.Errorf("s3gw: posix backend on %s: %w", o.Dir, err)
	}
	if err := createBuckets(ctx, be, o.AccessKey, o.Buckets); err != nil {
		be.Shutdown()
		return nil, err
	}
	ready := make(chan struct{})
	var readyOnce sync.Once
	cfg := &embedgw.Config{
		RootUserAccess:    o.AccessKey,
		RootUserSecret:    o.SecretKey,
		Region:            o.Region,
		Ports:             []string{addr},
		MaxConnections:    o.MaxConnections,
		MaxRequests:       o.MaxRequests,
		MultipartMaxParts: o.MultipartMaxParts,
		Quiet:             true,
		KeepAlive:         true,
		S3Options:         []s3api.Option{s3api.WithOnListen(func() { readyOnce.Do(func() { close(ready) }) })},
	}
	gctx, cancel := context.WithCancel(ctx)
	g := &Gateway{Endpoint: "http://" + addr, AccessKey: o.AccessKey, SecretKey: o.SecretKey, Region: o.Region,
		Dir: o.Dir, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(g.done)
		defer be.Shutdown()
		err := embedgw.RunVersityGW(gctx, be, cfg)
		if err != nil && strings.Contains(err.Error(), "already running") {
			err = ErrRunning
		}
		g.err = err
	}()
	select {
	case <-ready:
	case <-g.done:
		cancel()
		if g.err == nil {
			return nil, ErrExited
		}
		return nil, fmt.Errorf("s3gw: start on %s: %w", addr, g.err)
	case <-ctx.Done():
		cancel()
		<-g.done
		return nil, ctx.Err()
	}
	return g, nil
}

// Process is a gateway running in a child process started by
// StartProcess.
type Process struct {
	// Endpoint, AccessKey, SecretKey, Region and Dir are as in Gateway.
	Endpoint                     string
	AccessKey, SecretKey, Region string
	Dir                          string
	// Addr is the host:port it listens on; a new process started with the
	// same Addr and Dir serves the same objects.
	Addr string

	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Pid returns the child's process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the child has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Kill ends the child with SIGKILL, as a crash would, and waits for it.
func (p *Process) Kill() error {
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("s3gw: kill %d: %w", p.Pid(), err)
	}
	<-p.done
	return nil
}

// Stop asks the child to shut down (SIGTERM) and waits for it; a child
// that does not exit within timeout is killed.
func (p *Process) Stop(timeout time.Duration) error {
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("s3gw: stop %d: %w", p.Pid(), err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(timeout):
		return p.Kill()
	}
}

// StartProcess runs a gateway in a child process: the current executable
// run again, which must call RunIfChild first thing in main (or TestMain).
// It returns once the child listens. The child's stderr goes to stderr, or
// to logw when it is not nil. The child is killed when ctx ends.
func StartProcess(ctx context.Context, o Options, logw io.Writer) (*Process, error) {
	if err := o.withDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("s3gw: dir: %w", err)
	}
	addr, err := freeAddr(o.Addr)
	if err != nil {
		return nil, err
	}
	o.Addr = addr
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("s3gw: find the current executable: %w", err)
	}
	spec, err := json.Marshal(o)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	cmd.Dir = o.Dir
	if logw == nil {
		logw = os.Stderr
	}
	cmd.Stderr = logw
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("s3gw: start %s: %w", exe, err)
	}
	p := &Process{Endpoint: "http://" + addr, AccessKey: o.AccessKey, SecretKey: o.SecretKey, Region: o.Region,
		Dir: o.Dir, Addr: addr, cmd: cmd, done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		// Wait may only run once the pipe is read to its end.
		sc := bufio.NewScanner(stdout)
		seen := false
		for sc.Scan() {
			if !seen && strings.HasPrefix(sc.Text(), readyLine) {
				seen = true
				close(ready)
				continue
			}
			fmt.Fprintln(logw, sc.Text())
		}
		io.Copy(io.Discard, stdout)
		p.err = cmd.Wait()
		close(p.done)
	}()
	select {
	case <-ready:
		return p, nil
	case <-p.done:
		return nil, fmt.Errorf("%w: child for %s: %v", ErrExited, o.Dir, p.err)
	case <-ctx.Done():
		<-p.done
		return nil, ctx.Err()
	}
}

// RunIfChild runs the gateway and exits when the process was started by
// StartProcess; otherwise it returns at once. Call it first in main or in
// TestMain.
func RunIfChild() {
	spec, ok := os.LookupEnv(childEnv)
	if !ok {
		return
	}
	os.Unsetenv(childEnv)
	var o Options
	if err := json.Unmarshal([]byte(spec), &o); err != nil {
		fmt.Fprintf(os.Stderr, "s3gw child: options: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signalContext()
	defer stop()
	g, err := Start(ctx, o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "s3gw child: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("%s%s\n", readyLine, g.Endpoint)
	<-g.Done()
	if err := g.Err(); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "s3gw child: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// createBuckets makes the missing buckets through the backend, with the
// ACL and ownership the gateway gives a bucket its root user creates.
func createBuckets(ctx context.Context, be *posix.Posix, owner string, buckets []string) error {
	acl, err := json.Marshal(auth.ACL{Owner: owner})
	if err != nil {
		return err
	}
	for _, b := range buckets {
		if fi, err := os.Stat(b); err == nil && fi.IsDir() {
			continue // the backend resolves buckets against the working directory, the root
		}
		noLock := false
		err := be.CreateBucket(ctx, &s3.CreateBucketInput{
			Bucket:                     &b,
			ObjectOwnership:            types.ObjectOwnershipBucketOwnerEnforced,
			ObjectLockEnabledForBucket: &noLock,
			CreateBucketConfiguration:  &types.CreateBucketConfiguration{},
		}, acl)
		if err != nil {
			return fmt.Errorf("s3gw: create bucket %s: %w", b, err)
		}
	}
	return nil
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
}
