//go:build tools

// Package apiserver pins the Kubernetes API server build; it holds no code of
// its own. See tools/kube/build-apiserver.sh.
package apiserver

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
