package checkpoint

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m2train/m2train/model"
)

// oddSegment is a segment size that is no multiple of any element size,
// so that segment boundaries split elements of every tensor they cross.
const oddSegment = MinSegmentSize + 3

// largerState is a checkpoint of several segments per tensor object at
// MinSegmentSize: about 0.7 MB of weights and 1.4 MB of moments in fp32.
func largerState[T model.Float](step int) *State[T] {
	cfg := model.DefaultConfig(64, 2, 1008)
	cfg.HeadDim, cfg.DState = 16, 16
	cfg.NHeads = cfg.Expand * cfg.DModel / cfg.HeadDim
	l := model.NewLayout(cfg)
	s := &State[T]{Config: cfg, Layout: l, Params: make([]T, l.Total), M: make([]T, l.Total), V: make([]T, l.Total),
		Trainer: TrainerState{Step: step, Cursor: 77, Seed: 5, OptimizerStep: int64(step), Loss: 2.25, Precision: "float32"}}
	for i := range s.Params {
		// Values that float32 cannot hold exactly, so that a float64
		// checkpoint read into float32 buffers rounds.
		s.Params[i] = T(float64(i)*1e-3 + 1.0/3)
		s.M[i] = T(-float64(i) / 7)
		s.V[i] = T(float64(i%97) * 1e-7)
	}
	return s
}

