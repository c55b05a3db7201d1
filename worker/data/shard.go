package data

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"sync"
)

// Shard format constants. The layout is specified in docs/dataset-format.md.
const (
	// ShardExt is the file extension of token shards.
	ShardExt = ".m2tok"
	// HeaderSize is the size in bytes of the fixed shard header.
	HeaderSize = 64
	// FormatVersion is the shard format version this package writes and reads.
	FormatVersion = 1
	// MaxVocab is the largest vocabulary a shard may declare: every token must
	// fit a non-negative int32, the type the loader hands to the model.
	MaxVocab = 1 << 31
)

// shardMagic opens every shard file.
var shardMagic = [8]byte{'M', '2', 'T', 'O', 'K', 'S', 'H', 'D'}

// castagnoli is the CRC-32C table used for the header and token checksums.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Header byte offsets.
const (
	offMagic     = 0
	offVersion   = 8
	offWidth     = 10
	offVocab     = 12
	offCount     = 16
	offChecksum  = 24
	offReserved  = 28
	offHeaderCRC = 60
)

// Header is the decoded fixed header of a shard.
type Header struct {
	Version  uint16 // format version; FormatVersion for shards written here
	Width    int    // bytes per token: 2 (uint16) or 4 (uint32)
	Vocab    uint32 // vocabulary size; every token is < Vocab
	Count    uint64 // number of tokens after the header
	Checksum uint32 // CRC-32C (Castagnoli) of the token bytes
}

// DataSize is the number of token bytes the header announces.
func (h Header) DataSize() uint64 { return h.Count * uint64(h.Width) }

// encode writes the header, including its own checksum, into a HeaderSize buffer.
func (h Header) encode() [HeaderSize]byte {
	var b [HeaderSize]byte
	copy(b[offMagic:], shardMagic[:])
	binary.LittleEndian.PutUint16(b[offVersion:], h.Version)
	binary.LittleEndian.PutUint16(b[offWidth:], uint16(h.Width))
	binary.LittleEndian.PutUint32(b[offVocab:], h.Vocab)
	binary.LittleEndian.PutUint64(b[offCount:], h.Count)
	binary.LittleEndian.PutUint32(b[offChecksum:], h.Checksum)
	binary.LittleEndian.PutUint32(b[offHeaderCRC:], crc32.Checksum(b[:offHeaderCRC], castagnoli))
	return b
}

// decodeHeader parses and validates a header read from the file named path.
// Checks run in the order the fields appear so that the first broken field is
// the one reported.
func decodeHeader(path string, b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, shardErr(path, "header", fmt.Errorf("%w: %d bytes, need %d", ErrTruncated, len(b), HeaderSize))
	}
	if [8]byte(b[offMagic:offVersion]) != shardMagic {
		return Header{}, shardErr(path, "magic", fmt.Errorf("%w: got %q, want %q", ErrBadMagic, b[offMagic:offVersion], shardMagic[:]))
	}
	h := Header{
		Version:  binary.LittleEndian.Uint16(b[offVersion:]),
		Width:    int(binary.LittleEndian.Uint16(b[offWidth:])),
		Vocab:    binary.LittleEndian.Uint32(b[offVocab:]),
		Count:    binary.LittleEndian.Uint64(b[offCount:]),
		Checksum: binary.LittleEndian.Uint32(b[offChecksum:]),
	}
	if h.Version != FormatVersion {
		return Header{}, shardErr(path, "version", fmt.Errorf("%w: %d, this reader supports %d", ErrUnsupportedVersion, h.Version, FormatVersion))
	}
	if want, got := crc32.Checksum(b[:offHeaderCRC], castagnoli), binary.LittleEndian.Uint32(b[offHeaderCRC:]); want != got {
		return Header{}, shardErr(path, "header_crc32c", fmt.Errorf("%w: stored %08x, computed %08x", ErrBadHeader, got, want))
	}
	if err := validateWidthVocab(h.Width, h.Vocab); err != nil {
		field := "vocab_size"
		if errors.Is(err, ErrBadWidth) {
			field = "token_width"
		}
		return Header{}, shardErr(path, field, err)
	}
	for i, c := range b[offReserved:offHeaderCRC] {
		if c != 0 {
			return Header{}, shardErr(path, "reserved", fmt.Errorf("%w: byte %d is %#x, must be 0", ErrBadHeader, offReserved+i, c))
		}
	}
	if h.Count > (math.MaxInt64-HeaderSize)/uint64(h.Width) {
		return Header{}, shardErr(path, "token_count", fmt.Errorf("%w: %d tokens cannot fit a file", ErrBadHeader, h.Count))
	}
	return h, nil
}

