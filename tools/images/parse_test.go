package images

import (
	"encoding/json"
	"fmt"
	"strings"
)

// This file is a small Dockerfile parser: enough of the Dockerfile syntax
// to lint the project's own files (instructions, parser directives,
// comments, line continuations, exec and shell forms, flags, build stages,
// ARG substitution in FROM). What it does not understand (heredocs, an
// unknown parser directive) is an error rather than a guess.

// instruction is one Dockerfile instruction, its continuation lines joined.
type instruction struct {
	line  int               // 1-based line of its first physical line
	cmd   string            // upper case: FROM, RUN, COPY, ...
	flags map[string]string // leading --name[=value] options; a bare --name maps to ""
	args  string            // the rest after the flags, trimmed
	exec  []string          // the JSON array of an exec-form argument; nil for the shell form
}

// stage is one build stage: a FROM and the instructions up to the next one.
type stage struct {
	index  int
	line   int    // line of its FROM
	name   string // the AS name, lower case; "" when the stage has none
	base   string // the FROM image after global ARG substitution
	parent *stage // the earlier stage the FROM names, or nil for an image
	instrs []instruction
}

// dockerfile is a parsed Dockerfile.
type dockerfile struct {
	path       string
	directives map[string]string // parser directives (syntax, escape, check), lower-case keys
	globalArgs map[string]string // ARGs before the first FROM and their defaults
	globalDecl map[string]bool   // declared global ARGs, with or without a default
	stages     []*stage
}

// posError is a problem found at a line of a file.
type posError struct {
	path string
	line int
	msg  string
}

func (e *posError) Error() string {
	if e.line > 0 {
		return fmt.Sprintf("%s:%d: %s", e.path, e.line, e.msg)
	}
	return fmt.Sprintf("%s: %s", e.path, e.msg)
}

func errAt(path string, line int, format string, a ...any) error {
	return &posError{path: path, line: line, msg: fmt.Sprintf(format, a...)}
}

// knownDirectives are the parser directives BuildKit accepts.
var knownDirectives = map[string]bool{"syntax": true, "escape": true, "check": true}

// parseDockerfile parses src, naming path in its errors.
func parseDockerfile(path string, src string) (*dockerfile, error) {
	df := &dockerfile{
		path:       path,
		directives: map[string]string{},
		globalArgs: map[string]string{},
		globalDecl: map[string]bool{},
	}
	lines := strings.Split(strings.ReplaceAll(src, "\r\n", "\n"), "\n")

	// Parser directives: "# key=value" comments at the very top. The first
	// line that is not one ends them.
	first := 0
	for ; first < len(lines); first++ {
		t := strings.TrimSpace(lines[first])
		if !strings.HasPrefix(t, "#") {
			break
		}
		k, v, ok := strings.Cut(strings.TrimSpace(t[1:]), "=")
		k = strings.ToLower(strings.TrimSpace(k))
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			break // an ordinary comment ends the directives
		}
		if !knownDirectives[k] {
			return nil, errAt(path, first+1, "unknown parser directive %q", k)
		}
		if _, dup := df.directives[k]; dup {
			return nil, errAt(path, first+1, "parser directive %q given twice", k)
		}
		df.directives[k] = strings.TrimSpace(v)
	}
	escape := byte('\\')
	if e, ok := df.directives["escape"]; ok {
		if e != "\\" && e != "`" {
			return nil, errAt(path, 1, "escape directive %q: must be \\ or `", e)
		}
		escape = e[0]
	}

	var cur *stage
	for i := first; i < len(lines); i++ {
		t := strings.TrimSpace(lines[i])
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		start := i
		var b strings.Builder
		text := strings.TrimRight(lines[i], " \t")
		for strings.HasSuffix(text, string(escape)) {
			b.WriteString(text[:len(text)-1])
			b.WriteByte(' ')
			// Comment and empty lines inside a continuation are skipped.
			for {
				i++
				if i >= len(lines) {
					return nil, errAt(path, start+1, "line continuation runs past the end of the file")
				}
				nt := strings.TrimSpace(lines[i])
				if nt != "" && !strings.HasPrefix(nt, "#") {
					break
				}
			}
			text = strings.TrimRight(lines[i], " \t")
		}
		b.WriteString(text)
		in, err := parseInstruction(path, start+1, b.String())
		if err != nil {
			return nil, err
		}
		switch {
		case in.cmd == "FROM":
			s, err := df.newStage(in)
			if err != nil {
				return nil, err
			}
			cur = s
		case cur == nil && in.cmd == "ARG":
			kvs, err := keyValues(in)
			if err != nil {
				return nil, errAt(path, in.line, "%v", err)
			}
			for _, kv := range kvs {
				df.globalDecl[kv.key] = true
				if kv.set {
					df.globalArgs[kv.key] = kv.value
				}
			}
		case cur == nil:
			return nil, errAt(path, in.line, "%s before the first FROM (only ARG may come before it)", in.cmd)
		default:
			cur.instrs = append(cur.instrs, in)
		}
	}
	if len(df.stages) == 0 {
		return nil, errAt(path, 0, "no FROM instruction")
	}
	return df, nil
}

