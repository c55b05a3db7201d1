package hf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
)

// quoteNonFinite rewrites the bare tokens Infinity, -Infinity and NaN that
// Python's json module writes (and strict JSON forbids) into the strings
// "Infinity", "-Infinity" and "NaN", which the float fields accept. Text
// inside JSON strings is left alone.
func quoteNonFinite(in []byte) []byte {
	out := make([]byte, 0, len(in)+16)
	inString := false
	for i := 0; i < len(in); i++ {
		c := in[i]
		if inString {
			out = append(out, c)
			switch c {
			case '\\':
				if i+1 < len(in) {
					i++
					out = append(out, in[i])
				}
			case '"':
				inString = false
			}
			continue
		}
		if c == '"' {
			inString = true
			out = append(out, c)
			continue
		}
		replaced := false
		for _, tok := range [...]string{"-Infinity", "Infinity", "NaN"} {
			if bytes.HasPrefix(in[i:], []byte(tok)) {
				out = append(out, '"')
				out = append(out, tok...)
				out = append(out, '"')
				i += len(tok) - 1
				replaced = true
				break
			}
		}
		if !replaced {
			out = append(out, c)
		}
	}
	return out
}

// object is a decoded JSON object whose fields are read one at a time, so
// that each error names its field. The first error sticks.
type object struct {
	prefix string // prepended to field names in errors, e.g. "ssm_cfg."
	m      map[string]json.RawMessage
	used   map[string]bool
	err    error
}

func newObject(prefix string, raw []byte) (*object, error) {
	o := &object{prefix: prefix, used: map[string]bool{}}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&o.m); err != nil {
		name := strings.TrimSuffix(prefix, ".")
		if name == "" {
			name = "config"
		}
		return nil, fieldErr(ErrConfig, name, "not a JSON object: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fieldErr(ErrConfig, "config", "data after the JSON object")
	}
	if o.m == nil {
		return nil, fieldErr(ErrConfig, strings.TrimSuffix(prefix, "."), "must be a JSON object, got null")
	}
	return o, nil
}

func (o *object) has(key string) bool { _, ok := o.m[key]; return ok }

func (o *object) fail(err *FieldError) {
	if o.err == nil {
		o.err = err
	}
}

// get returns the raw value of key; a missing required key is an error.
func (o *object) get(key string, required bool) (json.RawMessage, bool) {
	o.used[key] = true
	raw, ok := o.m[key]
	if !ok {
		if required {
			o.fail(fieldErr(ErrConfig, o.prefix+key, "missing (required)"))
		}
		return nil, false
	}
	return raw, true
}

func (o *object) decode(key string, raw json.RawMessage, dst any, want string) bool {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(dst); err != nil || string(raw) == "null" {
		o.fail(fieldErr(ErrConfig, o.prefix+key, "must be %s, got %s", want, abbreviate(raw)))
		return false
	}
	return true
}

// int reads an integer field; def applies when the field is absent and not
// required.
func (o *object) int(key string, required bool, def int) int {
	raw, ok := o.get(key, required)
	if !ok {
		return def
	}
	var n json.Number
	if t := bytes.TrimSpace(raw); len(t) > 0 && t[0] == '"' {
		o.fail(fieldErr(ErrConfig, o.prefix+key, "must be an integer, got %s", abbreviate(raw)))
		return def
	}
	if !o.decode(key, raw, &n, "an integer") {
		return def
	}
	v, err := strconv.ParseInt(string(n), 10, 0)
	if err != nil {
		o.fail(fieldErr(ErrConfig, o.prefix+key, "must be an integer, got %s", n))
		return def
	}
	return int(v)
}

func (o *object) bool(key string, def bool) bool {
	raw, ok := o.get(key, false)
	if !ok {
		return def
	}
	var v bool
	if !o.decode(key, raw, &v, "true or false") {
		return def
	}
	return v
}

func (o *object) string(key string, required bool, def string) string {
	raw, ok := o.get(key, required)
	if !ok {
		return def
	}
	var v string
	if !o.decode(key, raw, &v, "a string") {
		return def
	}
	return v
}

func (o *object) float(key string, def float64) float64 {
	raw, ok := o.get(key, false)
	if !ok {
		return def
	}
	v, err := parseFloat(raw)
	if err != nil {
		o.fail(fieldErr(ErrConfig, o.prefix+key, "%v", err))
		return def
	}
	return v
}

