package safetensors

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const oracleDir = "../testdata/oracle/tiny-mamba2"

// rawFile assembles a safetensors file from a header text and a data section.
func rawFile(header string, body []byte) []byte {
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	out = append(out, header...)
	return append(out, body...)
}

func mustWrite(t *testing.T, tensors []Tensor, meta map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := Write(&buf, tensors, meta); err != nil {
		t.Fatalf("Write: %v", err)
	}
	return buf.Bytes()
}

func TestGolden(t *testing.T) {
	b, err := FromFloat32s("b", []int{2}, []float32{1, -2}, F32)
	if err != nil {
		t.Fatal(err)
	}
	a := FromInt64s("a", nil, []int64{7})
	got := mustWrite(t, []Tensor{b, a}, map[string]string{"format": "pt"})
	// Header: 138 bytes of JSON, keys sorted, padded with 6 spaces to 144.
	// Data: b first as given (1.0 = 0x3f800000, -2.0 = 0xc0000000), then a.
	want := "\x90\x00\x00\x00\x00\x00\x00\x00" +
		`{"__metadata__":{"format":"pt"},` +
		`"a":{"dtype":"I64","shape":[],"data_offsets":[8,16]},` +
		`"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}      ` +
		"\x00\x00\x80\x3f\x00\x00\x00\xc0" +
		"\x07\x00\x00\x00\x00\x00\x00\x00"
	if string(got) != want {
		t.Fatalf("golden mismatch:\n got %q\nwant %q", got, want)
	}
	f, err := Read(got)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Tensors) != 2 || f.Tensors[0].Name != "b" || f.Tensors[1].Name != "a" {
		t.Fatalf("tensors not in offset order: %+v", f.Tensors)
	}
	if !reflect.DeepEqual(f.Metadata, map[string]string{"format": "pt"}) {
		t.Fatalf("metadata %v", f.Metadata)
	}
	ints, err := f.Tensors[1].Int64s()
	if err != nil || !reflect.DeepEqual(ints, []int64{7}) || f.Tensors[1].NumElements() != 1 {
		t.Fatalf("a = %v, %v", ints, err)
	}
}

func TestWriteEmpty(t *testing.T) {
	got := mustWrite(t, nil, map[string]string{})
	if want := "\x08\x00\x00\x00\x00\x00\x00\x00{}      "; string(got) != want {
		t.Fatalf("got %q want %q", got, want)
	}
	f, err := Read(got)
	if err != nil || len(f.Tensors) != 0 || f.Metadata != nil {
		t.Fatalf("Read empty: %+v %v", f, err)
	}
}

func TestRoundTripEveryDType(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	dtypes := []DType{F64, F32, F16, BF16, F8E4M3, F8E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL}
	shapes := [][]int{{}, {0}, {3}, {2, 3}, {2, 0, 4}, {1, 2, 3}}
	var tensors []Tensor
	for _, d := range dtypes {
		for j, s := range shapes {
			n := 1
			for _, v := range s {
				n *= v
			}
			data := make([]byte, n*d.Size())
			for k := range data {
				data[k] = byte(rng.IntN(256))
				if d == BOOL {
					data[k] &= 1
				}
			}
			tensors = append(tensors, Tensor{Name: string(d) + "/" + string(rune('a'+j)), DType: d, Shape: s, Data: data})
		}
	}
	meta := map[string]string{"format": "pt", "note": `<&>"\ü`}
	blob := mustWrite(t, tensors, meta)
	if (binary.LittleEndian.Uint64(blob)+8)%8 != 0 {
		t.Fatalf("header not padded to 8")
	}
	f, err := Read(blob)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(f.Metadata, meta) {
		t.Fatalf("metadata %v", f.Metadata)
	}
	for _, want := range tensors {
		t.Run(want.Name, func(t *testing.T) {
			got, ok := f.Get(want.Name)
			if !ok {
				t.Fatal("missing")
			}
			if got.DType != want.DType || len(got.Shape) != len(want.Shape) || !bytes.Equal(got.Data, want.Data) {
				t.Fatalf("got %s %v %x, want %s %v %x", got.DType, got.Shape, got.Data, want.DType, want.Shape, want.Data)
			}
			for i := range want.Shape {
				if got.Shape[i] != want.Shape[i] {
					t.Fatalf("shape %v want %v", got.Shape, want.Shape)
				}
			}
		})
	}
	// Deterministic: writing what was read reproduces the bytes.
	if again := mustWrite(t, f.Tensors, f.Metadata); !bytes.Equal(again, blob) {
		t.Fatal("rewrite of a read file differs")
	}
}

