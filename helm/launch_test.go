package helm_test

// TestLaunch runs the real m2coord and m2worker binaries exactly as the
// rendered chart starts them, and sees them form a raft cluster, register
// the workers, accept a job through the client Service and train it on the
// CPU to the end. The chart cannot claim a flag the binaries lack, a port
// they do not serve, a probe path they do not answer or a file they cannot
// read: every process gets the args and env of its container as rendered
// and is watched from its first instant, and one that exits (a usage error
// exits with status 2) fails the test with its log.
//
// What a cluster would provide is emulated on one machine as follows.
//
//   - Pods. Every replica of every StatefulSet is a pod named
//     <statefulset>-<ordinal>; every container of it is a child process of
//     the binary its image names (m2coord or m2worker, built once per run),
//     started without a command, as the chart leaves the images'
//     entrypoints in place.
//   - The pod network. Each pod gets an address of its own in a loopback
//     /24 picked at random for the run (127.A.B.0/24; Linux routes all of
//     127.0.0.0/8 to lo), so that every pod binds the chart's fixed ports
//     as in a cluster. An argument's or variable's listen address 0.0.0.0
//     becomes the pod's address: all of a pod's interfaces are its own
//     address here.
//   - DNS. Every host name in an argument, or in a variable's value as
//     the manifest writes it, is replaced by the address the cluster's DNS
//     would answer (with the namespace's search path):
//     <pod>.<headless service>.<ns>.svc[.<cluster domain>] gives the pod's
//     address, when the StatefulSet names that Service and the Service
//     selects the pod; <service>.<ns>.svc[...] of a Service with a cluster
//     IP gives the Service's address; the external names of the values
//     (etcd endpoints, the S3 endpoint) give the servers the test starts
//     for them. A .svc name that is none of these fails the test: in a
//     cluster it would not resolve. The cluster domain is the values'
//     clusterDomain, else the kubelet's cluster.local. Host names are
//     whole words of [A-Za-z0-9.-], so a raft ID such as a pod name is
//     left alone.
//   - Services. A Service with a cluster IP is a TCP proxy on its own
//     loopback address and port that forwards each connection to the
//     targetPort of one of the selected pods that is ready now, in turn,
//     as kube-proxy does with the Service's endpoints.
//   - Probes. The readiness probe of every container (its httpGet path and
//     port, a named port resolved through the container's ports, on the
//     pod's address) runs every launchProbeEvery, more often than the
//     manifest's period so that the test waits less; a pod is ready when
//     all of its containers are. The liveness probe is checked once
//     everything is ready.
//   - The downward API and $(VAR). Variables from fieldRef (metadata.name,
//     metadata.namespace, status.podIP, ...) take the pod's values,
//     secretKeyRef variables the Secret's, and $(VAR) in args and values is
//     expanded as the kubelet expands it ($$ escapes a $); a reference that
//     stays unresolved fails the test.
//   - Volumes. A volumeClaimTemplate is a directory per pod, an emptyDir a
//     directory per pod shared by its containers, a Secret volume a
//     directory holding one file per key (or per item, with the item's
//     path and mode), written as the kubelet writes them. A mount path in
//     an argument or variable becomes the directory; a mount at /tmp also
//     sets TMPDIR. Secrets come from the rendered manifests or, for the
//     existingSecret values, from the test: a random API token; a CA and
//     one certificate valid for the names of the README's TLS list and,
//     since the processes dial addresses here, for every address in use;
//     and the S3 gateway's access key.
//   - The container's root file system. The working directory and HOME
//     are a read-only directory, standing in for readOnlyRootFilesystem;
//     HOSTNAME is the pod name, as the runtime sets it.
//   - GPUs. The node gives no container a GPU (CUDA_VISIBLE_DEVICES is
//     empty), so the workers' --backend=auto chooses the CPU.
//
// The processes run as the test's user, not as the chart's uid 65532, and
// without the images' ENV (the chart passes every flag it relies on).
// Each case is one values file of ci/ (with more worker pods where it has
// one, so that a job has two ranks): the defaults with embedded etcd; an
// external etcd of three members started in the test, a token and S3
// through a gateway (the dataset and the checkpoints live there); and
// mutual TLS everywhere with an external etcd that requires client
// certificates. At the end every process gets SIGTERM, workers first, and
// must exit with status 0 within the grace period its pod declares.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	miniocreds "github.com/minio/minio-go/v7/pkg/credentials"
	dto "github.com/prometheus/client_model/go"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/m2train/m2train/coordinator/client"
	"github.com/m2train/m2train/coordinator/etcdembed"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/helm"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
	"github.com/m2train/m2train/tools/promtest"
	"github.com/m2train/m2train/worker/checkpoint/s3gw"
	"github.com/m2train/m2train/worker/data"
)

const (
	launchRelease   = "m2train"
	launchNamespace = "ml"
	// launchDefaultClusterDomain is the kubelet's default cluster domain,
	// used when the values set none.
	launchDefaultClusterDomain = "cluster.local"
	// launchBucket is the bucket the S3 gateway serves.
	launchBucket = "m2train-launch"
	// Timeouts are generous: a loaded 2-core machine runs the whole suite.
	launchBuildTimeout = 10 * time.Minute
	launchReadyTimeout = 4 * time.Minute
	launchJobTimeout   = 6 * time.Minute
	// launchProbeEvery is how often the readiness probes run.
	launchProbeEvery = 250 * time.Millisecond
	// launchLogTail is how many lines of each process's log a failure shows.
	launchLogTail = 60
	// The job: a tiny byte-level model, one rank per worker container.
	launchSteps     = 12
	launchCkptEvery = 6
)

// TestMain lets the test binary serve S3 as the gateway child that
// s3gw.StartProcess starts.
func TestMain(m *testing.M) {
	s3gw.RunIfChild()
	os.Exit(m.Run())
}

// launchCase is one install: a values file of ci/ and values laid over it.
type launchCase struct {
	name       string
	valuesFile string
	overlay    map[string]any
}

var launchCases = []launchCase{
	{"embedded-etcd", "ci/default-values.yaml", map[string]any{"workers": map[string]any{"replicas": 2}}},
	{"external-etcd-s3", "ci/external-etcd-values.yaml", nil},
	{"mtls", "ci/mtls-values.yaml", map[string]any{"workers": map[string]any{"replicas": 2}}},
}

func TestLaunch(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("TestLaunch gives every pod its own address in 127.0.0.0/8, which only Linux routes to the loopback interface")
	}
	if testing.Short() {
		t.Skip("-short: TestLaunch builds m2coord and m2worker and trains a job with them")
	}
	bins := launchBuild(t)
	for _, tc := range launchCases {
		t.Run(tc.name, func(t *testing.T) { launchRun(t, bins, tc) })
	}
}

// launchBinaries maps an image's name (the last element of its repository)
// to the binary its entrypoint runs.
type launchBinaries map[string]string

// launchBuild builds m2coord and m2worker from this module.
func launchBuild(t *testing.T) launchBinaries {
	t.Helper()
	start := time.Now()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("the module root %s has no go.mod: %v", root, err)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is not on PATH (go test puts it there): %v", err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), launchBuildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", dir+string(filepath.Separator), "./coordinator/m2coord", "./worker/m2worker")
	cmd.Dir = root
	// go-nvml's cgo code uses deprecated declarations; the worker image
	// builds with the same flags.
	cmd.Env = append(os.Environ(), "CGO_CFLAGS=-O2 -g -Wno-deprecated-declarations")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build m2coord m2worker: %v\n%s", err, out)
	}
	t.Logf("built m2coord and m2worker in %v", time.Since(start).Round(time.Millisecond))
	return launchBinaries{"m2coord": filepath.Join(dir, "m2coord"), "m2worker": filepath.Join(dir, "m2worker")}
}

