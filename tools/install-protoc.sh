#!/usr/bin/env bash
# Installs the protobuf compiler and the Go plugins that proto/gen.sh uses.
set -euo pipefail
if ! command -v protoc >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq protobuf-compiler libprotobuf-dev
fi
go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
