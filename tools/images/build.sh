#!/usr/bin/env bash
# Builds the coordinator and worker images from the repository root, and
# optionally pushes them.
#
#   tools/images/build.sh [--registry REG] [--tag TAG] [--push] [--platform P]
#                         [--only coordinator|worker] [--dry-run]
#
#   --registry REG   image name prefix (default ghcr.io/m2train, or $M2_IMAGE_REGISTRY);
#                    the images are REG/m2coord:TAG and REG/m2worker:TAG, the
#                    names the Helm chart's values.yaml uses
#   --tag TAG        image tag (default: `git describe --tags --always --dirty`,
#                    with a leading v removed)
#   --push           push both tags after building, and print their digests
#   --platform P     target platform (default: the Docker daemon's, e.g. linux/amd64)
#   --only NAME      build one image
#   --dry-run        print the docker commands instead of running them
#
# Environment: DOCKER (the docker client, default docker); M2K_JOBS (parallel
# nvcc compiles in the worker build, default all CPUs of the builder).
#
# Needs a Docker daemon with BuildKit (Docker 23 or later builds with it by
# default; `docker buildx` is used when installed) and access to the base
# images' registries (Docker Hub, gcr.io) and the Go module proxy.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
docker="${DOCKER:-docker}"
registry="${M2_IMAGE_REGISTRY:-ghcr.io/m2train}"
tag=""
push=0
platform=""
only=""
dry=0

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}
die() {
    echo "build.sh: $*" >&2
    exit 2
}

while (($#)); do
    case "$1" in
    --registry) [[ $# -ge 2 ]] || die "--registry needs a value"; registry="$2"; shift 2 ;;
    --registry=*) registry="${1#*=}"; shift ;;
    --tag) [[ $# -ge 2 ]] || die "--tag needs a value"; tag="$2"; shift 2 ;;
    --tag=*) tag="${1#*=}"; shift ;;
    --push) push=1; shift ;;
    --platform) [[ $# -ge 2 ]] || die "--platform needs a value"; platform="$2"; shift 2 ;;
    --platform=*) platform="${1#*=}"; shift ;;
    --only) [[ $# -ge 2 ]] || die "--only needs a value"; only="$2"; shift 2 ;;
    --only=*) only="${1#*=}"; shift ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done

case "$only" in
"") images=(coordinator worker) ;;
coordinator | worker) images=("$only") ;;
*) die "--only: $only, want coordinator or worker" ;;
esac
registry="${registry%/}"
[[ -n "$registry" ]] || die "--registry: empty"

revision="unknown"
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    revision="$(git -C "$root" rev-parse HEAD)"
    if [[ -z "$tag" ]]; then
        tag="$(git -C "$root" describe --tags --always --dirty)"
        tag="${tag#v}"
    fi
fi
[[ -n "$tag" ]] || die "not in a git checkout: give --tag"
# A Docker tag: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
if ! [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
    die "--tag: $tag is not a valid image tag (letters, digits, _ . -; at most 128; not starting with . or -)"
fi
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [[ -n "${SOURCE_DATE_EPOCH:-}" ]]; then
    created="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
fi

run() {
    if ((dry)); then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

if ((!dry)); then
    if ! command -v "$docker" >/dev/null 2>&1; then
        echo "build.sh: the docker client ($docker) is not installed or not on PATH" >&2
        exit 1
    fi
    if ! out="$("$docker" info --format '{{.ServerVersion}}' 2>&1)"; then
        echo "build.sh: no Docker daemon reachable through '$docker' (docker info failed):" >&2
        echo "$out" | sed '/^[[:space:]]*$/d; s/^/  /' >&2
        echo "build.sh: start Docker, or point DOCKER_HOST (or a docker context) at a daemon" >&2
        exit 1
    fi
fi

# buildx when installed, else docker build with BuildKit (the Dockerfiles
# use RUN --mount cache mounts, which the legacy builder lacks).
build=("$docker" build)
if ((!dry)) && "$docker" buildx version >/dev/null 2>&1; then
    build=("$docker" buildx build --load)
fi
export DOCKER_BUILDKIT=1

for image in "${images[@]}"; do
    case "$image" in
    coordinator) name=m2coord ;;
    worker) name=m2worker ;;
    esac
    ref="$registry/$name:$tag"
    args=(-f "$root/tools/images/$image.Dockerfile" -t "$ref"
        --build-arg "VERSION=$tag" --build-arg "REVISION=$revision" --build-arg "CREATED=$created")
    if [[ -n "$platform" ]]; then
        args+=(--platform "$platform")
    fi
    if [[ "$image" == worker && -n "${M2K_JOBS:-}" ]]; then
        args+=(--build-arg "M2K_JOBS=$M2K_JOBS")
    fi
    echo "build.sh: building $ref" >&2
    run "${build[@]}" "${args[@]}" "$root"
    if ((push)); then
        echo "build.sh: pushing $ref" >&2
        run "$docker" push "$ref"
        # The registry digest, for the chart's image.<name>.digest.
        run "$docker" image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$ref"
    fi
done
