package helm_test

// The tests in this file lint and render the chart for every values file in
// ci/, decode every object strictly into its Kubernetes API type (an
// unknown field, a duplicate key or an unknown kind fails), and check what
// the processes are told: replica counts, the raft peer list, one GPU per
// worker container, ports, probes, Secrets and the security settings. The
// expectations are written out per values file rather than derived from
// the templates, so that a template bug cannot make its own check pass.

import (
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	"github.com/m2train/m2train/helm"
)

const (
	chartRelease   = "m2train"
	chartNamespace = "ml"
	// chartFullname is the prefix of every object name: the release name,
	// since it contains the chart's name.
	chartFullname = "m2train"
)

// chartExpect is what one ci/ values file must produce.
type chartExpect struct {
	coordinators   int
	workerPods     int
	gpusPerPod     int
	svcDomain      string // the namespace's service domain in advertised names
	embeddedEtcd   bool
	etcdClientPort int    // embedded only
	etcdPeerPort   int    // embedded only
	etcdEndpoints  string // external only: the --etcd-endpoints value
	authSecret     string // "" when the API takes no token
	authKey        string
	generatedAuth  bool // the chart creates authSecret
	tlsSecret      string
	s3Secret       string
	s3Endpoint     string
	s3SessionKey   string
	backend        string
	storageClass   *string // nil: not set
	storageSize    string
	coordImage     string
	workerImage    string
	pullSecrets    []string
	serviceMonitor bool
	workerCPU      string // requests.cpu of each worker container
}

func chartStr(s string) *string { return &s }

// chartExpects lists every values file in ci/; a file without an entry
// fails TestChartCIFilesHaveExpectations.
var chartExpects = map[string]chartExpect{
	"default-values.yaml": {
		coordinators: 3, workerPods: 1, gpusPerPod: 1, svcDomain: "ml.svc",
		embeddedEtcd: true, etcdClientPort: 2379, etcdPeerPort: 2380,
		backend: "auto", storageSize: "10Gi",
		coordImage: "ghcr.io/m2train/m2coord:0.1.0", workerImage: "ghcr.io/m2train/m2worker:0.1.0",
		workerCPU: "4",
	},
	"external-etcd-values.yaml": {
		coordinators: 3, workerPods: 2, gpusPerPod: 2, svcDomain: "ml.svc",
		etcdEndpoints: "http://etcd-0.etcd.infra.svc:2379,http://etcd-1.etcd.infra.svc:2379,http://etcd-2.etcd.infra.svc:2379",
		authSecret:    "m2train-token", authKey: "token",
		s3Secret: "m2train-s3", s3Endpoint: "http://minio.storage.svc:9000",
		backend: "auto", storageSize: "10Gi",
		coordImage: "ghcr.io/m2train/m2coord:0.1.0", workerImage: "ghcr.io/m2train/m2worker:0.1.0",
		workerCPU: "4",
	},
	"embedded-etcd-values.yaml": {
		coordinators: 5, workerPods: 2, gpusPerPod: 1, svcDomain: "ml.svc",
		embeddedEtcd: true, etcdClientPort: 12379, etcdPeerPort: 12380,
		authSecret: "m2train-auth", authKey: "token", generatedAuth: true,
		s3Secret: "m2train-s3", s3Endpoint: "https://s3.eu-central-1.amazonaws.com",
		backend: "cuda", storageClass: chartStr("fast-ssd"), storageSize: "20Gi",
		coordImage: "ghcr.io/m2train/m2coord:0.1.0", workerImage: "ghcr.io/m2train/m2worker:0.1.0",
		workerCPU: "4",
	},
	"mtls-values.yaml": {
		coordinators: 3, workerPods: 1, gpusPerPod: 1, svcDomain: "ml.svc.cluster.local",
		etcdEndpoints: "https://etcd.infra.svc:2379",
		authSecret:    "m2train-token", authKey: "api-token",
		tlsSecret: "m2train-tls",
		s3Secret:  "m2train-s3", s3SessionKey: "AWS_SESSION_TOKEN",
		backend: "auto", storageSize: "10Gi",
		coordImage:     "registry.example.com:5000/m2train/m2coord:0.1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		workerImage:    "registry.example.com:5000/m2train/m2worker:0.1.0@sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210",
		pullSecrets:    []string{"regcred"},
		serviceMonitor: true,
		workerCPU:      "4",
	},
	"large-values.yaml": {
		coordinators: 3, workerPods: 8, gpusPerPod: 8, svcDomain: "ml.svc",
		etcdEndpoints: "https://etcd.infra.svc:2379",
		authSecret:    "m2train-token", authKey: "token",
		tlsSecret: "m2train-tls",
		s3Secret:  "m2train-s3", s3Endpoint: "http://minio.storage.svc:9000",
		backend: "auto", storageSize: "10Gi",
		coordImage: "ghcr.io/m2train/m2coord:0.1.0", workerImage: "ghcr.io/m2train/m2worker:0.1.0",
		serviceMonitor: true,
		workerCPU:      "12",
	},
}

// chartCIFiles returns the values files in ci/.
func chartCIFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("ci", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no values files in ci/")
	}
	return files
}

func TestChartCIFilesHaveExpectations(t *testing.T) {
	seen := map[string]bool{}
	for _, f := range chartCIFiles(t) {
		seen[filepath.Base(f)] = true
		if _, ok := chartExpects[filepath.Base(f)]; !ok {
			t.Errorf("%s: no entry in chartExpects", f)
		}
	}
	for name := range chartExpects {
		if !seen[name] {
			t.Errorf("chartExpects has %s, which is not in ci/", name)
		}
	}
}

// TestChartLint runs helm lint's rules (Chart.yaml, values against the
// schema, templates and the objects they render) for every ci/ file.
// Errors and warnings fail; informational notes are logged.
func TestChartLint(t *testing.T) {
	caps, err := helm.Capabilities()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range chartCIFiles(t) {
		t.Run(filepath.Base(f), func(t *testing.T) {
			vals, err := helm.LoadValuesFile(f)
			if err != nil {
				t.Fatal(err)
			}
			res := lint.AllWithKubeVersion(".", vals, chartNamespace, &caps.KubeVersion)
			for _, m := range res.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("lint: %s", m)
				} else {
					t.Logf("lint: %s", m)
				}
			}
		})
	}
}

