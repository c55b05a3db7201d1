#!/usr/bin/env bash
# Runs what CI runs: formatting, vet, the CGO-free build of the coordinator,
# every test, and a short run of every fuzz target. Usage: tools/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# go-nvml's cgo preamble calls functions NVML marks deprecated; the warnings
# are noise for us.
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g} -Wno-deprecated-declarations"

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

echo "== go vet"
go vet ./...

echo "== coordinator builds without cgo"
CGO_ENABLED=0 go build ./coordinator/...

echo "== go test"
go test -count=1 -timeout 20m ./...

echo "== fuzz targets (short runs)"
fuzztime=${FUZZTIME:-8s}
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    echo "-- $pkg $target"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg"
  done
done
echo "== all checks passed"