// launchCluster is one install of the chart, run as processes.
type launchCluster struct {
	t      *testing.T
	dir    string
	bins   launchBinaries
	values chartutil.Values // the chart's values.yaml under the case's
	domain string           // the cluster domain

	sets     []*appsv1.StatefulSet
	services []*corev1.Service
	secrets  map[string]map[string][]byte

	net      *launchNet
	pods     []*launchPod
	svcIP    map[string]string // Service name → its address
	proxies  []*launchProxy
	etcdEPs  []*launchEndpoint // the external etcd members
	s3EP     *launchEndpoint   // the S3 endpoint, when the values name one
	s3       *s3gw.Process
	etcds    []*etcdembed.Server
	pki      *security.DevCA
	dataDir  string // the dataset, prepared locally
	anyExit  chan struct{}
	exitOnce sync.Once
	stopping atomic.Bool
	probes   sync.WaitGroup
	logs     []string // log files of the processes and servers
}

// launchEndpoint is an external service the values name: its URL's
// scheme, host and port, and the address the test serves it on.
type launchEndpoint struct {
	scheme, host, port string
	ip                 string
}

func (e *launchEndpoint) addr() string { return net.JoinHostPort(e.ip, e.port) }

// launchPod is one pod of a StatefulSet.
type launchPod struct {
	name       string
	ip         string
	set        *appsv1.StatefulSet
	labels     map[string]string
	volumes    map[string]string // volume name → directory
	root       string            // the read-only root file system
	containers []*launchContainer
}

// launchContainer is one container of a pod and the process running it.
type launchContainer struct {
	pod   *launchPod
	spec  *corev1.Container
	args  []string // resolved
	env   []string // resolved, KEY=VALUE
	ready atomic.Bool
	proc  *launchProc
}

func (c *launchContainer) String() string { return c.pod.name + "/" + c.spec.Name }

// arg returns the value of the resolved --name=value argument.
func (c *launchContainer) arg(name string) (string, bool) {
	for _, a := range c.args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// launchProc is a running child process.
type launchProc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error // set before done closes
}

func (p *launchProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// describeExit says how the process ended, with its log.
func (p *launchProc) describeExit() string {
	why := fmt.Sprintf("exited: %v", p.err)
	var ee *exec.ExitError
	if errors.As(p.err, &ee) && ee.ExitCode() == 2 {
		why = "rejected its command line or environment (exit status 2, a usage error)"
	} else if p.err == nil {
		why = "exited with status 0"
	}
	return fmt.Sprintf("%s %s; command line: %q; log:\n%s", p.name, why, p.cmd.Args, launchTail(p.logPath, launchLogTail))
}

func launchRun(t *testing.T, bins launchBinaries, tc launchCase) {
	begin := time.Now()
	c := &launchCluster{t: t, dir: t.TempDir(), bins: bins, secrets: map[string]map[string][]byte{},
		svcIP: map[string]string{}, anyExit: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		c.probes.Wait()
		c.teardown()
	})
	c.render(tc)
	c.net = launchNewNet(t, c.domain)
	c.plan()
	c.prepareExternal(ctx)
	c.preparePods()
	c.checkPortsFree()
	c.startProxies()
	c.startPods(ctx)
	c.waitFor("every container ready", launchReadyTimeout, c.allReady)
	t.Logf("every container ready %v after the start", time.Since(begin).Round(time.Millisecond))
	c.checkLiveness()
	c.checkCluster()
	formed := time.Now()
	t.Logf("raft formed and every worker registered %v after the start", formed.Sub(begin).Round(time.Millisecond))
	c.runJob(ctx)
	t.Logf("the job succeeded %v after the cluster formed", time.Since(formed).Round(time.Millisecond))
	stop := time.Now()
	c.stopGracefully()
	t.Logf("every process stopped %v after SIGTERM", time.Since(stop).Round(time.Millisecond))
	t.Logf("%s: %v in all", tc.name, time.Since(begin).Round(time.Millisecond))
}

// render renders the chart with the case's values and decodes the objects
// the test runs.
func (c *launchCluster) render(tc launchCase) {
	t := c.t
	vals, err := helm.LoadValuesFile(tc.valuesFile)
	if err != nil {
		t.Fatal(err)
	}
	launchMerge(vals, tc.overlay)
	ms, err := helm.Render(".", vals, launchRelease, launchNamespace)
	if err != nil {
		t.Fatalf("render with %s: %v", tc.valuesFile, err)
	}
	ch, err := loader.Load(".")
	if err != nil {
		t.Fatal(err)
	}
	if c.values, err = chartutil.CoalesceValues(ch, vals); err != nil {
		t.Fatal(err)
	}
	c.domain = launchValue[string](t, c.values, "clusterDomain")
	if c.domain == "" {
		c.domain = launchDefaultClusterDomain
	}
	for _, m := range ms {
		var err error
		switch m.Kind {
		case "StatefulSet":
			var s appsv1.StatefulSet
			err = yaml.UnmarshalStrict([]byte(m.YAML), &s)
			c.sets = append(c.sets, &s)
		case "Service":
			var s corev1.Service
			err = yaml.UnmarshalStrict([]byte(m.YAML), &s)
			c.services = append(c.services, &s)
		case "Secret":
			var s corev1.Secret
			err = yaml.UnmarshalStrict([]byte(m.YAML), &s)
			data := maps.Clone(s.Data)
			if data == nil {
				data = map[string][]byte{}
			}
			for k, v := range s.StringData {
				data[k] = []byte(v)
			}
			c.secrets[s.Name] = data
		}
		if err != nil {
			t.Fatalf("decode %s %s (%s): %v", m.Kind, m.Name, m.Source, err)
		}
	}
	if len(c.sets) == 0 {
		t.Fatal("the chart rendered no StatefulSet")
	}
}

// launchMerge lays src over dst, map by map.
func launchMerge(dst, src map[string]any) {
	for k, v := range src {
		if sm, ok := v.(map[string]any); ok {
			if dm, ok := dst[k].(map[string]any); ok {
				launchMerge(dm, sm)
				continue
			}
			dm := map[string]any{}
			launchMerge(dm, sm)
			dst[k] = dm
			continue
		}
		dst[k] = v
	}
}

// launchValue reads a value of type T at a dotted path.
func launchValue[T any](t *testing.T, vals chartutil.Values, path string) T {
	t.Helper()
	var cur any = map[string]any(vals)
	for _, k := range strings.Split(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			t.Fatalf("values: %s: %s is not a map", path, k)
		}
		cur = m[k]
	}
	v, ok := cur.(T)
	if !ok {
		var zero T
		t.Fatalf("values: %s is %T, want %T", path, cur, zero)
	}
	return v
}

// launchNet hands out the loopback addresses of a run and answers host
// names as the cluster's DNS would.
type launchNet struct {
	t      *testing.T
	prefix string // "127.A.B."
	next   int
	domain string
	names  map[string]string
	used   []net.IP
}

func launchNewNet(t *testing.T, domain string) *launchNet {
	t.Helper()
	// A /24 of its own keeps the chart's fixed ports clear of whatever else
	// listens on 127.0.0.1.
	for range 20 {
		prefix := fmt.Sprintf("127.%d.%d.", 64+mrand.IntN(190), 1+mrand.IntN(250))
		l, err := net.Listen("tcp", prefix+"1:0")
		if err != nil {
			continue
		}
		l.Close()
		return &launchNet{t: t, prefix: prefix, next: 1, domain: domain, names: map[string]string{}}
	}
	t.Fatal("cannot bind addresses in 127.0.0.0/8 other than 127.0.0.1; the test gives every pod its own loopback address")
	return nil
}