// parseInstruction splits one joined instruction into command, flags and
// arguments.
func parseInstruction(path string, line int, text string) (instruction, error) {
	text = strings.TrimSpace(text)
	cmd, rest, _ := strings.Cut(text, " ")
	if i := strings.IndexAny(cmd, "\t"); i >= 0 {
		cmd, rest = cmd[:i], cmd[i+1:]+" "+rest
	}
	in := instruction{line: line, cmd: strings.ToUpper(cmd), flags: map[string]string{}}
	if !validCommands[in.cmd] {
		return in, errAt(path, line, "unknown instruction %q", cmd)
	}
	rest = strings.TrimSpace(rest)
	// Leading --flags. They hold no spaces in the syntax BuildKit accepts.
	for strings.HasPrefix(rest, "--") {
		tok, after, _ := strings.Cut(rest, " ")
		name, val, _ := strings.Cut(tok[2:], "=")
		if name == "" {
			return in, errAt(path, line, "%s: empty flag name in %q", in.cmd, tok)
		}
		if _, dup := in.flags[name]; dup && in.cmd != "RUN" {
			return in, errAt(path, line, "%s: flag --%s given twice", in.cmd, name)
		}
		if prev, dup := in.flags[name]; dup {
			val = prev + "\n" + val // RUN may repeat --mount
		}
		in.flags[name] = val
		rest = strings.TrimSpace(after)
	}
	in.args = rest
	if (in.cmd == "RUN" || in.cmd == "COPY" || in.cmd == "ADD") && heredoc(rest) {
		return in, errAt(path, line, "%s: heredocs are not supported by this linter; use a script file", in.cmd)
	}
	if execForms[in.cmd] && strings.HasPrefix(rest, "[") {
		var arr []string
		if err := json.Unmarshal([]byte(rest), &arr); err == nil {
			in.exec = arr
		}
		// Not valid JSON: Docker runs it in the shell form; so do we.
	}
	return in, nil
}

// heredoc reports whether args start a heredoc (<<WORD or <<-WORD).
func heredoc(args string) bool {
	for i := strings.Index(args, "<<"); i >= 0; {
		r := strings.TrimPrefix(args[i+2:], "-")
		r = strings.TrimLeft(r, `"'`)
		if r != "" && (r[0] == '_' || r[0] >= 'A' && r[0] <= 'Z' || r[0] >= 'a' && r[0] <= 'z') {
			return true
		}
		j := strings.Index(args[i+2:], "<<")
		if j < 0 {
			break
		}
		i += 2 + j
	}
	return false
}

var validCommands = map[string]bool{
	"ADD": true, "ARG": true, "CMD": true, "COPY": true, "ENTRYPOINT": true, "ENV": true,
	"EXPOSE": true, "FROM": true, "HEALTHCHECK": true, "LABEL": true, "MAINTAINER": true,
	"ONBUILD": true, "RUN": true, "SHELL": true, "STOPSIGNAL": true, "USER": true,
	"VOLUME": true, "WORKDIR": true,
}

// execForms are the instructions whose argument may be a JSON array.
var execForms = map[string]bool{
	"RUN": true, "CMD": true, "ENTRYPOINT": true, "SHELL": true, "COPY": true, "ADD": true, "VOLUME": true,
}

// newStage starts a stage at a FROM instruction.
func (df *dockerfile) newStage(in instruction) (*stage, error) {
	words := strings.Fields(in.args)
	s := &stage{index: len(df.stages), line: in.line}
	switch {
	case len(words) == 1:
	case len(words) == 3 && strings.EqualFold(words[1], "AS"):
		s.name = strings.ToLower(words[2])
		if !validStageName(s.name) {
			return nil, errAt(df.path, in.line, "FROM: stage name %q: must start with a letter and hold only letters, digits, '-', '_' and '.'", words[2])
		}
		for _, o := range df.stages {
			if o.name == s.name {
				return nil, errAt(df.path, in.line, "FROM: stage name %q already used by the stage at line %d", s.name, o.line)
			}
		}
	default:
		return nil, errAt(df.path, in.line, "FROM: want \"FROM [--platform=P] IMAGE [AS NAME]\", got %q", in.args)
	}
	base, err := expandVars(words[0], df.globalArgs, df.globalDecl)
	if err != nil {
		return nil, errAt(df.path, in.line, "FROM %s: %v", words[0], err)
	}
	s.base = base
	for _, o := range df.stages {
		if o.name != "" && o.name == strings.ToLower(base) {
			s.parent = o
		}
	}
	s.instrs = []instruction{in}
	df.stages = append(df.stages, s)
	return s, nil
}

