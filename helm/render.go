// Package helm renders the m2train Helm chart that lives in this directory
// with the Helm v3 SDK, without the helm binary and without a cluster, so
// that Go tests can lint the chart, decode every object it produces and
// check invariants, or hand the objects to an API server.
//
// It owns rendering only: it never installs anything and never talks to a
// cluster (templates that call lookup see no objects).
package helm

import (
	"errors"
	"fmt"
	"path"
	"strings"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/releaseutil"
)

// KubeVersion is the Kubernetes version the chart is rendered for: that of
// the k8s.io/api module the tests decode into.
const KubeVersion = "v1.37.0"

// Manifest is one Kubernetes object of a rendered chart, in install order.
type Manifest struct {
	// Source is the template that produced it, e.g.
	// "m2train/templates/coordinator-statefulset.yaml".
	Source string
	// APIVersion, Kind and Name are read from the object's head.
	APIVersion, Kind, Name string
	// YAML is the object as the template rendered it.
	YAML string
}

// Rendered is a rendered release: its objects in install order and the
// text of NOTES.txt that helm prints after an install.
type Rendered struct {
	Manifests []Manifest
	Notes     string
}

// Render renders the chart in chartDir as an install of release into
// namespace, with values (nil for none) over the chart's values.yaml. The
// values are checked against values.schema.json first; an error names the
// field that breaks a rule. Templates run in strict mode, so a template
// that reads a value missing from values.yaml fails too.
func Render(chartDir string, values map[string]any, release, namespace string) ([]Manifest, error) {
	r, err := RenderRelease(chartDir, values, release, namespace)
	if err != nil {
		return nil, err
	}
	return r.Manifests, nil
}

// RenderRelease is Render that also returns the rendered NOTES.txt.
func RenderRelease(chartDir string, values map[string]any, release, namespace string) (*Rendered, error) {
	if release == "" || namespace == "" {
		return nil, errors.New("helm: render: release and namespace are required")
	}
	ch, err := loader.Load(chartDir)
	if err != nil {
		return nil, fmt.Errorf("helm: load chart %s: %w", chartDir, err)
	}
	caps, err := Capabilities()
	if err != nil {
		return nil, err
	}
	if err := checkKubeVersion(ch, caps); err != nil {
		return nil, err
	}
	if values == nil {
		values = map[string]any{}
	}
	opts := chartutil.ReleaseOptions{Name: release, Namespace: namespace, Revision: 1, IsInstall: true}
	top, err := chartutil.ToRenderValues(ch, values, opts, caps)
	if err != nil {
		return nil, fmt.Errorf("helm: values: %w", err)
	}
	files, err := engine.Engine{Strict: true}.Render(ch, top)
	if err != nil {
		return nil, fmt.Errorf("helm: render: %w", err)
	}
	out := &Rendered{}
	for name, text := range files {
		if path.Base(name) == "NOTES.txt" {
			if path.Dir(name) == ch.Name()+"/templates" {
				out.Notes = text
			}
			delete(files, name)
		}
	}
	hooks, manifests, err := releaseutil.SortManifests(files, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("helm: split manifests: %w", err)
	}
	if len(hooks) > 0 {
		return nil, fmt.Errorf("helm: render: the chart has hooks (%s), which Render does not return", hooks[0].Path)
	}
	for _, m := range manifests {
		if m.Head == nil || m.Head.Kind == "" || m.Head.Version == "" {
			return nil, fmt.Errorf("helm: %s: an object without apiVersion or kind", m.Name)
		}
		mf := Manifest{Source: sourceOf(m.Name), APIVersion: m.Head.Version, Kind: m.Head.Kind, YAML: m.Content}
		if m.Head.Metadata != nil {
			mf.Name = m.Head.Metadata.Name
		}
		out.Manifests = append(out.Manifests, mf)
	}
	return out, nil
}

// sourceOf strips the " (document index)" helm can append to a path.
func sourceOf(name string) string {
	if i := strings.Index(name, " "); i > 0 {
		return name[:i]
	}
	return name
}

// Capabilities returns the cluster capabilities the chart is rendered
// with: Kubernetes KubeVersion and Helm's default API versions.
func Capabilities() (*chartutil.Capabilities, error) {
	kv, err := chartutil.ParseKubeVersion(KubeVersion)
	if err != nil {
		return nil, fmt.Errorf("helm: kube version %s: %w", KubeVersion, err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	caps.KubeVersion = *kv
	return caps, nil
}

// checkKubeVersion applies Chart.yaml's kubeVersion constraint, as an
// install does.
func checkKubeVersion(ch *chart.Chart, caps *chartutil.Capabilities) error {
	if ch.Metadata.KubeVersion == "" {
		return nil
	}
	if !chartutil.IsCompatibleRange(ch.Metadata.KubeVersion, caps.KubeVersion.String()) {
		return fmt.Errorf("helm: chart requires kubeVersion %s, rendering for %s", ch.Metadata.KubeVersion, caps.KubeVersion.String())
	}
	return nil
}

// LoadValuesFile reads a values file (YAML) into a map for Render, the
// way `helm install -f` reads it. An empty file gives an empty map.
func LoadValuesFile(path string) (map[string]any, error) {
	v, err := chartutil.ReadValuesFile(path)
	if err != nil {
		return nil, fmt.Errorf("helm: values file %s: %w", path, err)
	}
	return v.AsMap(), nil
}
