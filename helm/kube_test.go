package helm_test

// The tests in this file install the chart on a real Kubernetes API server:
// kube-apiserver runs as a child process on loopback against an etcd
// embedded in the test process. There is no scheduler, controller manager or
// kubelet, so objects are validated, defaulted and stored but no pod runs;
// that is what an install, an upgrade and an uninstall by Helm need.
//
// M2_KUBE_APISERVER names the kube-apiserver binary
// (tools/kube/build-apiserver.sh builds one; tools/check.sh sets the
// variable). Without it the tests skip, unless CI or M2_REQUIRE_KUBE=1 is
// set, where they fail instead.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/m2train/m2train/coordinator/etcdembed"
	"github.com/m2train/m2train/coordinator/security"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	helmkube "helm.sh/helm/v3/pkg/kube"
	"helm.sh/helm/v3/pkg/release"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/yaml"
)

const (
	// kubeRelease is the release name every install uses.
	kubeRelease = "m2train"
	// kubeFieldManager names the test's server-side dry-run applies.
	kubeFieldManager = "m2train-kube-test"
	// kubeTimeout bounds each Helm action and each wait on the server; it is
	// generous because a loaded 2-core machine runs the whole suite at once.
	kubeTimeout = 3 * time.Minute
)

// kubeChartDir is the chart under test: this directory.
const kubeChartDir = "."

// The upgrade step lays these values over a CI values file, as an
// operator's upgrade would: more worker pods and a new image tag for both
// images.
const (
	kubeUpgradeWorkers = 5
	kubeUpgradeTag     = "kube-upgrade"
)

// The chart names its StatefulSets <fullname>-coordinator and
// <fullname>-worker; the fullname is the release name when that contains
// the chart's name, as kubeRelease does.
const (
	kubeCoordinatorSet = kubeRelease + "-coordinator"
	kubeWorkerSet      = kubeRelease + "-worker"
)

func kubeUpgradeValues() map[string]any {
	return map[string]any{
		"workers": map[string]any{"replicas": kubeUpgradeWorkers},
		"image": map[string]any{
			"coordinator": map[string]any{"tag": kubeUpgradeTag},
			"worker":      map[string]any{"tag": kubeUpgradeTag},
		},
	}
}

// kubeCluster is a running kube-apiserver with clients for it.
type kubeCluster struct {
	kubeconfig string
	config     *rest.Config
	client     kubernetes.Interface
	dynamic    dynamic.Interface
	mapper     *restmapper.DeferredDiscoveryRESTMapper
}

// kubeAPIServerBinary returns M2_KUBE_APISERVER, or skips the test when it
// is unset outside CI.
func kubeAPIServerBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("M2_KUBE_APISERVER"); bin != "" {
		return bin
	}
	const how = "M2_KUBE_APISERVER is unset: point it at a kube-apiserver binary " +
		"(tools/kube/build-apiserver.sh builds one and prints its path) to install the chart on a real API server"
	if ci := os.Getenv("CI"); (ci != "" && ci != "false" && ci != "0") || os.Getenv("M2_REQUIRE_KUBE") == "1" {
		t.Fatal(how + " (required because CI or M2_REQUIRE_KUBE=1 is set)")
	}
	t.Skip(how)
	return ""
}

