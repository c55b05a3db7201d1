#!/usr/bin/env bash
# Regenerates the Go code of every .proto file under proto/, next to its source.
# Needs protoc (apt-get install protobuf-compiler libprotobuf-dev), protoc-gen-go
# v1.36.12 and protoc-gen-go-grpc v1.6.2 on PATH (tools/install-protoc.sh).
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$(go env GOPATH)/bin:$PATH"
mapfile -t files < <(find . -name '*.proto' | sort)
[ ${#files[@]} -gt 0 ] || { echo "no .proto files"; exit 0; }
protoc -I . \
  --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
  "${files[@]}"
