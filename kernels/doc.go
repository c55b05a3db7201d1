// Package kernels loads libm2kernels.so, the CUDA backend of m2train, and
// binds the functions of its one C header, m2kernels.h, without cgo (through
// github.com/ebitengine/purego), so every build of the module, CGO_ENABLED=0
// included, compiles this package; only running a kernel needs the library
// and a GPU.
//
// The package owns the loader (Open, Default), the runtime helpers of the
// header's common section (devices, device memory as Buffer, streams, events,
// f32/bf16 conversion) and the bindings of its ssd section (the chunked
// selective scan: SSDForward, SSDBackward). Bindings of the other sections
// live in their own packages (kernels/ops), which register with
// RegisterSymbols so that they are bound whenever a library is opened.
//
// One library is loaded per process. A Lib holds no CUDA context of its own:
// the CUDA runtime's primary context of the current device serves every host
// thread. Device pointers cross the boundary as uintptr; the package checks
// shapes and lengths in Go before crossing, and the library checks them again
// and names the offending argument (Error.Detail).
//
// The CUDA sources are in the subdirectories common/, ssd/ and ops/; build.sh
// compiles them into the library, and gpu-report.sh runs the GPU tests
// (files *_gpu_test.go, build tag gpu) and writes a report.
package kernels