// validateWidthVocab checks the token width and the vocabulary size it must hold.
func validateWidthVocab(width int, vocab uint32) error {
	switch width {
	case 2:
		if vocab == 0 || vocab > 1<<16 {
			return fmt.Errorf("%w: vocab_size %d must be in [1, 65536] for 2-byte tokens", ErrBadHeader, vocab)
		}
	case 4:
		if vocab == 0 || vocab > MaxVocab {
			return fmt.Errorf("%w: vocab_size %d must be in [1, %d] for 4-byte tokens", ErrBadHeader, vocab, uint64(MaxVocab))
		}
	default:
		return fmt.Errorf("%w: %d, must be 2 or 4", ErrBadWidth, width)
	}
	return nil
}

// WidthFor returns the narrowest token width (2 or 4) that holds vocab.
func WidthFor(vocab uint32) int {
	if vocab <= 1<<16 {
		return 2
	}
	return 4
}

// WriterOptions configure a ShardWriter.
type WriterOptions struct {
	// Width is the token width in bytes, 2 or 4. Zero picks WidthFor(Vocab).
	Width int
	// Vocab is the vocabulary size; required. Writes of tokens outside
	// [0, Vocab) fail.
	Vocab uint32
}

// ShardWriter streams tokens into a new shard. Tokens go to a temporary file
// next to the destination; Close writes the final header, syncs, renames the
// file into place and syncs the directory, so a shard either exists complete
// or not at all. A ShardWriter is not safe for concurrent use.
type ShardWriter struct {
	path   string
	f      *os.File
	hdr    Header
	crc    uint32
	buf    []byte
	err    error // sticky: once set, every call returns it
	closed bool
}

const writeBufSize = 1 << 18

// NewShardWriter starts a shard that will appear at path when Close succeeds.
func NewShardWriter(path string, opts WriterOptions) (*ShardWriter, error) {
	if opts.Width == 0 {
		opts.Width = WidthFor(opts.Vocab)
	}
	if err := validateWidthVocab(opts.Width, opts.Vocab); err != nil {
		return nil, invalidf("WriterOptions: %v", err)
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("data: create shard %s: %w", path, err)
	}
	w := &ShardWriter{
		path: path,
		f:    f,
		hdr:  Header{Version: FormatVersion, Width: opts.Width, Vocab: opts.Vocab},
		buf:  make([]byte, 0, writeBufSize),
	}
	// The header is written as zeros first and overwritten on Close; a crash
	// leaves only a temporary file without a valid magic.
	var zero [HeaderSize]byte
	if _, err := f.Write(zero[:]); err != nil {
		w.abort()
		return nil, fmt.Errorf("data: write shard %s: %w", path, err)
	}
	return w, nil
}

// Path returns the final path of the shard.
func (w *ShardWriter) Path() string { return w.path }

// Count returns the number of tokens written so far.
func (w *ShardWriter) Count() uint64 { return w.hdr.Count }

// Write appends tokens. A token outside [0, Vocab) fails the write and the
// whole shard: Close then returns the error and leaves no file behind.
func (w *ShardWriter) Write(tokens []int32) error {
	if w.closed {
		return shardErr(w.path, "write", ErrClosed)
	}
	if w.err != nil {
		return w.err
	}
	width := w.hdr.Width
	for i, t := range tokens {
		if t < 0 || uint32(t) >= w.hdr.Vocab {
			w.err = shardErr(w.path, "tokens", fmt.Errorf("%w: token %d at index %d, vocab_size %d", ErrTokenRange, t, w.hdr.Count+uint64(i), w.hdr.Vocab))
			return w.err
		}
		if len(w.buf)+width > cap(w.buf) {
			if err := w.flush(); err != nil {
				return err
			}
		}
		n := len(w.buf)
		w.buf = w.buf[:n+width]
		if width == 2 {
			binary.LittleEndian.PutUint16(w.buf[n:], uint16(t))
		} else {
			binary.LittleEndian.PutUint32(w.buf[n:], uint32(t))
		}
	}
	w.hdr.Count += uint64(len(tokens))
	return nil
}

// flush writes the buffered token bytes, folding them into the checksum.
func (w *ShardWriter) flush() error {
	w.crc = crc32.Update(w.crc, castagnoli, w.buf)
	if _, err := w.f.Write(w.buf); err != nil {
		w.err = fmt.Errorf("data: write shard %s: %w", w.path, err)
		return w.err
	}
	w.buf = w.buf[:0]
	return nil
}