func (n *launchNet) alloc() string {
	n.next++
	if n.next > 254 {
		n.t.Fatal("more than 253 addresses")
	}
	ip := n.prefix + strconv.Itoa(n.next)
	n.used = append(n.used, net.ParseIP(ip))
	return ip
}

// inNamespace names ip as name (a Service or <pod>.<service>) in the
// release's namespace, in every form the namespace's search path
// resolves: name.ns.svc.domain, name.ns.svc, name.ns and name. (A bare pod
// name is no such name: it resolves only inside its own pod, and it is
// the raft ID of a coordinator.)
func (n *launchNet) inNamespace(name, ip string) {
	for _, f := range []string{name + "." + launchNamespace + ".svc." + n.domain, name + "." + launchNamespace + ".svc", name + "." + launchNamespace, name} {
		n.names[f] = ip
	}
}

// external names ip as an external host of the values, also with the
// cluster domain appended when it is a .svc name.
func (n *launchNet) external(host, ip string) {
	n.names[host] = ip
	if strings.HasSuffix(host, ".svc") {
		n.names[host+"."+n.domain] = ip
	}
}

// rewrite replaces every host name in s by its address and the unspecified
// address 0.0.0.0 by podIP. Host names are whole runs of [A-Za-z0-9.-],
// so an ID that begins like a name is left alone. A run that looks like a
// cluster name but resolves to nothing is an error.
func (n *launchNet) rewrite(s, podIP string) (string, error) {
	var b strings.Builder
	isHost := func(r byte) bool {
		return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-'
	}
	for i := 0; i < len(s); {
		if !isHost(s[i]) {
			b.WriteByte(s[i])
			i++
			continue
		}
		j := i
		for j < len(s) && isHost(s[j]) {
			j++
		}
		tok := s[i:j]
		switch ip, ok := n.names[strings.ToLower(tok)]; {
		case ok:
			b.WriteString(ip)
		case tok == "0.0.0.0":
			b.WriteString(podIP)
		case strings.HasSuffix(tok, ".svc") || strings.Contains(tok, ".svc."):
			return "", fmt.Errorf("the host name %q resolves to nothing in the cluster: it is no pod of a headless Service, no Service with an address and no external host of the values", tok)
		default:
			b.WriteString(tok)
		}
		i = j
	}
	return b.String(), nil
}

// plan lays out the pods and Services and gives them addresses and names.
func (c *launchCluster) plan() {
	t := c.t
	for _, s := range c.sets {
		n := 1
		if s.Spec.Replicas != nil {
			n = int(*s.Spec.Replicas)
		}
		for i := range n {
			name := fmt.Sprintf("%s-%d", s.Name, i)
			lbl := maps.Clone(s.Spec.Template.Labels)
			if lbl == nil {
				lbl = map[string]string{}
			}
			lbl["statefulset.kubernetes.io/pod-name"] = name
			lbl["apps.kubernetes.io/pod-index"] = strconv.Itoa(i)
			p := &launchPod{name: name, ip: c.net.alloc(), set: s, labels: lbl, volumes: map[string]string{}}
			c.pods = append(c.pods, p)
		}
	}
	for _, svc := range c.services {
		sel := labels.SelectorFromSet(svc.Spec.Selector)
		if svc.Spec.ClusterIP == corev1.ClusterIPNone {
			for _, p := range c.pods {
				if p.set.Spec.ServiceName == svc.Name && len(svc.Spec.Selector) > 0 && sel.Matches(labels.Set(p.labels)) {
					c.net.inNamespace(p.name+"."+svc.Name, p.ip)
				}
			}
			continue
		}
		ip := c.net.alloc()
		c.svcIP[svc.Name] = ip
		c.net.inNamespace(svc.Name, ip)
	}
	// The servers the values point outside the chart at.
	if launchValue[string](t, c.values, "etcd.mode") == "external" {
		for _, ep := range launchValue[[]any](t, c.values, "etcd.external.endpoints") {
			e := c.endpoint("etcd.external.endpoints", fmt.Sprint(ep))
			c.etcdEPs = append(c.etcdEPs, e)
		}
	}
	if ep := launchValue[string](t, c.values, "s3.endpoint"); ep != "" {
		c.s3EP = c.endpoint("s3.endpoint", ep)
	}
	var lines []string
	for _, p := range c.pods {
		lines = append(lines, fmt.Sprintf("pod %s: %s", p.name, p.ip))
	}
	for _, name := range slices.Sorted(maps.Keys(c.svcIP)) {
		lines = append(lines, fmt.Sprintf("service %s: %s", name, c.svcIP[name]))
	}
	for _, e := range append(slices.Clone(c.etcdEPs), c.s3EP) {
		if e != nil {
			lines = append(lines, fmt.Sprintf("external %s: %s", e.host, e.addr()))
		}
	}
	t.Logf("addresses:\n  %s", strings.Join(lines, "\n  "))
}

// endpoint gives an external URL of the values an address of its own.
func (c *launchCluster) endpoint(field, raw string) *launchEndpoint {
	u, err := url.Parse(raw)
	if err != nil || u.Hostname() == "" || u.Port() == "" {
		c.t.Fatalf("values: %s: %q is not scheme://host:port (%v)", field, raw, err)
	}
	e := &launchEndpoint{scheme: u.Scheme, host: u.Hostname(), port: u.Port(), ip: c.net.alloc()}
	c.net.external(e.host, e.ip)
	return e
}

// prepareExternal makes what the values expect to exist outside the chart:
// the Secrets they name, the external etcd and the S3 server, and the
// training data.
func (c *launchCluster) prepareExternal(ctx context.Context) {
	t := c.t
	tlsOn := launchValue[bool](t, c.values, "tls.enabled")
	if tlsOn {
		var err error
		if c.pki, err = security.NewDevCA("m2train launch test CA"); err != nil {
			t.Fatal(err)
		}
		// One certificate for every component, valid for the README's names
		// and, since the test dials addresses, for every address in use.
		var dns []string
		for _, svc := range c.services {
			name := svc.Name + "." + launchNamespace + ".svc"
			if svc.Spec.ClusterIP == corev1.ClusterIPNone {
				name = "*." + name
			}
			dns = append(dns, name, name+"."+c.domain)
		}
		hosts := dns
		for _, ip := range c.net.used {
			hosts = append(hosts, ip.String())
		}
		cert, key, err := c.pki.Issue("m2train", hosts...)
		if err != nil {
			t.Fatal(err)
		}
		c.addSecret(launchValue[string](t, c.values, "tls.existingSecret"), map[string][]byte{"ca.crt": c.pki.CertPEM(), "tls.crt": cert, "tls.key": key})
	}
	if s := launchValue[string](t, c.values, "auth.existingSecret"); s != "" {
		c.addSecret(s, map[string][]byte{launchValue[string](t, c.values, "auth.secretKey"): []byte(randomHex(t, 24) + "\n")})
	}
	if len(c.etcdEPs) > 0 {
		c.startEtcd(ctx, tlsOn)
	}
	if s := launchValue[string](t, c.values, "s3.existingSecret"); s != "" {
		access, secret := "launch-unused-access-key", "launch-unused-secret-key"
		if c.s3EP != nil {
			c.startS3(ctx)
			access, secret = c.s3.AccessKey, c.s3.SecretKey
		}
		kv := map[string][]byte{
			launchValue[string](t, c.values, "s3.accessKeyIdKey"):     []byte(access),
			launchValue[string](t, c.values, "s3.secretAccessKeyKey"): []byte(secret),
		}
		if k := launchValue[string](t, c.values, "s3.sessionTokenKey"); k != "" {
			kv[k] = []byte("launch-unused-session-token")
		}
		c.addSecret(s, kv)
	} else if c.s3EP != nil {
		t.Fatal("values: s3.endpoint is set without s3.existingSecret; the test's gateway needs credentials")
	}
	c.prepareData(ctx)
}

