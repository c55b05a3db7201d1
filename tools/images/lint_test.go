package images

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// This file holds the rules the project's Dockerfiles follow. Each rule
// reports every violation it finds with the file, the line and what to
// change; lint runs them all.

// repo is what the rules need to know about the repository the images are
// built from (the build context).
type repo struct {
	root      string   // absolute path of the repository root
	module    string   // module path from go.mod
	goVersion string   // go.mod's go directive
	ignore    []ignore // .dockerignore, in order
}

// loadRepo reads go.mod and .dockerignore at root.
func loadRepo(root string) (*repo, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(filepath.Join(abs, "go.mod"))
	if err != nil {
		return nil, err
	}
	r := &repo{root: abs}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "module":
			r.module = strings.Trim(f[1], `"`)
		case len(f) == 2 && f[0] == "go":
			r.goVersion = f[1]
		}
	}
	if r.module == "" || r.goVersion == "" {
		return nil, errors.New("go.mod: no module or go directive")
	}
	ig, err := os.ReadFile(filepath.Join(abs, ".dockerignore"))
	if err != nil {
		return nil, fmt.Errorf(".dockerignore: %w (the images rely on it to keep the build context small and free of secrets)", err)
	}
	if r.ignore, err = parseDockerignore(string(ig)); err != nil {
		return nil, fmt.Errorf(".dockerignore: %w", err)
	}
	return r, nil
}

// ignore is one .dockerignore pattern.
type ignore struct {
	text   string
	re     *regexp.Regexp
	negate bool
}

// parseDockerignore reads .dockerignore the way BuildKit does: one pattern
// a line, '#' comments, '!' for exceptions, paths relative to the context
// root, '*' and '?' within one path element, '**' across any number.
func parseDockerignore(src string) ([]ignore, error) {
	var out []ignore
	for i, line := range strings.Split(src, "\n") {
		t := strings.TrimSpace(line)
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		neg := strings.HasPrefix(t, "!")
		if neg {
			t = strings.TrimSpace(t[1:])
		}
		p := path.Clean(strings.TrimPrefix(t, "/"))
		re, err := ignoreRegexp(p)
		if err != nil {
			return nil, fmt.Errorf("line %d: %q: %w", i+1, line, err)
		}
		out = append(out, ignore{text: line, re: re, negate: neg})
	}
	return out, nil
}

func ignoreRegexp(p string) (*regexp.Regexp, error) {
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case strings.HasPrefix(p[i:], "**/"):
			b.WriteString("(.*/)?")
			i += 2
		case strings.HasPrefix(p[i:], "**"):
			b.WriteString(".*")
			i++
		case c == '*':
			b.WriteString("[^/]*")
		case c == '?':
			b.WriteString("[^/]")
		case c == '[':
			end := strings.IndexByte(p[i:], ']')
			if end < 0 {
				return nil, errors.New("unterminated [")
			}
			b.WriteString(p[i : i+end+1])
			i += end
		case c == '\\' && i+1 < len(p):
			b.WriteString(regexp.QuoteMeta(p[i+1 : i+2]))
			i++
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString("$")
	return regexp.Compile(b.String())
}

// excluded reports whether .dockerignore keeps the repository-relative
// path p (slash-separated) out of the build context: the last pattern that
// matches p or one of its parent directories decides.
func (r *repo) excluded(p string) bool {
	ex := false
	for _, ig := range r.ignore {
		for q := p; ; q = path.Dir(q) {
			if ig.re.MatchString(q) {
				ex = !ig.negate
				break
			}
			if !strings.Contains(q, "/") {
				break
			}
		}
	}
	return ex
}

// lintOptions selects the rules that need more than the Dockerfile.
type lintOptions struct {
	// requireDigest demands a digest on every base image, not only a tag.
	requireDigest bool
	// goList runs `go list` to check that every go build target is a main
	// package of this module and that the build context holds every file
	// it compiles.
	goList bool
}