// pair reads a two-element list of floats, such as [0.0, Infinity].
func (o *object) pair(key string, def [2]float64) [2]float64 {
	raw, ok := o.get(key, false)
	if !ok {
		return def
	}
	var elems []json.RawMessage
	if !o.decode(key, raw, &elems, "a list of two numbers") {
		return def
	}
	if len(elems) != 2 {
		o.fail(fieldErr(ErrConfig, o.prefix+key, "must be a list of two numbers, got %d elements", len(elems)))
		return def
	}
	var out [2]float64
	for i, e := range elems {
		v, err := parseFloat(e)
		if err != nil {
			o.fail(fieldErr(ErrConfig, fmt.Sprintf("%s%s[%d]", o.prefix, key, i), "%v", err))
			return def
		}
		out[i] = v
	}
	return out
}

// isNull reports whether key is absent or null.
func (o *object) isNull(key string) bool {
	raw, ok := o.get(key, false)
	return !ok || string(bytes.TrimSpace(raw)) == "null"
}

// parseFloat accepts a JSON number or one of the strings that spell a
// non-finite value ("Infinity", "-Infinity", "NaN", "inf", ...).
func parseFloat(raw json.RawMessage) (float64, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) > 0 && raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err == nil {
			switch strings.ToLower(strings.TrimPrefix(s, "+")) {
			case "infinity", "inf":
				return math.Inf(1), nil
			case "-infinity", "-inf":
				return math.Inf(-1), nil
			case "nan":
				return math.NaN(), nil
			}
		}
		return 0, fmt.Errorf("must be a number, got %s", abbreviate(raw))
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err != nil || n == "" {
		return 0, fmt.Errorf("must be a number, got %s", abbreviate(raw))
	}
	v, err := strconv.ParseFloat(string(n), 64)
	if err != nil {
		return 0, fmt.Errorf("must be a finite float64, got %s", n)
	}
	return v, nil
}

func abbreviate(raw []byte) string {
	s := string(bytes.TrimSpace(raw))
	if len(s) > 40 {
		s = s[:40] + "..."
	}
	return s
}

// field is one key of an ordered JSON object.
type field struct {
	key string
	val any
}

// encodeJSON renders v as Python's json.dumps(v, indent=indent) would:
// ordered objects, one list element per line, floats in Python's repr
// (1e-05, 0.001, 1.0) and non-finite floats as the bare tokens Infinity,
// -Infinity and NaN, which Python's json.loads accepts.
func encodeJSON(v any, indent int) []byte {
	var b bytes.Buffer
	writeJSON(&b, v, strings.Repeat(" ", indent), "")
	b.WriteByte('\n')
	return b.Bytes()
}

func writeJSON(b *bytes.Buffer, v any, step, cur string) {
	next := cur + step
	switch v := v.(type) {
	case []field:
		if len(v) == 0 {
			b.WriteString("{}")
			return
		}
		b.WriteString("{\n")
		for i, f := range v {
			b.WriteString(next)
			b.Write(quote(f.key))
			b.WriteString(": ")
			writeJSON(b, f.val, step, next)
			if i < len(v)-1 {
				b.WriteByte(',')
			}
			b.WriteByte('\n')
		}
		b.WriteString(cur + "}")
	case []any:
		if len(v) == 0 {
			b.WriteString("[]")
			return
		}
		b.WriteString("[\n")
		for i, e := range v {
			b.WriteString(next)
			writeJSON(b, e, step, next)
			if i < len(v)-1 {
				b.WriteByte(',')
			}
			b.WriteByte('\n')
		}
		b.WriteString(cur + "]")
	case [2]float64:
		writeJSON(b, []any{v[0], v[1]}, step, cur)
	case string:
		b.Write(quote(v))
	case bool:
		b.WriteString(strconv.FormatBool(v))
	case int:
		b.WriteString(strconv.Itoa(v))
	case float64:
		b.WriteString(pyFloat(v))
	case nil:
		b.WriteString("null")
	default:
		panic(fmt.Sprintf("hf: encodeJSON: unhandled type %T", v))
	}
}

func quote(s string) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// pyFloat formats v like Python's float repr: shortest round-trip digits,
// positional between 1e-4 and 1e16, always with a decimal point or exponent.
func pyFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "Infinity"
	case math.IsInf(v, -1):
		return "-Infinity"
	case math.IsNaN(v):
		return "NaN"
	}
	if a := math.Abs(v); a != 0 && (a < 1e-4 || a >= 1e16) {
		return strconv.FormatFloat(v, 'e', -1, 64)
	}
	s := strconv.FormatFloat(v, 'f', -1, 64)
	if !strings.ContainsAny(s, ".") {
		s += ".0"
	}
	return s
}

// sortFields orders an object's keys as Python's sort_keys=True does.
func sortFields(fs []field) []field {
	sort.Slice(fs, func(i, j int) bool { return fs[i].key < fs[j].key })
	return fs
}