func (c *launchCluster) addSecret(name string, kv map[string][]byte) {
	if name == "" {
		c.t.Fatal("values: a Secret that is needed has no name")
	}
	if _, ok := c.secrets[name]; ok {
		c.t.Fatalf("the Secret %s is both rendered by the chart and expected to exist", name)
	}
	c.secrets[name] = kv
}

// startEtcd runs the external etcd: one member per endpoint, each on its
// endpoint's address, its peer port the client port plus one.
func (c *launchCluster) startEtcd(ctx context.Context, tlsOn bool) {
	t := c.t
	var tlsFiles *etcdembed.TLSFiles
	if tlsOn {
		dir := filepath.Join(c.dir, "etcd-tls")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		var hosts []string
		for _, e := range c.etcdEPs {
			hosts = append(hosts, e.host, e.ip)
		}
		cert, key, err := c.pki.Issue("etcd", hosts...)
		if err != nil {
			t.Fatal(err)
		}
		tlsFiles = &etcdembed.TLSFiles{Cert: filepath.Join(dir, "tls.crt"), Key: filepath.Join(dir, "tls.key"), CA: filepath.Join(dir, "ca.crt")}
		for path, b := range map[string][]byte{tlsFiles.Cert: cert, tlsFiles.Key: key, tlsFiles.CA: c.pki.CertPEM()} {
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	var members []etcdembed.Member
	peerAddr := func(e *launchEndpoint) string {
		p, err := strconv.Atoi(e.port)
		if err != nil {
			t.Fatalf("etcd endpoint port %q: %v", e.port, err)
		}
		return net.JoinHostPort(e.ip, strconv.Itoa(p+1))
	}
	for i, e := range c.etcdEPs {
		if want := map[bool]string{false: "http", true: "https"}[tlsOn]; e.scheme != want {
			t.Fatalf("values: etcd.external.endpoints: %s://%s uses %s, but tls.enabled is %v", e.scheme, e.host, e.scheme, tlsOn)
		}
		members = append(members, etcdembed.Member{Name: fmt.Sprintf("etcd-%d", i), PeerURL: e.scheme + "://" + peerAddr(e), ClientURL: e.scheme + "://" + e.addr()})
	}
	logPath := filepath.Join(c.dir, "logs", "etcd.log")
	logw := c.logFile(logPath)
	for i, e := range c.etcdEPs {
		s, err := etcdembed.StartMember(etcdembed.Config{
			Name: members[i].Name, Dir: filepath.Join(c.dir, "etcd", members[i].Name),
			ListenClient: e.addr(), ListenPeer: peerAddr(e), Members: members, TLS: tlsFiles,
			Logger: launchSlog(logw),
		})
		if err != nil {
			t.Fatalf("external etcd member %s: %v", members[i].Name, err)
		}
		c.etcds = append(c.etcds, s)
	}
	wctx, cancel := context.WithTimeout(ctx, launchReadyTimeout)
	defer cancel()
	for _, s := range c.etcds {
		if err := s.WaitReady(wctx); err != nil {
			t.Fatalf("external etcd: %v; log:\n%s", err, launchTail(logPath, launchLogTail))
		}
	}
}

// startS3 serves the values' S3 endpoint from a gateway in a child process.
func (c *launchCluster) startS3(ctx context.Context) {
	t := c.t
	if c.s3EP.scheme != "http" {
		t.Fatalf("values: s3.endpoint: the test serves http, not %s", c.s3EP.scheme)
	}
	logPath := filepath.Join(c.dir, "logs", "s3gw.log")
	p, err := s3gw.StartProcess(ctx, s3gw.Options{Dir: filepath.Join(c.dir, "s3"), Addr: c.s3EP.addr(),
		Region: launchValue[string](t, c.values, "s3.region"), Buckets: []string{launchBucket}}, c.logFile(logPath))
	if err != nil {
		t.Fatalf("S3 gateway on %s: %v; log:\n%s", c.s3EP.addr(), err, launchTail(logPath, launchLogTail))
	}
	c.s3 = p
}

// prepareData writes a small byte-level dataset and, with an S3 endpoint,
// uploads it to the bucket.
func (c *launchCluster) prepareData(ctx context.Context) {
	t := c.t
	src := filepath.Join(c.dir, "text")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	// The chart's templates are the text: a few tens of kilobytes.
	tpls, err := filepath.Glob("templates/*")
	if err != nil || len(tpls) == 0 {
		t.Fatalf("templates: %v (%d files)", err, len(tpls))
	}
	for _, p := range tpls {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, filepath.Base(p)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c.dataDir = filepath.Join(c.dir, "data")
	if _, err := data.Prepare(ctx, []string{src}, c.dataDir, data.PrepareOptions{EOD: true}); err != nil {
		t.Fatal(err)
	}
	if c.s3 == nil {
		return
	}
	mc := c.s3Client()
	err = filepath.WalkDir(c.dataDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(c.dataDir, p)
		if err != nil {
			return err
		}
		_, err = mc.FPutObject(ctx, launchBucket, "data/"+filepath.ToSlash(rel), p, minio.PutObjectOptions{})
		return err
	})
	if err != nil {
		t.Fatalf("upload the dataset to the gateway: %v", err)
	}
}

func (c *launchCluster) s3Client() *minio.Client {
	mc, err := minio.New(c.s3EP.addr(), &minio.Options{Creds: miniocreds.NewStaticV4(c.s3.AccessKey, c.s3.SecretKey, ""),
		Region: c.s3.Region, BucketLookup: minio.BucketLookupPath})
	if err != nil {
		c.t.Fatal(err)
	}
	return mc
}

// preparePods makes every pod's volumes and resolves every container's
// args and env.
func (c *launchCluster) preparePods() {
	t := c.t
	for _, p := range c.pods {
		pdir := filepath.Join(c.dir, "pods", p.name)
		p.root = filepath.Join(pdir, "root")
		if err := os.MkdirAll(p.root, 0o755); err != nil {
			t.Fatal(err)
		}
		launchReadOnly(t, p.root)
		spec := &p.set.Spec.Template.Spec
		for _, v := range spec.Volumes {
			dir := filepath.Join(pdir, "volumes", v.Name)
			switch {
			case v.EmptyDir != nil:
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
			case v.Secret != nil:
				c.writeSecretVolume(p, v.Secret, dir)
			default:
				t.Fatalf("pod %s: volume %s: only emptyDir and secret volumes are emulated", p.name, v.Name)
			}
			p.volumes[v.Name] = dir
		}
		for _, pvc := range p.set.Spec.VolumeClaimTemplates {
			if _, ok := p.volumes[pvc.Name]; ok {
				t.Fatalf("pod %s: the claim template %s has the name of a volume", p.name, pvc.Name)
			}
			dir := filepath.Join(pdir, "claims", pvc.Name+"-"+p.name)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			p.volumes[pvc.Name] = dir
		}
		if len(spec.InitContainers) > 0 {
			t.Fatalf("pod %s: init containers are not emulated", p.name)
		}
		for i := range spec.Containers {
			lc := &launchContainer{pod: p, spec: &spec.Containers[i]}
			for what, pr := range map[string]*corev1.Probe{"readiness": lc.spec.ReadinessProbe, "liveness": lc.spec.LivenessProbe} {
				if pr == nil || pr.HTTPGet == nil {
					t.Fatalf("%s: the %s probe is not an httpGet probe, the only kind the binaries serve", lc, what)
				}
			}
			c.resolve(lc)
			p.containers = append(p.containers, lc)
		}
	}
}

// writeSecretVolume writes a Secret's keys (or its items) as files, as the
// kubelet does.
func (c *launchCluster) writeSecretVolume(p *launchPod, v *corev1.SecretVolumeSource, dir string) {
	t := c.t
	kv, ok := c.secrets[v.SecretName]
	if !ok {
		if v.Optional != nil && *v.Optional {
			kv = map[string][]byte{}
		} else {
			t.Fatalf("pod %s: the Secret %s does not exist: the pod could not start", p.name, v.SecretName)
		}
	}
	mode := fs.FileMode(0o644)
	if v.DefaultMode != nil {
		mode = fs.FileMode(*v.DefaultMode)
	}
	type file struct {
		path string
		data []byte
		mode fs.FileMode
	}
	var files []file
	if len(v.Items) == 0 {
		for k, b := range kv {
			files = append(files, file{k, b, mode})
		}
	}
	for _, it := range v.Items {
		b, ok := kv[it.Key]
		if !ok {
			t.Fatalf("pod %s: the Secret %s has no key %q that its volume names", p.name, v.SecretName, it.Key)
		}
		m := mode
		if it.Mode != nil {
			m = fs.FileMode(*it.Mode)
		}
		files = append(files, file{it.Path, b, m})
	}
	for _, f := range files {
		path := filepath.Join(dir, filepath.FromSlash(f.path))
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, f.data, 0o600); err != nil {
			t.Fatal(err)
		}
		// The test's user owns the files; the mode's group bits stand for
		// the pod's fsGroup, so the owner gets them too.
		if err := os.Chmod(path, f.mode|(f.mode&0o070)<<3); err != nil {
			t.Fatal(err)
		}
	}
	launchReadOnly(t, dir)
}

// resolve works out a container's command line and environment as the
// kubelet would, then maps names, addresses and mount paths.
func (c *launchCluster) resolve(lc *launchContainer) {
	t, p, spec := c.t, lc.pod, lc.spec
	if len(spec.Command) > 0 {
		t.Fatalf("%s: sets command %q; the chart leaves the image's entrypoint in place", lc, spec.Command)
	}
	if len(spec.EnvFrom) > 0 {
		t.Fatalf("%s: envFrom is not emulated", lc)
	}
	vars := map[string]string{}
	literal := map[string]bool{} // set from value, not valueFrom
	lookup := func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	}
	var order []string
	for _, e := range spec.Env {
		var v string
		literal[e.Name] = e.ValueFrom == nil
		switch {
		case e.ValueFrom == nil:
			v = launchExpand(e.Value, lookup)
		case e.ValueFrom.FieldRef != nil:
			v = c.fieldRef(lc, e.ValueFrom.FieldRef.FieldPath)
		case e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			b, ok := c.secrets[ref.Name][ref.Key]
			if !ok {
				if ref.Optional != nil && *ref.Optional {
					continue
				}
				t.Fatalf("%s: env %s: the Secret %s has no key %q: the container could not start", lc, e.Name, ref.Name, ref.Key)
			}
			v = string(b)
		default:
			t.Fatalf("%s: env %s: only value, fieldRef and secretKeyRef are emulated", lc, e.Name)
		}
		if _, ok := vars[e.Name]; !ok {
			order = append(order, e.Name)
		}
		vars[e.Name] = v
	}
	mounts := c.mounts(lc)
	mapValue := func(what, s string) string {
		if i := strings.Index(s, "$("); i >= 0 {
			t.Fatalf("%s: %s %q: the reference %s is to no variable of the container", lc, what, s, s[i:])
		}
		out, err := c.net.rewrite(s, p.ip)
		if err != nil {
			t.Fatalf("%s: %s %q: %v", lc, what, s, err)
		}
		return launchMapPaths(out, mounts)
	}
	for _, a := range spec.Args {
		lc.args = append(lc.args, mapValue("argument", launchExpand(a, lookup)))
	}
	for _, k := range order {
		// Values from the downward API and Secrets are data, not text
		// the chart wrote: they are passed as they are.
		v := vars[k]
		if literal[k] {
			v = mapValue("env "+k, v)
		}
		lc.env = append(lc.env, k+"="+v)
	}
	lc.env = append(lc.env, "HOSTNAME="+p.name, "HOME="+p.root, "CUDA_VISIBLE_DEVICES=")
	if dir, ok := mounts["/tmp"]; ok {
		lc.env = append(lc.env, "TMPDIR="+dir)
	}
}