// chartObject is one decoded object of a rendered chart.
type chartObject struct {
	kind, name string
	obj        runtime.Object // typed; *unstructured.Unstructured for a ServiceMonitor
}

// chartStrictDecoder decodes YAML into the registered Kubernetes types and
// fails on unknown or duplicate fields.
var chartStrictDecoder = serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()

// chartDecode decodes every manifest strictly. ServiceMonitor, whose type is
// not in client-go, is checked against the fields of the
// monitoring.coreos.com/v1 CRD that the chart uses.
func chartDecode(t *testing.T, ms []helm.Manifest) []chartObject {
	t.Helper()
	var out []chartObject
	for _, m := range ms {
		if m.APIVersion == "monitoring.coreos.com/v1" && m.Kind == "ServiceMonitor" {
			out = append(out, chartObject{m.Kind, m.Name, chartDecodeServiceMonitor(t, m)})
			continue
		}
		obj, gvk, err := chartStrictDecoder.Decode([]byte(m.YAML), nil, nil)
		if err != nil {
			t.Fatalf("%s: %s %s: %v", m.Source, m.Kind, m.Name, err)
		}
		if gvk.Kind != m.Kind || gvk.GroupVersion().String() != m.APIVersion {
			t.Fatalf("%s: decoded %v, head says %s %s", m.Source, gvk, m.APIVersion, m.Kind)
		}
		out = append(out, chartObject{m.Kind, m.Name, obj})
	}
	return out
}

// chartServiceMonitor mirrors the fields of the ServiceMonitor CRD
// (monitoring.coreos.com/v1) that the chart may set; decoding into it with
// unknown fields disallowed catches a misspelt field.
type chartServiceMonitor struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Scheme        string `json:"scheme"`
			Interval      string `json:"interval"`
			ScrapeTimeout string `json:"scrapeTimeout"`
		} `json:"endpoints"`
	} `json:"spec"`
}

func chartDecodeServiceMonitor(t *testing.T, m helm.Manifest) *unstructured.Unstructured {
	t.Helper()
	js, err := yaml.YAMLToJSONStrict([]byte(m.YAML))
	if err != nil {
		t.Fatalf("%s: ServiceMonitor: %v", m.Source, err)
	}
	var sm chartServiceMonitor
	dec := json.NewDecoder(strings.NewReader(string(js)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&sm); err != nil {
		t.Fatalf("%s: ServiceMonitor: %v", m.Source, err)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		t.Fatalf("%s: ServiceMonitor: %v", m.Source, err)
	}
	return u
}

// chartRender renders a ci/ file and decodes it.
func chartRender(t *testing.T, file string) ([]chartObject, *helm.Rendered) {
	t.Helper()
	vals, err := helm.LoadValuesFile(file)
	if err != nil {
		t.Fatal(err)
	}
	r, err := helm.RenderRelease(".", vals, chartRelease, chartNamespace)
	if err != nil {
		t.Fatal(err)
	}
	return chartDecode(t, r.Manifests), r
}

// chartFind returns the one object of a kind and name, typed.
func chartFind[T runtime.Object](t *testing.T, objs []chartObject, kind, name string) T {
	t.Helper()
	for _, o := range objs {
		if o.kind == kind && o.name == name {
			v, ok := o.obj.(T)
			if !ok {
				t.Fatalf("%s %s decoded as %T", kind, name, o.obj)
			}
			return v
		}
	}
	var zero T
	t.Fatalf("no %s %s in the rendered chart", kind, name)
	return zero
}

// chartArgs splits --flag=value arguments into a map; a positional
// argument, a flag without '=' or a repeated flag fails.
func chartArgs(t *testing.T, who string, args []string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, a := range args {
		name, val, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || !ok {
			t.Fatalf("%s: argument %q is not --flag=value", who, a)
		}
		if _, dup := out[name]; dup {
			t.Fatalf("%s: --%s given twice", who, name)
		}
		out[name] = val
	}
	return out
}

func TestChartRenderCI(t *testing.T) {
	coordFlags := chartFlags(t, filepath.Join("..", "coordinator", "m2coord"), "id", "peers", "data-dir", "tls-ca")
	workerFlags := chartFlags(t, filepath.Join("..", "worker", "m2worker", "app"), "id", "coordinator", "collective-port", "tls-ca")
	for _, f := range chartCIFiles(t) {
		want, ok := chartExpects[filepath.Base(f)]
		if !ok {
			continue // reported by TestChartCIFilesHaveExpectations
		}
		t.Run(filepath.Base(f), func(t *testing.T) {
			objs, r := chartRender(t, f)
			chartCheckInventory(t, objs, want)
			chartCheckObjects(t, objs)
			chartCheckCoordinator(t, objs, want, coordFlags)
			chartCheckWorkers(t, objs, want, workerFlags)
			chartCheckServices(t, objs)
			if want.serviceMonitor {
				chartCheckServiceMonitor(t, objs, want)
			}
			if want.generatedAuth {
				chartCheckGeneratedAuth(t, objs, want)
			}
			chartCheckNotes(t, r.Notes, want)
		})
	}
}

// chartCheckInventory checks the exact set of objects.
func chartCheckInventory(t *testing.T, objs []chartObject, want chartExpect) {
	t.Helper()
	wantSet := []string{
		"ServiceAccount/" + chartFullname,
		"Service/" + chartFullname + "-coordinator",
		"Service/" + chartFullname + "-coordinator-headless",
		"Service/" + chartFullname + "-worker-headless",
		"StatefulSet/" + chartFullname + "-coordinator",
		"StatefulSet/" + chartFullname + "-worker",
		"PodDisruptionBudget/" + chartFullname + "-coordinator",
	}
	if want.generatedAuth {
		wantSet = append(wantSet, "Secret/"+want.authSecret)
	}
	if want.serviceMonitor {
		wantSet = append(wantSet, "ServiceMonitor/"+chartFullname)
	}
	var got []string
	for _, o := range objs {
		got = append(got, o.kind+"/"+o.name)
	}
	slices.Sort(got)
	slices.Sort(wantSet)
	if !slices.Equal(got, wantSet) {
		t.Errorf("objects:\n got %v\nwant %v", got, wantSet)
	}
}

// chartCheckObjects checks what every object shares: namespace, a valid
// name and valid labels.
func chartCheckObjects(t *testing.T, objs []chartObject) {
	t.Helper()
	for _, o := range objs {
		m, err := chartMeta(o.obj)
		if err != nil {
			t.Fatalf("%s %s: %v", o.kind, o.name, err)
		}
		if m.GetNamespace() != chartNamespace {
			t.Errorf("%s %s: namespace %q, want %q", o.kind, o.name, m.GetNamespace(), chartNamespace)
		}
		check := validation.IsDNS1123Subdomain
		if o.kind == "Service" {
			check = validation.IsDNS1035Label
		}
		if errs := check(o.name); len(errs) > 0 {
			t.Errorf("%s %q: bad name: %v", o.kind, o.name, errs)
		}
		if errs := metav1validation.ValidateLabels(m.GetLabels(), field.NewPath("metadata", "labels")); len(errs) > 0 {
			t.Errorf("%s %s: %v", o.kind, o.name, errs.ToAggregate())
		}
		if m.GetLabels()["app.kubernetes.io/instance"] != chartRelease {
			t.Errorf("%s %s: label app.kubernetes.io/instance = %q", o.kind, o.name, m.GetLabels()["app.kubernetes.io/instance"])
		}
	}
}

func chartMeta(o runtime.Object) (metav1.Object, error) {
	if m, ok := o.(metav1.Object); ok {
		return m, nil
	}
	return nil, fmt.Errorf("%T has no object metadata", o)
}

// chartFlags returns the flags that the command in dir registers, read
// from its source: every string literal passed as the flag name to a
// flag.FlagSet method. Source, because m2coord is a main package, and
// because linking m2worker's package into this test would bring in NVML's
// cgo binding. mustHave are flags the scan must find, so that a change in
// how the flags are declared fails here instead of passing vacuously.
func chartFlags(t *testing.T, dir string, mustHave ...string) map[string]bool {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("sources of %s: %v (%d files)", dir, err, len(files))
	}
	flags := map[string]bool{}
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			// fs.StringVar(&v, "name", ...), fs.Var(v, "name", ...) and
			// fs.String("name", ...) and the like.
			idx := -1
			switch name := sel.Sel.Name; {
			case strings.HasSuffix(name, "Var") || name == "Func" || name == "BoolFunc" || name == "TextVar":
				idx = 1
				if name == "Func" || name == "BoolFunc" {
					idx = 0
				}
			case slices.Contains([]string{"String", "Int", "Int64", "Uint", "Uint64", "Bool", "Duration", "Float64"}, name):
				idx = 0
			}
			if idx < 0 || len(call.Args) <= idx+1 {
				return true
			}
			if lit, ok := call.Args[idx].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if s, err := strconv.Unquote(lit.Value); err == nil {
					flags[s] = true
				}
			}
			return true
		})
	}
	for _, must := range mustHave {
		if !flags[must] {
			t.Fatalf("reading the flags of %s from its source found %d flags, not --%s: the scan is out of date", dir, len(flags), must)
		}
	}
	return flags
}