// lint runs every rule on df and returns all violations.
func lint(df *dockerfile, r *repo, opt lintOptions) []error {
	var errs []error
	add := func(line int, format string, a ...any) {
		errs = append(errs, errAt(df.path, line, format, a...))
	}
	lintStages(df, add)
	lintBases(df, opt, add)
	for _, s := range df.stages {
		lintInstructions(df, s, r, add)
	}
	lintFinal(df, add)
	builds := goBuilds(df, add)
	for _, b := range builds {
		lintGoStage(df, b, r, add)
	}
	if opt.goList && len(builds) > 0 {
		lintGoContext(df, builds, r, add)
	}
	lintKernels(df, r, add)
	lintGlibc(df, builds, add)
	return errs
}

type addFunc func(line int, format string, a ...any)

// lintStages: a multi-stage build whose stages all have names.
func lintStages(df *dockerfile, add addFunc) {
	if len(df.stages) < 2 {
		add(df.stages[0].line, "one stage only: build in a named stage and copy the results into a small final stage")
	}
	for _, s := range df.stages {
		if s.name == "" {
			add(s.line, "stage %d has no name: write FROM IMAGE AS NAME", s.index)
		}
	}
}

// imageRef is a parsed image reference.
type imageRef struct {
	name, tag, digest string
}

func parseImageRef(ref string) imageRef {
	var r imageRef
	rest := ref
	if i := strings.Index(rest, "@"); i >= 0 {
		rest, r.digest = rest[:i], rest[i+1:]
	}
	slash := strings.LastIndex(rest, "/")
	if i := strings.LastIndex(rest, ":"); i > slash {
		rest, r.tag = rest[:i], rest[i+1:]
	}
	r.name = rest
	return r
}

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// lintBases: every base image is pinned by an explicit tag other than
// latest, and by a well-formed sha256 digest where one is given (or always,
// with requireDigest).
func lintBases(df *dockerfile, opt lintOptions, add addFunc) {
	for _, s := range df.stages {
		if s.parent != nil || s.base == "scratch" {
			continue
		}
		ref := parseImageRef(s.base)
		switch {
		case ref.tag == "":
			add(s.line, "base image %q has no tag: pin an exact version tag (and its digest)", s.base)
		case ref.tag == "latest":
			add(s.line, "base image %q uses the latest tag: pin an exact version tag (and its digest)", s.base)
		}
		switch {
		case ref.digest != "" && !digestRE.MatchString(ref.digest):
			add(s.line, "base image %q: digest %q is not sha256: followed by 64 lower-case hex digits", s.base, ref.digest)
		case ref.digest == "" && opt.requireDigest:
			add(s.line, "base image %q has no digest: append @sha256:... of that tag", s.base)
		}
		if strings.Contains(s.base, "$") {
			add(s.line, "base image %q still holds a variable after substitution", s.base)
		}
	}
}

// secretRE matches names of settings that hold credentials.
var secretRE = regexp.MustCompile(`(?i)(passw(or)?d|secret|token|credential|private[_-]?key|access[_-]?key|api[_-]?key)`)

// lintInstructions checks one stage's instructions: no ADD, COPY --from
// names an earlier stage, context COPYs name existing paths that
// .dockerignore lets through and keep the repository's layout, nothing that
// looks like a credential in ENV, ARG or LABEL, and no RUN on a base
// without a shell.
func lintInstructions(df *dockerfile, s *stage, r *repo, add addFunc) {
	workdir := inheritedWorkdir(s)
	shell := !strings.Contains(rootBase(s), "distroless")
	for _, in := range s.instrs[1:] {
		switch in.cmd {
		case "ADD":
			add(in.line, "ADD: use COPY (ADD fetches URLs and unpacks archives without a pinned checksum)")
		case "WORKDIR":
			w := in.args
			if !path.IsAbs(w) {
				w = path.Join(workdir, w)
			}
			workdir = path.Clean(w)
		case "RUN":
			if !shell && in.exec == nil {
				add(in.line, "RUN in the shell form on %s, which has no shell", rootBase(s))
			}
		case "ENV", "ARG", "LABEL":
			kvs, err := keyValues(in)
			if err != nil {
				add(in.line, "%v", err)
				continue
			}
			for _, kv := range kvs {
				if secretRE.MatchString(kv.key) && in.cmd != "LABEL" {
					add(in.line, "%s %s: credentials do not belong in an image; mount them at run time (a Kubernetes Secret)", in.cmd, kv.key)
				}
			}
		case "COPY":
			lintCopy(df, s, in, workdir, r, add)
		}
	}
}

