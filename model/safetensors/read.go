package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"unicode/utf8"
)

// MaxHeaderSize bounds the JSON header (the reference implementation uses
// the same 100 MB limit) so that a corrupt length cannot force a huge parse.
const MaxHeaderSize = 100_000_000

// metadataKey is the reserved header key of the string metadata map.
const metadataKey = "__metadata__"

// File is a parsed safetensors file: its metadata and its tensors in the
// order of their data offsets.
type File struct {
	Metadata map[string]string
	Tensors  []Tensor

	index map[string]int // name → position in Tensors, built by Read
}

// Get returns the tensor with the given name.
func (f *File) Get(name string) (*Tensor, bool) {
	if i, ok := f.index[name]; ok && i < len(f.Tensors) && f.Tensors[i].Name == name {
		return &f.Tensors[i], true
	}
	for i := range f.Tensors {
		if f.Tensors[i].Name == name {
			return &f.Tensors[i], true
		}
	}
	return nil, false
}

// ReadFile reads and validates the safetensors file at path into memory.
// For multi-GiB files prefer Open, which maps the file instead of copying it.
func ReadFile(path string) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	f, err := Read(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// Read parses and validates a complete safetensors file held in data. The
// tensors' Data slices alias data; nothing is copied.
func Read(data []byte) (*File, error) {
	if len(data) < 8 {
		return nil, errf(ErrTruncated, "", "file has %d bytes, fewer than the 8-byte header length", len(data))
	}
	n := binary.LittleEndian.Uint64(data)
	if n > uint64(len(data)-8) {
		return nil, errf(ErrTruncated, "", "header length %d exceeds the %d bytes that follow it", n, len(data)-8)
	}
	if n > MaxHeaderSize {
		return nil, errf(ErrHeader, "", "header length %d exceeds the limit of %d bytes", n, MaxHeaderSize)
	}
	header, body := data[8:8+n], data[8+n:]
	entries, meta, err := parseHeader(header, len(body))
	if err != nil {
		return nil, err
	}
	f := &File{Metadata: meta, Tensors: make([]Tensor, len(entries)), index: make(map[string]int, len(entries))}
	for i, e := range entries {
		f.Tensors[i] = Tensor{Name: e.name, DType: e.dtype, Shape: e.shape, Data: body[e.begin:e.end:e.end]}
		f.index[e.name] = i
	}
	return f, nil
}

// entry is one validated tensor description of the header.
type entry struct {
	name       string
	dtype      DType
	shape      []int
	begin, end int
}

// rawEntry is the JSON form of a tensor description; pointers tell a
// missing field from a zero one.
type rawEntry struct {
	DType   *string
	Shape   *[]json.Number
	Offsets *[]json.Number
}

// decodeRawEntry decodes a tensor description. Keys must match exactly:
// encoding/json would match struct fields case-insensitively and accept
// "DType" or a second spelling of the same field.
func decodeRawEntry(raw json.RawMessage) (rawEntry, error) {
	var fields map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&fields); err != nil {
		return rawEntry{}, err
	}
	if fields == nil {
		return rawEntry{}, errors.New("not an object")
	}
	var r rawEntry
	for k, v := range fields {
		var dst any
		switch k {
		case "dtype":
			r.DType = new(string)
			dst = r.DType
		case "shape":
			r.Shape = new([]json.Number)
			dst = r.Shape
		case "data_offsets":
			r.Offsets = new([]json.Number)
			dst = r.Offsets
		default:
			return rawEntry{}, fmt.Errorf("unknown field %q", k)
		}
		d := json.NewDecoder(bytes.NewReader(v))
		d.UseNumber()
		if err := d.Decode(dst); err != nil {
			return rawEntry{}, fmt.Errorf("field %q: %v", k, err)
		}
	}
	return r, nil
}

// parseHeader decodes the header object, validates every entry against a
// data section of bodyLen bytes and returns the entries sorted by offset.
func parseHeader(header []byte, bodyLen int) ([]entry, map[string]string, error) {
	if !utf8.Valid(header) {
		return nil, nil, errf(ErrHeader, "", "header is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(header))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil, nil, errf(ErrHeader, "", "header is not a JSON object")
	}
	var (
		entries []entry
		meta    map[string]string
		seen    = map[string]bool{}
	)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, errf(ErrHeader, "", "invalid JSON: %v", err)
		}
		name, ok := tok.(string)
		if !ok {
			return nil, nil, errf(ErrHeader, "", "object key is not a string")
		}
		if seen[name] {
			return nil, nil, errf(ErrDuplicate, name, "name appears more than once in the header")
		}
		seen[name] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, nil, errf(ErrHeader, name, "invalid JSON value: %v", err)
		}
		if name == metadataKey {
			if err := json.Unmarshal(raw, &meta); err != nil {
				return nil, nil, errf(ErrHeader, metadataKey, "must be an object of strings: %v", err)
			}
			continue
		}
		e, err := parseEntry(name, raw, bodyLen)
		if err != nil {
			return nil, nil, err
		}
		entries = append(entries, e)
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
		return nil, nil, errf(ErrHeader, "", "header object is not closed")
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, nil, errf(ErrHeader, "", "data after the header object")
	}
	if err := checkCoverage(entries, bodyLen); err != nil {
		return nil, nil, err
	}
	return entries, meta, nil
}

