package images

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const repoRoot = "../.."

func loadTestRepo(t *testing.T) *repo {
	t.Helper()
	r, err := loadRepo(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func parseFile(t *testing.T, name string) *dockerfile {
	t.Helper()
	src, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	df, err := parseDockerfile(name, string(src))
	if err != nil {
		t.Fatal(err)
	}
	return df
}

// TestDockerfilesFollowTheRules lints both Dockerfiles with every rule,
// `go list` included, and digests required on every base image.
func TestDockerfilesFollowTheRules(t *testing.T) {
	r := loadTestRepo(t)
	for _, name := range []string{"coordinator.Dockerfile", "worker.Dockerfile"} {
		t.Run(name, func(t *testing.T) {
			df := parseFile(t, name)
			for _, err := range lint(df, r, lintOptions{requireDigest: true, goList: true}) {
				t.Error(err)
			}
		})
	}
}

// finalStage returns the last stage and its instructions by command.
func finalStage(df *dockerfile) (*stage, map[string][]instruction) {
	f := df.stages[len(df.stages)-1]
	by := map[string][]instruction{}
	for _, in := range f.instrs {
		by[in.cmd] = append(by[in.cmd], in)
	}
	return f, by
}

func envOf(t *testing.T, ins []instruction) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, in := range ins {
		kvs, err := keyValues(in)
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range kvs {
			env[kv.key] = kv.value
		}
	}
	return env
}

// TestCoordinatorImage checks what is particular to the coordinator: both
// binaries built without cgo, a distroless static nonroot base, uid 65532.
func TestCoordinatorImage(t *testing.T) {
	df := parseFile(t, "coordinator.Dockerfile")
	got := buildCgo(t, df)
	want := map[string]string{"./coordinator/m2coord": "0", "./tools/m2ctl": "0"}
	if len(got) != len(want) || got["./coordinator/m2coord"] != "0" || got["./tools/m2ctl"] != "0" {
		t.Errorf("go builds (target: CGO_ENABLED) = %v, want %v", got, want)
	}
	f, by := finalStage(df)
	if ref := parseImageRef(f.base); ref.name != "gcr.io/distroless/static-debian12" || ref.tag != "nonroot" {
		t.Errorf("final base = %s, want gcr.io/distroless/static-debian12:nonroot", f.base)
	}
	if u := by["USER"]; len(u) != 1 || u[0].args != "65532:65532" {
		t.Errorf("USER = %v, want 65532:65532", u)
	}
	if e := by["ENTRYPOINT"]; len(e) != 1 || !slices.Equal(e[0].exec, []string{"/usr/local/bin/m2coord"}) {
		t.Errorf("ENTRYPOINT = %v, want [/usr/local/bin/m2coord]", e)
	}
}

// TestWorkerImage checks what is particular to the worker: matching CUDA
// devel and runtime images on Ubuntu 24.04, m2worker built with cgo, the
// kernel library where M2K_LIB says and next to the binary, the NVIDIA
// runtime's variables, uid 65532.
func TestWorkerImage(t *testing.T) {
	df := parseFile(t, "worker.Dockerfile")
	st := map[string]*stage{}
	for _, s := range df.stages {
		st[s.name] = s
	}
	k, ok := st["kernels"]
	if !ok {
		t.Fatal("no kernels stage")
	}
	f, by := finalStage(df)
	devel, runtime := parseImageRef(k.base), parseImageRef(f.base)
	if devel.name != "nvidia/cuda" || runtime.name != "nvidia/cuda" {
		t.Fatalf("CUDA images = %s, %s; want nvidia/cuda for both", k.base, f.base)
	}
	dv, dflavour, _ := strings.Cut(devel.tag, "-")
	rv, rflavour, _ := strings.Cut(runtime.tag, "-")
	if dv != rv || !strings.HasPrefix(dv, "13.0.") {
		t.Errorf("CUDA versions: devel %s, runtime %s; want the same 13.0.x", dv, rv)
	}
	if dflavour != "devel-ubuntu24.04" || rflavour != "runtime-ubuntu24.04" {
		t.Errorf("CUDA flavours %q, %q; want devel-ubuntu24.04 and runtime-ubuntu24.04", dflavour, rflavour)
	}

	cgo := buildCgo(t, df)
	if cgo["./worker/m2worker"] != "1" {
		t.Errorf("./worker/m2worker built with CGO_ENABLED=%q, want 1 (go-nvml needs cgo)", cgo["./worker/m2worker"])
	}

	env := envOf(t, by["ENV"])
	lib := env["M2K_LIB"]
	if filepath.Base(lib) != "libm2kernels.so" {
		t.Fatalf("M2K_LIB = %q, want a path to libm2kernels.so", lib)
	}
	entry := by["ENTRYPOINT"]
	if len(entry) != 1 || len(entry[0].exec) != 1 || filepath.Base(entry[0].exec[0]) != "m2worker" {
		t.Fatalf("ENTRYPOINT = %v, want [.../m2worker]", entry)
	}
	if filepath.Dir(lib) != filepath.Dir(entry[0].exec[0]) {
		t.Errorf("M2K_LIB %s is not next to %s, where the worker looks without M2K_LIB", lib, entry[0].exec[0])
	}
	var libCopied bool
	for _, in := range by["COPY"] {
		cp, err := parseCopy(in)
		if err != nil {
			t.Fatal(err)
		}
		if in.flags["from"] == "kernels" && cp.dest == lib {
			libCopied = true
		}
	}
	if !libCopied {
		t.Errorf("no COPY --from=kernels puts libm2kernels.so at M2K_LIB (%s)", lib)
	}
	if got := env["NVIDIA_DRIVER_CAPABILITIES"]; got != "compute,utility" {
		t.Errorf("NVIDIA_DRIVER_CAPABILITIES = %q, want compute,utility", got)
	}
	if _, ok := env["NVIDIA_VISIBLE_DEVICES"]; !ok {
		t.Error("NVIDIA_VISIBLE_DEVICES is not set")
	}
	if u := by["USER"]; len(u) != 1 || u[0].args != "65532:65532" {
		t.Errorf("USER = %v, want 65532:65532", u)
	}
}

// TestKernelsLinkWhatTheRuntimeImageHas ties the worker image to
// kernels/build.sh: the libraries the link step names are the ones the
// image's check step expects from the CUDA runtime image.
func TestKernelsLinkWhatTheRuntimeImageHas(t *testing.T) {
	src, err := os.ReadFile(filepath.Join(repoRoot, "kernels", "build.sh"))
	if err != nil {
		t.Fatal(err)
	}
	var link string
	for _, l := range strings.Split(string(src), "\n") {
		if strings.Contains(l, "-shared") {
			link = l
		}
	}
	if link == "" {
		t.Fatal("kernels/build.sh: no -shared link line")
	}
	var libs []string
	for _, w := range strings.Fields(link) {
		if strings.HasPrefix(w, "-l") {
			libs = append(libs, w[2:])
		}
	}
	// The CUDA runtime image carries cuBLAS and cuBLASLt (the libcublas
	// package holds both); anything else needs a change to worker.Dockerfile.
	for _, l := range libs {
		if l != "cublas" && l != "cublasLt" {
			t.Errorf("kernels/build.sh links -l%s; check that the CUDA runtime image has it and update this test", l)
		}
	}
	if len(libs) == 0 {
		t.Error("kernels/build.sh links no CUDA library; the expectations of worker.Dockerfile are out of date")
	}
}

// lintSnippet parses src and runs every rule but go list.
func lintSnippet(t *testing.T, r *repo, src string) []error {
	t.Helper()
	df, err := parseDockerfile("snippet.Dockerfile", src)
	if err != nil {
		return []error{err}
	}
	return lint(df, r, lintOptions{requireDigest: false, goList: true})
}

const (
	goImg   = "golang:1.26.8-bookworm@sha256:f4191582e1522dfc5980a6bdc0309a756f9697f3e7d0f199c7e26fc82ab324fd"
	baseImg = "gcr.io/distroless/static-debian12:nonroot"
)

// good is a small Dockerfile that passes every rule; the negative cases
// below change one thing in it.
const good = `ARG GO_IMAGE=` + goImg + `
FROM ${GO_IMAGE} AS build
WORKDIR /src
ENV CGO_ENABLED=0
COPY go.mod go.sum ./
COPY proto/ proto/
COPY coordinator/ coordinator/
RUN go build -trimpath -o /out/m2coord ./coordinator/m2coord

FROM ` + baseImg + ` AS final
LABEL org.opencontainers.image.title=t \
      org.opencontainers.image.description=d \
      org.opencontainers.image.source=s \
      org.opencontainers.image.version=v \
      org.opencontainers.image.revision=r
COPY --from=build /out/m2coord /usr/local/bin/m2coord
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/m2coord"]
`

func TestGoodSnippetPasses(t *testing.T) {
	r := loadTestRepo(t)
	for _, err := range lintSnippet(t, r, good) {
		t.Error(err)
	}
}

// edit returns good with each old string of the pairs replaced by its new
// one.
func edit(t *testing.T, pairs ...string) string {
	t.Helper()
	src := good
	for i := 0; i+1 < len(pairs); i += 2 {
		if !strings.Contains(src, pairs[i]) {
			t.Fatalf("snippet lacks %q", pairs[i])
		}
		src = strings.Replace(src, pairs[i], pairs[i+1], 1)
	}
	return src
}

// TestRulesCatchViolations: each case breaks one rule and must be reported
// with a message holding want.
func TestRulesCatchViolations(t *testing.T) {
	r := loadTestRepo(t)
	replace := func(old, new string) string { return edit(t, old, new) }
	cases := []struct {
		name, src, want string
	}{
		{"no tag", replace(baseImg, "gcr.io/distroless/static-debian12"), "has no tag"},
		{"latest", replace(baseImg, "gcr.io/distroless/static-debian12:latest"), "latest tag"},
		{"short digest", replace(baseImg, baseImg+"@sha256:abc123"), "64 lower-case hex"},
		{"upper-case digest", replace(baseImg, baseImg+"@sha256:"+strings.Repeat("AB", 32)), "64 lower-case hex"},
		{"other algorithm", replace(baseImg, baseImg+"@sha512:"+strings.Repeat("ab", 32)), "is not sha256:"},
		{"registry port is not a tag", replace(baseImg, "registry.example.com:5000/distroless/static"), "has no tag"},
		{"ARG without default", replace("ARG GO_IMAGE="+goImg, "ARG GO_IMAGE"), "ARG GO_IMAGE has no default"},
		{"undeclared ARG", replace("FROM ${GO_IMAGE}", "FROM ${GO_BUILDER}"), "not declared"},
		{"single stage", "FROM " + baseImg + " AS final\nUSER 65532\nENTRYPOINT [\"/x\"]\n", "one stage only"},
		{"unnamed stage", replace("FROM "+baseImg+" AS final", "FROM "+baseImg), "has no name"},
		{"COPY from unknown stage", replace("--from=build", "--from=builder"), "no stage of that name"},
		{"COPY from later stage", replace("COPY go.mod go.sum ./", "COPY --from=final /x /x\nCOPY go.mod go.sum ./"), "at or after this one"},
		{"COPY from an image", replace("--from=build", "--from=alpine:3.20"), "no stage of that name"},
		{"no USER", replace("USER 65532:65532\n", ""), "sets no USER"},
		{"root USER", replace("USER 65532:65532", "USER 0"), "must not run as root"},
		{"named USER", replace("USER 65532:65532", "USER nonroot"), "numeric uid"},
		{"named group", replace("USER 65532:65532", "USER 65532:nonroot"), "numeric gid"},
		{"shell ENTRYPOINT", replace(`ENTRYPOINT ["/usr/local/bin/m2coord"]`, "ENTRYPOINT /usr/local/bin/m2coord"), "shell form"},
		{"no ENTRYPOINT", replace(`ENTRYPOINT ["/usr/local/bin/m2coord"]`, ""), "sets no ENTRYPOINT"},
		{"ENTRYPOINT not copied", replace(`ENTRYPOINT ["/usr/local/bin/m2coord"]`, `ENTRYPOINT ["/usr/local/bin/m2worker"]`), "no COPY in the final stage puts a file there"},
		{"shell CMD", replace("USER 65532:65532", "USER 65532:65532\nCMD --help"), "CMD in the shell form"},
		{"missing label", replace("org.opencontainers.image.revision=r", "org.example.revision=r"), "lacks the label org.opencontainers.image.revision"},
		{"COPY of a missing path", replace("COPY proto/ proto/", "COPY protos/ protos/"), "no such file or directory"},
		{"COPY moves the tree", replace("COPY coordinator/ coordinator/", "COPY coordinator/ ./"), "keep the repository's layout"},
		{"COPY by pattern", replace("COPY proto/ proto/", "COPY pro*/ proto/"), "not by pattern"},
		{"COPY outside the context", replace("COPY proto/ proto/", "COPY ../x x"), "outside the build context"},
		{"COPY of an ignored path", replace("COPY proto/ proto/", "COPY proto/ proto/\nCOPY docs/ docs/"), ".dockerignore leaves it out"},
		{"ADD", replace("COPY proto/ proto/", "ADD proto/ proto/"), "ADD: use COPY"},
		{"secret ENV", replace("ENV CGO_ENABLED=0", "ENV CGO_ENABLED=0 AWS_SECRET_ACCESS_KEY=abc"), "credentials do not belong"},
		{"secret ARG", replace("WORKDIR /src", "WORKDIR /src\nARG M2_TOKEN"), "credentials do not belong"},
		{"RUN on distroless", replace("USER 65532:65532", "RUN mkdir /data\nUSER 65532:65532"), "has no shell"},
		{"not a main package", replace("./coordinator/m2coord", "./coordinator/client"), "is not a main package"},
		{"no such package", replace("./coordinator/m2coord", "./coordinator/nosuch"), "package ./coordinator/nosuch"},
		{"import path target", replace("./coordinator/m2coord", "github.com/m2train/m2train/coordinator/m2coord"), "by its ./path"},
		{"no -trimpath", replace("go build -trimpath", "go build"), "without -trimpath"},
		{"no package", replace("-o /out/m2coord ./coordinator/m2coord", "-o /out/m2coord"), "name the package"},
		{"source not copied", replace("COPY proto/ proto/\n", ""), "which no COPY into stage \"build\" brings in"},
		{"go.sum not copied", replace("COPY go.mod go.sum ./", "COPY go.mod ./"), "needs go.sum"},
		{"build elsewhere", replace("RUN go build", "WORKDIR /elsewhere\nRUN go build"), "the repository is not copied there"},
		{"old Go", replace(goImg, "golang:1.25.3-bookworm"), "older than go.mod"},
		{"not a Go image", replace(goImg, "debian:bookworm-20260901"), "official golang image"},
		{"cgo glibc too new", edit(t, "ENV CGO_ENABLED=0", "ENV CGO_ENABLED=1", goImg, "golang:1.26.8-trixie", baseImg, "nvidia/cuda:13.0.2-runtime-ubuntu24.04"), "glibc 2.41) would not run on"},
		{"cgo on undated Go image", edit(t, "ENV CGO_ENABLED=0", "ENV CGO_ENABLED=1", goImg, "golang:1.26.8", baseImg, "nvidia/cuda:13.0.2-runtime-ubuntu24.04"), "cannot tell its glibc"},
		{"inline CGO on unknown distro", replace("RUN go build", "RUN CGO_ENABLED=1 go build"), "cannot tell the final image's glibc"},
		{"heredoc", replace("RUN go build", "RUN <<EOF\necho hi\nEOF\nRUN go build"), "heredocs are not supported"},
		{"continuation at EOF", good + "RUN echo \\\n", "runs past the end of the file"},
		{"instruction before FROM", "WORKDIR /x\n" + good, "before the first FROM"},
		{"unknown instruction", replace("WORKDIR /src", "WORKDIRR /src"), "unknown instruction"},
		{"unknown directive", "# frobnicate=yes\n" + good, "unknown parser directive"},
		{"duplicate stage name", replace("AS final", "AS build"), "already used"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			errs := lintSnippet(t, r, c.src)
			for _, err := range errs {
				if strings.Contains(err.Error(), c.want) {
					return
				}
			}
			t.Errorf("no violation holding %q; got %d:", c.want, len(errs))
			for _, err := range errs {
				t.Log(err)
			}
		})
	}
}

