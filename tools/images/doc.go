// Package images holds the container images of m2train: the coordinator
// (coordinator.Dockerfile: m2coord and m2ctl on a distroless static base)
// and the worker (worker.Dockerfile: m2worker, m2ctl and libm2kernels.so on
// the CUDA runtime image), and build.sh, which builds and optionally pushes
// both from the repository root.
//
// The package has no Go API. Its tests parse both Dockerfiles with a small
// parser of their own and hold them to the project's rules: pinned base
// images, named stages, a numeric non-root user, exec-form entrypoints, and
// a build context (COPY sources and .dockerignore) that holds every file
// the Go and CUDA builds inside the images read. Other tests keep
// docs/operators-guide.md, which tells platform teams how to run the images
// with the Helm chart, true to the code: the m2ctl commands and flags, the
// chart values, the job spec and the links it shows must exist.
package images
