package checkpoint

import (
	"bytes"
	"io"
	"testing"
	"testing/iotest"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/safetensors"
)

// TestTensorReaderMatchesSafetensorsWrite checks that the streamed
// encoding is byte for byte what safetensors.Write produces, whatever the
// sizes of the reads.
func TestTensorReaderMatchesSafetensorsWrite(t *testing.T) {
	s := testState(7)
	for _, tc := range []struct {
		name string
		read func(io.Reader) io.Reader
	}{
		{"large reads", func(r io.Reader) io.Reader { return r }},
		{"one byte", iotest.OneByteReader},
		{"half reads", iotest.HalfReader},
		{"odd buffer", func(r io.Reader) io.Reader { return &chunkReader{r, 7} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ts []tensorData[float32]
			var want []safetensors.Tensor
			for i := range s.Layout.Tensors {
				lt := &s.Layout.Tensors[i]
				vals := model.View(s.Params, lt)
				ts = append(ts, tensorData[float32]{name: lt.Name, shape: lt.Shape, vals: vals})
				st, err := safetensors.FromFloats(lt.Name, lt.Shape, vals, safetensors.F32)
				if err != nil {
					t.Fatal(err)
				}
				want = append(want, st)
			}
			step := safetensors.FromInt64s("step", []int{1}, []int64{42})
			ts = append(ts, tensorData[float32]{name: "step", shape: step.Shape, raw: step.Data, dtype: step.DType})
			want = append(want, step)
			var wb bytes.Buffer
			meta := map[string]string{"format": "pt"}
			if err := safetensors.Write(&wb, want, meta); err != nil {
				t.Fatal(err)
			}
			r, err := newTensorReader(ts, safetensors.F32, meta)
			if err != nil {
				t.Fatal(err)
			}
			if r.size != int64(wb.Len()) {
				t.Fatalf("announced size %d, safetensors.Write wrote %d", r.size, wb.Len())
			}
			got, err := io.ReadAll(tc.read(r))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, wb.Bytes()) {
				t.Fatalf("streamed encoding (%d bytes) differs from safetensors.Write (%d bytes)", len(got), wb.Len())
			}
		})
	}
}

// chunkReader reads at most n bytes at a time.
type chunkReader struct {
	r io.Reader
	n int
}

func (c *chunkReader) Read(p []byte) (int, error) { return c.r.Read(p[:min(len(p), c.n)]) }
