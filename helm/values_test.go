package helm_test

import (
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/m2train/m2train/helm"
)

// TestChartRejectsBadValues renders with values that break a rule: the
// error must name the field (as the schema's JSON pointer, or the value's
// dotted name for the checks done in templates) and the rule.
func TestChartRejectsBadValues(t *testing.T) {
	cases := []struct {
		name   string
		values string
		want   []string
	}{
		{"negative coordinator replicas", "coordinator: {replicas: -1}", []string{"/coordinator/replicas", "minimum"}},
		{"negative worker replicas", "workers: {replicas: -2}", []string{"/workers/replicas", "minimum"}},
		{"replicas not a number", "workers: {replicas: two}", []string{"/workers/replicas", "integer"}},
		{"unknown top-level key", "replicas: 3", []string{"additional properties 'replicas' not allowed"}},
		{"unknown nested key", "coordinator: {replica: 3}", []string{"/coordinator", "additional properties 'replica' not allowed"}},
		{"unknown key in probe", "coordinator: {livenessProbe: {httpGet: {path: /}}}", []string{"/coordinator/livenessProbe", "'httpGet' not allowed"}},
		{"nine GPUs per pod", "workers: {gpusPerPod: 9}", []string{"/workers/gpusPerPod", "maximum"}},
		{"zero GPUs per pod", "workers: {gpusPerPod: 0}", []string{"/workers/gpusPerPod", "minimum"}},
		{"bad etcd mode", "etcd: {mode: sidecar}", []string{"/etcd/mode", "'embedded', 'external'"}},
		{"external etcd without endpoints", "etcd: {mode: external}", []string{"/etcd/external/endpoints", "minItems"}},
		{"embedded etcd with endpoints", "etcd: {external: {endpoints: [http://e:2379]}}", []string{"/etcd/external/endpoints", "maxItems"}},
		{"endpoint list in one string", "etcd: {mode: external, external: {endpoints: ['http://a:2379,http://b:2379']}}", []string{"/etcd/external/endpoints/0", "pattern"}},
		{"TLS without a Secret", "tls: {enabled: true}", []string{"/tls/existingSecret", "minLength"}},
		{"token generated and given", "auth: {generate: true, existingSecret: tok}", []string{"/auth/existingSecret", "maxLength"}},
		{"bad volume size", "coordinator: {persistence: {size: 10 GB}}", []string{"/coordinator/persistence/size", "pattern"}},
		{"bad memory limit", "workers: {resources: {limits: {memory: lots}}}", []string{"/workers/resources/limits/memory"}},
		{"unknown resources key", "workers: {resources: {limit: {memory: 1Gi}}}", []string{"/workers/resources", "'limit' not allowed"}},
		{"bad backend", "workers: {backend: tpu}", []string{"/workers/backend", "'auto', 'cuda', 'cpu'"}},
		{"bad duration", "workers: {collectiveTimeout: 1 minute}", []string{"/workers/collectiveTimeout", "pattern"}},
		{"bad digest", "image: {worker: {digest: 'sha256:abc'}}", []string{"/image/worker/digest", "pattern"}},
		{"bad pull policy", "image: {pullPolicy: Sometimes}", []string{"/image/pullPolicy"}},
		{"port out of range", "coordinator: {ports: {api: 70000}}", []string{"/coordinator/ports/api", "maximum"}},
		{"bad toleration operator", "workers: {tolerations: [{key: a, operator: Maybe}]}", []string{"/workers/tolerations/0/operator"}},
		{"bad affinity field", "workers: {affinity: {nodeAffinity: {required: []}}}", []string{"/workers/affinity/nodeAffinity", "'required' not allowed"}},
		{"bad label value", "workers: {podLabels: {team: 'a b'}}", []string{"/workers/podLabels/team", "pattern"}},
		{"podLabels override the selector", "workers: {podLabels: {app.kubernetes.io/component: x}}", []string{"/workers/podLabels", "app.kubernetes.io/component"}},
		{"long fullnameOverride", "fullnameOverride: " + strings.Repeat("a", 41), []string{"/fullnameOverride", "maxLength"}},
		{"bad S3 endpoint", "s3: {endpoint: 'minio:9000/bucket'}", []string{"/s3/endpoint", "pattern"}},
		{"log level", "logLevel: verbose", []string{"/logLevel"}},
		{"service monitor interval", "metrics: {serviceMonitor: {interval: 30}}", []string{"/metrics/serviceMonitor/interval", "string"}},
		// Rules that need arithmetic live in the templates.
		{"worker port ranges overlap", "workers: {gpusPerPod: 4, collectivePort: 9498}", []string{"workers.collectivePort", "workers.metricsPort", "overlap"}},
		{"coordinator ports collide", "coordinator: {ports: {raft: 7400}}", []string{"coordinator.ports (api 7400, raft 7400, metrics 9400)", "must all differ"}},
		{"etcd port collides", "etcd: {embedded: {clientPort: 9400}}", []string{"etcd.embedded (clientPort 9400, peerPort 2380)", "must all differ"}},
		{"disruption budget over the quorum", "coordinator: {podDisruptionBudget: {maxUnavailable: 2}}", []string{"coordinator.podDisruptionBudget.maxUnavailable", "2 of 3 replicas", "at most 1"}},
		{"worker ports past 65535", "workers: {gpusPerPod: 8, metricsPort: 65530}", []string{"workers.metricsPort", "65535"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := helm.Render(".", chartValues(t, c.values), chartRelease, chartNamespace)
			if err == nil {
				t.Fatalf("values %q rendered without an error", c.values)
			}
			t.Log(err)
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("values %q: error lacks %q:\n%v", c.values, w, err)
				}
			}
		})
	}
}

