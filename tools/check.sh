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
    # Go's fuzzing engine now and then ends a run that found nothing with
    # "context deadline exceeded" as -fuzztime runs out (seen on a 2-core
    # machine). That is the engine stopping, not a finding (a finding writes
    # its failing input), so such a run is tried once more; any other
    # failure stops the check.
    for attempt in 1 2; do
      log=$(mktemp)
      if go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" 2>&1 | tee "$log"; then
        rm -f "$log"; break
      fi
      if ((attempt == 1)) && grep -q 'context deadline exceeded' "$log" && ! grep -q 'Failing input written' "$log"; then
        echo "-- $target: the fuzzing engine stopped at its deadline without a finding; running it again"
        rm -f "$log"; continue
      fi
      rm -f "$log"; exit 1
    done
  done
done
echo "== all checks passed"
