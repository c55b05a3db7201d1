package checkpoint

import (
	"bytes"
	"errors"
	"io"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/safetensors"
)

// tensorData is one tensor of a safetensors file being encoded: float
// values converted on the fly, or raw bytes already encoded in dtype.
type tensorData[T model.Float] struct {
	name  string
	shape []int
	vals  []T
	raw   []byte
	dtype safetensors.DType // of raw
}

// tensorReader is a safetensors file as an io.Reader whose bytes are
// produced as they are read: the header, then each tensor's values
// converted straight into the caller's buffer. It holds no copy of the
// tensors, and its size is known before the first read.
type tensorReader[T model.Float] struct {
	size    int64
	pend    []byte // bytes produced but not yet read: the header, or part of one value
	one     [8]byte
	tensors []tensorData[T]
	dtype   safetensors.DType
	elem    int  // bytes of one converted value
	same    bool // the buffers hold the encoding already: copy their bytes

	ti  int // current tensor
	off int // values (or raw bytes) of it already produced
}

// errHeaderOnly stops safetensors.WriteStream once it has written the
// header, which is all safetensorsHeader wants of it.
var errHeaderOnly = errors.New("header only")

// safetensorsHeader renders the length prefix and header of a safetensors
// file of tensors through the safetensors package, so that the layout is
// that package's byte for byte.
func safetensorsHeader(tensors []safetensors.StreamTensor, meta map[string]string) ([]byte, error) {
	stopped := make([]safetensors.StreamTensor, len(tensors))
	for i, t := range tensors {
		t.WriteData = func(io.Writer) error { return errHeaderOnly }
		stopped[i] = t
	}
	var b bytes.Buffer
	err := safetensors.WriteStream(&b, stopped, meta)
	if len(tensors) > 0 && !errors.Is(err, errHeaderOnly) {
		if err == nil {
			err = errors.New("checkpoint: safetensors wrote no tensor data")
		}
		return nil, err
	}
	if len(tensors) == 0 && err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func newTensorReader[T model.Float](tensors []tensorData[T], dtype safetensors.DType, meta map[string]string) (*tensorReader[T], error) {
	st := make([]safetensors.StreamTensor, len(tensors))
	var size int64
	for i, t := range tensors {
		dt := dtype
		if t.raw != nil {
			dt = t.dtype
			size += int64(len(t.raw))
		} else {
			size += int64(len(t.vals)) * int64(dtype.Size())
		}
		st[i] = safetensors.StreamTensor{Name: t.name, DType: dt, Shape: t.shape}
	}
	header, err := safetensorsHeader(st, meta)
	if err != nil {
		return nil, err
	}
	return &tensorReader[T]{size: size + int64(len(header)), pend: header, tensors: tensors, dtype: dtype, elem: dtype.Size(),
		same: littleEndian && dtype == dtypeOf[T]()}, nil
}

// Read fills p with the next bytes of the file. Values are converted
// straight into p; when p has room for less than one value, the value is
// converted aside and handed out over several reads.
func (r *tensorReader[T]) Read(p []byte) (int, error) {
	n := copy(p, r.pend)
	r.pend = r.pend[n:]
	for n < len(p) && r.ti < len(r.tensors) {
		t := &r.tensors[r.ti]
		if len(t.raw) == 0 && len(t.vals) == 0 {
			r.ti, r.off = r.ti+1, 0
			continue
		}
		var k int
		switch room := (len(p) - n) / r.elem; {
		case t.raw != nil:
			k = copy(p[n:], t.raw[r.off:])
			r.off += k
			n += k
		case room == 0 && n > 0:
			return n, nil
		case room == 0:
			one, err := safetensors.AppendFloats(r.one[:0], t.vals[r.off:r.off+1], r.dtype)
			if err != nil {
				return 0, err
			}
			n = copy(p, one)
			r.pend = one[n:]
			r.off++
		default:
			k = min(room, len(t.vals)-r.off)
			if r.same {
				copy(p[n:], bytesOf(t.vals[r.off:r.off+k]))
			} else if _, err := safetensors.AppendFloats(p[n:n:n+k*r.elem], t.vals[r.off:r.off+k], r.dtype); err != nil {
				return n, err
			}
			r.off += k
			n += k * r.elem
		}
		if (t.raw != nil && r.off == len(t.raw)) || (t.raw == nil && r.off == len(t.vals)) {
			r.ti, r.off = r.ti+1, 0
		}
	}
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return n, nil
}
