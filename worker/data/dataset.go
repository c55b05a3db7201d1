package data

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Source opens shard bytes by name. LocalDir reads files from a directory; an
// object-store source (ranged GETs behind io.ReaderAt) plugs in the same way.
type Source interface {
	// Open returns the shard called name. The caller closes the Blob.
	Open(ctx context.Context, name string) (Blob, error)
}

// Blob is random-access, sized shard content.
type Blob interface {
	io.ReaderAt
	io.Closer
	// Size returns the length of the content in bytes.
	Size() int64
}

// LocalDir is a Source over the files of a directory; names are paths
// relative to it (absolute names are used as they are).
type LocalDir string

// Open opens the file name under the directory.
func (d LocalDir) Open(ctx context.Context, name string) (Blob, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p := name
	if !filepath.IsAbs(p) {
		p = filepath.Join(string(d), name)
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("data: open shard: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("data: open shard: %w", err)
	}
	return fileBlob{f, st.Size()}, nil
}

type fileBlob struct {
	*os.File
	size int64
}

func (b fileBlob) Size() int64 { return b.size }

// ManifestName is the file name of a dataset manifest inside a dataset
// directory; when present, Open uses it instead of listing *.m2tok files.
const ManifestName = "manifest.json"

// manifestFormat identifies manifest files.
const manifestFormat = "m2tok-manifest"

// Manifest lists the shards of a dataset in stream order with what their
// headers must say. Shard paths are relative to the manifest's directory.
type Manifest struct {
	Format    string          `json:"format"`              // always "m2tok-manifest"
	Version   int             `json:"version"`             // manifest version, 1
	Tokenizer string          `json:"tokenizer,omitempty"` // e.g. "byte" or "byte+eod"; informative
	VocabSize uint32          `json:"vocab_size"`          // vocabulary size of every shard
	Tokens    uint64          `json:"tokens"`              // total tokens over all shards
	Shards    []ManifestShard `json:"shards"`              // in stream order
}

// ManifestShard is one shard entry of a Manifest.
type ManifestShard struct {
	Path   string `json:"path"`   // relative to the manifest's directory
	Tokens uint64 `json:"tokens"` // token count of the shard header
	Width  int    `json:"width"`  // token width of the shard header
	CRC32C string `json:"crc32c"` // token checksum of the shard header, 8 lowercase hex digits
}

// Validate checks the manifest's own consistency.
func (m *Manifest) Validate() error {
	if m.Format != manifestFormat {
		return invalidf("manifest format %q, must be %q", m.Format, manifestFormat)
	}
	if m.Version != 1 {
		return invalidf("manifest version %d, must be 1", m.Version)
	}
	if len(m.Shards) == 0 {
		return fmt.Errorf("%w: manifest lists no shards", ErrNoShards)
	}
	var total uint64
	for i, s := range m.Shards {
		if s.Path == "" {
			return invalidf("manifest shards[%d].path is empty", i)
		}
		total += s.Tokens
	}
	if total != m.Tokens {
		return fmt.Errorf("%w: manifest tokens %d, shards sum to %d", ErrMismatch, m.Tokens, total)
	}
	return nil
}

// ReadManifest reads and validates the manifest at path.
func ReadManifest(path string) (*Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("data: read manifest: %w", err)
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%w: manifest %s: %v", ErrInvalidArgument, path, err)
	}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	return &m, nil
}

// WriteManifest writes m to path atomically (temporary file, sync, rename,
// directory sync). The output is deterministic for equal manifests.
func WriteManifest(path string, m *Manifest) error {
	if err := m.Validate(); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("data: encode manifest: %w", err)
	}
	b = append(b, '\n')
	return writeFileAtomic(path, b)
}

func writeFileAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("data: write %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("data: write %s: %w", path, err)
	}
	return syncDir(dir)
}