// fieldRef answers the downward API.
func (c *launchCluster) fieldRef(lc *launchContainer, path string) string {
	p := lc.pod
	switch path {
	case "metadata.name":
		return p.name
	case "metadata.namespace":
		return launchNamespace
	case "status.podIP", "status.podIPs":
		return p.ip
	case "status.hostIP", "status.hostIPs":
		return "127.0.0.1"
	case "spec.nodeName":
		return "launch-node"
	case "spec.serviceAccountName":
		return p.set.Spec.Template.Spec.ServiceAccountName
	}
	c.t.Fatalf("%s: fieldRef %s is not emulated", lc, path)
	return ""
}

// mounts maps the container's mount paths to directories.
func (c *launchCluster) mounts(lc *launchContainer) map[string]string {
	out := map[string]string{}
	for _, m := range lc.spec.VolumeMounts {
		dir, ok := lc.pod.volumes[m.Name]
		if !ok {
			c.t.Fatalf("%s: mounts %s, which is no volume or claim of the pod", lc, m.Name)
		}
		if m.SubPath != "" {
			dir = filepath.Join(dir, filepath.FromSlash(m.SubPath))
		}
		if _, dup := out[m.MountPath]; dup {
			c.t.Fatalf("%s: two mounts at %s", lc, m.MountPath)
		}
		out[m.MountPath] = dir
	}
	return out
}

// launchMapPaths replaces a mount path at the start of s or after '=',
// ',' or ':', when followed by the end, '/' or ',', by its directory; the
// longest mount path wins.
func launchMapPaths(s string, mounts map[string]string) string {
	paths := slices.Collect(maps.Keys(mounts))
	slices.SortFunc(paths, func(a, b string) int { return len(b) - len(a) })
	var b strings.Builder
	for i := 0; i < len(s); {
		matched := false
		if i == 0 || strings.ContainsRune("=,:", rune(s[i-1])) {
			for _, mp := range paths {
				rest := s[i:]
				if strings.HasPrefix(rest, mp) && (len(rest) == len(mp) || strings.ContainsRune("/,", rune(rest[len(mp)]))) {
					b.WriteString(mounts[mp])
					i += len(mp)
					matched = true
					break
				}
			}
		}
		if !matched {
			b.WriteByte(s[i])
			i++
		}
	}
	return b.String()
}