// kubeStart runs etcd and kube-apiserver on loopback for the test and
// returns once the server reports ready. Both stop when the test ends; the
// server's log is printed if the test failed.
func kubeStart(t *testing.T) *kubeCluster {
	t.Helper()
	bin := kubeAPIServerBinary(t)
	dir := t.TempDir()

	ctx, cancel := context.WithTimeout(context.Background(), kubeTimeout)
	defer cancel()
	etcd, err := etcdembed.Start(ctx, filepath.Join(dir, "etcd"), "127.0.0.1")
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(etcd.Close)

	pki := kubeWritePKI(t, dir)
	token := randomHex(t, 32)
	tokenFile := filepath.Join(dir, "tokens.csv")
	// token,user,uid,"groups": system:masters may do anything under RBAC.
	tokenLine := fmt.Sprintf("%s,kube-test-admin,kube-test-admin,\"system:masters\"\n", token)
	if err := os.WriteFile(tokenFile, []byte(tokenLine), 0o600); err != nil {
		t.Fatal(err)
	}
	port := kubeFreePort(t)
	args := []string{
		"--etcd-servers=" + etcd.Endpoint(),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + pki.certFile,
		"--tls-private-key-file=" + pki.keyFile,
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--token-auth-file=" + tokenFile,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + pki.saPublicFile,
		"--service-account-signing-key-file=" + pki.saKeyFile,
		"--service-cluster-ip-range=10.96.0.0/16",
		// No controller manager runs to keep the kubernetes Service's
		// endpoints; the server must not try either.
		"--endpoint-reconciler-type=none",
		// As on clusters built by kubeadm: pod templates may ask for
		// privileged containers.
		"--allow-privileged=true",
		"--profiling=false",
	}
	logPath := filepath.Join(dir, "kube-apiserver.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(kubeTimeout):
				t.Errorf("kube-apiserver did not stop within %v of SIGTERM; killing it", kubeTimeout)
				_ = cmd.Process.Kill()
				<-exited
			}
		}
		logFile.Close()
		if t.Failed() {
			t.Logf("kube-apiserver log (last lines of %s):\n%s", logPath, kubeTail(logPath, 80))
		}
	})

	c := &kubeCluster{kubeconfig: filepath.Join(dir, "kubeconfig")}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["m2train-test"] = &clientcmdapi.Cluster{
		Server:               "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		CertificateAuthority: pki.caFile,
	}
	kc.AuthInfos["kube-test-admin"] = &clientcmdapi.AuthInfo{Token: token}
	kc.Contexts["m2train-test"] = &clientcmdapi.Context{Cluster: "m2train-test", AuthInfo: "kube-test-admin"}
	kc.CurrentContext = "m2train-test"
	if err := clientcmd.WriteToFile(*kc, c.kubeconfig); err != nil {
		t.Fatal(err)
	}
	if c.config, err = clientcmd.BuildConfigFromFlags("", c.kubeconfig); err != nil {
		t.Fatal(err)
	}
	// The test's few hundred requests need no client-side throttling.
	c.config.QPS, c.config.Burst = 200, 400
	if c.client, err = kubernetes.NewForConfig(c.config); err != nil {
		t.Fatal(err)
	}
	if c.dynamic, err = dynamic.NewForConfig(c.config); err != nil {
		t.Fatal(err)
	}
	c.mapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.client.Discovery()))

	kubeWaitReady(t, c, exited, &waitErr, logPath)
	return c
}

// kubeWaitReady polls /readyz until it answers ok, the process exits, or
// kubeTimeout passes.
func kubeWaitReady(t *testing.T, c *kubeCluster, exited <-chan struct{}, waitErr *error, logPath string) {
	t.Helper()
	start := time.Now()
	deadline := time.NewTimer(kubeTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		body, err := c.client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		cancel()
		if err == nil && strings.TrimSpace(string(body)) == "ok" {
			t.Logf("kube-apiserver ready after %v", time.Since(start).Round(time.Millisecond))
			return
		}
		if err == nil {
			err = fmt.Errorf("/readyz answered %q", body)
		}
		last = err
		select {
		case <-exited:
			t.Fatalf("kube-apiserver exited before it was ready (%v); log:\n%s", *waitErr, kubeTail(logPath, 80))
		case <-deadline.C:
			t.Fatalf("kube-apiserver not ready after %v: %v", kubeTimeout, last)
		case <-tick.C:
		}
	}
}

// kubePKI names the files kubeWritePKI wrote.
type kubePKI struct {
	caFile, certFile, keyFile string
	saKeyFile, saPublicFile   string
}