// Dataset is an ordered list of shards viewed as one token stream. Sample i
// of sequence length L is the window of L+1 tokens starting at stream token
// i*L: its inputs are the first L tokens and its targets the last L, so
// targets are pre-shifted by one. Windows may cross shard boundaries. A
// Dataset is safe for concurrent reads.
type Dataset struct {
	shards []*Shard
	starts []uint64 // starts[i] is the stream index of shard i's first token
	total  uint64
	vocab  uint32
}

// NewDataset views shards, in the given order, as one stream. All shards must
// declare the same vocabulary size. The Dataset takes ownership of the shards:
// its Close closes them.
func NewDataset(shards []*Shard) (*Dataset, error) {
	if len(shards) == 0 {
		return nil, ErrNoShards
	}
	d := &Dataset{shards: shards, starts: make([]uint64, len(shards)), vocab: shards[0].hdr.Vocab}
	for i, s := range shards {
		if s.hdr.Vocab != d.vocab {
			return nil, shardErr(s.name, "vocab_size", fmt.Errorf("%w: %d, shard %s has %d", ErrMismatch, s.hdr.Vocab, shards[0].name, d.vocab))
		}
		d.starts[i] = d.total
		d.total += s.hdr.Count
	}
	return d, nil
}

// Open opens the dataset at path: a directory (its manifest.json if present,
// otherwise every *.m2tok file in it, sorted by name), a manifest file
// (*.json), or a single shard file.
func Open(path string) (*Dataset, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("data: open dataset: %w", err)
	}
	if !st.IsDir() {
		if strings.HasSuffix(path, ".json") {
			return OpenManifest(path)
		}
		return OpenShards(path)
	}
	mp := filepath.Join(path, ManifestName)
	if _, err := os.Stat(mp); err == nil {
		return OpenManifest(mp)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("data: open dataset: %w", err)
	}
	names, err := ListShards(path)
	if err != nil {
		return nil, err
	}
	return OpenShards(names...)
}

// ListShards returns the paths of the *.m2tok files directly inside dir,
// sorted by name.
func ListShards(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("data: list shards: %w", err)
	}
	var out []string
	for _, e := range entries {
		if e.Type().IsRegular() && strings.HasSuffix(e.Name(), ShardExt) && !strings.HasPrefix(e.Name(), ".") {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no *%s files in %s", ErrNoShards, ShardExt, dir)
	}
	sort.Strings(out)
	return out, nil
}

// OpenShards opens the given shard files as one stream, in the given order.
func OpenShards(paths ...string) (*Dataset, error) {
	shards := make([]*Shard, 0, len(paths))
	for _, p := range paths {
		s, err := OpenShard(p)
		if err != nil {
			closeAll(shards)
			return nil, err
		}
		shards = append(shards, s)
	}
	d, err := NewDataset(shards)
	if err != nil {
		closeAll(shards)
		return nil, err
	}
	return d, nil
}

// OpenManifest opens the shards listed in the manifest at path and checks
// each header against its entry.
func OpenManifest(path string) (*Dataset, error) {
	m, err := ReadManifest(path)
	if err != nil {
		return nil, err
	}
	return OpenSource(context.Background(), LocalDir(filepath.Dir(path)), m)
}

// OpenSource opens the shards of manifest m from src and checks each header
// against its entry (token count, width, checksum, vocabulary size).
func OpenSource(ctx context.Context, src Source, m *Manifest) (*Dataset, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	shards := make([]*Shard, 0, len(m.Shards))
	fail := func(err error) (*Dataset, error) {
		closeAll(shards)
		return nil, err
	}
	for _, e := range m.Shards {
		b, err := src.Open(ctx, e.Path)
		if err != nil {
			return fail(err)
		}
		s, err := NewShard(e.Path, b, b.Size())
		if err != nil {
			b.Close()
			return fail(err)
		}
		s.closer = b
		shards = append(shards, s)
		h := s.hdr
		switch {
		case h.Count != e.Tokens:
			return fail(shardErr(e.Path, "token_count", fmt.Errorf("%w: header %d, manifest %d", ErrMismatch, h.Count, e.Tokens)))
		case h.Width != e.Width:
			return fail(shardErr(e.Path, "token_width", fmt.Errorf("%w: header %d, manifest %d", ErrMismatch, h.Width, e.Width)))
		case fmt.Sprintf("%08x", h.Checksum) != e.CRC32C:
			return fail(shardErr(e.Path, "checksum_crc32c", fmt.Errorf("%w: header %08x, manifest %s", ErrMismatch, h.Checksum, e.CRC32C)))
		case h.Vocab != m.VocabSize:
			return fail(shardErr(e.Path, "vocab_size", fmt.Errorf("%w: header %d, manifest %d", ErrMismatch, h.Vocab, m.VocabSize)))
		}
	}
	d, err := NewDataset(shards)
	if err != nil {
		return fail(err)
	}
	return d, nil
}

