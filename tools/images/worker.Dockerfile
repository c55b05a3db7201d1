# The worker image: m2worker (the entrypoint), m2ctl (`m2ctl gpus` checks
# NVML and the kernel library inside a worker pod) and libm2kernels.so, the
# CUDA kernels, on the CUDA runtime image (cudart, cuBLAS, cuBLASLt) as uid
# 65532.
#
# Build from the repository root (tools/images/build.sh builds both images):
#
#   docker build -f tools/images/worker.Dockerfile -t m2worker:dev .
#
# Three stages: the kernels are compiled with nvcc on the CUDA devel image,
# the Go binaries with cgo (go-nvml) on the Go image, and both are copied
# into the runtime image. The two CUDA images must carry the same CUDA
# version, and the Go image's glibc (Debian bookworm: 2.36) must not be
# newer than the runtime image's (Ubuntu 24.04: 2.39). Base images are
# pinned by tag and digest; override a whole reference to use a mirror:
#
#   --build-arg CUDA_DEVEL_IMAGE=registry.example.com/nvidia/cuda:13.0.2-devel-ubuntu24.04@sha256:...
#   --build-arg CUDA_RUNTIME_IMAGE=registry.example.com/nvidia/cuda:13.0.2-runtime-ubuntu24.04@sha256:...
#   --build-arg GO_IMAGE=registry.example.com/golang:1.26.8-bookworm@sha256:...
#
# M2K_JOBS (default: all CPUs) bounds the parallel nvcc compiles, each of
# which can take several GB of memory.

ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04@sha256:5dc1bca23d05bd37b011be68ec470c03b403a5da07ec3a86e41af9470e9d0cc6
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04@sha256:6a0e31b59e70890446f2c17356d6efc0d54260090a8c63d6ca7c2ad049db95d2
ARG GO_IMAGE=golang:1.26.8-bookworm@sha256:f4191582e1522dfc5980a6bdc0309a756f9697f3e7d0f199c7e26fc82ab324fd

# libm2kernels.so: sm_90a code plus compute_90 PTX, linked against
# cuBLASLt and cuBLAS (kernels/build.sh).
FROM ${CUDA_DEVEL_IMAGE} AS kernels
WORKDIR /src
COPY kernels/build.sh kernels/m2kernels.h kernels/
COPY kernels/common/ kernels/common/
COPY kernels/ssd/ kernels/ssd/
COPY kernels/ops/ kernels/ops/
ARG M2K_JOBS=
RUN M2K_JOBS="${M2K_JOBS:-$(nproc)}" bash kernels/build.sh /out/kernels

# m2worker and m2ctl with cgo: go-nvml reads the GPUs through NVML, which
# the NVIDIA container runtime mounts into the pod (the "utility"
# capability). The kernel library is not linked: it is opened at run time.
FROM ${GO_IMAGE} AS gobuild
WORKDIR /src
# NVML marks some of the functions go-nvml wraps deprecated; the warnings
# are noise.
ENV CGO_ENABLED=1 CGO_CFLAGS="-O2 -g -Wno-deprecated-declarations" GOFLAGS=-buildvcs=false
COPY go.mod go.sum ./
COPY proto/ proto/
COPY coordinator/ coordinator/
COPY collective/ collective/
COPY model/ model/
COPY kernels/ kernels/
COPY worker/ worker/
COPY tools/m2ctl/ tools/m2ctl/
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    go build -trimpath -ldflags "-s -w" -o /out/bin/m2worker ./worker/m2worker && \
    go build -trimpath -ldflags "-s -w" -o /out/bin/m2ctl ./tools/m2ctl

FROM ${CUDA_RUNTIME_IMAGE} AS worker
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="m2worker" \
      org.opencontainers.image.description="m2train worker: trains ranks of Mamba-2 jobs on one GPU with the CUDA kernels (or on the CPU)" \
      org.opencontainers.image.source="https://github.com/m2train/m2train" \
      org.opencontainers.image.url="https://github.com/m2train/m2train/blob/main/docs/operators-guide.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
# The kernel library sits next to the binaries, where the worker looks
# for it; M2K_LIB names it as well, for m2ctl and for clarity.
COPY --from=kernels /out/kernels/libm2kernels.so /opt/m2train/bin/libm2kernels.so
COPY --from=gobuild /out/bin/m2worker /out/bin/m2ctl /opt/m2train/bin/
# One step: the user, the cache directory, and a check that every library
# the binaries and the kernel library link against is in the image (cuBLAS
# and cuBLASLt come with the runtime image; libcuda and NVML come from the
# driver at run time) and that TLS to S3 has a CA bundle.
RUN set -eu; \
    groupadd --gid 65532 m2train; \
    useradd --uid 65532 --gid 65532 --no-create-home --home-dir /var/cache/m2train --shell /usr/sbin/nologin m2train; \
    mkdir -p /var/cache/m2train; \
    chown 65532:65532 /var/cache/m2train; \
    for f in /opt/m2train/bin/libm2kernels.so /opt/m2train/bin/m2worker /opt/m2train/bin/m2ctl; do \
        missing="$(ldd "$f" | grep 'not found' || true)"; \
        if [ -n "$missing" ]; then echo "$f: unresolved libraries: $missing" >&2; exit 1; fi; \
    done; \
    test -s /etc/ssl/certs/ca-certificates.crt || { echo "no CA bundle at /etc/ssl/certs/ca-certificates.crt" >&2; exit 1; }
ENV PATH=/opt/m2train/bin:${PATH} \
    M2K_LIB=/opt/m2train/bin/libm2kernels.so \
    M2_CACHE_DIR=/var/cache/m2train \
    M2_LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/cache/m2train
USER 65532:65532
ENTRYPOINT ["/opt/m2train/bin/m2worker"]