// kubeWritePKI writes a throwaway CA and a serving certificate for
// 127.0.0.1 and the apiserver's names signed by it
// (security.GenerateDevPKI), and a service-account signing key pair, into
// dir.
func kubeWritePKI(t *testing.T, dir string) kubePKI {
	t.Helper()
	files, err := security.GenerateDevPKI(dir, "127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
	if err != nil {
		t.Fatal(err)
	}
	p := kubePKI{caFile: files.CA, certFile: files.Cert, keyFile: files.Key,
		saKeyFile: filepath.Join(dir, "sa.key"), saPublicFile: filepath.Join(dir, "sa.pub")}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	saPriv, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		t.Fatal(err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	for path, b := range map[string]*pem.Block{p.saKeyFile: {Type: "PRIVATE KEY", Bytes: saPriv}, p.saPublicFile: {Type: "PUBLIC KEY", Bytes: saPub}} {
		if err := os.WriteFile(path, pem.EncodeToMemory(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// kubeFreePort picks a free loopback port for the server. Another process
// may take it before the server binds; the server then exits and
// kubeWaitReady reports it with the server's log.
func kubeFreePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// kubeTail returns the last n lines of the file at path.
func kubeTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// kubeServiceMonitorCRD is a cut-down CustomResourceDefinition of the
// Prometheus Operator's monitoring.coreos.com/v1 ServiceMonitor, so that a
// chart's ServiceMonitor can be installed and validated. Its schema lists
// the fields a chart commonly sets (the operator's CRD has many more), and
// prunes nothing silently: the strict dry run rejects any field missing here.
const kubeServiceMonitorCRD = `
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names:
    kind: ServiceMonitor
    listKind: ServiceMonitorList
    plural: servicemonitors
    singular: servicemonitor
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            required: [selector]
            properties:
              jobLabel: {type: string}
              targetLabels: {type: array, items: {type: string}}
              podTargetLabels: {type: array, items: {type: string}}
              sampleLimit: {type: integer}
              selector:
                type: object
                properties:
                  matchLabels: {type: object, additionalProperties: {type: string}}
                  matchExpressions:
                    type: array
                    items:
                      type: object
                      required: [key, operator]
                      properties:
                        key: {type: string}
                        operator: {type: string}
                        values: {type: array, items: {type: string}}
              namespaceSelector:
                type: object
                properties:
                  any: {type: boolean}
                  matchNames: {type: array, items: {type: string}}
              endpoints:
                type: array
                items:
                  type: object
                  properties:
                    port: {type: string}
                    targetPort: {x-kubernetes-int-or-string: true}
                    path: {type: string}
                    scheme: {type: string, enum: [http, https]}
                    params: {type: object, additionalProperties: {type: array, items: {type: string}}}
                    interval: {type: string}
                    scrapeTimeout: {type: string}
                    honorLabels: {type: boolean}
                    honorTimestamps: {type: boolean}
                    followRedirects: {type: boolean}
                    enableHttp2: {type: boolean}
                    filterRunning: {type: boolean}
                    bearerTokenFile: {type: string}
                    tlsConfig: {type: object, x-kubernetes-preserve-unknown-fields: true}
                    relabelings:
                      type: array
                      items: {type: object, x-kubernetes-preserve-unknown-fields: true}
                    metricRelabelings:
                      type: array
                      items: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

// kubeInstallCRDs creates the CRDs the chart's optional objects need and
// waits until the server serves them.
func kubeInstallCRDs(t *testing.T, c *kubeCluster) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), kubeTimeout)
	defer cancel()
	crd := kubeDecodeUnstructured(t, kubeServiceMonitorCRD)
	gvr := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	if _, err := c.dynamic.Resource(gvr).Create(ctx, crd, metav1.CreateOptions{FieldValidation: metav1.FieldValidationStrict}); err != nil {
		t.Fatalf("create CRD %s: %v", crd.GetName(), err)
	}
	kubeWaitFor(t, ctx, "CRD "+crd.GetName()+" established", func() (bool, error) {
		got, err := c.dynamic.Resource(gvr).Get(ctx, crd.GetName(), metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
		for _, cond := range conds {
			m, _ := cond.(map[string]any)
			if m["type"] == "Established" && m["status"] == "True" {
				return true, nil
			}
		}
		return false, nil
	})
	// Discovery now lists the new kind; mappings looked up before do not.
	c.mapper.Reset()
}

// kubeWaitFor polls cond until it holds, fails, or ctx ends.
func kubeWaitFor(t *testing.T, ctx context.Context, what string, cond func() (bool, error)) {
	t.Helper()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

func kubeDecodeUnstructured(t *testing.T, doc string) *unstructured.Unstructured {
	t.Helper()
	js, err := yaml.YAMLToJSON([]byte(doc))
	if err != nil {
		t.Fatalf("YAML to JSON: %v\n%s", err, doc)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		t.Fatalf("decode object: %v\n%s", err, doc)
	}
	return u
}

// TestKubeInstallUpgradeUninstall installs the chart with each CI values
// file on a real API server, upgrades it with more workers and a new image
// tag, and uninstalls it. Every object the chart renders must pass the
// server's strict field validation, and the stored objects must be
// consistent: replicas and images as rendered, Services, Secrets (with the
// keys read), ConfigMaps and ServiceAccounts that pod templates refer to
// present, disruption budgets and Services selecting the release's pods,
// the release's own Secrets unchanged by the upgrade, and nothing left
// after the uninstall. A ServiceMonitor, where a values file enables one,
// is checked against a cut-down CRD (kubeServiceMonitorCRD).
func TestKubeInstallUpgradeUninstall(t *testing.T) {
	c := kubeStart(t)
	files, err := filepath.Glob(filepath.Join(kubeChartDir, "ci", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no CI values files match %s", filepath.Join(kubeChartDir, "ci", "*.yaml"))
	}
	ch, err := loader.Load(kubeChartDir)
	if err != nil {
		t.Fatalf("load chart %s: %v", kubeChartDir, err)
	}
	kubeInstallCRDs(t, c)
	for i, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			kubeLifecycle(t, c, ch, f, fmt.Sprintf("m2train-kube-%d", i))
		})
	}
}

// kubeLifecycle runs install, upgrade and uninstall of ch with the values in
// valuesFile, in a namespace of its own.
func kubeLifecycle(t *testing.T, c *kubeCluster, ch *chart.Chart, valuesFile, ns string) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*kubeTimeout)
	defer cancel()
	if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
	// Namespaces are left behind: deleting one needs the controller
	// manager, and the server goes away with the test.
	cfg := kubeHelmConfig(t, c, ns)
	vals := kubeReadValues(t, valuesFile)

	// Render against the server first: the objects must pass strict
	// validation, and Secrets the operator names in the values (an
	// existing-secret setting) are made here, as an operator would.
	dry := action.NewInstall(cfg)
	dry.ReleaseName, dry.Namespace, dry.DryRun = kubeRelease, ns, true
	rendered, err := dry.RunWithContext(ctx, ch, vals)
	if err != nil {
		t.Fatalf("dry-run install: %v", err)
	}
	kubeStrictDryRun(t, ctx, c, ns, rendered)
	kubeCreateExternalSecrets(t, ctx, c, ns, rendered, vals)

	install := action.NewInstall(cfg)
	install.ReleaseName, install.Namespace, install.Timeout = kubeRelease, ns, kubeTimeout
	installed, err := install.RunWithContext(ctx, ch, vals)
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	if installed.Info.Status != release.StatusDeployed {
		t.Fatalf("install: release status %s, want %s", installed.Info.Status, release.StatusDeployed)
	}
	before := kubeCheckStored(t, ctx, c, ns, installed)

	upVals := kubeReadValues(t, valuesFile)
	upVals = chartutil.CoalesceTables(kubeUpgradeValues(), upVals)
	upgrade := action.NewUpgrade(cfg)
	upgrade.Namespace, upgrade.Timeout = ns, kubeTimeout
	upgraded, err := upgrade.RunWithContext(ctx, kubeRelease, ch, upVals)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if upgraded.Info.Status != release.StatusDeployed || upgraded.Version != 2 {
		t.Fatalf("upgrade: release status %s revision %d, want %s revision 2", upgraded.Info.Status, upgraded.Version, release.StatusDeployed)
	}
	kubeStrictDryRun(t, ctx, c, ns, upgraded)
	after := kubeCheckStored(t, ctx, c, ns, upgraded)
	kubeCheckUpgrade(t, before, after)

	uninstall := action.NewUninstall(cfg)
	uninstall.Timeout = kubeTimeout
	if _, err := uninstall.Run(kubeRelease); err != nil {
		t.Fatalf("uninstall: %v", err)
	}
	kubeCheckGone(t, ctx, c, ns, upgraded)
}

// kubeHelmConfig is a Helm action configuration for namespace ns that keeps
// its release records in Secrets, as the helm command does by default.
func kubeHelmConfig(t *testing.T, c *kubeCluster, ns string) *action.Configuration {
	t.Helper()
	flags := helmkube.GetConfig(c.kubeconfig, "", ns)
	cacheDir := t.TempDir() // not ~/.kube/cache
	flags.CacheDir = &cacheDir
	cfg := new(action.Configuration)
	logf := func(format string, v ...any) { t.Logf("helm: "+format, v...) }
	if err := cfg.Init(flags, ns, "secret", logf); err != nil {
		t.Fatalf("helm configuration: %v", err)
	}
	return cfg
}

func kubeReadValues(t *testing.T, path string) map[string]any {
	t.Helper()
	v, err := chartutil.ReadValuesFile(path)
	if err != nil {
		t.Fatalf("values file %s: %v", path, err)
	}
	return v.AsMap()
}

// kubeObject is one object of a release manifest.
type kubeObject struct {
	source string // the template, for messages
	obj    *unstructured.Unstructured
	yaml   string
}

func (o kubeObject) String() string {
	return fmt.Sprintf("%s %s (%s)", o.obj.GetKind(), o.obj.GetName(), o.source)
}

// kubeObjects splits a release's manifest into objects in a stable order.
// Hooks are included: they are objects the chart renders too.
func kubeObjects(t *testing.T, rel *release.Release) []kubeObject {
	t.Helper()
	docs := releaseutil.SplitManifests(rel.Manifest)
	keys := make([]string, 0, len(docs))
	for k := range docs {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var out []kubeObject
	for _, k := range keys {
		out = append(out, kubeObjectOf(t, docs[k]))
	}
	for _, h := range rel.Hooks {
		out = append(out, kubeObjectOf(t, h.Manifest))
	}
	return out
}

func kubeObjectOf(t *testing.T, doc string) kubeObject {
	t.Helper()
	src := "?"
	for _, line := range strings.Split(doc, "\n") {
		if s, ok := strings.CutPrefix(line, "# Source: "); ok {
			src = s
			break
		}
	}
	return kubeObject{source: src, obj: kubeDecodeUnstructured(t, doc), yaml: doc}
}

// kubeResource maps an object to its resource on the server, in ns when
// the resource is namespaced.
func kubeResource(t *testing.T, c *kubeCluster, ns string, o kubeObject) dynamic.ResourceInterface {
	t.Helper()
	gvk := o.obj.GroupVersionKind()
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		t.Fatalf("%s: the server has no resource for %s: %v", o, gvk, err)
	}
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		return c.dynamic.Resource(m.Resource).Namespace(ns)
	}
	return c.dynamic.Resource(m.Resource)
}

// kubeStrictDryRun sends every object of rel to the server as a server-side
// apply with fieldValidation=Strict and dryRun=All, as
// `kubectl apply --server-side --dry-run=server --validate=strict` does: an
// unknown or duplicated field, or any value the API rejects, fails the test
// naming the object and its template.
func kubeStrictDryRun(t *testing.T, ctx context.Context, c *kubeCluster, ns string, rel *release.Release) {
	t.Helper()
	force := true
	for _, o := range kubeObjects(t, rel) {
		// The rendered YAML goes as it is (an apply patch may be YAML), so
		// that the server also sees keys the template wrote twice.
		_, err := kubeResource(t, c, ns, o).Patch(ctx, o.obj.GetName(), types.ApplyPatchType, []byte(o.yaml), metav1.PatchOptions{
			DryRun:          []string{metav1.DryRunAll},
			Force:           &force,
			FieldManager:    kubeFieldManager,
			FieldValidation: metav1.FieldValidationStrict,
		})
		if err != nil {
			t.Errorf("%s: strict server-side validation: %v", o, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// kubeWorkload is a pod-running object of a release: its kind, name,
// replica count (1 where the kind has none) and pod template.
type kubeWorkload struct {
	kind, name string
	replicas   int32
	template   corev1.PodTemplateSpec
	// claimTemplates names a StatefulSet's volumeClaimTemplates.
	claimTemplates []string
}

func (w kubeWorkload) String() string { return w.kind + " " + w.name }

func (w kubeWorkload) images() []string {
	var out []string
	for _, ct := range slices.Concat(w.template.Spec.InitContainers, w.template.Spec.Containers) {
		out = append(out, ct.Name+"="+ct.Image)
	}
	return out
}

// kubeWorkloadOf returns the workload in obj, or false if obj runs no pods.
func kubeWorkloadOf(obj runtime.Object) (kubeWorkload, bool) {
	one := func(r *int32) int32 {
		if r == nil {
			return 1
		}
		return *r
	}
	switch o := obj.(type) {
	case *appsv1.StatefulSet:
		w := kubeWorkload{kind: "StatefulSet", name: o.Name, replicas: one(o.Spec.Replicas), template: o.Spec.Template}
		for _, vct := range o.Spec.VolumeClaimTemplates {
			w.claimTemplates = append(w.claimTemplates, vct.Name)
		}
		return w, true
	case *appsv1.Deployment:
		return kubeWorkload{kind: "Deployment", name: o.Name, replicas: one(o.Spec.Replicas), template: o.Spec.Template}, true
	case *appsv1.DaemonSet:
		return kubeWorkload{kind: "DaemonSet", name: o.Name, replicas: 1, template: o.Spec.Template}, true
	case *batchv1.Job:
		return kubeWorkload{kind: "Job", name: o.Name, replicas: 1, template: o.Spec.Template}, true
	case *batchv1.CronJob:
		return kubeWorkload{kind: "CronJob", name: o.Name, replicas: 1, template: o.Spec.JobTemplate.Spec.Template}, true
	case *corev1.Pod:
		return kubeWorkload{kind: "Pod", name: o.Name, replicas: 1, template: corev1.PodTemplateSpec{ObjectMeta: o.ObjectMeta, Spec: o.Spec}}, true
	}
	return kubeWorkload{}, false
}

// kubeTyped decodes o into its client-go type, or returns nil for kinds
// client-go does not know (custom resources).
func kubeTyped(t *testing.T, o kubeObject) runtime.Object {
	t.Helper()
	obj, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(o.yaml), nil, nil)
	if runtime.IsNotRegisteredError(err) {
		return nil
	}
	if err != nil {
		t.Fatalf("%s: decode: %v", o, err)
	}
	return obj
}

// kubeRefs lists what a pod template needs from its namespace: Secrets
// and ConfigMaps with the keys it reads (an empty key set: the whole
// object), the ServiceAccount, and PersistentVolumeClaims. Optional
// references are left out.
type kubeRefs struct {
	secrets, configMaps map[string]map[string]bool
	serviceAccount      string
	claims              []string
}

func kubeRefsOf(spec *corev1.PodSpec) kubeRefs {
	r := kubeRefs{secrets: map[string]map[string]bool{}, configMaps: map[string]map[string]bool{}, serviceAccount: spec.ServiceAccountName}
	add := func(m map[string]map[string]bool, name string, optional *bool, keys ...string) {
		if optional != nil && *optional {
			return
		}
		if m[name] == nil {
			m[name] = map[string]bool{}
		}
		for _, k := range keys {
			m[name][k] = true
		}
	}
	for _, ct := range slices.Concat(spec.InitContainers, spec.Containers) {
		for _, e := range ct.Env {
			if e.ValueFrom == nil {
				continue
			}
			if s := e.ValueFrom.SecretKeyRef; s != nil {
				add(r.secrets, s.Name, s.Optional, s.Key)
			}
			if cm := e.ValueFrom.ConfigMapKeyRef; cm != nil {
				add(r.configMaps, cm.Name, cm.Optional, cm.Key)
			}
		}
		for _, e := range ct.EnvFrom {
			if e.SecretRef != nil {
				add(r.secrets, e.SecretRef.Name, e.SecretRef.Optional)
			}
			if e.ConfigMapRef != nil {
				add(r.configMaps, e.ConfigMapRef.Name, e.ConfigMapRef.Optional)
			}
		}
	}
	itemKeys := func(items []corev1.KeyToPath) []string {
		var keys []string
		for _, it := range items {
			keys = append(keys, it.Key)
		}
		return keys
	}
	for _, v := range spec.Volumes {
		switch {
		case v.Secret != nil:
			add(r.secrets, v.Secret.SecretName, v.Secret.Optional, itemKeys(v.Secret.Items)...)
		case v.ConfigMap != nil:
			add(r.configMaps, v.ConfigMap.Name, v.ConfigMap.Optional, itemKeys(v.ConfigMap.Items)...)
		case v.PersistentVolumeClaim != nil:
			r.claims = append(r.claims, v.PersistentVolumeClaim.ClaimName)
		case v.Projected != nil:
			for _, src := range v.Projected.Sources {
				if src.Secret != nil {
					add(r.secrets, src.Secret.Name, src.Secret.Optional, itemKeys(src.Secret.Items)...)
				}
				if src.ConfigMap != nil {
					add(r.configMaps, src.ConfigMap.Name, src.ConfigMap.Optional, itemKeys(src.ConfigMap.Items)...)
				}
			}
		}
	}
	for _, s := range spec.ImagePullSecrets {
		add(r.secrets, s.Name, nil)
	}
	return r
}

// kubeValuesName reports whether s appears as a string anywhere in vals.
func kubeValuesName(vals any, s string) bool {
	switch v := vals.(type) {
	case string:
		return v == s
	case map[string]any:
		for _, x := range v {
			if kubeValuesName(x, s) {
				return true
			}
		}
	case []any:
		for _, x := range v {
			if kubeValuesName(x, s) {
				return true
			}
		}
	}
	return false
}

// kubeCreateExternalSecrets creates the Secrets that rel's pods read but
// the release does not create, with the keys the pods read. Each must be
// named in the values (an existing-secret setting); a reference to a
// Secret nothing names is a broken chart and fails the test.
func kubeCreateExternalSecrets(t *testing.T, ctx context.Context, c *kubeCluster, ns string, rel *release.Release, vals map[string]any) {
	t.Helper()
	shipped := map[string]bool{}
	var workloads []kubeWorkload
	for _, o := range kubeObjects(t, rel) {
		if o.obj.GetKind() == "Secret" && o.obj.GetAPIVersion() == "v1" {
			shipped[o.obj.GetName()] = true
		}
		if w, ok := kubeWorkloadOf(kubeTyped(t, o)); ok {
			workloads = append(workloads, w)
		}
	}
	external := map[string]map[string]bool{}
	for _, w := range workloads {
		for name, keys := range kubeRefsOf(&w.template.Spec).secrets {
			if shipped[name] {
				continue
			}
			if !kubeValuesName(vals, name) {
				t.Errorf("%s reads Secret %q, which the release does not create and the values do not name", w, name)
				continue
			}
			if external[name] == nil {
				external[name] = map[string]bool{}
			}
			for k := range keys {
				external[name][k] = true
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for name, keys := range external {
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name}, StringData: map[string]string{}}
		for k := range keys {
			s.StringData[k] = "kube-test-" + k
		}
		if _, err := c.client.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create Secret %s named in the values: %v", name, err)
		}
		t.Logf("created Secret %s (keys %v), which the values name", name, slices.Sorted(maps.Keys(keys)))
	}
}

// kubeStored is what kubeCheckStored read back from the server.
type kubeStored struct {
	// workloads by "Kind name".
	workloads map[string]kubeWorkload
	// secrets holds the data of the Secrets the release creates, by name.
	secrets map[string]map[string][]byte
}

// kubeCheckStored checks the objects of rel as the server stored them and
// returns the workloads and Secrets among them.
func kubeCheckStored(t *testing.T, ctx context.Context, c *kubeCluster, ns string, rel *release.Release) kubeStored {
	t.Helper()
	stored := kubeStored{workloads: map[string]kubeWorkload{}, secrets: map[string]map[string][]byte{}}
	var workloads []kubeWorkload
	type selecting struct {
		what     string
		selector *metav1.LabelSelector
	}
	var selectors []selecting
	for _, o := range kubeObjects(t, rel) {
		if kubeIsHook(o) {
			continue
		}
		got, err := kubeResource(t, c, ns, o).Get(ctx, o.obj.GetName(), metav1.GetOptions{})
		if err != nil {
			t.Errorf("%s: get stored object: %v", o, err)
			continue
		}
		if got.GetAnnotations()["meta.helm.sh/release-name"] != kubeRelease ||
			got.GetAnnotations()["meta.helm.sh/release-namespace"] != ns ||
			got.GetLabels()["app.kubernetes.io/managed-by"] != "Helm" {
			t.Errorf("%s: stored without Helm's ownership labels and annotations: labels %v annotations %v", o, got.GetLabels(), got.GetAnnotations())
		}
		want := kubeTyped(t, o)
		if want == nil {
			continue
		}
		storedObj, err := scheme.Scheme.New(o.obj.GroupVersionKind())
		if err != nil {
			t.Fatalf("%s: %v", o, err)
		}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(got.Object, storedObj); err != nil {
			t.Fatalf("%s: convert stored object: %v", o, err)
		}
		if ww, ok := kubeWorkloadOf(want); ok {
			sw, _ := kubeWorkloadOf(storedObj)
			if sw.replicas != ww.replicas {
				t.Errorf("%s: stored with %d replicas, rendered with %d", o, sw.replicas, ww.replicas)
			}
			if !slices.Equal(sw.images(), ww.images()) {
				t.Errorf("%s: stored images %v, rendered %v", o, sw.images(), ww.images())
			}
			stored.workloads[sw.String()] = sw
			workloads = append(workloads, sw)
		}
		switch s := storedObj.(type) {
		case *appsv1.StatefulSet:
			kubeCheckGoverningService(t, ctx, c, ns, s)
		case *corev1.Secret:
			stored.secrets[s.Name] = s.Data
		case *policyv1.PodDisruptionBudget:
			selectors = append(selectors, selecting{"PodDisruptionBudget " + s.Name, s.Spec.Selector})
		case *corev1.Service:
			if len(s.Spec.Selector) > 0 {
				selectors = append(selectors, selecting{"Service " + s.Name, &metav1.LabelSelector{MatchLabels: s.Spec.Selector}})
			}
		}
	}
	for _, w := range workloads {
		kubeCheckRefs(t, ctx, c, ns, w)
	}
	for _, s := range selectors {
		sel, err := metav1.LabelSelectorAsSelector(s.selector)
		if err != nil {
			t.Errorf("%s: selector: %v", s.what, err)
			continue
		}
		if sel.Empty() {
			t.Errorf("%s: empty selector selects every pod in the namespace", s.what)
			continue
		}
		if !slices.ContainsFunc(workloads, func(w kubeWorkload) bool { return sel.Matches(labels.Set(w.template.Labels)) }) {
			t.Errorf("%s: selector %s matches the pods of none of the release's workloads", s.what, sel)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return stored
}

func kubeIsHook(o kubeObject) bool {
	_, ok := o.obj.GetAnnotations()[release.HookAnnotation]
	return ok
}

// kubeCheckGoverningService checks that a StatefulSet's serviceName names
// a headless Service, which gives its pods their stable DNS names.
func kubeCheckGoverningService(t *testing.T, ctx context.Context, c *kubeCluster, ns string, s *appsv1.StatefulSet) {
	t.Helper()
	if s.Spec.ServiceName == "" {
		t.Errorf("StatefulSet %s: no serviceName, so its pods get no stable DNS names", s.Name)
		return
	}
	svc, err := c.client.CoreV1().Services(ns).Get(ctx, s.Spec.ServiceName, metav1.GetOptions{})
	if err != nil {
		t.Errorf("StatefulSet %s: governing Service %s: %v", s.Name, s.Spec.ServiceName, err)
		return
	}
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("StatefulSet %s: governing Service %s has clusterIP %q, want None (headless)", s.Name, svc.Name, svc.Spec.ClusterIP)
	}
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	if len(svc.Spec.Selector) == 0 || !sel.Matches(labels.Set(s.Spec.Template.Labels)) {
		t.Errorf("StatefulSet %s: governing Service %s selector %v does not select its pods (labels %v)", s.Name, svc.Name, svc.Spec.Selector, s.Spec.Template.Labels)
	}
}

// kubeCheckRefs checks that what a workload's pods read from the namespace
// is there: Secrets and ConfigMaps with the keys read, the ServiceAccount,
// and claims that no volumeClaimTemplate provides.
func kubeCheckRefs(t *testing.T, ctx context.Context, c *kubeCluster, ns string, w kubeWorkload) {
	t.Helper()
	r := kubeRefsOf(&w.template.Spec)
	for name, keys := range r.secrets {
		s, err := c.client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Errorf("%s reads Secret %s: %v", w, name, err)
			continue
		}
		for k := range keys {
			if _, ok := s.Data[k]; !ok {
				t.Errorf("%s reads key %q of Secret %s, which has only %v", w, k, name, slices.Sorted(maps.Keys(s.Data)))
			}
		}
	}
	for name, keys := range r.configMaps {
		cm, err := c.client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Errorf("%s reads ConfigMap %s: %v", w, name, err)
			continue
		}
		for k := range keys {
			_, inData := cm.Data[k]
			_, inBinary := cm.BinaryData[k]
			if !inData && !inBinary {
				t.Errorf("%s reads key %q of ConfigMap %s, which lacks it", w, k, name)
			}
		}
	}
	// The default ServiceAccount is made by the controller manager, which
	// does not run here; any other must come with the release.
	if sa := r.serviceAccount; sa != "" && sa != "default" {
		if _, err := c.client.CoreV1().ServiceAccounts(ns).Get(ctx, sa, metav1.GetOptions{}); err != nil {
			t.Errorf("%s runs as ServiceAccount %s: %v", w, sa, err)
		}
	}
	for _, claim := range r.claims {
		if slices.Contains(w.claimTemplates, claim) {
			continue
		}
		if _, err := c.client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, claim, metav1.GetOptions{}); err != nil {
			t.Errorf("%s mounts PersistentVolumeClaim %s: %v", w, claim, err)
		}
	}
}

// kubeCheckUpgrade checks that the upgrade values reached the stored
// StatefulSets: the worker count changed, the coordinator's did not, and
// every container of both runs the new tag (a digest, if the values pin
// one, stays). The release's Secrets must keep their data: the upgrade
// changes nothing they hold, and a generated token that changed would lock
// out every client.
func kubeCheckUpgrade(t *testing.T, beforeState, afterState kubeStored) {
	t.Helper()
	for name, data := range beforeState.secrets {
		now, ok := afterState.secrets[name]
		switch {
		case !ok:
			t.Errorf("Secret %s: gone after the upgrade", name)
		case !maps.EqualFunc(data, now, bytes.Equal):
			t.Errorf("Secret %s: data changed in an upgrade that changed only replicas and image tags", name)
		}
	}
	before, after := beforeState.workloads, afterState.workloads
	get := func(m map[string]kubeWorkload, name string) kubeWorkload {
		w, ok := m["StatefulSet "+name]
		if !ok {
			t.Fatalf("the release has no StatefulSet %s (it has %v)", name, slices.Sorted(maps.Keys(m)))
		}
		return w
	}
	if w := get(after, kubeWorkerSet); w.replicas != kubeUpgradeWorkers {
		t.Errorf("%s: %d replicas after an upgrade with workers.replicas=%d", w, w.replicas, kubeUpgradeWorkers)
	}
	if b, a := get(before, kubeCoordinatorSet), get(after, kubeCoordinatorSet); a.replicas != b.replicas {
		t.Errorf("%s: replicas went from %d to %d in an upgrade that changed only the workers", a, b.replicas, a.replicas)
	}
	for _, name := range []string{kubeCoordinatorSet, kubeWorkerSet} {
		for _, ct := range slices.Concat(get(after, name).template.Spec.InitContainers, get(after, name).template.Spec.Containers) {
			ref, _, _ := strings.Cut(ct.Image, "@")
			if !strings.HasSuffix(ref, ":"+kubeUpgradeTag) {
				t.Errorf("StatefulSet %s container %s: image %s after an upgrade to tag %s", name, ct.Name, ct.Image, kubeUpgradeTag)
			}
		}
	}
}

// kubeCheckGone checks that the uninstall removed every object of rel but
// those marked to be kept, and the release's history.
func kubeCheckGone(t *testing.T, ctx context.Context, c *kubeCluster, ns string, rel *release.Release) {
	t.Helper()
	for _, o := range kubeObjects(t, rel) {
		if kubeIsHook(o) || o.obj.GetAnnotations()[helmkube.ResourcePolicyAnno] == helmkube.KeepPolicy {
			continue
		}
		_, err := kubeResource(t, c, ns, o).Get(ctx, o.obj.GetName(), metav1.GetOptions{})
		if !apierrors.IsNotFound(err) {
			t.Errorf("%s: after uninstall, get = %v, want not found", o, err)
		}
	}
	records, err := c.client.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{LabelSelector: "owner=helm,name=" + kubeRelease})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(records.Items); n != 0 {
		t.Errorf("after uninstall, %d release records remain", n)
	}
}