// parseEntry validates one tensor description.
func parseEntry(name string, raw json.RawMessage, bodyLen int) (entry, error) {
	if name == "" {
		return entry{}, errf(ErrName, "", "a tensor has an empty name")
	}
	r, err := decodeRawEntry(raw)
	if err != nil {
		return entry{}, errf(ErrHeader, name, "bad tensor description: %v", err)
	}
	switch {
	case r.DType == nil:
		return entry{}, errf(ErrHeader, name, "missing dtype")
	case r.Shape == nil:
		return entry{}, errf(ErrHeader, name, "missing shape")
	case r.Offsets == nil:
		return entry{}, errf(ErrHeader, name, "missing data_offsets")
	}
	e := entry{name: name, dtype: DType(*r.DType)}
	size := e.dtype.Size()
	if size == 0 {
		return entry{}, errf(ErrDType, name, "dtype %q is not a safetensors dtype", *r.DType)
	}
	e.shape = make([]int, len(*r.Shape))
	for i, s := range *r.Shape {
		d, err := strconv.ParseInt(string(s), 10, 64)
		if err != nil {
			return entry{}, errf(ErrShape, name, "dimension %d (%s) is not an integer", i, s)
		}
		if d < 0 {
			return entry{}, errf(ErrShape, name, "dimension %d is negative (%d)", i, d)
		}
		e.shape[i] = int(d)
	}
	if len(*r.Offsets) != 2 {
		return entry{}, errf(ErrOffsets, name, "data_offsets must be [begin, end], got %d numbers", len(*r.Offsets))
	}
	var off [2]int64
	for i, s := range *r.Offsets {
		v, err := strconv.ParseInt(string(s), 10, 64)
		if err != nil || v < 0 {
			return entry{}, errf(ErrOffsets, name, "data_offsets[%d] = %s is not a non-negative integer", i, s)
		}
		off[i] = v
	}
	if off[1] < off[0] {
		return entry{}, errf(ErrOffsets, name, "data_offsets [%d, %d] end before they begin", off[0], off[1])
	}
	if off[1] > int64(bodyLen) {
		return entry{}, errf(ErrOffsets, name, "data_offsets [%d, %d] run past the %d-byte data section", off[0], off[1], bodyLen)
	}
	e.begin, e.end = int(off[0]), int(off[1])
	n, err := numElements(name, e.shape, math.MaxInt/size)
	if err != nil {
		return entry{}, err
	}
	if n*size != e.end-e.begin {
		return entry{}, errf(ErrShape, name, "shape %v of %s needs %d bytes, data_offsets [%d, %d] hold %d",
			e.shape, e.dtype, n*size, e.begin, e.end, e.end-e.begin)
	}
	return e, nil
}

// checkCoverage sorts entries by offset and requires them to tile the data
// section exactly: no overlap, no gap, nothing after the last tensor.
func checkCoverage(entries []entry, bodyLen int) error {
	sort.Slice(entries, func(i, j int) bool {
		a, b := entries[i], entries[j]
		if a.begin != b.begin {
			return a.begin < b.begin
		}
		if a.end != b.end {
			return a.end < b.end
		}
		return a.name < b.name
	})
	pos, prev := 0, ""
	for _, e := range entries {
		switch {
		case e.begin > pos:
			return errf(ErrOffsets, e.name, "data_offsets [%d, %d] leave bytes [%d, %d) of the data section uncovered",
				e.begin, e.end, pos, e.begin)
		case e.begin < pos:
			return errf(ErrOffsets, e.name, "data_offsets [%d, %d] overlap tensor %q, which ends at %d",
				e.begin, e.end, prev, pos)
		}
		pos, prev = e.end, e.name
	}
	if pos != bodyLen {
		return errf(ErrOffsets, "", "data section has %d bytes, tensors cover only [0, %d)", bodyLen, pos)
	}
	return nil
}