// TestKernelSourcesMustBeCopied: a stage that runs kernels/build.sh without
// one of the source directories is reported.
func TestKernelSourcesMustBeCopied(t *testing.T) {
	r := loadTestRepo(t)
	src := `FROM nvidia/cuda:13.0.2-devel-ubuntu24.04 AS kernels
WORKDIR /src
COPY kernels/build.sh kernels/m2kernels.h kernels/
COPY kernels/common/ kernels/common/
COPY kernels/ops/ kernels/ops/
RUN bash kernels/build.sh /out

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS final
COPY --from=kernels /out/libm2kernels.so /opt/lib/libm2kernels.so
USER 65532
ENTRYPOINT ["/opt/lib/libm2kernels.so"]
`
	var found bool
	for _, err := range lintSnippet(t, r, src) {
		if strings.Contains(err.Error(), "kernels/build.sh needs kernels/ssd/") {
			found = true
		}
	}
	if !found {
		t.Error("a kernels stage without kernels/ssd/ was not reported")
	}
	// With the directory it passes that rule.
	fixed := strings.Replace(src, "COPY kernels/ops/", "COPY kernels/ssd/ kernels/ssd/\nCOPY kernels/ops/", 1)
	for _, err := range lintSnippet(t, r, fixed) {
		if strings.Contains(err.Error(), "kernels/build.sh needs") {
			t.Error(err)
		}
	}
}