// Close finishes the shard: it flushes the tokens, writes the header with the
// token count and checksum, syncs, and renames the file into place. If any
// earlier call failed, Close removes the temporary file and returns that error.
// Close on a closed writer returns ErrClosed.
func (w *ShardWriter) Close() error {
	if w.closed {
		return shardErr(w.path, "close", ErrClosed)
	}
	w.closed = true
	if w.err != nil {
		w.abort()
		return w.err
	}
	if err := w.finish(); err != nil {
		w.abort()
		return err
	}
	return nil
}

func (w *ShardWriter) finish() error {
	if err := w.flush(); err != nil {
		return err
	}
	w.hdr.Checksum = w.crc
	hb := w.hdr.encode()
	if _, err := w.f.WriteAt(hb[:], 0); err != nil {
		return fmt.Errorf("data: write shard header %s: %w", w.path, err)
	}
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("data: sync shard %s: %w", w.path, err)
	}
	if err := w.f.Close(); err != nil {
		return fmt.Errorf("data: close shard %s: %w", w.path, err)
	}
	if err := os.Rename(w.f.Name(), w.path); err != nil {
		return fmt.Errorf("data: rename shard %s: %w", w.path, err)
	}
	return syncDir(filepath.Dir(w.path))
}

// Abort discards the shard: the temporary file is removed and no file appears
// at the destination. Abort after a successful Close does nothing.
func (w *ShardWriter) Abort() {
	if w.closed {
		return
	}
	w.closed = true
	w.abort()
}

func (w *ShardWriter) abort() {
	_ = w.f.Close()
	_ = os.Remove(w.f.Name())
}

// Header returns the header as it stands: after a successful Close it is the
// header on disk.
func (w *ShardWriter) Header() Header {
	h := w.hdr
	h.Checksum = w.crc
	return h
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("data: sync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("data: sync dir %s: %w", dir, err)
	}
	return nil
}

// Shard is an open, header-validated shard. Its token reads go through an
// io.ReaderAt, so a Shard is safe for concurrent reads.
type Shard struct {
	name   string
	r      io.ReaderAt
	closer io.Closer
	hdr    Header
	size   int64
}

// OpenShard opens the shard file at path and validates its header: magic,
// version, header checksum, token width, vocabulary size, reserved bytes, and
// that the file size equals HeaderSize + Count*Width. Token bytes are checked
// only by Verify.
func OpenShard(path string) (*Shard, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("data: open shard: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("data: open shard: %w", err)
	}
	s, err := NewShard(path, f, st.Size())
	if err != nil {
		f.Close()
		return nil, err
	}
	s.closer = f
	return s, nil
}

// NewShard validates the header of a shard of size bytes readable through r
// (a file, a memory buffer, or a ranged object-store reader) and returns it.
// name identifies the shard in errors. Close does not close r.
func NewShard(name string, r io.ReaderAt, size int64) (*Shard, error) {
	var b [HeaderSize]byte
	n, err := r.ReadAt(b[:], 0)
	if n < HeaderSize {
		if err == nil || errors.Is(err, io.EOF) {
			return nil, shardErr(name, "header", fmt.Errorf("%w: file is %d bytes, header needs %d", ErrTruncated, size, HeaderSize))
		}
		return nil, shardErr(name, "header", err)
	}
	h, err := decodeHeader(name, b[:])
	if err != nil {
		return nil, err
	}
	want := int64(HeaderSize + h.DataSize())
	switch {
	case size < want:
		return nil, shardErr(name, "token_count", fmt.Errorf("%w: header says %d tokens of %d bytes (%d bytes in all), file has %d", ErrTruncated, h.Count, h.Width, want, size))
	case size > want:
		return nil, shardErr(name, "token_count", fmt.Errorf("%w: header says %d tokens of %d bytes (%d bytes in all), file has %d", ErrTrailingData, h.Count, h.Width, want, size))
	}
	return &Shard{name: name, r: r, hdr: h, size: size}, nil
}

// Name returns the path or name the shard was opened with.
func (s *Shard) Name() string { return s.name }

// Header returns the shard's validated header.
func (s *Shard) Header() Header { return s.hdr }

// Len returns the number of tokens in the shard.
func (s *Shard) Len() uint64 { return s.hdr.Count }