// copySpec is a COPY's sources and destination.
type copySpec struct {
	srcs []string
	dest string
}

func parseCopy(in instruction) (copySpec, error) {
	words := in.exec
	if words == nil {
		var err error
		if words, err = shellWords(in.args); err != nil {
			return copySpec{}, err
		}
	}
	if len(words) < 2 {
		return copySpec{}, fmt.Errorf("COPY needs at least one source and a destination, got %q", in.args)
	}
	return copySpec{srcs: words[:len(words)-1], dest: words[len(words)-1]}, nil
}

func lintCopy(df *dockerfile, s *stage, in instruction, workdir string, r *repo, add addFunc) {
	cp, err := parseCopy(in)
	if err != nil {
		add(in.line, "%v", err)
		return
	}
	if from, ok := in.flags["from"]; ok {
		src := findStage(df, from)
		switch {
		case src == nil:
			add(in.line, "COPY --from=%s: no stage of that name (copy only from a named build stage)", from)
		case src.index >= s.index:
			add(in.line, "COPY --from=%s: that stage comes at or after this one (line %d)", from, src.line)
		}
		return
	}
	destAbs := cp.dest
	if !path.IsAbs(destAbs) {
		destAbs = path.Join(workdir, destAbs)
	}
	for _, src := range cp.srcs {
		rel := path.Clean(src)
		if strings.ContainsAny(rel, "*?[") {
			add(in.line, "COPY %s: name paths in the build context explicitly, not by pattern", src)
			continue
		}
		if rel == ".." || strings.HasPrefix(rel, "../") || path.IsAbs(rel) {
			add(in.line, "COPY %s: outside the build context (the repository root)", src)
			continue
		}
		st, err := os.Stat(filepath.Join(r.root, filepath.FromSlash(rel)))
		if err != nil {
			add(in.line, "COPY %s: no such file or directory in the repository", src)
			continue
		}
		if rel != "." && r.excluded(rel) {
			add(in.line, "COPY %s: .dockerignore leaves it out of the build context", src)
		}
		target := destAbs
		if !st.IsDir() && (strings.HasSuffix(cp.dest, "/") || len(cp.srcs) > 1) {
			target = path.Join(destAbs, path.Base(rel))
		}
		if want := path.Join(workdir, rel); path.Clean(target) != want {
			add(in.line, "COPY %s %s: lands at %s; keep the repository's layout under WORKDIR %s (want %s)", src, cp.dest, path.Clean(target), workdir, want)
		}
	}
}

func findStage(df *dockerfile, name string) *stage {
	for _, o := range df.stages {
		if o.name != "" && o.name == strings.ToLower(name) {
			return o
		}
	}
	return nil
}

// rootBase is the image a stage is ultimately built on.
func rootBase(s *stage) string {
	for s.parent != nil {
		s = s.parent
	}
	return s.base
}

// view is a stage's instructions after those of the stages it builds on,
// without their FROM lines.
func view(s *stage) []instruction {
	if s == nil {
		return nil
	}
	return append(view(s.parent), s.instrs[1:]...)
}

func inheritedWorkdir(s *stage) string {
	w := "/"
	for _, in := range view(s.parent) {
		if in.cmd == "WORKDIR" {
			w = chdir(w, in.args)
		}
	}
	return w
}

// requiredLabels are the OCI annotations every final image carries.
var requiredLabels = []string{
	"org.opencontainers.image.title",
	"org.opencontainers.image.description",
	"org.opencontainers.image.source",
	"org.opencontainers.image.version",
	"org.opencontainers.image.revision",
}