func sameBits[T model.Float](a, b *State[T]) bool {
	return bytes.Equal(bytesOf(a.Params), bytesOf(b.Params)) && bytes.Equal(bytesOf(a.M), bytesOf(b.M)) &&
		bytes.Equal(bytesOf(a.V), bytesOf(b.V)) && reflect.DeepEqual(a.Trainer, b.Trainer) && reflect.DeepEqual(a.Config, b.Config)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestSegmentDigestsRoundTrip saves with two segment sizes and checks the
// manifest against the files: the whole digest is what sha256sum prints,
// and each segment's digest is that of its bytes.
func TestSegmentDigestsRoundTrip(t *testing.T) {
	ctx := context.Background()
	for _, seg := range []int64{MinSegmentSize, oddSegment} {
		t.Run(fmt.Sprint(seg), func(t *testing.T) {
			store := LocalStore{Root: t.TempDir()}
			want := largerState[float32](9)
			man, err := SaveWith(ctx, store, "j", want, SaveOptions{SegmentSize: seg})
			if err != nil {
				t.Fatal(err)
			}
			read, err := ReadManifest(ctx, store, "j", 9)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(read, man) {
				t.Fatalf("manifest on storage %+v differs from the one Save returned %+v", read, man)
			}
			if man.Format != ManifestFormat || man.SegmentSize != seg {
				t.Fatalf("format %q, segment size %d; want %q, %d", man.Format, man.SegmentSize, ManifestFormat, seg)
			}
			for _, o := range man.Objects {
				b, err := os.ReadFile(filepath.Join(store.Root, "j", StepDir(9), o.Name))
				if err != nil {
					t.Fatal(err)
				}
				if int64(len(b)) != o.Size || sha256Hex(b) != o.SHA256 {
					t.Errorf("%s: %d bytes, sha256 %s; the manifest says %d, %s", o.Name, len(b), sha256Hex(b), o.Size, o.SHA256)
				}
				if n := segmentCount(o.Size, seg); int64(len(o.Segments)) != n {
					t.Fatalf("%s: %d segments, want %d", o.Name, len(o.Segments), n)
				}
				for i, d := range o.Segments {
					part := b[int64(i)*seg : min(int64(i+1)*seg, o.Size)]
					if sha256Hex(part) != d {
						t.Errorf("%s segment %d: sha256 %s, the manifest says %s", o.Name, i, sha256Hex(part), d)
					}
				}
			}
			if n := len(man.Objects[2].Segments); man.Objects[2].Name != OptimizerObject || n < 8 {
				t.Fatalf("%s has %d segments; the test needs a checkpoint of many", man.Objects[2].Name, n)
			}
			got, _, err := Load[float32](ctx, store, "j", 9)
			if err != nil {
				t.Fatal(err)
			}
			if !sameBits(got, want) {
				t.Error("the loaded state differs from the saved one")
			}
		})
	}
}

// TestConcurrentLoadEqualsDecode loads one checkpoint with several
// concurrencies, through the parallel segment path, and compares every
// bit with what ReadVerified and Decode make of the same objects: in the
// buffers' own precision and converted either way, with segment
// boundaries that split elements.
func TestConcurrentLoadEqualsDecode(t *testing.T) {
	t.Run("float32", func(t *testing.T) { checkLoadEqualsDecode[float32](t, largerState[float32](3)) })
	t.Run("float64 into float32", func(t *testing.T) { checkLoadEqualsDecode[float32](t, largerState[float64](3)) })
	t.Run("float32 into float64", func(t *testing.T) { checkLoadEqualsDecode[float64](t, largerState[float32](3)) })
}

func checkLoadEqualsDecode[T, S model.Float](t *testing.T, saved *State[S]) {
	ctx := context.Background()
	store := LocalStore{Root: t.TempDir()}
	if _, err := SaveWith(ctx, store, "", saved, SaveOptions{SegmentSize: oddSegment}); err != nil {
		t.Fatal(err)
	}
	_, objs, err := ReadVerified(ctx, store, "", 3)
	if err != nil {
		t.Fatal(err)
	}
	want, err := Decode[T](objs)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []int{1, 3, 8} {
		got, _, err := LoadWith[T](ctx, store, "", 3, LoadOptions{Concurrency: c})
		if err != nil {
			t.Fatalf("concurrency %d: %v", c, err)
		}
		if !sameBits(got, want) {
			t.Errorf("concurrency %d: Load and Decode disagree", c)
		}
	}
	// The sequential stream of a store without range reads agrees too.
	got, _, err := Load[T](ctx, plainStore{store}, "", 3)
	if err != nil {
		t.Fatal(err)
	}
	if !sameBits(got, want) {
		t.Error("the streaming Load and Decode disagree")
	}
}

// plainStore hides the range reads of the store it wraps.
type plainStore struct{ Store }

// stepFile is the path of an object of step's checkpoint in a local store.
func stepFile(s LocalStore, step int, name string) string {
	return filepath.Join(s.Root, StepDir(step), name)
}

func editFile(t *testing.T, p string, edit func([]byte) []byte) {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, edit(b), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestLoadNamesCorruptSegment flips one byte of a tensor object and
// checks that the load fails with ErrCorrupt naming the object and the
// segment that holds the byte, wherever it is: in tensor data, or in the
// header, where it may first show as a header that does not parse.
func TestLoadNamesCorruptSegment(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		object string
		at     func(size int64) int64
	}{
		{"middle segment", OptimizerObject, func(size int64) int64 { return size / 2 }},
		{"last byte", ModelObject, func(size int64) int64 { return size - 1 }},
		{"header json", ModelObject, func(int64) int64 { return 9 }},
		{"header length", OptimizerObject, func(int64) int64 { return 6 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := LocalStore{Root: t.TempDir()}
			man, err := SaveWith(ctx, store, "", largerState[float32](5), SaveOptions{SegmentSize: MinSegmentSize})
			if err != nil {
				t.Fatal(err)
			}
			var obj Object
			for _, o := range man.Objects {
				if o.Name == tc.object {
					obj = o
				}
			}
			at := tc.at(obj.Size)
			editFile(t, stepFile(store, 5, tc.object), func(b []byte) []byte { b[at] ^= 0x40; return b })
			_, _, err = Load[float32](ctx, store, "", 5)
			seg := at / MinSegmentSize
			want := fmt.Sprintf("%s segment %d of %d (bytes %d to %d) has sha256", tc.object, seg, len(obj.Segments), seg*MinSegmentSize, min((seg+1)*MinSegmentSize, obj.Size))
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), want) {
				t.Fatalf("Load: %v\nwant ErrCorrupt saying %q", err, want)
			}
		})
	}
}

// TestLoadTruncatedObject cuts a tensor object short, in its data and in
// its length prefix, and grows one: each is ErrCorrupt naming the object
// and both sizes, through range reads and through the stream.
func TestLoadTruncatedObject(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		edit func([]byte) []byte
	}{
		{"data", func(b []byte) []byte { return b[:len(b)-MinSegmentSize-5] }},
		{"length prefix", func(b []byte) []byte { return b[:4] }},
		{"empty", func(b []byte) []byte { return nil }},
		{"grown", func(b []byte) []byte { return append(b, 0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := LocalStore{Root: t.TempDir()}
			man, err := SaveWith(ctx, store, "", largerState[float32](5), SaveOptions{SegmentSize: MinSegmentSize})
			if err != nil {
				t.Fatal(err)
			}
			editFile(t, stepFile(store, 5, ModelObject), tc.edit)
			info, err := os.Stat(stepFile(store, 5, ModelObject))
			if err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprintf("%s has %d bytes, the manifest says %d", ModelObject, info.Size(), man.Objects[1].Size)
			if _, _, err := Load[float32](ctx, store, "", 5); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), want) {
				t.Errorf("Load: %v\nwant ErrCorrupt saying %q", err, want)
			}
			if _, _, err := Load[float32](ctx, plainStore{store}, "", 5); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), ModelObject) {
				t.Errorf("streaming Load: %v, want ErrCorrupt naming %s", err, ModelObject)
			}
		})
	}
}