// Close releases the file opened by OpenShard.
func (s *Shard) Close() error {
	if s.closer == nil {
		return nil
	}
	c := s.closer
	s.closer = nil
	return c.Close()
}

// bufPool holds scratch byte buffers for token reads.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 1<<16); return &b }}

// ReadTokens fills dst with the tokens starting at token index start. It
// fails with ErrOutOfRange if the shard ends before dst is full, and with
// ErrTokenRange if a token is not below the vocabulary size.
func (s *Shard) ReadTokens(dst []int32, start uint64) error {
	bp := bufPool.Get().(*[]byte)
	err := s.readTokens(dst, start, bp)
	bufPool.Put(bp)
	return err
}

// readTokens is ReadTokens with a caller-owned scratch buffer, grown as needed.
func (s *Shard) readTokens(dst []int32, start uint64, scratch *[]byte) error {
	n := uint64(len(dst))
	if start > s.hdr.Count || n > s.hdr.Count-start {
		return shardErr(s.name, "tokens", fmt.Errorf("%w: tokens [%d, %d) of %d", ErrOutOfRange, start, start+n, s.hdr.Count))
	}
	if n == 0 {
		return nil
	}
	w := s.hdr.Width
	nb := int(n) * w
	if cap(*scratch) < nb {
		*scratch = make([]byte, nb)
	}
	b := (*scratch)[:nb]
	if _, err := s.r.ReadAt(b, HeaderSize+int64(start)*int64(w)); err != nil {
		return shardErr(s.name, "tokens", fmt.Errorf("read tokens [%d, %d): %w", start, start+n, err))
	}
	bad := decodeTokens(dst, b, w, s.hdr.Vocab)
	if bad >= 0 {
		return shardErr(s.name, "tokens", fmt.Errorf("%w: token %d at index %d, vocab_size %d", ErrTokenRange, uint32(dst[bad]), start+uint64(bad), s.hdr.Vocab))
	}
	return nil
}

// decodeTokens converts little-endian tokens of width w in b into dst and
// returns the index of the first token >= vocab, or -1.
func decodeTokens(dst []int32, b []byte, w int, vocab uint32) int {
	var over uint32
	if w == 2 {
		b = b[:2*len(dst)]
		for i := range dst {
			v := uint32(binary.LittleEndian.Uint16(b[2*i:]))
			over |= boolBit(v >= vocab)
			dst[i] = int32(v)
		}
	} else {
		b = b[:4*len(dst)]
		for i := range dst {
			v := binary.LittleEndian.Uint32(b[4*i:])
			over |= boolBit(v >= vocab)
			dst[i] = int32(v)
		}
	}
	if over == 0 {
		return -1
	}
	for i, t := range dst {
		if uint32(t) >= vocab {
			return i
		}
	}
	return -1
}

func boolBit(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

// Verify reads every token byte, checks the CRC-32C against the header and
// checks that every token is below the vocabulary size.
func (s *Shard) Verify() error { return s.VerifyContext(context.Background()) }

// verifyChunk is the number of tokens Verify reads at a time.
const verifyChunk = 1 << 18

// VerifyContext is Verify that stops early when ctx is done.
func (s *Shard) VerifyContext(ctx context.Context) error {
	w := s.hdr.Width
	buf := make([]byte, verifyChunk*w)
	toks := make([]int32, verifyChunk)
	var crc uint32
	firstBad := int64(-1)
	var badTok int32
	for start := uint64(0); start < s.hdr.Count; start += verifyChunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(uint64(verifyChunk), s.hdr.Count-start)
		b := buf[:int(n)*w]
		if _, err := s.r.ReadAt(b, HeaderSize+int64(start)*int64(w)); err != nil {
			return shardErr(s.name, "tokens", fmt.Errorf("read tokens [%d, %d): %w", start, start+n, err))
		}
		crc = crc32.Update(crc, castagnoli, b)
		if firstBad < 0 {
			if i := decodeTokens(toks[:n], b, w, s.hdr.Vocab); i >= 0 {
				firstBad, badTok = int64(start)+int64(i), toks[i]
			}
		}
	}
	if crc != s.hdr.Checksum {
		return shardErr(s.name, "checksum_crc32c", fmt.Errorf("%w: header %08x, tokens %08x", ErrChecksum, s.hdr.Checksum, crc))
	}
	if firstBad >= 0 {
		return shardErr(s.name, "tokens", fmt.Errorf("%w: token %d at index %d, vocab_size %d", ErrTokenRange, uint32(badTok), firstBad, s.hdr.Vocab))
	}
	return nil
}