// chartCheckPodSecurity checks the pod's and every container's security
// settings and that the pod never gets an API token.
func chartCheckPodSecurity(t *testing.T, who string, spec *corev1.PodSpec) {
	t.Helper()
	psc := spec.SecurityContext
	switch {
	case psc == nil:
		t.Fatalf("%s: no pod securityContext", who)
	case psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot:
		t.Errorf("%s: runAsNonRoot is not true", who)
	case psc.RunAsUser == nil || *psc.RunAsUser != 65532:
		t.Errorf("%s: runAsUser %v, want 65532", who, psc.RunAsUser)
	case psc.FSGroup == nil || *psc.FSGroup != 65532:
		t.Errorf("%s: fsGroup %v, want 65532", who, psc.FSGroup)
	case psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Errorf("%s: pod seccompProfile %v, want RuntimeDefault", who, psc.SeccompProfile)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: automountServiceAccountToken is not false", who)
	}
	if spec.ServiceAccountName != chartFullname {
		t.Errorf("%s: serviceAccountName %q, want %q", who, spec.ServiceAccountName, chartFullname)
	}
	for _, c := range spec.Containers {
		sc := c.SecurityContext
		switch {
		case sc == nil:
			t.Errorf("%s/%s: no securityContext", who, c.Name)
		case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
			t.Errorf("%s/%s: readOnlyRootFilesystem is not true", who, c.Name)
		case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
			t.Errorf("%s/%s: allowPrivilegeEscalation is not false", who, c.Name)
		case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
			t.Errorf("%s/%s: capabilities %v, want drop [ALL] and no add", who, c.Name, sc.Capabilities)
		case sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
			t.Errorf("%s/%s: seccompProfile %v, want RuntimeDefault", who, c.Name, sc.SeccompProfile)
		case sc.Privileged != nil && *sc.Privileged:
			t.Errorf("%s/%s: privileged", who, c.Name)
		}
	}
}

// chartCheckPodWiring checks references inside a pod: every mount names a
// volume, container and port names are valid and unique, probes name a
// port of their container, and env names are valid.
func chartCheckPodWiring(t *testing.T, who string, spec *corev1.PodSpec, claims []string) {
	t.Helper()
	vols := map[string]bool{}
	for _, v := range spec.Volumes {
		vols[v.Name] = true
	}
	for _, c := range claims {
		vols[c] = true
	}
	portNames, containerNames := map[string]bool{}, map[string]bool{}
	for _, c := range spec.Containers {
		if errs := validation.IsDNS1123Label(c.Name); len(errs) > 0 || containerNames[c.Name] {
			t.Errorf("%s: container name %q: %v (or repeated)", who, c.Name, errs)
		}
		containerNames[c.Name] = true
		for _, m := range c.VolumeMounts {
			if !vols[m.Name] {
				t.Errorf("%s/%s: mount of unknown volume %q", who, c.Name, m.Name)
			}
		}
		for _, p := range c.Ports {
			if errs := validation.IsValidPortName(p.Name); len(errs) > 0 || portNames[p.Name] {
				t.Errorf("%s/%s: port name %q: %v (or repeated in the pod)", who, c.Name, p.Name, errs)
			}
			portNames[p.Name] = true
		}
		for _, e := range c.Env {
			if errs := validation.IsEnvVarName(e.Name); len(errs) > 0 {
				t.Errorf("%s/%s: env %q: %v", who, c.Name, e.Name, errs)
			}
		}
		if c.Image == "" || c.ImagePullPolicy == "" {
			t.Errorf("%s/%s: image %q, pull policy %q", who, c.Name, c.Image, c.ImagePullPolicy)
		}
	}
}