func TestParser(t *testing.T) {
	src := "# syntax=docker/dockerfile:1.7\n" +
		"# an ordinary comment\n" +
		"ARG A=alpine:3.20\n" +
		"from ${A} as First\n" +
		"RUN --mount=type=cache,target=/a --mount=type=cache,target=/b \\\n" +
		"    # a comment inside the continuation\n" +
		"\n" +
		"    echo one && \\\n" +
		"    echo 'two  three'\n" +
		"ENV K=V L=\"x y\"\n" +
		"ENV LEGACY value with spaces\n" +
		"FROM first AS second\n" +
		`ENTRYPOINT ["/bin/sh", "-c"]` + "\n" +
		"CMD [not json\n"
	df, err := parseDockerfile("t", src)
	if err != nil {
		t.Fatal(err)
	}
	if df.directives["syntax"] != "docker/dockerfile:1.7" {
		t.Errorf("directives = %v", df.directives)
	}
	if len(df.stages) != 2 {
		t.Fatalf("%d stages, want 2", len(df.stages))
	}
	s0, s1 := df.stages[0], df.stages[1]
	if s0.name != "first" || s0.base != "alpine:3.20" || s0.line != 4 {
		t.Errorf("stage 0 = %q on %q at line %d", s0.name, s0.base, s0.line)
	}
	if s1.parent != s0 || s1.name != "second" {
		t.Errorf("stage 1: parent %v, name %q", s1.parent, s1.name)
	}
	run := s0.instrs[1]
	if run.cmd != "RUN" || run.line != 5 {
		t.Fatalf("instr = %s at %d", run.cmd, run.line)
	}
	if run.flags["mount"] != "type=cache,target=/a\ntype=cache,target=/b" {
		t.Errorf("mount flags = %q", run.flags["mount"])
	}
	cmds, err := simpleCommands(run.args)
	if err != nil {
		t.Fatal(err)
	}
	if len(cmds) != 2 || !slices.Equal(cmds[1], []string{"echo", "two  three"}) {
		t.Errorf("commands = %q", cmds)
	}
	env := envOf(t, s0.instrs[2:4])
	if env["K"] != "V" || env["L"] != "x y" || env["LEGACY"] != "value with spaces" {
		t.Errorf("env = %q", env)
	}
	if e := s1.instrs[1]; !slices.Equal(e.exec, []string{"/bin/sh", "-c"}) {
		t.Errorf("exec = %q", e.exec)
	}
	if c := s1.instrs[2]; c.exec != nil || c.args != "[not json" {
		t.Errorf("invalid JSON should be the shell form: exec %q args %q", c.exec, c.args)
	}
}