func TestFloatRoundTrips(t *testing.T) {
	vals := []float64{0, math.Copysign(0, -1), 1, -2.5, 0.1, 1e-3, 65504, -65504, math.Inf(1), math.Inf(-1),
		math.SmallestNonzeroFloat32, math.MaxFloat32, 3.140625}
	for _, dt := range []DType{F64, F32, F16, BF16} {
		t.Run(string(dt), func(t *testing.T) {
			tn, err := FromFloat64s("x", []int{len(vals)}, vals, dt)
			if err != nil {
				t.Fatal(err)
			}
			f, err := Read(mustWrite(t, []Tensor{tn}, nil))
			if err != nil {
				t.Fatal(err)
			}
			got64, err := f.Tensors[0].Float64s()
			if err != nil {
				t.Fatal(err)
			}
			got32, err := f.Tensors[0].Float32s()
			if err != nil {
				t.Fatal(err)
			}
			for i, v := range vals {
				var want float64
				switch dt {
				case F64:
					want = v
				case F32:
					want = float64(float32(v))
				case F16:
					want = float64(Float32FromF16(F16FromFloat64(v)))
				case BF16:
					want = float64(Float32FromBF16(BF16FromFloat64(v)))
				}
				if math.Float64bits(got64[i]) != math.Float64bits(want) {
					t.Errorf("Float64s[%d] of %g = %g, want %g", i, v, got64[i], want)
				}
				if math.Float32bits(got32[i]) != math.Float32bits(float32(want)) {
					t.Errorf("Float32s[%d] of %g = %g, want %g", i, v, got32[i], float32(want))
				}
			}
			// Encoding from float32 values agrees with encoding from float64
			// where the value is already a float32.
			v32 := make([]float32, len(vals))
			for i, v := range vals {
				v32[i] = float32(v)
			}
			a, err := FromFloat32s("x", []int{len(vals)}, v32, dt)
			if err != nil {
				t.Fatal(err)
			}
			w64 := make([]float64, len(vals))
			for i, v := range v32 {
				w64[i] = float64(v)
			}
			b, err := FromFloat64s("x", []int{len(vals)}, w64, dt)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(a.Data, b.Data) {
				t.Errorf("float32 and float64 encodings differ: %x vs %x", a.Data, b.Data)
			}
		})
	}
	// NaN survives every float dtype.
	for _, dt := range []DType{F64, F32, F16, BF16} {
		tn, err := FromFloat64s("n", []int{1}, []float64{math.NaN()}, dt)
		if err != nil {
			t.Fatal(err)
		}
		v, _ := tn.Float64s()
		if !math.IsNaN(v[0]) {
			t.Errorf("%s: NaN became %g", dt, v[0])
		}
	}
}

func TestIntDecoding(t *testing.T) {
	le := binary.LittleEndian
	cases := []struct {
		dt   DType
		data []byte
		want []int64
	}{
		{I64, le.AppendUint64(nil, uint64(1<<63)), []int64{math.MinInt64}},
		{I32, le.AppendUint32(nil, 0xffffffff), []int64{-1}},
		{U32, le.AppendUint32(nil, 0xffffffff), []int64{0xffffffff}},
		{I16, le.AppendUint16(nil, 0x8000), []int64{-32768}},
		{U16, le.AppendUint16(nil, 0x8000), []int64{32768}},
		{I8, []byte{0xff}, []int64{-1}},
		{U8, []byte{0xff}, []int64{255}},
		{BOOL, []byte{1, 0}, []int64{1, 0}},
		{U64, le.AppendUint64(nil, math.MaxInt64), []int64{math.MaxInt64}},
	}
	for _, c := range cases {
		t.Run(string(c.dt), func(t *testing.T) {
			tn := Tensor{Name: "i", DType: c.dt, Shape: []int{len(c.want)}, Data: c.data}
			got, err := tn.Int64s()
			if err != nil || !reflect.DeepEqual(got, c.want) {
				t.Fatalf("got %v, %v; want %v", got, err, c.want)
			}
			if _, err := tn.Float64s(); !errors.Is(err, ErrConversion) {
				t.Fatalf("Float64s of %s: %v, want ErrConversion", c.dt, err)
			}
		})
	}
	bad := []Tensor{
		{Name: "u", DType: U64, Shape: []int{1}, Data: le.AppendUint64(nil, 1<<63)},
		{Name: "b", DType: BOOL, Shape: []int{1}, Data: []byte{2}},
		{Name: "f", DType: F32, Shape: []int{1}, Data: make([]byte, 4)},
	}
	for _, tn := range bad {
		if _, err := tn.Int64s(); !errors.Is(err, ErrConversion) || !strings.Contains(err.Error(), `"`+tn.Name+`"`) {
			t.Errorf("Int64s(%s %s): %v, want ErrConversion naming the tensor", tn.Name, tn.DType, err)
		}
	}
}