// chartContainerPort returns the port number a probe's named port refers to
// in container c.
func chartContainerPort(t *testing.T, who string, c *corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	if p.Type != intstr.String {
		t.Fatalf("%s: probe port %v is a number; name the port", who, p.IntValue())
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	t.Fatalf("%s: probe port %q is not a port of the container", who, p.StrVal)
	return 0
}

// chartMountOf returns the mount path of the volume that projects the
// Secret secret (with key) into container c, and fails if there is none.
func chartMountOf(t *testing.T, who string, spec *corev1.PodSpec, c *corev1.Container, secret string, keys ...string) string {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Secret == nil || v.Secret.SecretName != secret {
			continue
		}
		var have []string
		for _, it := range v.Secret.Items {
			if it.Key != it.Path {
				t.Errorf("%s: Secret %s key %s projected as %s", who, secret, it.Key, it.Path)
			}
			have = append(have, it.Key)
		}
		for _, k := range keys {
			if !slices.Contains(have, k) {
				t.Errorf("%s: volume of Secret %s lacks key %s (has %v)", who, secret, k, have)
			}
		}
		if v.Secret.DefaultMode == nil {
			t.Errorf("%s: Secret %s has no defaultMode (0644: readable by others)", who, secret)
		} else if mode := *v.Secret.DefaultMode; mode&0o007 != 0 {
			t.Errorf("%s: Secret %s is readable by others (mode %#o)", who, secret, mode)
		}
		for _, m := range c.VolumeMounts {
			if m.Name == v.Name {
				if !m.ReadOnly {
					t.Errorf("%s: Secret %s mounted writable", who, secret)
				}
				return m.MountPath
			}
		}
		t.Fatalf("%s: container %s does not mount the volume of Secret %s", who, c.Name, secret)
	}
	t.Fatalf("%s: no volume of Secret %s", who, secret)
	return ""
}

// chartCheckSecurityArgs checks --token-file and --tls-* against the
// mounted Secrets.
func chartCheckSecurityArgs(t *testing.T, who string, spec *corev1.PodSpec, c *corev1.Container, args map[string]string, want chartExpect) {
	t.Helper()
	if want.authSecret == "" {
		if _, ok := args["token-file"]; ok {
			t.Errorf("%s: --token-file without auth", who)
		}
	} else {
		dir := chartMountOf(t, who, spec, c, want.authSecret, want.authKey)
		if got := args["token-file"]; got != dir+"/"+want.authKey {
			t.Errorf("%s: --token-file=%q, want %s/%s", who, got, dir, want.authKey)
		}
	}
	if _, ok := args["token"]; ok {
		t.Errorf("%s: the token is on the command line", who)
	}
	if want.tlsSecret == "" {
		for _, f := range []string{"tls-cert", "tls-key", "tls-ca"} {
			if _, ok := args[f]; ok {
				t.Errorf("%s: --%s without tls.enabled", who, f)
			}
		}
		return
	}
	dir := chartMountOf(t, who, spec, c, want.tlsSecret, "ca.crt", "tls.crt", "tls.key")
	for flag, file := range map[string]string{"tls-cert": "tls.crt", "tls-key": "tls.key", "tls-ca": "ca.crt"} {
		if got := args[flag]; got != dir+"/"+file {
			t.Errorf("%s: --%s=%q, want %s/%s", who, flag, got, dir, file)
		}
	}
}

// chartPodNameEnv checks that POD_NAME, which $(POD_NAME) in the arguments
// expands, comes from the pod's name.
func chartPodNameEnv(t *testing.T, who string, c *corev1.Container) {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == "POD_NAME" {
			if e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "metadata.name" {
				t.Errorf("%s: POD_NAME is not the pod's name: %+v", who, e)
			}
			return
		}
	}
	t.Errorf("%s: no POD_NAME in env", who)
}

// chartStatefulSet finds the StatefulSet name among objs and checks its
// replicas and that its serviceName is its headless Service, NAME-headless;
// it returns the StatefulSet, how errors name it, and the Service's name.
func chartStatefulSet(t *testing.T, objs []chartObject, name string, replicas int) (sts *appsv1.StatefulSet, who, headless string) {
	t.Helper()
	headless = name + "-headless"
	sts = chartFind[*appsv1.StatefulSet](t, objs, "StatefulSet", name)
	who = "StatefulSet " + name
	if sts.Spec.Replicas == nil || int(*sts.Spec.Replicas) != replicas {
		t.Errorf("%s: replicas %v, want %d", who, sts.Spec.Replicas, replicas)
	}
	if sts.Spec.ServiceName != headless {
		t.Errorf("%s: serviceName %q, want %q", who, sts.Spec.ServiceName, headless)
	}
	return sts, who, headless
}