// lintFinal checks the stage that becomes the image: a numeric non-root
// USER, an exec-form ENTRYPOINT naming a file the stage copies in, an
// exec-form CMD if any, and the OCI labels.
func lintFinal(df *dockerfile, add addFunc) {
	f := df.stages[len(df.stages)-1]
	var user, entry *instruction
	labels := map[string]bool{}
	var copied []string
	for i, in := range f.instrs {
		switch in.cmd {
		case "USER":
			user = &f.instrs[i]
		case "ENTRYPOINT":
			entry = &f.instrs[i]
		case "CMD":
			if in.exec == nil {
				add(in.line, "CMD in the shell form: use the exec form [\"arg\", ...]")
			}
		case "LABEL":
			kvs, _ := keyValues(in) // malformed LABELs are reported by lintInstructions
			for _, kv := range kvs {
				labels[kv.key] = true
			}
		case "COPY":
			if cp, err := parseCopy(in); err == nil {
				for _, src := range cp.srcs {
					if strings.HasSuffix(cp.dest, "/") || len(cp.srcs) > 1 {
						copied = append(copied, path.Join(cp.dest, path.Base(src)))
					} else {
						copied = append(copied, path.Clean(cp.dest))
					}
				}
			}
		}
	}
	switch {
	case user == nil:
		add(f.line, "final stage %q sets no USER: add USER with a numeric non-root uid (e.g. 65532:65532)", f.name)
	default:
		uid, gid, hasGID := strings.Cut(user.args, ":")
		n, err := strconv.ParseUint(uid, 10, 32)
		switch {
		case err != nil:
			add(user.line, "USER %s: give a numeric uid (Kubernetes' runAsNonRoot cannot verify a user name)", user.args)
		case n == 0:
			add(user.line, "USER %s: the final stage must not run as root", user.args)
		}
		if hasGID {
			if _, err := strconv.ParseUint(gid, 10, 32); err != nil {
				add(user.line, "USER %s: give a numeric gid", user.args)
			}
		}
	}
	switch {
	case entry == nil:
		add(f.line, "final stage %q sets no ENTRYPOINT", f.name)
	case entry.exec == nil:
		add(entry.line, "ENTRYPOINT in the shell form: use the exec form [\"/path/to/binary\"] so that signals reach the process")
	case len(entry.exec) == 0 || !path.IsAbs(entry.exec[0]):
		add(entry.line, "ENTRYPOINT %q: name the binary by its absolute path", entry.args)
	case !slices.Contains(copied, entry.exec[0]):
		add(entry.line, "ENTRYPOINT %s: no COPY in the final stage puts a file there", entry.exec[0])
	}
	for _, l := range requiredLabels {
		if !labels[l] {
			add(f.line, "final stage %q lacks the label %s", f.name, l)
		}
	}
}

// goBuild is one `go build` found in a RUN.
type goBuild struct {
	stage   *stage
	line    int
	targets []string // ./dir forms
	cgo     string   // the effective CGO_ENABLED: "0" or "1"
	flags   map[string]string
	workdir string
}

// goValueFlags are the go build flags that take the next word as value.
var goValueFlags = map[string]bool{
	"o": true, "ldflags": true, "gcflags": true, "asmflags": true, "tags": true, "mod": true,
	"modfile": true, "p": true, "pkgdir": true, "buildmode": true, "compiler": true,
	"gccgoflags": true, "installsuffix": true, "overlay": true, "pgo": true, "toolexec": true,
	"C": true, "covermode": true, "coverpkg": true,
}

// goBuilds finds every `go build` in RUN instructions, with the CGO_ENABLED
// it runs under (the command's own assignment, else the stage's ENV or ARG,
// else the go command's default with a C compiler present: 1).
func goBuilds(df *dockerfile, add addFunc) []goBuild {
	var out []goBuild
	for _, s := range df.stages {
		env := map[string]string{}
		workdir := "/"
		own := map[int]bool{}
		for _, in := range s.instrs[1:] {
			own[in.line] = true
		}
		for _, in := range view(s) {
			switch in.cmd {
			case "ENV", "ARG":
				kvs, _ := keyValues(in)
				for _, kv := range kvs {
					if kv.set {
						env[kv.key] = kv.value
					}
				}
			case "WORKDIR":
				if path.IsAbs(in.args) {
					workdir = path.Clean(in.args)
				} else {
					workdir = path.Join(workdir, in.args)
				}
			case "RUN":
				if !own[in.line] {
					continue // reported where the ancestor stage is checked
				}
				cmds := [][]string{in.exec}
				if in.exec == nil {
					var err error
					if cmds, err = simpleCommands(in.args); err != nil {
						add(in.line, "RUN: %v", err)
						continue
					}
				}
				for _, c := range cmds {
					b, ok, err := parseGoBuild(c, env)
					if err != nil {
						add(in.line, "%v", err)
					}
					if ok {
						b.stage, b.line, b.workdir = s, in.line, workdir
						out = append(out, b)
					}
				}
			}
		}
	}
	return out
}

