package images

import (
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/helm"
)

// The operator's guide (docs/operators-guide.md) describes how to run the
// images this package builds. These tests keep it true to the code: every
// m2ctl command and flag it shows exists, every chart value it names is a
// key of helm/values.yaml, its job spec passes the coordinator's
// validation, and its links lead somewhere.

const guidePath = repoRoot + "/docs/operators-guide.md"

type fence struct {
	lang, text string
	line       int
}

// readGuide returns the guide's fenced code blocks and its inline code
// spans outside them.
func readGuide(t *testing.T) (string, []fence, []string) {
	t.Helper()
	data, err := os.ReadFile(guidePath)
	if err != nil {
		t.Fatal(err)
	}
	src := string(data)
	var fences []fence
	var prose strings.Builder
	lines := strings.Split(src, "\n")
	for i := 0; i < len(lines); i++ {
		t := strings.TrimSpace(lines[i])
		if !strings.HasPrefix(t, "```") {
			prose.WriteString(lines[i] + "\n")
			continue
		}
		f := fence{lang: strings.TrimPrefix(t, "```"), line: i + 1}
		var body []string
		for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
			body = append(body, lines[i])
		}
		f.text = strings.Join(body, "\n")
		fences = append(fences, f)
	}
	var spans []string
	for _, m := range regexp.MustCompile("`([^`\n]+)`").FindAllStringSubmatch(prose.String(), -1) {
		spans = append(spans, m[1])
	}
	return src, fences, spans
}

var (
	m2ctlOnce sync.Once
	m2ctlBin  string
	m2ctlErr  error
)

// buildM2ctl builds m2ctl once per test run.
func buildM2ctl(t *testing.T) string {
	t.Helper()
	m2ctlOnce.Do(func() {
		dir, err := os.MkdirTemp("", "m2ctl-guide-")
		if err != nil {
			m2ctlErr = err
			return
		}
		m2ctlBin = filepath.Join(dir, "m2ctl")
		cmd := exec.Command("go", "build", "-o", m2ctlBin, "./tools/m2ctl")
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			m2ctlErr = err
			m2ctlBin = string(out)
		}
	})
	if m2ctlErr != nil {
		t.Fatalf("go build ./tools/m2ctl: %v\n%s", m2ctlErr, m2ctlBin)
	}
	return m2ctlBin
}

var helpCache = map[string]string{}

// help returns `m2ctl PATH... --help`.
func help(t *testing.T, bin string, cmdPath []string) string {
	t.Helper()
	key := strings.Join(cmdPath, " ")
	if h, ok := helpCache[key]; ok {
		return h
	}
	out, err := exec.Command(bin, append(slices.Clone(cmdPath), "--help")...).CombinedOutput()
	if err != nil {
		t.Fatalf("m2ctl %s --help: %v\n%s", key, err, out)
	}
	helpCache[key] = string(out)
	return string(out)
}

// subcommands lists the "Available Commands" of a help text.
func subcommands(h string) []string {
	var out []string
	_, after, ok := strings.Cut(h, "Available Commands:\n")
	if !ok {
		return nil
	}
	for _, l := range strings.Split(after, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			break
		}
		out = append(out, f[0])
	}
	return out
}

// m2ctlCommands finds the m2ctl invocations of the guide: in sh blocks
// (continuations joined, one simple command at a time) and in inline spans
// that start with "m2ctl ".
func m2ctlCommands(t *testing.T, fences []fence, spans []string) [][]string {
	t.Helper()
	var out [][]string
	for _, f := range fences {
		if f.lang != "sh" {
			continue
		}
		joined := strings.ReplaceAll(f.text, "\\\n", " ")
		for _, line := range strings.Split(joined, "\n") {
			cmds, err := simpleCommands(line)
			if err != nil {
				t.Fatalf("guide line %d: %q: %v", f.line, line, err)
			}
			for _, c := range cmds {
				for i, w := range c {
					if w == "m2ctl" {
						out = append(out, c[i:])
						break
					}
				}
			}
		}
	}
	for _, s := range spans {
		if strings.HasPrefix(s, "m2ctl ") {
			// Usage notation: [--flag N], a|b.
			s = strings.NewReplacer("[", " ", "]", " ").Replace(s)
			out = append(out, strings.Fields(s))
		}
	}
	return out
}

