#!/usr/bin/env bash
# Builds a Kubernetes API server (kube-apiserver) from the Go module proxy, for
# the tests that install the Helm chart against a real API server (see
# helm/kube_test.go). Usage: tools/kube/build-apiserver.sh [OUT_DIR]
#
# OUT_DIR defaults to .cache/kube/bin (git-ignored); the binary lands at
# OUT_DIR/kube-apiserver and its path is printed on the last line of stdout.
# A binary already there that reports the pinned version is kept, so a second
# run costs a second.
#
# k8s.io/kubernetes cannot be built with `go install pkg@version`: its go.mod
# points every k8s.io/* staging module at a directory inside its own source
# tree. The wrapper module in tools/kube/apiserver/ requires it and replaces
# each staging module with the published release of the same version
# (v0.X.Y for v1.X.Y). A cold build takes about 11 minutes on 2 cores.
set -euo pipefail

version=v1.37.2
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/.cache/kube/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=$out/kube-apiserver

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "Kubernetes $version"; then
  echo "kube-apiserver $version already built" >&2
  echo "$bin"
  exit 0
fi

cd "$root/tools/kube/apiserver"
# The wrapper's go.sum is committed, so the build must not change it; no
# workspace file may pull the wrapper into another module's build; the
# version stamp below needs no VCS data.
export GOWORK=off
export GOFLAGS="-mod=readonly -buildvcs=false"
# The API server's version (/version, used by clients such as Helm to check a
# chart's kubeVersion) comes from these variables, which the Kubernetes
# release build sets the same way.
minor=${version#v1.}
minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"

echo "building kube-apiserver $version into $out" >&2
start=$SECONDS
tmp=$bin.tmp.$$
trap 'rm -f "$tmp"' EXIT
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp" k8s.io/kubernetes/cmd/kube-apiserver
got=$("$tmp" --version)
if [ "$got" != "Kubernetes $version" ]; then
  echo "built kube-apiserver reports '$got', want 'Kubernetes $version'" >&2
  exit 1
fi
mv -f "$tmp" "$bin"
echo "built kube-apiserver $version in $((SECONDS - start))s" >&2
echo "$bin"