func validStageName(n string) bool {
	if n == "" || !(n[0] >= 'a' && n[0] <= 'z') {
		return false
	}
	for _, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// expandVars substitutes $NAME, ${NAME} and ${NAME:-default} from vars. A
// name that was never declared, or declared without a default, is an
// error: the linter checks what a build without --build-arg would use.
func expandVars(s string, vars map[string]string, declared map[string]bool) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' {
			b.WriteByte(s[i])
			continue
		}
		var name, def string
		hasDef := false
		if i+1 < len(s) && s[i+1] == '{' {
			end := strings.IndexByte(s[i:], '}')
			if end < 0 {
				return "", fmt.Errorf("unterminated ${ in %q", s)
			}
			body := s[i+2 : i+end]
			if n, d, ok := strings.Cut(body, ":-"); ok {
				name, def, hasDef = n, d, true
			} else {
				name = body
			}
			i += end
		} else {
			j := i + 1
			for j < len(s) && (s[j] == '_' || s[j] >= 'A' && s[j] <= 'Z' || s[j] >= 'a' && s[j] <= 'z' || s[j] >= '0' && s[j] <= '9') {
				j++
			}
			name = s[i+1 : j]
			i = j - 1
		}
		if name == "" {
			return "", fmt.Errorf("empty variable name in %q", s)
		}
		v, ok := vars[name]
		switch {
		case ok && v != "":
			b.WriteString(v)
		case hasDef:
			b.WriteString(def)
		case !declared[name]:
			return "", fmt.Errorf("$%s is not declared by an ARG before the first FROM", name)
		default:
			return "", fmt.Errorf("ARG %s has no default", name)
		}
	}
	return b.String(), nil
}

// shellOps are the shell control operators that end a simple command.
var shellOps = []string{"&&", "||", ";;", ";", "|", "&", "(", ")", "\n"}

// shellWords splits a shell command line into words and control operators
// the way a POSIX shell tokenises it: quotes group and are removed,
// backslash escapes the next character outside single quotes, and an
// unquoted operator is its own token. Variables are left unexpanded. It is
// enough to find commands such as "go build" and read their arguments.
func shellWords(s string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inWord := false
	flush := func() {
		if inWord {
			out = append(out, cur.String())
			cur.Reset()
			inWord = false
		}
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\'':
			end := strings.IndexByte(s[i+1:], '\'')
			if end < 0 {
				return nil, fmt.Errorf("unterminated single quote in %q", s)
			}
			cur.WriteString(s[i+1 : i+1+end])
			inWord = true
			i += end + 1
		case c == '"':
			inWord = true
			j := i + 1
			for ; j < len(s) && s[j] != '"'; j++ {
				if s[j] == '\\' && j+1 < len(s) && strings.IndexByte("\"\\$`", s[j+1]) >= 0 {
					j++
				}
				cur.WriteByte(s[j])
			}
			if j >= len(s) {
				return nil, fmt.Errorf("unterminated double quote in %q", s)
			}
			i = j
		case c == '\\' && i+1 < len(s):
			cur.WriteByte(s[i+1])
			inWord = true
			i++
		case c == ' ' || c == '\t':
			flush()
		case c == '#' && !inWord:
			// A comment runs to the end of the line.
			flush()
			nl := strings.IndexByte(s[i:], '\n')
			if nl < 0 {
				return out, nil
			}
			i += nl - 1
		default:
			op := ""
			for _, o := range shellOps {
				if strings.HasPrefix(s[i:], o) {
					op = o
					break
				}
			}
			if op == "" {
				cur.WriteByte(c)
				inWord = true
				continue
			}
			flush()
			out = append(out, op)
			i += len(op) - 1
		}
	}
	flush()
	return out, nil
}

func isShellOp(w string) bool {
	for _, o := range shellOps {
		if w == o {
			return true
		}
	}
	return false
}

// simpleCommands splits a shell command line into its simple commands
// (the words between control operators).
func simpleCommands(s string) ([][]string, error) {
	words, err := shellWords(s)
	if err != nil {
		return nil, err
	}
	var out [][]string
	var cur []string
	for _, w := range words {
		if isShellOp(w) {
			if len(cur) > 0 {
				out = append(out, cur)
			}
			cur = nil
			continue
		}
		cur = append(cur, w)
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out, nil
}

// keyValue is one KEY=VALUE pair of an ENV, LABEL or ARG instruction.
type keyValue struct {
	key, value string
	set        bool // false for an ARG declared without a default
}

// keyValues reads the KEY=VALUE pairs of an ENV, LABEL or ARG instruction
// (and ENV's legacy "ENV KEY VALUE" form). ARG may name a key without a
// value.
func keyValues(in instruction) ([]keyValue, error) {
	words, err := shellWords(in.args)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", in.cmd, err)
	}
	if len(words) == 0 {
		return nil, fmt.Errorf("%s: no arguments", in.cmd)
	}
	if in.cmd == "ENV" && !strings.Contains(words[0], "=") {
		k, v, _ := strings.Cut(strings.TrimSpace(in.args), " ")
		return []keyValue{{key: k, value: strings.TrimSpace(v), set: true}}, nil
	}
	var out []keyValue
	for _, w := range words {
		k, v, ok := strings.Cut(w, "=")
		if !ok && in.cmd != "ARG" {
			return nil, fmt.Errorf("%s: %q is not KEY=VALUE", in.cmd, w)
		}
		if k == "" {
			return nil, fmt.Errorf("%s: empty key in %q", in.cmd, w)
		}
		out = append(out, keyValue{key: k, value: v, set: ok})
	}
	return out, nil
}