func TestGuideM2ctlCommandsExist(t *testing.T) {
	_, fences, spans := readGuide(t)
	cmds := m2ctlCommands(t, fences, spans)
	if len(cmds) < 10 {
		t.Fatalf("found only %d m2ctl commands in the guide; the extraction is broken", len(cmds))
	}
	bin := buildM2ctl(t)
	for _, c := range cmds {
		for _, p := range checkM2ctl(t, bin, c) {
			t.Error(p)
		}
	}
}

// checkM2ctl returns what is wrong with the m2ctl command line c: an
// unknown command, a missing subcommand, or a flag that command lacks.
func checkM2ctl(t *testing.T, bin string, c []string) []string {
	t.Helper()
	var problems []string
	var cmdPath []string
	h := help(t, bin, nil)
	args := c[1:]
	for len(args) > 0 && !strings.HasPrefix(args[0], "-") && slices.Contains(subcommands(h), args[0]) {
		cmdPath = append(cmdPath, args[0])
		args = args[1:]
		h = help(t, bin, cmdPath)
	}
	line := strings.Join(c, " ")
	if len(cmdPath) == 0 {
		return []string{line + ": no such m2ctl command"}
	}
	if subs := subcommands(h); len(subs) > 0 && len(args) > 0 {
		return []string{line + ": m2ctl " + strings.Join(cmdPath, " ") + " needs one of the subcommands " + strings.Join(subs, ", ")}
	}
	for _, a := range args {
		name, _, _ := strings.Cut(a, "=")
		switch {
		case strings.HasPrefix(name, "--"):
			if !regexp.MustCompile(`(^|\s)` + regexp.QuoteMeta(name) + `(\s|$)`).MatchString(h) {
				problems = append(problems, line+": m2ctl "+strings.Join(cmdPath, " ")+" has no flag "+name)
			}
		case strings.HasPrefix(name, "-") && len(name) == 2:
			if !strings.Contains(h, " "+name+", --") {
				problems = append(problems, line+": m2ctl "+strings.Join(cmdPath, " ")+" has no flag "+name)
			}
		}
	}
	return problems
}

// TestCheckM2ctlCatchesMistakes: the checker itself rejects what does not
// exist.
func TestCheckM2ctlCatchesMistakes(t *testing.T) {
	bin := buildM2ctl(t)
	for _, c := range []string{
		"m2ctl jobs ls",
		"m2ctl job frobnicate JOB",
		"m2ctl job ls --no-such-flag",
		"m2ctl job watch -z JOB",
		"m2ctl checkpoint export LOC OUT --dtype=float32 --precision bf16",
	} {
		if p := checkM2ctl(t, bin, strings.Fields(c)); len(p) == 0 {
			t.Errorf("%q passed the check", c)
		}
	}
	for _, c := range []string{
		"m2ctl job submit job.yaml -w --coordinator=127.0.0.1:7400",
		"m2ctl checkpoint export LOC OUT --dtype bfloat16 --step 3",
		"m2ctl job ls -o json --token-file f",
	} {
		if p := checkM2ctl(t, bin, strings.Fields(c)); len(p) != 0 {
			t.Errorf("%q: %v", c, p)
		}
	}
}