func TestEncodeErrors(t *testing.T) {
	cases := []struct {
		name string
		err  error
		run  func() error
	}{
		{"int dtype", ErrConversion, func() error { _, e := FromFloat64s("t", []int{1}, []float64{1}, I32); return e }},
		{"unknown dtype", ErrDType, func() error { _, e := FromFloat32s("t", []int{1}, []float32{1}, "F7"); return e }},
		{"count", ErrShape, func() error { _, e := FromFloat64s("t", []int{2, 2}, []float64{1}, F32); return e }},
		{"negative", ErrShape, func() error { _, e := FromFloat64s("t", []int{-1}, nil, F32); return e }},
		{"write data length", ErrShape, func() error {
			return Write(&bytes.Buffer{}, []Tensor{{Name: "t", DType: F32, Shape: []int{2}, Data: make([]byte, 4)}}, nil)
		}},
		{"write int64 count", ErrShape, func() error {
			return Write(&bytes.Buffer{}, []Tensor{FromInt64s("t", []int{3}, []int64{1})}, nil)
		}},
		{"write duplicate", ErrDuplicate, func() error {
			a := FromInt64s("t", []int{1}, []int64{1})
			return Write(&bytes.Buffer{}, []Tensor{a, a}, nil)
		}},
		{"write reserved", ErrName, func() error {
			return Write(&bytes.Buffer{}, []Tensor{FromInt64s(metadataKey, []int{1}, []int64{1})}, nil)
		}},
		{"write empty name", ErrName, func() error {
			return Write(&bytes.Buffer{}, []Tensor{FromInt64s("", []int{1}, []int64{1})}, nil)
		}},
		{"write overflow", ErrShape, func() error {
			return Write(&bytes.Buffer{}, []Tensor{{Name: "t", DType: F64, Shape: []int{1 << 40, 1 << 40}}}, nil)
		}},
		{"stream short", ErrShape, func() error {
			return WriteStream(&bytes.Buffer{}, []StreamTensor{{Name: "t", DType: F32, Shape: []int{2},
				WriteData: func(w io.Writer) error { _, e := w.Write([]byte{1, 2, 3, 4}); return e }}}, nil)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.run()
			if !errors.Is(err, c.err) {
				t.Fatalf("got %v, want %v", err, c.err)
			}
		})
	}
}

func TestReadRejects(t *testing.T) {
	good := `{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`
	body8 := make([]byte, 8)
	cases := []struct {
		name   string
		file   []byte
		err    error
		naming string // must appear in the message
	}{
		{"short file", []byte{1, 2, 3}, ErrTruncated, "8-byte"},
		{"header length beyond file", append(binary.LittleEndian.AppendUint64(nil, 1000), good...), ErrTruncated, "header length 1000"},
		{"header length huge", binary.LittleEndian.AppendUint64(nil, math.MaxUint64), ErrTruncated, "header length"},
		{"bad JSON", rawFile(`{"w":{"dtype":"F32",`, body8), ErrHeader, `"w"`},
		{"not an object", rawFile(`[1,2]`, nil), ErrHeader, "not a JSON object"},
		{"trailing data", rawFile(good+`{}`, body8), ErrHeader, "after the header"},
		{"invalid utf8", rawFile("{\"\xff\":1}", nil), ErrHeader, "UTF-8"},
		{"unknown dtype", rawFile(`{"w":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}}`, body8), ErrDType, `"w"`},
		{"missing dtype", rawFile(`{"w":{"shape":[2],"data_offsets":[0,8]}}`, body8), ErrHeader, "missing dtype"},
		{"missing shape", rawFile(`{"w":{"dtype":"F32","data_offsets":[0,8]}}`, body8), ErrHeader, "missing shape"},
		{"missing offsets", rawFile(`{"w":{"dtype":"F32","shape":[2]}}`, body8), ErrHeader, "missing data_offsets"},
		{"unknown field", rawFile(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}`, body8), ErrHeader, `"w"`},
		{"key in another case", rawFile(`{"w":{"DType":"F32","shape":[2],"data_offsets":[0,8]}}`, body8), ErrHeader, `"DType"`},
		{"empty name", rawFile(`{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, body8), ErrName, "empty name"},
		{"fractional dim", rawFile(`{"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}`, body8), ErrShape, "not an integer"},
		{"negative dim", rawFile(`{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}`, body8), ErrShape, "negative"},
		{"shape mismatch", rawFile(`{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, body8), ErrShape, "needs 12 bytes"},
		{"dtype size mismatch", rawFile(`{"w":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}}`, body8), ErrShape, `"w"`},
		{"shape overflow", rawFile(`{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}`, body8), ErrShape, `"w"`},
		{"offsets count", rawFile(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}}`, body8), ErrOffsets, "[begin, end]"},
		{"negative offset", rawFile(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}`, body8), ErrOffsets, `"w"`},
		{"reversed offsets", rawFile(`{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}`, body8), ErrOffsets, "end before"},
		{"out of range", rawFile(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`, body8), ErrOffsets, "run past"},
		{"overlap", rawFile(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, body8),
			ErrOffsets, `overlap tensor "a"`},
		{"gap", rawFile(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, body8), ErrOffsets, "uncovered"},
		{"trailing data bytes", rawFile(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, body8), ErrOffsets, "cover only"},
		{"duplicate", rawFile(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, body8),
			ErrDuplicate, `"w"`},
		{"metadata not strings", rawFile(`{"__metadata__":{"a":1}}`, nil), ErrHeader, "__metadata__"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := Read(c.file)
			if err == nil {
				t.Fatalf("accepted: %+v", f)
			}
			if !errors.Is(err, c.err) {
				t.Fatalf("error %q does not wrap %v", err, c.err)
			}
			if !strings.Contains(err.Error(), c.naming) {
				t.Fatalf("error %q does not mention %q", err, c.naming)
			}
		})
	}
}