// TestLoadOldFormatManifest rewrites a manifest as format v1, without
// segments: the checkpoint still loads, verified object by object.
func TestLoadOldFormatManifest(t *testing.T) {
	ctx := context.Background()
	store := LocalStore{Root: t.TempDir()}
	want := largerState[float32](6)
	man, err := SaveWith(ctx, store, "", want, SaveOptions{SegmentSize: MinSegmentSize})
	if err != nil {
		t.Fatal(err)
	}
	type v1Object struct {
		Name   string `json:"name"`
		Size   int64  `json:"size"`
		SHA256 string `json:"sha256"`
	}
	v1 := struct {
		Format  string     `json:"format"`
		Step    int        `json:"step"`
		Objects []v1Object `json:"objects"`
	}{Format: ManifestFormatV1, Step: 6}
	for _, o := range man.Objects {
		v1.Objects = append(v1.Objects, v1Object{o.Name, o.Size, o.SHA256})
	}
	b, err := json.Marshal(v1)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stepFile(store, 6, ManifestObject), b, 0o644); err != nil {
		t.Fatal(err)
	}
	got, read, err := Load[float32](ctx, store, "", 6)
	if err != nil {
		t.Fatal(err)
	}
	if read.Format != ManifestFormatV1 || read.SegmentSize != 0 || !sameBits(got, want) {
		t.Fatalf("v1 checkpoint: format %q, segment size %d, same state %v", read.Format, read.SegmentSize, sameBits(got, want))
	}
	// A damaged object is found by its whole digest.
	editFile(t, stepFile(store, 6, OptimizerObject), func(b []byte) []byte { b[len(b)/2] ^= 1; return b })
	_, _, err = Load[float32](ctx, store, "", 6)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), OptimizerObject+" has sha256") {
		t.Errorf("damaged v1 checkpoint: %v, want ErrCorrupt on the sha256 of %s", err, OptimizerObject)
	}
}

// TestReadManifestRejectsBadSegments checks the rules a manifest's
// segments must follow, each by a manifest that breaks one.
func TestReadManifestRejectsBadSegments(t *testing.T) {
	ctx := context.Background()
	digest := strings.Repeat("ab", 32)
	good := func() *Manifest {
		return &Manifest{Format: ManifestFormat, Step: 1, SegmentSize: MinSegmentSize, Objects: []Object{
			{Name: "a", Size: MinSegmentSize + 1, SHA256: digest, Segments: []string{digest, digest}},
			{Name: "b", Size: 0, SHA256: digest},
		}}
	}
	for _, tc := range []struct {
		name string
		edit func(*Manifest)
		want string // in the error; "" for a manifest that must be accepted
	}{
		{"good", func(*Manifest) {}, ""},
		{"v1 without segments", func(m *Manifest) {
			m.Format, m.SegmentSize = ManifestFormatV1, 0
			m.Objects[0].Segments = nil
		}, ""},
		{"segment size too small", func(m *Manifest) { m.SegmentSize = MinSegmentSize - 1 }, "segment_size must be between"},
		{"segment size missing", func(m *Manifest) { m.SegmentSize = 0 }, "segment_size must be between"},
		{"too few segments", func(m *Manifest) { m.Objects[0].Segments = m.Objects[0].Segments[:1] }, "a: 1 segments, want 2"},
		{"too many segments", func(m *Manifest) { m.Objects[1].Segments = []string{digest} }, "b: 1 segments, want 0"},
		{"segment not hex", func(m *Manifest) { m.Objects[0].Segments[1] = strings.Repeat("AB", 32) }, "segments[1]"},
		{"sha256 short", func(m *Manifest) { m.Objects[1].SHA256 = "ab" }, "sha256 \"ab\""},
		{"v1 with segments", func(m *Manifest) { m.Format, m.SegmentSize = ManifestFormatV1, 0 }, "has no segments"},
		{"v1 with a segment size", func(m *Manifest) { m.Format = ManifestFormatV1 }, "has no segment_size"},
		{"unknown format", func(m *Manifest) { m.Format = "m2train-checkpoint/v3" }, "format \"m2train-checkpoint/v3\""},
		{"wrong step", func(m *Manifest) { m.Step = 2 }, "step is 2, want 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := LocalStore{Root: t.TempDir()}
			m := good()
			tc.edit(m)
			b, err := json.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			if err := PutBytes(ctx, store, JoinKey(StepDir(1), ManifestObject), b); err != nil {
				t.Fatal(err)
			}
			_, err = ReadManifest(ctx, store, "", 1)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("a valid manifest was rejected: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ReadManifest: %v\nwant ErrCorrupt saying %q", err, tc.want)
			}
		})
	}
}

func TestOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{SaveOptions{SegmentSize: MinSegmentSize - 1}.Validate(), "segment size must be between"},
		{SaveOptions{SegmentSize: MaxSegmentSize + 1}.Validate(), "segment size must be between"},
		{LoadOptions{Concurrency: -1}.Validate(), "concurrency must be between"},
		{LoadOptions{Concurrency: MaxLoadConcurrency + 1}.Validate(), "concurrency must be between"},
	} {
		if tc.err == nil || !strings.Contains(tc.err.Error(), tc.want) {
			t.Errorf("got %v, want an error saying %q", tc.err, tc.want)
		}
	}
	for _, err := range []error{SaveOptions{}.Validate(), SaveOptions{SegmentSize: MaxSegmentSize}.Validate(),
		LoadOptions{}.Validate(), LoadOptions{Concurrency: 1}.Validate()} {
		if err != nil {
			t.Errorf("valid options rejected: %v", err)
		}
	}
	if c := (LoadOptions{}).concurrency(); c < 4 || c > 64 {
		t.Errorf("default concurrency %d is outside [4, 64]", c)
	}
}

// hookedRanges calls hook before each range read of the store it wraps.
type hookedRanges struct {
	*S3Store
	hook func(name string, off int64)
}

func (h hookedRanges) OpenRanges(ctx context.Context, name string) (RangeReader, error) {
	rr, err := h.S3Store.OpenRanges(ctx, name)
	if err != nil {
		return nil, err
	}
	return hookedRangeReader{rr, func(off int64) { h.hook(name, off) }}, nil
}

type hookedRangeReader struct {
	RangeReader
	hook func(off int64)
}

func (h hookedRangeReader) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	h.hook(off)
	return h.RangeReader.ReadRange(ctx, off, n)
}

// TestS3LoadRetriesAcrossRestart kills the server in the middle of a
// parallel load, once some segments are in, and restarts it when the
// first request fails: the range reads retry and resume, and the state
// loads whole.
func TestS3LoadRetriesAcrossRestart(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	cfg := g.config()
	cfg.Retry = RetryPolicy{Attempts: 10, BaseDelay: 10 * time.Millisecond, MaxDelay: 500 * time.Millisecond}
	var restarted atomic.Bool
	var retries atomic.Int32
	cfg.OnRetry = func(op, name string, attempt int, err error) {
		retries.Add(1)
		if restarted.CompareAndSwap(false, true) {
			g.restart()
		}
	}
	s := g.store(t, cfg)
	saved := largerState[float32](7)
	man, err := SaveWith(ctx, s, "job", saved, SaveOptions{SegmentSize: MinSegmentSize})
	if err != nil {
		t.Fatal(err)
	}
	var reads atomic.Int32
	var killed atomic.Bool
	// One read finds each header; the segments past what it read follow.
	want := 0
	for _, o := range man.Objects[1:3] {
		want += 1 + len(o.Segments) - int(min(o.Size, headProbe)/MinSegmentSize)
	}
	store := hookedRanges{s, func(name string, off int64) {
		// Both headers and a few segments are read first.
		if reads.Add(1) == 8 && killed.CompareAndSwap(false, true) {
			g.kill()
		}
	}}
	got, _, err := LoadWith[float32](ctx, store, "job", 7, LoadOptions{Concurrency: 3})
	if err != nil {
		t.Fatalf("load across a restart: %v", err)
	}
	if !killed.Load() || int(reads.Load()) != want {
		t.Fatalf("%d range reads, want %d; killed %v", reads.Load(), want, killed.Load())
	}
	if retries.Load() == 0 {
		t.Fatal("no request was retried, so the server was not down")
	}
	if !sameBits(got, saved) {
		t.Fatal("the state loaded across the restart differs from the saved one")
	}
}