// loadValues reads helm/values.yaml.
func loadValues(t *testing.T) map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "helm", "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := yaml.Unmarshal(data, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// lookupValue reports whether the dotted path is a key of values, and
// whether it leads into a map the chart leaves free-form (empty by
// default, like nodeSelector), below which any key goes.
func lookupValue(values map[string]any, dotted string) (found, freeForm bool) {
	var cur any = values
	for _, k := range strings.Split(dotted, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return false, false
		}
		if len(m) == 0 {
			return true, true
		}
		if cur, ok = m[k]; !ok {
			return false, false
		}
	}
	if m, ok := cur.(map[string]any); ok && len(m) == 0 {
		return true, true
	}
	return true, false
}

// valueRE matches inline spans that name a chart value.
var valueRE = regexp.MustCompile(`^(clusterDomain|nameOverride|fullnameOverride|image|imagePullSecrets|serviceAccount|podSecurityContext|logLevel|auth|tls|s3|etcd|coordinator|workers|metrics)(\.[A-Za-z0-9]+)*$`)

func TestGuideChartValuesExist(t *testing.T) {
	values := loadValues(t)
	_, fences, spans := readGuide(t)
	n := 0
	for _, s := range spans {
		if !valueRE.MatchString(s) || strings.HasSuffix(s, ".crt") || strings.HasSuffix(s, ".key") {
			continue // tls.crt and the like are files of a Secret
		}
		n++
		if found, _ := lookupValue(values, s); !found {
			t.Errorf("the guide names the chart value %s, which helm/values.yaml lacks", s)
		}
	}
	if n < 10 {
		t.Fatalf("found only %d chart values in the guide's text; the extraction is broken", n)
	}
	var sawValues bool
	for _, f := range fences {
		if f.lang != "yaml" || !strings.HasPrefix(f.text, "# my-values.yaml") {
			continue
		}
		sawValues = true
		var mine map[string]any
		if err := yaml.Unmarshal([]byte(f.text), &mine); err != nil {
			t.Fatalf("guide line %d: %v", f.line, err)
		}
		var walk func(prefix string, m map[string]any)
		walk = func(prefix string, m map[string]any) {
			for k, v := range m {
				p := strings.TrimPrefix(prefix+"."+k, ".")
				found, free := lookupValue(values, p)
				if !found {
					t.Errorf("guide line %d: my-values.yaml sets %s, which helm/values.yaml lacks", f.line, p)
					continue
				}
				if sub, ok := v.(map[string]any); ok && !free && !strings.HasSuffix(p, "resources") {
					walk(p, sub)
				}
			}
		}
		walk("", mine)
	}
	if !sawValues {
		t.Error("the guide has no yaml block starting with # my-values.yaml")
	}
}

func TestLookupValue(t *testing.T) {
	values := map[string]any{
		"workers": map[string]any{"replicas": 1, "nodeSelector": map[string]any{}},
	}
	for p, want := range map[string]bool{
		"workers.replicas":                 true,
		"workers.nodeSelector":             true,
		"workers.nodeSelector.example.com": true, // free-form below an empty map
		"workers.gpuCount":                 false,
		"workers.replicas.x":               false,
		"coordinator":                      false,
	} {
		if got, _ := lookupValue(values, p); got != want {
			t.Errorf("lookupValue(%s) = %v, want %v", p, got, want)
		}
	}
}

func TestGuideJobSpecIsValid(t *testing.T) {
	_, fences, _ := readGuide(t)
	n := 0
	for _, f := range fences {
		if f.lang != "yaml" || !strings.HasPrefix(f.text, "# job.yaml") {
			continue
		}
		n++
		spec, err := jobspec.Parse([]byte(f.text))
		if err != nil {
			t.Errorf("guide line %d: %v", f.line, err)
			continue
		}
		if spec.Parallel.DP*spec.Parallel.SP != 8 {
			t.Errorf("guide line %d: the text says eight GPUs, the spec asks for dp %d × sp %d", f.line, spec.Parallel.DP, spec.Parallel.SP)
		}
	}
	if n != 1 {
		t.Errorf("%d yaml blocks start with # job.yaml, want 1", n)
	}
}