// TestChartAcceptsEdgeValues renders values at the edges of their ranges.
func TestChartAcceptsEdgeValues(t *testing.T) {
	for _, v := range []string{
		"coordinator: {replicas: 1}",
		"coordinator: {replicas: 5, podDisruptionBudget: {maxUnavailable: 2}}",
		"workers: {replicas: 0}",
		"workers: {gpusPerPod: 8, backend: cpu, cache: {medium: Memory, sizeLimit: 8Gi}}",
		"coordinator: {persistence: {storageClass: '-'}}",
		"coordinator: {resources: {requests: {cpu: 1.5, memory: 1e9}}}",
		"workers: {runtimeClassName: '', gpuResourceName: nvidia.com/mig-3g.71gb}",
		"metrics: {podAnnotations: false}",
		"serviceAccount: {create: false, name: training}",
		"auth: {existingSecret: tok, secretKey: api.token}",
		"etcd: {prefix: /}",
		"s3: {endpoint: 'http://10.0.0.5:9000'}",
	} {
		if _, err := helm.Render(".", chartValues(t, v), chartRelease, chartNamespace); err != nil {
			t.Errorf("values %q: %v", v, err)
		}
	}
}

// TestChartReadmeListsEveryValue keeps README.md's values table in step
// with values.yaml: every key (a leaf, or a map or list whose entries the
// user supplies) is listed, and every listed key exists.
func TestChartReadmeListsEveryValue(t *testing.T) {
	vals, err := helm.LoadValuesFile("values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			sub, ok := v.(map[string]any)
			if ok && len(sub) > 0 && !chartFreeFormValue(prefix+k) {
				walk(prefix+k+".", sub)
				continue
			}
			keys = append(keys, prefix+k)
		}
	}
	walk("", vals)
	sort.Strings(keys)

	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\| `([A-Za-z0-9.]+)` \\|")
	var listed []string
	for _, m := range row.FindAllStringSubmatch(string(readme), -1) {
		listed = append(listed, m[1])
	}
	for _, k := range keys {
		if !slices.Contains(listed, k) {
			t.Errorf("README.md does not list the value %s", k)
		}
	}
	for _, k := range listed {
		if !slices.Contains(keys, k) {
			t.Errorf("README.md lists %s, which values.yaml does not have", k)
		}
	}
}

// chartFreeFormValue reports whether a values key holds a map whose keys
// the user chooses (Kubernetes structures, label and annotation maps).
func chartFreeFormValue(key string) bool {
	last := key[strings.LastIndex(key, ".")+1:]
	return slices.Contains([]string{"resources", "nodeSelector", "affinity", "podAnnotations", "podLabels", "annotations", "labels", "livenessProbe", "readinessProbe"}, last)
}