// launchExpand expands $(VAR) references as the kubelet does: a defined
// variable is replaced, an undefined reference is kept as written, and $$
// is a literal $.
func launchExpand(s string, lookup func(string) (string, bool)) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			ref := s[i : i+3+end]
			if v, ok := lookup(s[i+2 : i+2+end]); ok {
				b.WriteString(v)
			} else {
				b.WriteString(ref)
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

// checkPortsFree fails early, with a clear reason, when something on this
// machine already holds a port a pod declares (a server listening on
// every address takes the port on the pods' addresses too).
func (c *launchCluster) checkPortsFree() {
	for _, p := range c.pods {
		for _, lc := range p.containers {
			for _, port := range lc.spec.Ports {
				addr := net.JoinHostPort(p.ip, strconv.Itoa(int(port.ContainerPort)))
				l, err := net.Listen("tcp", addr)
				if err != nil {
					c.t.Fatalf("%s: port %s (%d) cannot be bound on %s: %v; is a server on this machine listening on it on every address?", lc, port.Name, port.ContainerPort, p.ip, err)
				}
				l.Close()
			}
		}
	}
}

// launchProxy is a Service with a cluster IP: a listener that forwards each
// connection to a ready endpoint.
type launchProxy struct {
	ln        net.Listener
	endpoints func() []string
	next      atomic.Uint64
	mu        sync.Mutex
	conns     map[net.Conn]bool
	closed    bool
	wg        sync.WaitGroup
}

func (c *launchCluster) startProxies() {
	for _, svc := range c.services {
		ip, ok := c.svcIP[svc.Name]
		if !ok {
			continue
		}
		sel := labels.SelectorFromSet(svc.Spec.Selector)
		for _, sp := range svc.Spec.Ports {
			addr := net.JoinHostPort(ip, strconv.Itoa(int(sp.Port)))
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				c.t.Fatalf("service %s port %s: %v", svc.Name, sp.Name, err)
			}
			target := sp.TargetPort
			if target.Type == intstr.Int && target.IntVal == 0 {
				target = intstr.FromInt32(sp.Port)
			}
			px := &launchProxy{ln: ln, conns: map[net.Conn]bool{}, endpoints: func() []string {
				var eps []string
				for _, p := range c.pods {
					if len(svc.Spec.Selector) == 0 || !sel.Matches(labels.Set(p.labels)) || !p.ready() {
						continue
					}
					for _, lc := range p.containers {
						if port, ok := launchContainerPort(lc.spec, target); ok {
							eps = append(eps, net.JoinHostPort(p.ip, strconv.Itoa(int(port))))
							break
						}
					}
				}
				return eps
			}}
			c.proxies = append(c.proxies, px)
			px.wg.Add(1)
			go px.serve()
		}
	}
}

func (x *launchProxy) serve() {
	defer x.wg.Done()
	for {
		in, err := x.ln.Accept()
		if err != nil {
			return
		}
		eps := x.endpoints()
		if len(eps) == 0 {
			// No ready endpoint: the connection is refused, as kube-proxy
			// rejects it.
			in.Close()
			continue
		}
		ep := eps[int(x.next.Add(1)%uint64(len(eps)))]
		if !x.track(in, true) {
			in.Close()
			return
		}
		x.wg.Add(1)
		go func() {
			defer x.wg.Done()
			defer x.track(in, false)
			defer in.Close()
			out, err := net.DialTimeout("tcp", ep, 10*time.Second)
			if err != nil {
				return
			}
			if !x.track(out, true) {
				out.Close()
				return
			}
			defer x.track(out, false)
			defer out.Close()
			done := make(chan struct{}, 2)
			pipe := func(dst, src net.Conn) {
				io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					tc.CloseWrite()
				}
				done <- struct{}{}
			}
			go pipe(out, in)
			go pipe(in, out)
			<-done
			<-done
		}()
	}
}

// track adds or removes a connection; it refuses additions once closed.
func (x *launchProxy) track(c net.Conn, add bool) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	if add {
		if x.closed {
			return false
		}
		x.conns[c] = true
		return true
	}
	delete(x.conns, c)
	return true
}

func (x *launchProxy) close() {
	x.ln.Close()
	x.mu.Lock()
	x.closed = true
	for c := range x.conns {
		c.Close()
	}
	x.mu.Unlock()
	x.wg.Wait()
}

// launchContainerPort resolves a port (a number or a container port's
// name) against a container's ports.
func launchContainerPort(c *corev1.Container, p intstr.IntOrString) (int32, bool) {
	if p.Type == intstr.Int {
		return p.IntVal, true
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

func (p *launchPod) ready() bool {
	for _, lc := range p.containers {
		if !lc.ready.Load() {
			return false
		}
	}
	return true
}

// startPods starts every container of every pod at once, as a StatefulSet
// with podManagementPolicy Parallel does, and probes their readiness.
func (c *launchCluster) startPods(ctx context.Context) {
	for _, p := range c.pods {
		for _, lc := range p.containers {
			c.start(lc)
			c.t.Logf("%s: %s %s", lc, filepath.Base(lc.proc.cmd.Path), strings.Join(lc.args, " "))
			c.probes.Add(1)
			go c.probe(ctx, lc)
		}
	}
}

func (c *launchCluster) start(lc *launchContainer) {
	t := c.t
	img := lc.spec.Image
	if i := strings.Index(img, "@"); i >= 0 {
		img = img[:i]
	}
	if i := strings.LastIndex(img, ":"); i > strings.LastIndex(img, "/") {
		img = img[:i]
	}
	bin, ok := c.bins[img[strings.LastIndex(img, "/")+1:]]
	if !ok {
		t.Fatalf("%s: image %s runs no binary the test builds (%v)", lc, lc.spec.Image, slices.Sorted(maps.Keys(c.bins)))
	}
	logPath := filepath.Join(c.dir, "logs", lc.pod.name, lc.spec.Name+".log")
	logw := c.logFile(logPath)
	cmd := exec.Command(bin, lc.args...)
	cmd.Env = lc.env
	cmd.Dir = lc.pod.root
	cmd.Stdout, cmd.Stderr = logw, logw
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: start %s: %v", lc, bin, err)
	}
	p := &launchProc{name: lc.String(), cmd: cmd, logPath: logPath, done: make(chan struct{})}
	lc.proc = p
	go func() {
		p.err = cmd.Wait()
		close(p.done)
		if !c.stopping.Load() {
			c.exitOnce.Do(func() { close(c.anyExit) })
		}
	}()
}

// logFile opens a log file that the test closes at its end.
func (c *launchCluster) logFile(path string) *os.File {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		c.t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { f.Close() })
	c.logs = append(c.logs, path)
	return f
}

// probe runs the container's readiness probe until ctx ends or the
// process exits.
func (c *launchCluster) probe(ctx context.Context, lc *launchContainer) {
	defer c.probes.Done()
	pr := lc.spec.ReadinessProbe
	tick := time.NewTicker(launchProbeEvery)
	defer tick.Stop()
	for {
		ok, _ := c.probeOnce(lc, pr)
		lc.ready.Store(ok && !lc.proc.exited())
		select {
		case <-ctx.Done():
			return
		case <-lc.proc.done:
			lc.ready.Store(false)
			return
		case <-tick.C:
		}
	}
}

// probeOnce runs an httpGet probe once on the pod's address.
func (c *launchCluster) probeOnce(lc *launchContainer, pr *corev1.Probe) (bool, string) {
	g := pr.HTTPGet
	port, ok := launchContainerPort(lc.spec, g.Port)
	if !ok {
		return false, fmt.Sprintf("the probe's port %s is no port of the container", g.Port.String())
	}
	host := g.Host
	if host == "" {
		host = lc.pod.ip
	}
	scheme := strings.ToLower(string(g.Scheme))
	if scheme == "" {
		scheme = "http"
	}
	timeout := time.Duration(max(pr.TimeoutSeconds, 1)) * time.Second
	u := scheme + "://" + net.JoinHostPort(host, strconv.Itoa(int(port))) + g.Path
	code, body, err := launchGet(u, timeout)
	if err != nil {
		return false, fmt.Sprintf("GET %s: %v", u, err)
	}
	// The kubelet counts 200-399 as success.
	return code >= 200 && code < 400, fmt.Sprintf("GET %s: %d %s", u, code, strings.TrimSpace(body))
}

