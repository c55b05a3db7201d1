# The coordinator image: m2coord (the entrypoint) and m2ctl (for
# `kubectl exec ... -- m2ctl job ls` inside the cluster), both static Go
# binaries without cgo, on distroless static as uid 65532.
#
# Build from the repository root (tools/images/build.sh builds both images):
#
#   docker build -f tools/images/coordinator.Dockerfile -t m2coord:dev .
#
# Base images are pinned by tag and digest. To build from a mirror, or to
# move to a newer patch release, override the whole reference:
#
#   --build-arg GO_IMAGE=registry.example.com/golang:1.26.8-bookworm@sha256:...
#   --build-arg RUNTIME_IMAGE=registry.example.com/distroless/static-debian12:nonroot@sha256:...
#
# The Go image must be at least go.mod's go version: the official images set
# GOTOOLCHAIN=local and do not download a newer toolchain.

ARG GO_IMAGE=golang:1.26.8-bookworm@sha256:f4191582e1522dfc5980a6bdc0309a756f9697f3e7d0f199c7e26fc82ab324fd
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot@sha256:afa5c872c891853ca7fcf1f12c3edb23f7eeef36189728842dd51042ff57f7ab

FROM ${GO_IMAGE} AS build
WORKDIR /src
# The coordinator and m2ctl run without cgo (m2ctl's NVML part has a stub),
# so the binaries need no libc and run on distroless static.
ENV CGO_ENABLED=0 GOFLAGS=-buildvcs=false
COPY go.mod go.sum ./
# m2ctl reaches into every part of the tree (train, checkpoint, export);
# m2coord needs only coordinator/ and proto/.
COPY proto/ proto/
COPY coordinator/ coordinator/
COPY collective/ collective/
COPY model/ model/
COPY kernels/ kernels/
COPY worker/ worker/
COPY tools/m2ctl/ tools/m2ctl/
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    go build -trimpath -ldflags "-s -w" -o /out/bin/m2coord ./coordinator/m2coord && \
    go build -trimpath -ldflags "-s -w" -o /out/bin/m2ctl ./tools/m2ctl && \
    mkdir -p /out/var/lib/m2train

FROM ${RUNTIME_IMAGE} AS coordinator
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="m2coord" \
      org.opencontainers.image.description="m2train coordinator: the raft-replicated control plane that schedules Mamba-2 training jobs onto GPU workers" \
      org.opencontainers.image.source="https://github.com/m2train/m2train" \
      org.opencontainers.image.url="https://github.com/m2train/m2train/blob/main/docs/operators-guide.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
COPY --from=build /out/bin/m2coord /out/bin/m2ctl /usr/local/bin/
# The working directory, writable by uid 65532, holds ./m2coord-data/<id>
# when no --data-dir is given (docker run); the Helm chart mounts the raft
# volume here and passes --data-dir=/var/lib/m2train.
COPY --from=build --chown=65532:65532 /out/var/lib/m2train /var/lib/m2train
WORKDIR /var/lib/m2train
# Logs as JSON in containers; the API on every interface so that a
# published port reaches it (flags and M2_* variables set at run time win).
ENV M2_LOG_FORMAT=json M2_API_ADDR=0.0.0.0:7400
EXPOSE 7400 7401
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/m2coord"]