func chartCheckCoordinator(t *testing.T, objs []chartObject, want chartExpect, known map[string]bool) {
	t.Helper()
	name := chartFullname + "-coordinator"
	sts, who, headless := chartStatefulSet(t, objs, name, want.coordinators)
	if sts.Spec.PodManagementPolicy != appsv1.ParallelPodManagement {
		t.Errorf("%s: podManagementPolicy %q, want Parallel", who, sts.Spec.PodManagementPolicy)
	}
	spec := &sts.Spec.Template.Spec
	chartCheckPodSecurity(t, who, spec)
	var claims []string
	for _, c := range sts.Spec.VolumeClaimTemplates {
		claims = append(claims, c.Name)
	}
	chartCheckPodWiring(t, who, spec, claims)
	chartCheckPullSecrets(t, who, spec, want)
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", who, len(spec.Containers))
	}
	c := &spec.Containers[0]
	if c.Image != want.coordImage {
		t.Errorf("%s: image %q, want %q", who, c.Image, want.coordImage)
	}
	chartPodNameEnv(t, who, c)
	args := chartArgs(t, who, c.Args)
	for f := range args {
		if !known[f] {
			t.Errorf("%s: --%s is not a flag of m2coord (coordinator/m2coord)", who, f)
		}
	}

	// The volume claim holds --data-dir.
	if len(sts.Spec.VolumeClaimTemplates) != 1 {
		t.Fatalf("%s: %d volume claim templates, want 1", who, len(sts.Spec.VolumeClaimTemplates))
	}
	pvc := sts.Spec.VolumeClaimTemplates[0]
	if got := pvc.Spec.Resources.Requests[corev1.ResourceStorage]; got.Cmp(resource.MustParse(want.storageSize)) != 0 {
		t.Errorf("%s: volume size %s, want %s", who, got.String(), want.storageSize)
	}
	switch {
	case want.storageClass == nil && pvc.Spec.StorageClassName != nil:
		t.Errorf("%s: storageClassName %q, want unset", who, *pvc.Spec.StorageClassName)
	case want.storageClass != nil && (pvc.Spec.StorageClassName == nil || *pvc.Spec.StorageClassName != *want.storageClass):
		t.Errorf("%s: storageClassName %v, want %q", who, pvc.Spec.StorageClassName, *want.storageClass)
	}
	dataDir := ""
	for _, m := range c.VolumeMounts {
		if m.Name == pvc.Name {
			dataDir = m.MountPath
		}
	}
	if dataDir == "" || args["data-dir"] != dataDir {
		t.Errorf("%s: --data-dir=%q, the claim %q is mounted at %q", who, args["data-dir"], pvc.Name, dataDir)
	}

	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	fqdn := "$(POD_NAME)." + headless + "." + want.svcDomain
	wantArgs := map[string]string{
		"id":             "$(POD_NAME)",
		"raft-addr":      fmt.Sprintf("0.0.0.0:%d", ports["raft"]),
		"raft-advertise": fmt.Sprintf("%s:%d", fqdn, ports["raft"]),
		"api-addr":       fmt.Sprintf("0.0.0.0:%d", ports["api"]),
		"api-advertise":  fmt.Sprintf("%s:%d", fqdn, ports["api"]),
		"metrics-addr":   fmt.Sprintf("0.0.0.0:%d", ports["metrics"]),
		"log-format":     "json",
	}
	for f, v := range wantArgs {
		if args[f] != v {
			t.Errorf("%s: --%s=%q, want %q", who, f, args[f], v)
		}
	}
	if ports["api"] == 0 || ports["raft"] == 0 || ports["metrics"] == 0 {
		t.Errorf("%s: container ports %v lack api, raft or metrics", who, ports)
	}

	// Every replica is in --peers under its pod name and headless name.
	peers := strings.Split(args["peers"], ",")
	if len(peers) != want.coordinators {
		t.Errorf("%s: --peers has %d entries, want %d (the replicas): %q", who, len(peers), want.coordinators, args["peers"])
	}
	for i, p := range peers {
		pod := fmt.Sprintf("%s-%d", name, i)
		if w := fmt.Sprintf("%s=%s.%s.%s:%d", pod, pod, headless, want.svcDomain, ports["raft"]); p != w {
			t.Errorf("%s: peer %d is %q, want %q", who, i, p, w)
		}
	}

	// Probes: the metrics port serves /healthz and /readyz.
	for what, pr := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		if pr == nil || pr.HTTPGet == nil {
			t.Errorf("%s: no HTTP %s probe", who, what)
			continue
		}
		wantPath := map[string]string{"liveness": "/healthz", "readiness": "/readyz"}[what]
		if pr.HTTPGet.Path != wantPath {
			t.Errorf("%s: %s probe path %q, want %q", who, what, pr.HTTPGet.Path, wantPath)
		}
		if p := chartContainerPort(t, who, c, pr.HTTPGet.Port); p != ports["metrics"] {
			t.Errorf("%s: %s probe on port %d, metrics on %d", who, what, p, ports["metrics"])
		}
	}

	// etcd: embedded members on the headless Service, or external endpoints.
	hs := chartFind[*corev1.Service](t, objs, "Service", headless)
	svcPorts := map[string]int32{}
	for _, p := range hs.Spec.Ports {
		svcPorts[p.Name] = p.Port
	}
	if want.embeddedEtcd {
		if _, ok := args["etcd-endpoints"]; ok {
			t.Errorf("%s: --etcd-endpoints in embedded mode", who)
		}
		for f, v := range map[string]string{
			"etcd-client-port": strconv.Itoa(want.etcdClientPort),
			"etcd-peer-port":   strconv.Itoa(want.etcdPeerPort),
			"etcd-listen-host": "0.0.0.0",
		} {
			if args[f] != v {
				t.Errorf("%s: --%s=%q, want %q", who, f, args[f], v)
			}
		}
		if ports["etcd-client"] != int32(want.etcdClientPort) || ports["etcd-peer"] != int32(want.etcdPeerPort) {
			t.Errorf("%s: etcd container ports %d/%d, want %d/%d", who, ports["etcd-client"], ports["etcd-peer"], want.etcdClientPort, want.etcdPeerPort)
		}
		if svcPorts["etcd-client"] != int32(want.etcdClientPort) || svcPorts["etcd-peer"] != int32(want.etcdPeerPort) {
			t.Errorf("Service %s: etcd ports %v, want %d/%d", headless, svcPorts, want.etcdClientPort, want.etcdPeerPort)
		}
	} else {
		if args["etcd-endpoints"] != want.etcdEndpoints {
			t.Errorf("%s: --etcd-endpoints=%q, want %q", who, args["etcd-endpoints"], want.etcdEndpoints)
		}
		for _, f := range []string{"etcd-client-port", "etcd-peer-port", "etcd-listen-host"} {
			if _, ok := args[f]; ok {
				t.Errorf("%s: --%s with external etcd", who, f)
			}
		}
		if _, ok := svcPorts["etcd-client"]; ok {
			t.Errorf("Service %s: etcd ports with external etcd", headless)
		}
	}
	chartCheckSecurityArgs(t, who, spec, c, args, want)

	// Prometheus annotations name the metrics port.
	ann := sts.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(int(ports["metrics"])) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("%s: prometheus annotations %v", who, ann)
	}

	pdb := chartFind[*policyv1.PodDisruptionBudget](t, objs, "PodDisruptionBudget", name)
	if pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntValue() != 1 || pdb.Spec.MinAvailable != nil {
		t.Errorf("PodDisruptionBudget %s: maxUnavailable %v minAvailable %v, want 1 and unset", name, pdb.Spec.MaxUnavailable, pdb.Spec.MinAvailable)
	}
	chartCheckSelects(t, "PodDisruptionBudget "+name, pdb.Spec.Selector, sts)
}