func launchGet(u string, timeout time.Duration) (int, string, error) {
	cl := &http.Client{Timeout: timeout}
	resp, err := cl.Get(u)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// exitedProc returns a process that has exited although the test did not
// stop it.
func (c *launchCluster) exitedProc() *launchProc {
	for _, p := range c.pods {
		for _, lc := range p.containers {
			if lc.proc != nil && lc.proc.exited() {
				return lc.proc
			}
		}
	}
	return nil
}

// waitFor polls cond until it holds, a process exits, or timeout passes.
func (c *launchCluster) waitFor(what string, timeout time.Duration, cond func() (bool, string)) {
	c.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		if p := c.exitedProc(); p != nil {
			c.t.Fatalf("waiting for %s: %s", what, p.describeExit())
		}
		ok, why := cond()
		if ok {
			return
		}
		select {
		case <-c.anyExit:
		case <-deadline.C:
			c.t.Fatalf("waiting for %s: not after %v: %s", what, timeout, why)
		case <-tick.C:
		}
	}
}

// allReady reports whether every container is ready, and else why not.
func (c *launchCluster) allReady() (bool, string) {
	var not []string
	for _, p := range c.pods {
		for _, lc := range p.containers {
			if lc.ready.Load() {
				continue
			}
			_, why := c.probeOnce(lc, lc.spec.ReadinessProbe)
			not = append(not, fmt.Sprintf("%s (%s)", lc, why))
		}
	}
	return len(not) == 0, "not ready: " + strings.Join(not, "; ")
}

// checkLiveness runs every container's liveness probe once.
func (c *launchCluster) checkLiveness() {
	for _, p := range c.pods {
		for _, lc := range p.containers {
			if ok, why := c.probeOnce(lc, lc.spec.LivenessProbe); !ok {
				c.t.Errorf("%s: liveness probe fails: %s", lc, why)
			}
		}
	}
}

// roles splits the containers into coordinators and workers by the
// binaries they run.
func (c *launchCluster) roles() (coords, workers []*launchContainer) {
	for _, p := range c.pods {
		for _, lc := range p.containers {
			switch lc.proc.cmd.Path {
			case c.bins["m2coord"]:
				coords = append(coords, lc)
			case c.bins["m2worker"]:
				workers = append(workers, lc)
			}
		}
	}
	return coords, workers
}

// metricsURL is where Prometheus would scrape a container: the pod's
// prometheus.io annotations for the pod's first container, else the port
// and path of its readiness probe's metrics port.
func (c *launchCluster) metricsURL(lc *launchContainer) string {
	ann := lc.pod.set.Spec.Template.Annotations
	if port := ann["prometheus.io/port"]; port != "" && lc == lc.pod.containers[0] {
		path := ann["prometheus.io/path"]
		return "http://" + net.JoinHostPort(lc.pod.ip, port) + path
	}
	port, ok := launchContainerPort(lc.spec, lc.spec.ReadinessProbe.HTTPGet.Port)
	if !ok {
		c.t.Fatalf("%s: the readiness probe's port is no port of the container", lc)
	}
	return "http://" + net.JoinHostPort(lc.pod.ip, strconv.Itoa(int(port))) + "/metrics"
}

func (c *launchCluster) scrape(lc *launchContainer) (map[string]*dto.MetricFamily, error) {
	u := c.metricsURL(lc)
	code, body, err := launchGet(u, 10*time.Second)
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %d", u, code)
	}
	return promtest.Parse(body)
}

// checkCluster waits until the coordinators' metrics show one leader among
// all replicas, each replica counting every replica as a voter, and the
// leader every worker alive; and checks that every worker trains on the
// CPU.
func (c *launchCluster) checkCluster() {
	coords, workers := c.roles()
	if len(coords) == 0 || len(workers) == 0 {
		c.t.Fatalf("%d coordinator and %d worker containers; the test needs both", len(coords), len(workers))
	}
	c.waitFor("one raft leader and every worker alive", launchReadyTimeout, func() (bool, string) {
		var leaders []string
		for _, lc := range coords {
			mfs, err := c.scrape(lc)
			if err != nil {
				return false, fmt.Sprintf("%s: %v", lc, err)
			}
			if v, _ := promtest.Value(mfs, "m2train_coordinator_raft_peers"); int(v) != len(coords) {
				return false, fmt.Sprintf("%s counts %v voters, want %d", lc, v, len(coords))
			}
			if v, _ := promtest.Value(mfs, "m2train_coordinator_is_leader"); v == 1 {
				leaders = append(leaders, lc.String())
				if alive, _ := promtest.Value(mfs, "m2train_coordinator_workers", "state", "alive"); int(alive) != len(workers) {
					return false, fmt.Sprintf("the leader %s has %v workers alive, want %d", lc, alive, len(workers))
				}
			}
		}
		if len(leaders) != 1 {
			return false, fmt.Sprintf("leaders: %v", leaders)
		}
		c.t.Logf("raft leader: %s of %d replicas", leaders[0], len(coords))
		return true, ""
	})
	for _, lc := range workers {
		mfs, err := c.scrape(lc)
		if err != nil {
			c.t.Fatalf("%s: %v", lc, err)
		}
		if v, _ := promtest.Value(mfs, "m2train_worker_info", "device", "cpu"); v != 1 {
			c.t.Errorf("%s does not train on the CPU: m2train_worker_info{device=\"cpu\"} = %v", lc, v)
		}
		if v, _ := promtest.Value(mfs, "m2train_worker_ready"); v != 1 {
			c.t.Errorf("%s: m2train_worker_ready = %v, want 1", lc, v)
		}
	}
}

// clientConfig is how an operator reaches the API: through the client
// Service, with the token and certificate of the chart's Secrets (read
// from the files the coordinator is given).
func (c *launchCluster) clientConfig(coord *launchContainer) client.Config {
	t := c.t
	var addr string
	for _, svc := range c.services {
		ip, ok := c.svcIP[svc.Name]
		if !ok {
			continue
		}
		for _, sp := range svc.Spec.Ports {
			if sp.Name == "api" {
				addr = net.JoinHostPort(ip, strconv.Itoa(int(sp.Port)))
			}
		}
	}
	if addr == "" {
		t.Fatal("no Service with a cluster IP has a port named api")
	}
	cfg := client.Config{Addrs: []string{addr}}
	if path, ok := coord.arg("token-file"); ok {
		tok, err := security.ReadToken("", path)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Token = tok
	}
	files := security.Files{}
	files.Cert, _ = coord.arg("tls-cert")
	files.Key, _ = coord.arg("tls-key")
	files.CA, _ = coord.arg("tls-ca")
	creds, err := files.ClientCredentials("")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Creds = creds
	return cfg
}