func parseGoBuild(words []string, env map[string]string) (goBuild, bool, error) {
	b := goBuild{flags: map[string]string{}, cgo: "1"}
	if v, ok := env["CGO_ENABLED"]; ok {
		b.cgo = v
	}
	for len(words) > 0 && strings.Contains(words[0], "=") && !strings.HasPrefix(words[0], "-") {
		k, v, _ := strings.Cut(words[0], "=")
		if k == "CGO_ENABLED" {
			b.cgo = v
		}
		words = words[1:]
	}
	if len(words) < 2 || words[0] != "go" || words[1] != "build" {
		return b, false, nil
	}
	args := words[2:]
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			b.targets = append(b.targets, a)
			continue
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !hasVal && goValueFlags[name] {
			if i+1 >= len(args) {
				return b, true, fmt.Errorf("go build: flag -%s needs a value", name)
			}
			val = args[i+1]
			i++
		}
		b.flags[name] = val
	}
	if len(b.targets) == 0 {
		return b, true, errors.New("go build: name the package to build (./path/to/main)")
	}
	if _, ok := b.flags["C"]; ok {
		return b, true, errors.New("go build -C: build from WORKDIR instead, with ./path targets")
	}
	return b, true, nil
}

var goTagRE = regexp.MustCompile(`^(\d+)\.(\d+)(?:\.(\d+))?(?:-|$)`)

// lintGoStage checks one go build: ./relative targets built with -trimpath
// on an official Go image at least as new as go.mod's go directive (those
// images set GOTOOLCHAIN=local and will not fetch a newer toolchain).
func lintGoStage(df *dockerfile, b goBuild, r *repo, add addFunc) {
	for _, t := range b.targets {
		if !strings.HasPrefix(t, "./") {
			add(b.line, "go build %s: name the package by its ./path from the repository root", t)
		}
	}
	if _, ok := b.flags["trimpath"]; !ok {
		add(b.line, "go build without -trimpath: the binary would carry the build machine's paths")
	}
	if b.cgo != "0" && b.cgo != "1" {
		add(b.line, "go build: CGO_ENABLED=%q, want 0 or 1", b.cgo)
	}
	ref := parseImageRef(rootBase(b.stage))
	if path.Base(ref.name) != "golang" {
		add(b.stage.line, "go build on %s: build on the official golang image, whose tag states the Go version", rootBase(b.stage))
		return
	}
	m := goTagRE.FindStringSubmatch(ref.tag)
	want := goTagRE.FindStringSubmatch(r.goVersion)
	if m == nil || want == nil {
		add(b.stage.line, "golang:%s: the tag does not start with a Go version (go.mod says %s)", ref.tag, r.goVersion)
		return
	}
	if compareVersions(m[1:], want[1:]) < 0 {
		add(b.stage.line, "golang:%s is older than go.mod's go %s", ref.tag, r.goVersion)
	}
}