// chartCheckSelects checks that a selector picks the pods of sts and no
// others of the release.
func chartCheckSelects(t *testing.T, who string, sel *metav1.LabelSelector, sts *appsv1.StatefulSet) {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil || s.Empty() {
		t.Fatalf("%s: selector %v: %v (or empty)", who, sel, err)
	}
	if !s.Matches(labels.Set(sts.Spec.Template.Labels)) {
		t.Errorf("%s: selector %v does not match the pods of %s (%v)", who, sel, sts.Name, sts.Spec.Template.Labels)
	}
}

func chartCheckPullSecrets(t *testing.T, who string, spec *corev1.PodSpec, want chartExpect) {
	t.Helper()
	var got []string
	for _, s := range spec.ImagePullSecrets {
		got = append(got, s.Name)
	}
	if !slices.Equal(got, want.pullSecrets) {
		t.Errorf("%s: imagePullSecrets %v, want %v", who, got, want.pullSecrets)
	}
}

func chartCheckWorkers(t *testing.T, objs []chartObject, want chartExpect, known map[string]bool) {
	t.Helper()
	name := chartFullname + "-worker"
	sts, who, headless := chartStatefulSet(t, objs, name, want.workerPods)
	spec := &sts.Spec.Template.Spec
	chartCheckPodSecurity(t, who, spec)
	chartCheckPodWiring(t, who, spec, nil)
	chartCheckPullSecrets(t, who, spec, want)
	if spec.RuntimeClassName == nil || *spec.RuntimeClassName != "nvidia" {
		t.Errorf("%s: runtimeClassName %v, want nvidia", who, spec.RuntimeClassName)
	}
	if len(spec.Containers) != want.gpusPerPod {
		t.Fatalf("%s: %d containers, want %d (one per GPU)", who, len(spec.Containers), want.gpusPerPod)
	}
	if total := want.workerPods * len(spec.Containers); total != want.workerPods*want.gpusPerPod {
		t.Errorf("%s: %d worker processes in all, want %d", who, total, want.workerPods*want.gpusPerPod)
	}
	coordAddr := fmt.Sprintf("%s-coordinator.%s:%d", chartFullname, want.svcDomain, chartClientPort(t, objs))
	var cacheVol *corev1.Volume
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == "cache" {
			cacheVol = &spec.Volumes[i]
		}
	}
	if cacheVol == nil || cacheVol.EmptyDir == nil {
		t.Fatalf("%s: no emptyDir volume named cache", who)
	}
	for i := range spec.Containers {
		c := &spec.Containers[i]
		cwho := fmt.Sprintf("%s/%s", who, c.Name)
		if c.Name != fmt.Sprintf("worker-g%d", i) {
			t.Errorf("%s: container %d is named %q", cwho, i, c.Name)
		}
		if c.Image != want.workerImage {
			t.Errorf("%s: image %q, want %q", cwho, c.Image, want.workerImage)
		}
		chartPodNameEnv(t, cwho, c)

		// Exactly one GPU, requested and limited.
		gpu := corev1.ResourceName("nvidia.com/gpu")
		lim, req := c.Resources.Limits[gpu], c.Resources.Requests[gpu]
		if lim.Value() != 1 || req.Value() != 1 {
			t.Errorf("%s: nvidia.com/gpu limit %s request %s, want 1 and 1", cwho, lim.String(), req.String())
		}
		if cpu := c.Resources.Requests[corev1.ResourceCPU]; cpu.Cmp(resource.MustParse(want.workerCPU)) != 0 {
			t.Errorf("%s: cpu request %s, want %s", cwho, cpu.String(), want.workerCPU)
		}

		args := chartArgs(t, cwho, c.Args)
		ports := map[string]int32{}
		for _, p := range c.Ports {
			ports[p.Name] = p.ContainerPort
		}
		coll, met := ports[fmt.Sprintf("coll-g%d", i)], ports[fmt.Sprintf("metrics-g%d", i)]
		if coll != int32(7500+i) || met != int32(9500+i) {
			t.Errorf("%s: ports %v, want coll-g%d=%d and metrics-g%d=%d", cwho, ports, i, 7500+i, i, 9500+i)
		}
		cacheDir := ""
		for _, m := range c.VolumeMounts {
			if m.Name == "cache" {
				cacheDir = m.MountPath
			}
		}
		wantArgs := map[string]string{
			"id":              fmt.Sprintf("$(POD_NAME)-g%d", i),
			"coordinator":     coordAddr,
			"advertise-host":  "$(POD_NAME)." + headless + "." + want.svcDomain,
			"listen-host":     "0.0.0.0",
			"collective-port": strconv.Itoa(int(coll)),
			"metrics-addr":    fmt.Sprintf("0.0.0.0:%d", met),
			"backend":         want.backend,
			"cache-dir":       cacheDir,
			"log-format":      "json",
		}
		for f, v := range wantArgs {
			if args[f] != v {
				t.Errorf("%s: --%s=%q, want %q", cwho, f, args[f], v)
			}
		}
		if _, ok := args["gpu"]; ok {
			t.Errorf("%s: --gpu given; the device plugin picks the GPU", cwho)
		}
		chartCheckSecurityArgs(t, cwho, spec, c, args, want)
		for what, pr := range map[string]*corev1.Probe{"/healthz": c.LivenessProbe, "/readyz": c.ReadinessProbe} {
			if pr == nil || pr.HTTPGet == nil || pr.HTTPGet.Path != what {
				t.Errorf("%s: probe %v, want HTTP %s", cwho, pr, what)
			} else if p := chartContainerPort(t, cwho, c, pr.HTTPGet.Port); p != met {
				t.Errorf("%s: %s probe on port %d, metrics on %d", cwho, what, p, met)
			}
		}
		chartCheckS3Env(t, cwho, c, want)

		for f := range args {
			if !known[f] {
				t.Errorf("%s: --%s is not a flag of m2worker (worker/m2worker/app)", cwho, f)
			}
		}
	}
}