func closeAll(shards []*Shard) {
	for _, s := range shards {
		s.Close()
	}
}

// Close closes every shard.
func (d *Dataset) Close() error {
	var errs []error
	for _, s := range d.shards {
		if err := s.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Shards returns the shards in stream order. The slice must not be modified.
func (d *Dataset) Shards() []*Shard { return d.shards }

// Tokens returns the number of tokens in the stream.
func (d *Dataset) Tokens() uint64 { return d.total }

// Vocab returns the vocabulary size shared by all shards.
func (d *Dataset) Vocab() uint32 { return d.vocab }

// NumSamples returns the number of samples of sequence length seqLen:
// (Tokens()-1)/seqLen, or 0 when the stream is shorter than one window.
func (d *Dataset) NumSamples(seqLen int) uint64 {
	if seqLen <= 0 || d.total == 0 {
		return 0
	}
	return (d.total - 1) / uint64(seqLen)
}

// ReadTokens fills dst with the stream tokens starting at start, crossing
// shard boundaries as needed.
func (d *Dataset) ReadTokens(dst []int32, start uint64) error {
	bp := bufPool.Get().(*[]byte)
	err := d.readTokens(dst, start, bp)
	bufPool.Put(bp)
	return err
}

func (d *Dataset) readTokens(dst []int32, start uint64, scratch *[]byte) error {
	n := uint64(len(dst))
	if start > d.total || n > d.total-start {
		return fmt.Errorf("%w: stream tokens [%d, %d) of %d", ErrOutOfRange, start, start+n, d.total)
	}
	// The last shard whose start is <= start holds the first token.
	i := sort.Search(len(d.starts), func(i int) bool { return d.starts[i] > start }) - 1
	for len(dst) > 0 {
		s := d.shards[i]
		off := start - d.starts[i]
		k := min(uint64(len(dst)), s.hdr.Count-off)
		if err := s.readTokens(dst[:k], off, scratch); err != nil {
			return err
		}
		dst, start = dst[k:], start+k
		i++
	}
	return nil
}

// Sample writes sample i of sequence length len(inputs) into inputs and
// targets (both of length L): inputs = stream[i*L : i*L+L], targets =
// stream[i*L+1 : i*L+L+1].
func (d *Dataset) Sample(i uint64, inputs, targets []int32) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	win := make([]int32, len(inputs)+1)
	return d.sample(i, inputs, targets, win, bp)
}

func (d *Dataset) sample(i uint64, inputs, targets, win []int32, scratch *[]byte) error {
	L := len(inputs)
	if L == 0 || len(targets) != L {
		return invalidf("sample buffers: inputs %d and targets %d tokens, must be equal and > 0", len(inputs), len(targets))
	}
	if n := d.NumSamples(L); i >= n {
		return fmt.Errorf("%w: sample %d of %d at seq_len %d", ErrOutOfRange, i, n, L)
	}
	win = win[:L+1]
	if err := d.readTokens(win, i*uint64(L), scratch); err != nil {
		return err
	}
	copy(inputs, win[:L])
	copy(targets, win[1:])
	return nil
}

// Verify verifies every shard (see Shard.Verify), stopping at the first error.
func (d *Dataset) Verify(ctx context.Context) error {
	for _, s := range d.shards {
		if err := s.VerifyContext(ctx); err != nil {
			return err
		}
	}
	return nil
}