func TestReadAcceptsEdgeCases(t *testing.T) {
	cases := []struct {
		name  string
		file  []byte
		order []string
	}{
		{"null metadata", rawFile(`{"__metadata__":null}`, nil), nil},
		{"zero-size tensors share offsets",
			rawFile(`{"z":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"I8","shape":[],"data_offsets":[4,5]},"y":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}`,
				make([]byte, 5)), []string{"a", "y", "z", "b"}},
		{"padding spaces", rawFile(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}   `, []byte{9}), []string{"a"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := Read(c.file)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, tn := range f.Tensors {
				names = append(names, tn.Name)
			}
			if !reflect.DeepEqual(names, c.order) {
				t.Fatalf("order %v want %v", names, c.order)
			}
		})
	}
}

func TestOracleFiles(t *testing.T) {
	exp, err := ReadFile(filepath.Join(oracleDir, "expected.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	ids, ok := exp.Get("input_ids")
	if !ok || ids.DType != I64 || !reflect.DeepEqual(ids.Shape, []int{2, 20}) {
		t.Fatalf("input_ids: %+v", ids)
	}
	toks, err := ids.Int64s()
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range toks {
		if v < 0 || v >= 96 {
			t.Fatalf("token %d = %d outside the vocabulary of 96", i, v)
		}
	}
	logits, ok := exp.Get("logits")
	if !ok || logits.DType != F64 || !reflect.DeepEqual(logits.Shape, []int{2, 20, 96}) {
		t.Fatalf("logits: %+v", logits)
	}
	lv, err := logits.Float64s()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range lv {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			t.Fatal("non-finite logit")
		}
	}
	loss, _ := exp.Get("loss")
	l, err := loss.Float64s()
	if err != nil || len(l) != 1 || !(l[0] > 0 && l[0] < 20) {
		t.Fatalf("loss %v %v", l, err)
	}

	path := filepath.Join(oracleDir, "model.safetensors")
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Metadata["format"] != "pt" || len(m.Tensors) != 20 {
		t.Fatalf("model: metadata %v, %d tensors", m.Metadata, len(m.Tensors))
	}
	for _, tn := range m.Tensors {
		if tn.DType != F32 {
			t.Fatalf("%s is %s, want F32", tn.Name, tn.DType)
		}
	}
	emb, _ := m.Get("backbone.embeddings.weight")
	ev, err := emb.Float32s()
	if err != nil || len(ev) != 96*32 {
		t.Fatalf("embedding: %d values, %v", len(ev), err)
	}
	if want := math.Float32frombits(binary.LittleEndian.Uint32(emb.Data[4*33:])); ev[33] != want {
		t.Fatalf("embedding[33] = %g want %g", ev[33], want)
	}
	// Our writer reproduces the reference writer's bytes for this file.
	if got := mustWrite(t, m.Tensors, m.Metadata); !bytes.Equal(got, orig) {
		t.Errorf("rewriting model.safetensors changes its bytes (%d vs %d)", len(got), len(orig))
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.safetensors")
	a := FromInt64s("a", []int{2}, []int64{1, 2})
	if err := WriteFile(path, []Tensor{a}, nil); err != nil {
		t.Fatal(err)
	}
	b := FromInt64s("b", []int{1}, []int64{3})
	if err := WriteFile(path, []Tensor{b}, map[string]string{"k": "v"}); err != nil {
		t.Fatal(err)
	}
	f, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := f.Get("b"); !ok || len(f.Tensors) != 1 || f.Metadata["k"] != "v" {
		t.Fatalf("replaced file holds %+v", f)
	}
	// A failing write leaves the previous file and no temporary behind.
	bad := Tensor{Name: "bad", DType: F32, Shape: []int{3}, Data: make([]byte, 4)}
	if err := WriteFile(path, []Tensor{bad}, nil); !errors.Is(err, ErrShape) {
		t.Fatalf("bad write: %v", err)
	}
	if f, err := ReadFile(path); err != nil || f.Tensors[0].Name != "b" {
		t.Fatalf("after failed write: %+v %v", f, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries, want 1: %v", len(entries), entries)
	}
	if info, _ := entries[0].Info(); info.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v", info.Mode())
	}
	if _, err := ReadFile(filepath.Join(dir, "absent")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
	if _, err := Open(filepath.Join(dir, "absent")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}

func TestOpenLargeMapped(t *testing.T) {
	// Above the read-instead-of-map threshold, so the mmap path runs.
	vals := make([]float32, 10000)
	for i := range vals {
		vals[i] = float32(i) * 0.5
	}
	tn, err := FromFloat32s("v", []int{100, 100}, vals, F32)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "big.safetensors")
	if err := WriteFile(path, []Tensor{tn}, nil); err != nil {
		t.Fatal(err)
	}
	m, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.Tensors[0].Float32s()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, vals) {
		t.Fatal("mapped values differ")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if m.Tensors[0].Data != nil {
		t.Fatal("Data still set after Close")
	}
	// A corrupt file fails Open and names the path.
	os.WriteFile(path, append(rawFile(`{"x":1}`, nil), make([]byte, 5000)...), 0o644)
	if _, err := Open(path); !errors.Is(err, ErrHeader) || !strings.Contains(err.Error(), path) {
		t.Fatalf("corrupt Open: %v", err)
	}
}

func FuzzRead(f *testing.F) {
	b, _ := FromFloat32s("b", []int{2}, []float32{1, -2}, F32)
	seed, _ := func() ([]byte, error) {
		var buf bytes.Buffer
		err := Write(&buf, []Tensor{b, FromInt64s("a", nil, []int64{7})}, map[string]string{"format": "pt"})
		return buf.Bytes(), err
	}()
	f.Add(seed)
	f.Add(rawFile(`{"z":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, make([]byte, 4)))
	f.Add(rawFile(`{"__metadata__":null}`, nil))
	f.Add(rawFile(`{"a":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}}`, []byte{0, 1}))
	f.Add([]byte{})
	if data, err := os.ReadFile(filepath.Join(oracleDir, "model.safetensors")); err == nil {
		f.Add(data[:4096])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := Read(data)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v is not a *Error", err)
			}
			return
		}
		// Everything accepted survives a write and a re-read unchanged.
		var buf bytes.Buffer
		if err := Write(&buf, file.Tensors, file.Metadata); err != nil {
			t.Fatalf("rewrite: %v", err)
		}
		again, err := Read(buf.Bytes())
		if err != nil {
			t.Fatalf("re-read: %v", err)
		}
		if len(again.Tensors) != len(file.Tensors) {
			t.Fatalf("tensor count %d != %d", len(again.Tensors), len(file.Tensors))
		}
		for _, tn := range file.Tensors {
			g, ok := again.Get(tn.Name)
			if !ok || g.DType != tn.DType || !bytes.Equal(g.Data, tn.Data) || g.NumElements() != tn.NumElements() {
				t.Fatalf("tensor %q changed", tn.Name)
			}
			if tn.DType.IsFloat() {
				if _, err := tn.Float64s(); err != nil {
					t.Fatal(err)
				}
			}
		}
		if len(again.Metadata) != len(file.Metadata) {
			t.Fatal("metadata changed")
		}
	})
}