// chartClientPort returns the API port of the client Service.
func chartClientPort(t *testing.T, objs []chartObject) int32 {
	t.Helper()
	svc := chartFind[*corev1.Service](t, objs, "Service", chartFullname+"-coordinator")
	for _, p := range svc.Spec.Ports {
		if p.Name == "api" {
			return p.Port
		}
	}
	t.Fatalf("Service %s-coordinator has no api port", chartFullname)
	return 0
}

// chartCheckS3Env checks the S3 variables that worker/checkpoint reads.
func chartCheckS3Env(t *testing.T, who string, c *corev1.Container, want chartExpect) {
	t.Helper()
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		if _, dup := env[e.Name]; dup {
			t.Errorf("%s: env %s twice", who, e.Name)
		}
		env[e.Name] = e
	}
	if got := env["M2_S3_ENDPOINT"].Value; got != want.s3Endpoint {
		t.Errorf("%s: M2_S3_ENDPOINT %q, want %q", who, got, want.s3Endpoint)
	}
	keys := map[string]string{"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
	if want.s3SessionKey != "" {
		keys["AWS_SESSION_TOKEN"] = want.s3SessionKey
	}
	for name, key := range keys {
		e, ok := env[name]
		switch {
		case want.s3Secret == "" && ok:
			t.Errorf("%s: %s set without s3.existingSecret", who, name)
		case want.s3Secret == "":
		case !ok || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil:
			t.Errorf("%s: %s does not come from a Secret: %+v", who, name, e)
		case e.ValueFrom.SecretKeyRef.Name != want.s3Secret || e.ValueFrom.SecretKeyRef.Key != key:
			t.Errorf("%s: %s from Secret %s key %s, want %s key %s", who, name, e.ValueFrom.SecretKeyRef.Name, e.ValueFrom.SecretKeyRef.Key, want.s3Secret, key)
		}
	}
	if _, ok := env["AWS_SESSION_TOKEN"]; ok && want.s3SessionKey == "" {
		t.Errorf("%s: AWS_SESSION_TOKEN without s3.sessionTokenKey", who)
	}
}

// chartCheckServices checks that every Service selects the pods of one
// StatefulSet, that each target port is a port of those pods, and that
// the governing Services are headless and publish unready pods.
func chartCheckServices(t *testing.T, objs []chartObject) {
	t.Helper()
	var sets []*appsv1.StatefulSet
	for _, o := range objs {
		if s, ok := o.obj.(*appsv1.StatefulSet); ok {
			sets = append(sets, s)
			chartCheckSelects(t, "StatefulSet "+s.Name, s.Spec.Selector, s)
		}
	}
	for _, o := range objs {
		svc, ok := o.obj.(*corev1.Service)
		if !ok {
			continue
		}
		who := "Service " + svc.Name
		var target *appsv1.StatefulSet
		for _, s := range sets {
			if labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(s.Spec.Template.Labels)) {
				if target != nil {
					t.Fatalf("%s selects the pods of %s and %s", who, target.Name, s.Name)
				}
				target = s
			}
		}
		if len(svc.Spec.Selector) == 0 || target == nil {
			t.Fatalf("%s: selector %v matches no StatefulSet's pods", who, svc.Spec.Selector)
		}
		podPorts := map[string]int32{}
		for _, c := range target.Spec.Template.Spec.Containers {
			for _, p := range c.Ports {
				podPorts[p.Name] = p.ContainerPort
			}
		}
		for _, p := range svc.Spec.Ports {
			if p.TargetPort.Type != intstr.String {
				t.Errorf("%s: port %s targets a number; name the pod's port", who, p.Name)
			} else if cp, ok := podPorts[p.TargetPort.StrVal]; !ok || cp != p.Port {
				t.Errorf("%s: port %s (%d) targets %q, which the pods of %s have as %d", who, p.Name, p.Port, p.TargetPort.StrVal, target.Name, cp)
			}
		}
		if target.Spec.ServiceName == svc.Name {
			if svc.Spec.ClusterIP != corev1.ClusterIPNone || !svc.Spec.PublishNotReadyAddresses {
				t.Errorf("%s governs %s: clusterIP %q publishNotReadyAddresses %v, want None and true", who, target.Name, svc.Spec.ClusterIP, svc.Spec.PublishNotReadyAddresses)
			}
		}
	}
}

func chartCheckServiceMonitor(t *testing.T, objs []chartObject, want chartExpect) {
	t.Helper()
	sm := chartFind[*unstructured.Unstructured](t, objs, "ServiceMonitor", chartFullname)
	sel, _, err := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
	if err != nil || len(sel) == 0 {
		t.Fatalf("ServiceMonitor: selector %v: %v", sel, err)
	}
	eps, _, err := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	if err != nil {
		t.Fatal(err)
	}
	scraped := map[string]bool{}
	for _, e := range eps {
		ep := e.(map[string]any)
		scraped[fmt.Sprint(ep["port"])] = true
		if ep["path"] != "/metrics" {
			t.Errorf("ServiceMonitor: endpoint %v path %v", ep["port"], ep["path"])
		}
	}
	// Every metrics port of every selected Service is scraped, once.
	var ports []string
	for _, o := range objs {
		svc, ok := o.obj.(*corev1.Service)
		if !ok || !labels.SelectorFromSet(sel).Matches(labels.Set(svc.Labels)) {
			continue
		}
		if svc.Spec.ClusterIP != corev1.ClusterIPNone {
			t.Errorf("ServiceMonitor selects Service %s, which is not headless: its pods would be scraped twice", svc.Name)
		}
		for _, p := range svc.Spec.Ports {
			if strings.HasPrefix(p.Name, "metrics") {
				ports = append(ports, p.Name)
			}
		}
	}
	if len(ports) != 1+want.gpusPerPod || len(scraped) != len(ports) {
		t.Errorf("ServiceMonitor: scrapes %v; the selected Services have metrics ports %v (want %d)", slices.Sorted(maps.Keys(scraped)), ports, 1+want.gpusPerPod)
	}
	for _, p := range ports {
		if !scraped[p] {
			t.Errorf("ServiceMonitor: metrics port %s is not scraped", p)
		}
	}
	if ns, _, _ := unstructured.NestedStringSlice(sm.Object, "spec", "namespaceSelector", "matchNames"); !slices.Equal(ns, []string{chartNamespace}) {
		t.Errorf("ServiceMonitor: namespaceSelector %v", ns)
	}
}