// slug is the anchor GitHub gives a heading.
func slug(h string) string {
	h = strings.ToLower(strings.TrimSpace(h))
	var b strings.Builder
	for _, r := range h {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9':
			b.WriteRune(r)
		}
	}
	return b.String()
}

func TestSlug(t *testing.T) {
	for in, want := range map[string]string{
		" 6. Failure model":       "6-failure-model",
		" `m2ctl up`: the system": "m2ctl-up-the-system",
	} {
		if got := slug(in); got != want {
			t.Errorf("slug(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestGuideLinksResolve(t *testing.T) {
	src, _, _ := readGuide(t)
	links := regexp.MustCompile(`\]\(([^)\s]+)\)`).FindAllStringSubmatch(src, -1)
	if len(links) == 0 {
		t.Fatal("no links found")
	}
	for _, l := range links {
		target := l[1]
		if strings.Contains(target, "://") {
			continue
		}
		file, anchor, _ := strings.Cut(target, "#")
		p := filepath.Join(repoRoot, "docs", filepath.FromSlash(file))
		data, err := os.ReadFile(p)
		if err != nil {
			t.Errorf("link %s: %v", target, err)
			continue
		}
		if anchor == "" {
			continue
		}
		var slugs []string
		for _, line := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(line, "#") {
				slugs = append(slugs, slug(strings.TrimLeft(line, "#")))
			}
		}
		if !slices.Contains(slugs, anchor) {
			t.Errorf("link %s: no heading %q in %s", target, anchor, path.Base(file))
		}
	}
}

// obj is a decoded Kubernetes object.
type obj map[string]any

// get walks keys (string keys into maps, int keys into lists).
func (o obj) get(keys ...any) any {
	var cur any = map[string]any(o)
	for _, k := range keys {
		switch k := k.(type) {
		case string:
			m, ok := cur.(map[string]any)
			if !ok {
				return nil
			}
			cur = m[k]
		case int:
			l, ok := cur.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			cur = l[k]
		}
	}
	return cur
}

// entrypoint is the binary the final stage of a Dockerfile starts.
func entrypoint(t *testing.T, name string) string {
	t.Helper()
	_, by := finalStage(parseFile(t, name))
	if e := by["ENTRYPOINT"]; len(e) == 1 && len(e[0].exec) > 0 {
		return e[0].exec[0]
	}
	t.Fatalf("%s: no exec-form ENTRYPOINT in the final stage", name)
	return ""
}

// TestGuideMatchesTheChart renders the chart with the guide's values file
// (through values.schema.json, as helm install does) and checks the names,
// paths and ports the guide tells operators to use.
func TestGuideMatchesTheChart(t *testing.T) {
	_, fences, _ := readGuide(t)
	var values map[string]any
	for _, f := range fences {
		if f.lang == "yaml" && strings.HasPrefix(f.text, "# my-values.yaml") {
			if err := yaml.Unmarshal([]byte(f.text), &values); err != nil {
				t.Fatal(err)
			}
		}
	}
	if values == nil {
		t.Fatal("no my-values.yaml block in the guide")
	}
	manifests, err := helm.Render(filepath.Join(repoRoot, "helm"), values, "m2train", "m2train")
	if err != nil {
		t.Fatalf("the guide's values do not render: %v", err)
	}
	objs := map[string]obj{}
	for _, m := range manifests {
		// A plain map: yaml.v3 would give nested maps the named type too.
		var o map[string]any
		if err := yaml.Unmarshal([]byte(m.YAML), &o); err != nil {
			t.Fatalf("%s %s: %v", m.Kind, m.Name, err)
		}
		objs[m.Kind+"/"+m.Name] = obj(o)
	}
	for _, want := range []string{
		"StatefulSet/m2train-coordinator", "StatefulSet/m2train-worker",
		"Service/m2train-coordinator", "Service/m2train-coordinator-headless",
		"Secret/m2train-auth", "PodDisruptionBudget/m2train-coordinator",
	} {
		if _, ok := objs[want]; !ok {
			t.Errorf("the guide names %s, which the chart does not create", want)
		}
	}

	coord, worker := objs["StatefulSet/m2train-coordinator"], objs["StatefulSet/m2train-worker"]
	if coord == nil || worker == nil {
		t.FailNow()
	}
	args := func(o obj, i int) []string {
		var out []string
		l, _ := o.get("spec", "template", "spec", "containers", i, "args").([]any)
		for _, a := range l {
			out = append(out, a.(string))
		}
		return out
	}
	cargs := args(coord, 0)
	for _, a := range []string{"--token-file=/etc/m2train/auth/token", "--metrics-addr=0.0.0.0:9400", "--api-addr=0.0.0.0:7400", "--data-dir=/var/lib/m2train"} {
		if !slices.Contains(cargs, a) {
			t.Errorf("coordinator args %q lack %s, which the guide and the image rely on", cargs, a)
		}
	}
	if got := coord.get("spec", "template", "spec", "containers", 0, "image"); got != "registry.example.com/ml/m2coord:0.1.0" {
		t.Errorf("coordinator image = %v", got)
	}
	if got := coord.get("spec", "volumeClaimTemplates", 0, "metadata", "name"); got != "data" {
		t.Errorf("coordinator volume claim template %v, the guide says data (PVCs data-m2train-coordinator-N)", got)
	}
	pvcLabels, _ := coord.get("spec", "volumeClaimTemplates", 0, "metadata", "labels").(map[string]any)
	if pvcLabels["app.kubernetes.io/instance"] != "m2train" || pvcLabels["app.kubernetes.io/component"] != "coordinator" {
		t.Errorf("coordinator PVC labels %v do not match the guide's kubectl delete pvc -l selector", pvcLabels)
	}
	for i := range 4 {
		if got := worker.get("spec", "template", "spec", "containers", i, "name"); got != fmt.Sprintf("worker-g%d", i) {
			t.Errorf("worker container %d is %v, the guide says worker-g%d", i, got, i)
		}
		wargs := args(worker, i)
		if !slices.Contains(wargs, "--cache-dir=/var/cache/m2train") {
			t.Errorf("worker args %q lack --cache-dir=/var/cache/m2train, where the image makes the cache directory", wargs)
		}
		if !slices.Contains(wargs, fmt.Sprintf("--metrics-addr=0.0.0.0:%d", 9500+i)) {
			t.Errorf("worker %d args %q: the guide says metrics on %d", i, wargs, 9500+i)
		}
	}
	if got := worker.get("spec", "template", "spec", "containers", 4); got != nil {
		t.Error("more than gpusPerPod (4) worker containers")
	}
	if got := worker.get("spec", "template", "spec", "runtimeClassName"); got != "nvidia" {
		t.Errorf("worker runtimeClassName = %v", got)
	}
	if got := worker.get("spec", "template", "spec", "containers", 0, "image"); got != "registry.example.com/ml/m2worker:0.1.0" {
		t.Errorf("worker image = %v", got)
	}
	// The chart passes arguments only: the images' entrypoints run.
	for _, c := range []struct {
		o     obj
		n     int
		entry string
	}{{coord, 1, entrypoint(t, "coordinator.Dockerfile")}, {worker, 4, entrypoint(t, "worker.Dockerfile")}} {
		for i := range c.n {
			cmd, _ := c.o.get("spec", "template", "spec", "containers", i, "command").([]any)
			if len(cmd) > 0 && cmd[0] != c.entry {
				t.Errorf("%v container %d runs %v, not the image's entrypoint %s", c.o.get("metadata", "name"), i, cmd, c.entry)
			}
		}
	}
	for _, o := range []obj{coord, worker} {
		sc := o.get("spec", "template", "spec", "securityContext", "runAsUser")
		if sc != 65532 {
			t.Errorf("%v runs as %v; the images' user is 65532", o.get("metadata", "name"), sc)
		}
	}
}