func compareVersions(a, b []string) int {
	for i := range 3 {
		x, _ := strconv.Atoi(a[i])
		y, _ := strconv.Atoi(b[i])
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

// listedPackage is the part of `go list -json` the rules read.
type listedPackage struct {
	ImportPath string
	Name       string
	Dir        string
	DepOnly    bool
	Standard   bool
	Module     *struct{ Path string }
	GoFiles    []string
	CgoFiles   []string
	CFiles     []string
	CXXFiles   []string
	HFiles     []string
	SFiles     []string
	SysoFiles  []string
	EmbedFiles []string
	Error      *struct{ Err string }
}

// goListCache keeps go list's answers: the many cases of the tests list
// the same few packages, and each run costs a second or more on a busy
// machine.
var goListCache = struct {
	sync.Mutex
	m map[string][]listedPackage
}{m: map[string][]listedPackage{}}

// goList runs `go list -deps -json` on pkgs in the repository for linux/amd64
// with the given CGO_ENABLED.
func goList(r *repo, cgo string, pkgs []string) ([]listedPackage, error) {
	key := r.root + "\x00" + cgo + "\x00" + strings.Join(pkgs, "\x00")
	goListCache.Lock()
	defer goListCache.Unlock()
	if l, ok := goListCache.m[key]; ok {
		return l, nil
	}
	args := append([]string{"list", "-e", "-deps", "-json=ImportPath,Name,Dir,DepOnly,Standard,Module,GoFiles,CgoFiles,CFiles,CXXFiles,HFiles,SFiles,SysoFiles,EmbedFiles,Error"}, pkgs...)
	cmd := exec.Command("go", args...)
	cmd.Dir = r.root
	cmd.Env = append(os.Environ(), "CGO_ENABLED="+cgo, "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-mod=readonly")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	var list []listedPackage
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p listedPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			return nil, fmt.Errorf("go list output: %w", err)
		}
		list = append(list, p)
	}
	goListCache.m[key] = list
	return list, nil
}

// lintGoContext checks, with `go list`, that every go build target is a
// main package of this module and that every file the build compiles
// (and go.mod, go.sum) is copied into the stage from the build context.
func lintGoContext(df *dockerfile, builds []goBuild, r *repo, add addFunc) {
	for _, b := range builds {
		sources, ok := contextSources(b.stage, b.workdir)
		if !ok {
			add(b.line, "go build runs in WORKDIR %s, but the repository is not copied there", b.workdir)
			continue
		}
		for _, f := range []string{"go.mod", "go.sum"} {
			checkInContext(f, "the module", sources, b, r, add)
		}
		list, err := goList(r, b.cgo, b.targets)
		if err != nil {
			add(b.line, "%v", err)
			continue
		}
		for _, p := range list {
			if p.Standard {
				continue
			}
			if p.Error != nil {
				add(b.line, "go build: package %s: %s", p.ImportPath, p.Error.Err)
				continue
			}
			inModule := p.Module != nil && p.Module.Path == r.module
			if !p.DepOnly {
				switch {
				case !inModule:
					add(b.line, "go build %s: not a package of module %s", p.ImportPath, r.module)
				case p.Name != "main":
					add(b.line, "go build %s: package %s is not a main package", p.ImportPath, p.Name)
				}
			}
			if !inModule {
				continue // modules come from the proxy, not the context
			}
			var files []string
			for _, l := range [][]string{p.GoFiles, p.CgoFiles, p.CFiles, p.CXXFiles, p.HFiles, p.SFiles, p.SysoFiles, p.EmbedFiles} {
				files = append(files, l...)
			}
			for _, f := range files {
				rel, err := filepath.Rel(r.root, filepath.Join(p.Dir, f))
				if err != nil || strings.HasPrefix(rel, "..") {
					add(b.line, "package %s: %s is outside the repository", p.ImportPath, f)
					continue
				}
				if !checkInContext(filepath.ToSlash(rel), "package "+p.ImportPath, sources, b, r, add) {
					break // one report per package is enough
				}
			}
		}
	}
}

// contextSources are the repository paths COPYed from the build context
// into workdir of stage s (and the stages it builds on), or false when no
// copy targets workdir.
func contextSources(s *stage, workdir string) ([]string, bool) {
	var out []string
	w := "/"
	for _, in := range view(s) {
		switch in.cmd {
		case "WORKDIR":
			if path.IsAbs(in.args) {
				w = path.Clean(in.args)
			} else {
				w = path.Join(w, in.args)
			}
		case "COPY":
			if _, from := in.flags["from"]; from || w != workdir {
				continue
			}
			if cp, err := parseCopy(in); err == nil {
				for _, src := range cp.srcs {
					out = append(out, path.Clean(src))
				}
			}
		}
	}
	return out, len(out) > 0
}

func covered(p string, sources []string) bool {
	for _, s := range sources {
		if s == "." || p == s || strings.HasPrefix(p, s+"/") {
			return true
		}
	}
	return false
}