// runJob submits a job with one rank per worker container through the
// client Service and waits until it succeeds.
func (c *launchCluster) runJob(ctx context.Context) {
	t := c.t
	coords, workers := c.roles()
	ccfg := c.clientConfig(coords[0])
	cl, err := client.New(ccfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	dp := len(workers)
	dataPath, ckpt := c.dataDir, filepath.Join(c.dir, "checkpoints")
	if c.s3 != nil {
		dataPath, ckpt = "s3://"+launchBucket+"/data", "s3://"+launchBucket+"/checkpoints"
	}
	spec := fmt.Sprintf(`name: launch
model: {config: {d_model: 32, n_layer: 1, vocab_size: 272, d_state: 16, headdim: 16, chunk_size: 16}}
data: {path: %q, seq_len: 32}
parallel: {dp: %d, sp: 1}
batch: {micro_batch: 2, global_batch: %d}
optimizer: {lr: 0.003}
schedule: {warmup_steps: 2, total_steps: %d}
checkpoint: {location: %q, every_steps: %d, keep: 2}
precision: float32
seed: 1
backend: cpu
`, dataPath, dp, 2*dp, launchSteps, ckpt, launchCkptEvery)
	jctx, cancel := context.WithTimeout(ctx, launchJobTimeout)
	defer cancel()
	job, err := cl.Submit(jctx, []byte(spec))
	if err != nil {
		t.Fatalf("submit through the client Service: %v", err)
	}
	t.Logf("job %s submitted through the client Service (%s)", job.GetId(), ccfg.Addrs[0])
	type result struct {
		job *pb.Job
		err error
	}
	res := make(chan result, 1)
	// A finished job holds no assignments: keep those of its last
	// generation seen while it ran.
	var assigned []*pb.Assignment
	go func() {
		j, err := cl.Watch(jctx, job.GetId(), func(j *pb.Job) error {
			if len(j.GetAssignments()) > 0 {
				assigned = j.GetAssignments()
			}
			return nil
		})
		res <- result{j, err}
	}()
	var r result
	select {
	case r = <-res:
	case <-c.anyExit:
		cancel()
		<-res
		t.Fatalf("while the job ran: %s", c.exitedProc().describeExit())
	}
	if r.err != nil {
		t.Fatalf("watch job %s: %v%s", job.GetId(), r.err, c.events(cl, job.GetId()))
	}
	j := r.job
	if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("job %s ended %s: %s%s", j.GetId(), j.GetState(), j.GetMessage(), c.events(cl, j.GetId()))
	}
	if got := j.GetProgress().GetStep(); got != launchSteps {
		t.Errorf("job %s succeeded at step %d, want %d", j.GetId(), got, launchSteps)
	}
	t.Logf("job %s succeeded: step %d, loss %.3f, %d restarts", j.GetId(), j.GetProgress().GetStep(), j.GetProgress().GetLoss(), j.GetRestarts())

	// The ranks ran on the workers, each dialled at its pod's address and
	// the collective port its container was given.
	want := map[string]string{}
	for _, lc := range workers {
		id, _ := lc.arg("id")
		port, _ := lc.arg("collective-port")
		want[id] = net.JoinHostPort(lc.pod.ip, port)
	}
	seen := map[string]bool{}
	for _, a := range assigned {
		addr, ok := want[a.GetWorkerId()]
		switch {
		case !ok:
			t.Errorf("rank %d ran on %q, no worker container of the chart", a.GetRank(), a.GetWorkerId())
		case a.GetWorkerAddr() != addr:
			t.Errorf("rank %d on %s was dialled at %s, want %s", a.GetRank(), a.GetWorkerId(), a.GetWorkerAddr(), addr)
		case seen[a.GetWorkerId()]:
			t.Errorf("two ranks on %s", a.GetWorkerId())
		}
		seen[a.GetWorkerId()] = true
	}
	if len(assigned) != dp {
		t.Errorf("job %s ran %d ranks, want %d", j.GetId(), len(assigned), dp)
	}
	// Every rank finishes on its worker; the last ones may do so just
	// after the job is marked succeeded.
	c.waitFor(fmt.Sprintf("%d ranks finished on the workers", dp), launchReadyTimeout, func() (bool, string) {
		finished := 0.0
		for _, lc := range workers {
			mfs, err := c.scrape(lc)
			if err != nil {
				return false, fmt.Sprintf("%s: %v", lc, err)
			}
			v, _ := promtest.Value(mfs, "m2train_worker_rank_ends_total", "outcome", "finished")
			finished += v
		}
		return int(finished) == dp, fmt.Sprintf("the workers count %v ranks finished", finished)
	})
	c.checkCheckpoint(jctx, cl, j)
}

// checkCheckpoint checks that the last checkpoint is of the last step and
// that its files are in the store.
func (c *launchCluster) checkCheckpoint(ctx context.Context, cl *client.Client, j *pb.Job) {
	t := c.t
	ck := j.GetLastCheckpoint()
	if ck.GetStep() != launchSteps {
		t.Errorf("last checkpoint of job %s: step %d, want %d", j.GetId(), ck.GetStep(), launchSteps)
	}
	loc := ck.GetLocation()
	n := 0
	if rest, ok := strings.CutPrefix(loc, "s3://"); ok {
		bucket, prefix, _ := strings.Cut(rest, "/")
		for o := range c.s3Client().ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
			if o.Err != nil {
				t.Fatalf("list %s: %v", loc, o.Err)
			}
			n++
		}
	} else {
		err := filepath.WalkDir(loc, func(_ string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				n++
			}
			return err
		})
		if err != nil {
			t.Fatalf("checkpoint %s: %v", loc, err)
		}
	}
	if n == 0 {
		t.Errorf("checkpoint %s of step %d holds no files", loc, ck.GetStep())
	}
	t.Logf("checkpoint of step %d: %s, %d files", ck.GetStep(), loc, n)
}

// events returns a job's events for a failure message.
func (c *launchCluster) events(cl *client.Client, id string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs, err := cl.Events(ctx, id, 0, 100)
	if err != nil {
		return fmt.Sprintf("\n(events: %v)", err)
	}
	var b strings.Builder
	b.WriteString("\nevents:")
	for _, e := range evs {
		fmt.Fprintf(&b, "\n  %v", e)
	}
	return b.String()
}

// stopGracefully stops the workers, then the coordinators, as an uninstall
// would (SIGTERM), and checks that each exits with status 0 within its
// pod's termination grace period.
func (c *launchCluster) stopGracefully() {
	if p := c.exitedProc(); p != nil {
		c.t.Fatalf("before the uninstall: %s", p.describeExit())
	}
	c.stopping.Store(true)
	coords, workers := c.roles()
	for _, group := range [][]*launchContainer{workers, coords} {
		for _, lc := range group {
			if err := lc.proc.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				c.t.Errorf("%s: SIGTERM: %v", lc, err)
			}
		}
		for _, lc := range group {
			grace := 30 * time.Second
			if g := lc.pod.set.Spec.Template.Spec.TerminationGracePeriodSeconds; g != nil {
				grace = time.Duration(*g) * time.Second
			}
			timer := time.NewTimer(grace)
			select {
			case <-lc.proc.done:
				if lc.proc.err != nil {
					c.t.Errorf("%s: after SIGTERM: %s", lc, lc.proc.describeExit())
				}
			case <-timer.C:
				c.t.Errorf("%s: still running %v after SIGTERM, the pod's grace period; the kubelet would kill it", lc, grace)
			}
			timer.Stop()
		}
	}
}

// teardown kills what still runs, stops the servers and, when the test
// failed, shows every log.
func (c *launchCluster) teardown() {
	c.stopping.Store(true)
	for _, p := range c.pods {
		for _, lc := range p.containers {
			if lc.proc != nil && !lc.proc.exited() {
				lc.proc.cmd.Process.Kill()
				<-lc.proc.done
			}
		}
	}
	for _, x := range c.proxies {
		x.close()
	}
	if c.s3 != nil {
		c.s3.Stop(10 * time.Second)
	}
	for _, s := range c.etcds {
		s.Close()
	}
	if c.t.Failed() {
		for _, path := range c.logs {
			c.t.Logf("---- %s ----\n%s", strings.TrimPrefix(path, c.dir+string(filepath.Separator)), launchTail(path, launchLogTail))
		}
	}
}

// launchTail returns a file's first lines (where a usage error starts)
// and its last n lines.
func launchTail(path string, n int) string {
	const head = 15
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > head+n {
		skipped := fmt.Sprintf("(%d lines left out)", len(lines)-head-n)
		lines = slices.Concat(lines[:head], []string{skipped}, lines[len(lines)-n:])
	}
	return strings.Join(lines, "\n")
}

// launchReadOnly makes dir read-only until the test ends (then writable
// again, so that the temporary directory can be removed).
func launchReadOnly(t *testing.T, dir string) {
	t.Helper()
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(dir, 0o755) })
}

// randomHex returns n random bytes in hexadecimal.
func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// launchSlog keeps the etcd members' log lines in a file.
func launchSlog(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}