func TestParserEscapeDirective(t *testing.T) {
	df, err := parseDockerfile("t", "# escape=`\nFROM a:1 AS x\nRUN echo a `\n    b\n")
	if err != nil {
		t.Fatal(err)
	}
	if got := df.stages[0].instrs[1].args; got != "echo a      b" {
		t.Errorf("args = %q", got)
	}
}

func TestShellWords(t *testing.T) {
	cases := []struct {
		in   string
		want []string
	}{
		{`a "b c" 'd e'`, []string{"a", "b c", "d e"}},
		{`go build -ldflags "-s -w" -o x ./y&&echo ok`, []string{"go", "build", "-ldflags", "-s -w", "-o", "x", "./y", "&&", "echo", "ok"}},
		{`a\ b "q\"x" c;d|e`, []string{"a b", `q"x`, "c", ";", "d", "|", "e"}},
		{`x # comment`, []string{"x"}},
	}
	for _, c := range cases {
		got, err := shellWords(c.in)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("shellWords(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	for _, bad := range []string{`"open`, `'open`} {
		if _, err := shellWords(bad); err == nil {
			t.Errorf("shellWords(%q): no error", bad)
		}
	}
}

func TestDockerignoreMatcher(t *testing.T) {
	ig, err := parseDockerignore("*\n!src/\n!tools/one/\n**/*_test.go\n**/testdata/\n/build/out\n# c\n")
	if err != nil {
		t.Fatal(err)
	}
	r := &repo{ignore: ig}
	for p, want := range map[string]bool{
		"README.md":             true,
		"src":                   false,
		"src/a.go":              false,
		"src/a_test.go":         true,
		"src/x/testdata/f":      true,
		"tools/one/main.go":     false,
		"tools/two/main.go":     true,
		"build/out":             true,
		"srcx/a.go":             true,
		"tools/one/sub/deep.go": false,
	} {
		if got := r.excluded(p); got != want {
			t.Errorf("excluded(%q) = %v, want %v", p, got, want)
		}
	}
}

func TestImageRef(t *testing.T) {
	cases := map[string]imageRef{
		"golang:1.26.8-bookworm@sha256:ab": {name: "golang", tag: "1.26.8-bookworm", digest: "sha256:ab"},
		"registry:5000/a/b":                {name: "registry:5000/a/b"},
		"registry:5000/a/b:v1":             {name: "registry:5000/a/b", tag: "v1"},
		"a@sha256:cd":                      {name: "a", digest: "sha256:cd"},
	}
	for in, want := range cases {
		if got := parseImageRef(in); got != want {
			t.Errorf("parseImageRef(%q) = %+v, want %+v", in, got, want)
		}
	}
}

// buildCgo maps every package that df's RUN instructions go build to the
// CGO_ENABLED it builds under (goBuilds), failing the test on a build
// command it cannot read.
func buildCgo(t *testing.T, df *dockerfile) map[string]string {
	t.Helper()
	var errs []error
	builds := goBuilds(df, func(line int, format string, a ...any) {
		errs = append(errs, errAt(df.path, line, format, a...))
	})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	cgo := map[string]string{}
	for _, b := range builds {
		for _, target := range b.targets {
			cgo[target] = b.cgo
		}
	}
	return cgo
}