func chartCheckGeneratedAuth(t *testing.T, objs []chartObject, want chartExpect) {
	t.Helper()
	s := chartFind[*corev1.Secret](t, objs, "Secret", want.authSecret)
	tok, ok := s.Data[want.authKey]
	if !ok || len(s.Data) != 1 {
		t.Fatalf("Secret %s: keys %v, want only %s", s.Name, slices.Sorted(maps.Keys(s.Data)), want.authKey)
	}
	// Data holds the decoded bytes of the chart's base64: the token itself.
	if len(tok) != 48 || strings.Trim(string(tok), "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") != "" {
		t.Errorf("Secret %s: token of %d bytes, want 48 letters and digits", s.Name, len(tok))
	}
}

func chartCheckNotes(t *testing.T, notes string, want chartExpect) {
	t.Helper()
	for _, s := range []string{
		"kubectl -n ml port-forward svc/m2train-coordinator 7400:7400",
		"export M2_COORDINATOR=127.0.0.1:7400",
		"m2ctl job submit", "m2ctl job status", "m2ctl job watch",
	} {
		if !strings.Contains(notes, s) {
			t.Errorf("NOTES.txt lacks %q:\n%s", s, notes)
		}
	}
	tokenLine := "kubectl -n ml get secret " + want.authSecret + " -o jsonpath="
	if got := strings.Contains(notes, tokenLine); got != (want.authSecret != "") {
		t.Errorf("NOTES.txt: token from Secret %q shown: %v:\n%s", want.authSecret, got, notes)
	}
	if got := strings.Contains(notes, "--tls-server-name m2train-coordinator."+want.svcDomain); got != (want.tlsSecret != "") {
		t.Errorf("NOTES.txt: TLS flags shown: %v, TLS on: %v:\n%s", got, want.tlsSecret != "", notes)
	}
}

// TestChartLargeCluster counts GPUs over the whole large rendering: 8 pods
// of 8 worker containers, each limited to one GPU.
func TestChartLargeCluster(t *testing.T) {
	objs, _ := chartRender(t, filepath.Join("ci", "large-values.yaml"))
	sts := chartFind[*appsv1.StatefulSet](t, objs, "StatefulSet", chartFullname+"-worker")
	pods := int(*sts.Spec.Replicas)
	var gpus int64
	ids := map[string]bool{}
	for p := range pods {
		for _, c := range sts.Spec.Template.Spec.Containers {
			lim := c.Resources.Limits["nvidia.com/gpu"]
			if lim.Value() != 1 {
				t.Errorf("container %s: GPU limit %s", c.Name, lim.String())
			}
			gpus += lim.Value()
			args := chartArgs(t, c.Name, c.Args)
			ids[strings.ReplaceAll(args["id"], "$(POD_NAME)", fmt.Sprintf("%s-worker-%d", chartFullname, p))] = true
		}
	}
	if pods != 8 || gpus != 64 || len(ids) != 64 {
		t.Errorf("%d pods, %d GPUs, %d distinct worker IDs; want 8, 64, 64", pods, gpus, len(ids))
	}
}

// TestChartLongReleaseName renders with a release name far over the name
// limit: every name must still be valid, and distinct.
func TestChartLongReleaseName(t *testing.T) {
	rel := "a-release-name-much-longer-than-the-forty-characters-allowed"
	ms, err := helm.Render(".", nil, rel, chartNamespace)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, o := range chartDecode(t, ms) {
		if seen[o.kind+"/"+o.name] {
			t.Errorf("%s %s twice", o.kind, o.name)
		}
		seen[o.kind+"/"+o.name] = true
		if errs := validation.IsDNS1035Label(o.name); len(errs) > 0 {
			t.Errorf("%s %q: %v", o.kind, o.name, errs)
		}
		if sts, ok := o.obj.(*appsv1.StatefulSet); ok {
			// The controller labels pods with <name>-<10-character hash>.
			if len(sts.Name) > 52 {
				t.Errorf("StatefulSet %q: %d characters, at most 52 leave room for the revision label", sts.Name, len(sts.Name))
			}
			for _, c := range sts.Spec.Template.Spec.Containers {
				args := chartArgs(t, sts.Name, c.Args)
				for _, f := range []string{"raft-advertise", "api-advertise", "advertise-host"} {
					v, ok := args[f]
					if !ok {
						continue
					}
					host := strings.ReplaceAll(v, "$(POD_NAME)", sts.Name+"-99")
					if h, _, err := net.SplitHostPort(host); err == nil {
						host = h
					}
					if errs := validation.IsDNS1123Subdomain(host); len(errs) > 0 {
						t.Errorf("%s: --%s names %q: %v", sts.Name, f, host, errs)
					}
					for _, label := range strings.Split(host, ".") {
						if errs := validation.IsDNS1123Label(label); len(errs) > 0 {
							t.Errorf("%s: --%s names %q, label %q: %v", sts.Name, f, host, label, errs)
						}
					}
				}
			}
		}
	}
}

// chartValues parses YAML values for a test case.
func chartValues(t *testing.T, doc string) map[string]any {
	t.Helper()
	v, err := chartutil.ReadValues([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return v.AsMap()
}