// checkInContext reports when the repository file p, needed by what, is
// not copied into the stage or is dropped by .dockerignore.
func checkInContext(p, what string, sources []string, b goBuild, r *repo, add addFunc) bool {
	switch {
	case !covered(p, sources):
		add(b.line, "%s needs %s, which no COPY into stage %q brings in", what, p, b.stage.name)
		return false
	case r.excluded(p):
		add(b.line, "%s needs %s, which .dockerignore leaves out of the build context", what, p)
		return false
	}
	return true
}

// lintKernels: a stage that runs kernels/build.sh has every CUDA source
// and header of kernels/ (and build.sh itself) in its context copies.
func lintKernels(df *dockerfile, r *repo, add addFunc) {
	for _, s := range df.stages {
		for _, in := range s.instrs[1:] {
			if in.cmd != "RUN" || !strings.Contains(in.args, "kernels/build.sh") {
				continue
			}
			sources, _ := contextSources(s, inheritedWorkdirAt(s, in.line))
			need := []string{"kernels/build.sh"}
			root := filepath.Join(r.root, "kernels")
			_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				rel, _ := filepath.Rel(r.root, p)
				rel = filepath.ToSlash(rel)
				if d.IsDir() && rel == "kernels/build" {
					return filepath.SkipDir // build output
				}
				switch path.Ext(rel) {
				case ".cu", ".cuh", ".h":
					need = append(need, rel)
				}
				return nil
			})
			for _, p := range need {
				switch {
				case !covered(p, sources):
					add(in.line, "kernels/build.sh needs %s, which no COPY into stage %q brings in", p, s.name)
				case r.excluded(p):
					add(in.line, "kernels/build.sh needs %s, which .dockerignore leaves out of the build context", p)
				}
			}
		}
	}
}

// chdir is the working directory after WORKDIR dir in working directory w.
func chdir(w, dir string) string {
	if path.IsAbs(dir) {
		return path.Clean(dir)
	}
	return path.Join(w, dir)
}

// inheritedWorkdirAt is the WORKDIR in effect at line of stage s.
func inheritedWorkdirAt(s *stage, line int) string {
	w := inheritedWorkdir(s)
	for _, in := range s.instrs[1:] {
		if in.line >= line {
			break
		}
		if in.cmd == "WORKDIR" {
			w = chdir(w, in.args)
		}
	}
	return w
}

// glibcOf is the glibc version of the distributions base images name in
// their tags.
var glibcOf = []struct {
	marker string
	glibc  [2]int
}{
	{"bullseye", [2]int{2, 31}},
	{"bookworm", [2]int{2, 36}},
	{"trixie", [2]int{2, 41}},
	{"ubuntu22.04", [2]int{2, 35}},
	{"jammy", [2]int{2, 35}},
	{"ubuntu24.04", [2]int{2, 39}},
	{"noble", [2]int{2, 39}},
}

func glibc(image string) ([2]int, bool) {
	ref := parseImageRef(image)
	tag := ref.tag
	if path.Base(ref.name) == "ubuntu" || path.Base(ref.name) == "debian" {
		tag = path.Base(ref.name) + tag // ubuntu:24.04, debian:bookworm-...
	}
	for _, g := range glibcOf {
		if strings.Contains(tag, g.marker) {
			return g.glibc, true
		}
	}
	return [2]int{}, false
}

// lintGlibc: a cgo binary links against its build image's glibc, so that
// glibc must not be newer than the final image's.
func lintGlibc(df *dockerfile, builds []goBuild, add addFunc) {
	final := rootBase(df.stages[len(df.stages)-1])
	for _, b := range builds {
		if b.cgo != "1" {
			continue
		}
		build := rootBase(b.stage)
		bg, ok1 := glibc(build)
		fg, ok2 := glibc(final)
		switch {
		case !ok1:
			add(b.line, "cgo build on %s: cannot tell its glibc; use a tag that names the distribution (e.g. -bookworm)", build)
		case !ok2:
			add(b.line, "cgo build for %s: cannot tell the final image's glibc from its tag", final)
		case bg[0] > fg[0] || bg[0] == fg[0] && bg[1] > fg[1]:
			add(b.line, "cgo build on %s (glibc %d.%d) would not run on %s (glibc %d.%d)", build, bg[0], bg[1], final, fg[0], fg[1])
		}
	}
}
