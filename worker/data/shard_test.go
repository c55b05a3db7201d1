package data

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// writeShard writes tokens to a new shard at dir/name and returns its path.
func writeShard(t *testing.T, dir, name string, width int, vocab uint32, tokens []int32) string {
	t.Helper()
	p := filepath.Join(dir, name)
	w, err := NewShardWriter(p, WriterOptions{Width: width, Vocab: vocab})
	if err != nil {
		t.Fatalf("NewShardWriter: %v", err)
	}
	// Write in uneven pieces to exercise the buffering.
	for rest := tokens; len(rest) > 0; {
		k := min(len(rest), 1+len(rest)/3)
		if err := w.Write(rest[:k]); err != nil {
			t.Fatalf("Write: %v", err)
		}
		rest = rest[k:]
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return p
}

// rawShard builds shard bytes by hand: a header for the given fields and the
// token bytes, with a correct header checksum.
func rawShard(h Header, tokenBytes []byte) []byte {
	hb := h.encode()
	return append(hb[:], tokenBytes...)
}

// fixHeaderCRC recomputes the header checksum after a deliberate edit, so a
// test reaches the check of the edited field.
func fixHeaderCRC(b []byte) {
	binary.LittleEndian.PutUint32(b[offHeaderCRC:], crc32.Checksum(b[:offHeaderCRC], castagnoli))
}

func le16(v ...uint16) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], x)
	}
	return b
}

func TestShardRoundTrip(t *testing.T) {
	tests := []struct {
		name   string
		width  int
		vocab  uint32
		tokens []int32
	}{
		{"empty u16", 2, 256, nil},
		{"bytes u16", 2, 257, []int32{0, 1, 255, 256, 7}},
		{"full u16 range", 2, 65536, []int32{65535, 0, 32768}},
		{"u32", 4, 100000, []int32{99999, 65536, 0, 3}},
		{"width from vocab", 0, 70000, []int32{69999}},
		{"large crossing write buffer", 2, 50000, seqTokens(300000, 50000)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := writeShard(t, dir, "a"+ShardExt, tc.width, tc.vocab, tc.tokens)
			s, err := OpenShard(p)
			if err != nil {
				t.Fatalf("OpenShard: %v", err)
			}
			defer s.Close()
			wantWidth := tc.width
			if wantWidth == 0 {
				wantWidth = WidthFor(tc.vocab)
			}
			h := s.Header()
			wantSum := crc32.Checksum(encodeLE(tc.tokens, wantWidth), castagnoli)
			if h.Version != FormatVersion || h.Width != wantWidth || h.Vocab != tc.vocab || h.Count != uint64(len(tc.tokens)) || h.Checksum != wantSum {
				t.Fatalf("header %+v, want version %d width %d vocab %d count %d crc %08x", h, FormatVersion, wantWidth, tc.vocab, len(tc.tokens), wantSum)
			}
			st, _ := os.Stat(p)
			if st.Size() != int64(HeaderSize+len(tc.tokens)*wantWidth) {
				t.Fatalf("file size %d, want %d", st.Size(), HeaderSize+len(tc.tokens)*wantWidth)
			}
			got := make([]int32, len(tc.tokens))
			if err := s.ReadTokens(got, 0); err != nil {
				t.Fatalf("ReadTokens: %v", err)
			}
			if !slices.Equal(got, tc.tokens) {
				t.Fatalf("tokens differ")
			}
			if err := s.Verify(); err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if len(tc.tokens) > 2 {
				mid := make([]int32, 2)
				if err := s.ReadTokens(mid, 1); err != nil || mid[0] != tc.tokens[1] || mid[1] != tc.tokens[2] {
					t.Fatalf("ReadTokens(1) = %v, %v; want %v", mid, err, tc.tokens[1:3])
				}
			}
			if err := s.ReadTokens(make([]int32, 1), uint64(len(tc.tokens))); !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("read past end: %v, want ErrOutOfRange", err)
			}
			// No temporary file is left next to the shard.
			entries, _ := os.ReadDir(dir)
			if len(entries) != 1 {
				t.Fatalf("directory holds %d entries, want only the shard", len(entries))
			}
		})
	}
}

func encodeLE(tokens []int32, width int) []byte {
	b := make([]byte, len(tokens)*width)
	for i, t := range tokens {
		if width == 2 {
			binary.LittleEndian.PutUint16(b[2*i:], uint16(t))
		} else {
			binary.LittleEndian.PutUint32(b[4*i:], uint32(t))
		}
	}
	return b
}

func seqTokens(n int, vocab int32) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32((i*7919 + 13) % int(vocab))
	}
	return out
}

func TestShardHeaderGolden(t *testing.T) {
	// The header bytes of a small shard, spelled out field by field as in
	// docs/dataset-format.md, so that any change to the layout fails here.
	b := rawShard(Header{Version: 1, Width: 2, Vocab: 257, Count: 3, Checksum: crc32.Checksum(le16(104, 105, 256), castagnoli)}, le16(104, 105, 256))
	want := []byte{
		'M', '2', 'T', 'O', 'K', 'S', 'H', 'D', // magic
		1, 0, // version
		2, 0, // width
		1, 1, 0, 0, // vocab 257
		3, 0, 0, 0, 0, 0, 0, 0, // count
	}
	if !bytes.Equal(b[:24], want) {
		t.Fatalf("header prefix % x, want % x", b[:24], want)
	}
	if !bytes.Equal(b[offReserved:offHeaderCRC], make([]byte, 32)) {
		t.Fatalf("reserved bytes not zero")
	}
	if got := binary.LittleEndian.Uint32(b[offHeaderCRC:]); got != crc32.Checksum(b[:60], crc32.MakeTable(crc32.Castagnoli)) {
		t.Fatalf("header crc %08x wrong", got)
	}
	if !bytes.Equal(b[HeaderSize:], []byte{104, 0, 105, 0, 0, 1}) {
		t.Fatalf("token bytes % x", b[HeaderSize:])
	}
	s, err := NewShard("golden", bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("NewShard: %v", err)
	}
	if err := s.Verify(); err != nil {
		t.Fatalf("Verify: %v", err)
	}
}

func TestShardRejections(t *testing.T) {
	good := le16(1, 2, 3, 4)
	goodHdr := Header{Version: 1, Width: 2, Vocab: 10, Count: 4, Checksum: crc32.Checksum(good, castagnoli)}
	tests := []struct {
		name      string
		build     func() []byte
		field     string
		want      error
		atOpen    bool // rejected by NewShard; otherwise by Verify
		readFails bool // a plain read of all tokens fails too
	}{
		{"bad magic", func() []byte { b := rawShard(goodHdr, good); b[0] = 'X'; return b }, "magic", ErrBadMagic, true, false},
		{"empty file", func() []byte { return nil }, "header", ErrTruncated, true, false},
		{"truncated header", func() []byte { return rawShard(goodHdr, good)[:40] }, "header", ErrTruncated, true, false},
		{"truncated tokens", func() []byte { return rawShard(goodHdr, good)[:HeaderSize+7] }, "token_count", ErrTruncated, true, false},
		{"trailing bytes", func() []byte { return append(rawShard(goodHdr, good), 0, 0) }, "token_count", ErrTrailingData, true, false},
		{"version", func() []byte {
			b := rawShard(goodHdr, good)
			binary.LittleEndian.PutUint16(b[offVersion:], 2)
			fixHeaderCRC(b)
			return b
		}, "version", ErrUnsupportedVersion, true, false},
		{"header checksum", func() []byte { b := rawShard(goodHdr, good); b[offCount] ^= 1; return b }, "header_crc32c", ErrBadHeader, true, false},
		{"width 3", func() []byte {
			b := rawShard(goodHdr, good)
			binary.LittleEndian.PutUint16(b[offWidth:], 3)
			fixHeaderCRC(b)
			return b
		}, "token_width", ErrBadWidth, true, false},
		{"width 1", func() []byte {
			b := rawShard(goodHdr, good)
			binary.LittleEndian.PutUint16(b[offWidth:], 1)
			fixHeaderCRC(b)
			return b
		}, "token_width", ErrBadWidth, true, false},
		{"wrong width for file size", func() []byte {
			b := rawShard(goodHdr, good)
			binary.LittleEndian.PutUint16(b[offWidth:], 4)
			fixHeaderCRC(b)
			return b
		}, "token_count", ErrTruncated, true, false},
		{"vocab zero", func() []byte { h := goodHdr; h.Vocab = 0; return rawShard(h, good) }, "vocab_size", ErrBadHeader, true, false},
		{"vocab too large for u16", func() []byte { h := goodHdr; h.Vocab = 65537; return rawShard(h, good) }, "vocab_size", ErrBadHeader, true, false},
		{"vocab too large for u32", func() []byte {
			h := goodHdr
			h.Width, h.Vocab, h.Count = 4, 1<<31+1, 2
			return rawShard(h, good)
		}, "vocab_size", ErrBadHeader, true, false},
		{"reserved byte", func() []byte { b := rawShard(goodHdr, good); b[offReserved+5] = 1; fixHeaderCRC(b); return b }, "reserved", ErrBadHeader, true, false},
		{"absurd count", func() []byte { h := goodHdr; h.Count = 1 << 62; return rawShard(h, good) }, "token_count", ErrBadHeader, true, false},
		{"checksum mismatch", func() []byte { b := rawShard(goodHdr, good); b[HeaderSize+2] ^= 0x01; return b }, "checksum_crc32c", ErrChecksum, false, false},
		{"token >= vocab", func() []byte {
			toks := le16(1, 10, 3, 4)
			h := goodHdr
			h.Checksum = crc32.Checksum(toks, castagnoli)
			return rawShard(h, toks)
		}, "tokens", ErrTokenRange, false, true},
		{"u32 token beyond int32", func() []byte {
			toks := []byte{1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}
			h := Header{Version: 1, Width: 4, Vocab: 70000, Count: 2, Checksum: crc32.Checksum(toks, castagnoli)}
			return rawShard(h, toks)
		}, "tokens", ErrTokenRange, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad"+ShardExt)
			if err := os.WriteFile(path, tc.build(), 0o644); err != nil {
				t.Fatal(err)
			}
			s, err := OpenShard(path)
			if !tc.atOpen {
				if err != nil {
					t.Fatalf("OpenShard: %v, want success (checked by Verify)", err)
				}
				defer s.Close()
				err = s.Verify()
				rerr := s.ReadTokens(make([]int32, s.Len()), 0)
				if tc.readFails != (rerr != nil) {
					t.Fatalf("ReadTokens error %v, want failure %v", rerr, tc.readFails)
				}
				if rerr != nil && !errors.Is(rerr, tc.want) {
					t.Fatalf("ReadTokens error %v, want %v", rerr, tc.want)
				}
			} else if s != nil {
				s.Close()
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			var se *ShardError
			if !errors.As(err, &se) {
				t.Fatalf("error %v is not a *ShardError", err)
			}
			if se.Path != path || se.Field != tc.field {
				t.Fatalf("error names path %q field %q, want %q %q", se.Path, se.Field, path, tc.field)
			}
			if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, tc.field) {
				t.Fatalf("message %q does not name the file and the field", msg)
			}
		})
	}
}

func TestShardWriterRejects(t *testing.T) {
	t.Run("options", func(t *testing.T) {
		for _, o := range []WriterOptions{{Width: 3, Vocab: 10}, {Width: 2, Vocab: 0}, {Width: 2, Vocab: 70000}, {Width: 4, Vocab: 0}} {
			if _, err := NewShardWriter(filepath.Join(t.TempDir(), "x"+ShardExt), o); !errors.Is(err, ErrInvalidArgument) {
				t.Errorf("options %+v: error %v, want ErrInvalidArgument", o, err)
			}
		}
	})
	for _, tok := range []int32{10, -1} {
		t.Run("token out of range", func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "x"+ShardExt)
			w, err := NewShardWriter(p, WriterOptions{Vocab: 10})
			if err != nil {
				t.Fatal(err)
			}
			if err := w.Write([]int32{1, 2, tok}); !errors.Is(err, ErrTokenRange) {
				t.Fatalf("Write: %v, want ErrTokenRange", err)
			}
			if err := w.Write([]int32{1}); !errors.Is(err, ErrTokenRange) {
				t.Fatalf("second Write: %v, want the sticky ErrTokenRange", err)
			}
			if err := w.Close(); !errors.Is(err, ErrTokenRange) {
				t.Fatalf("Close: %v, want ErrTokenRange", err)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Fatalf("failed shard left %d files", len(entries))
			}
			if err := w.Close(); !errors.Is(err, ErrClosed) {
				t.Fatalf("second Close: %v, want ErrClosed", err)
			}
		})
	}
	t.Run("abort", func(t *testing.T) {
		dir := t.TempDir()
		w, err := NewShardWriter(filepath.Join(dir, "x"+ShardExt), WriterOptions{Vocab: 10})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Write([]int32{1, 2}); err != nil {
			t.Fatal(err)
		}
		w.Abort()
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Fatalf("aborted shard left %d files", len(entries))
		}
		if err := w.Write([]int32{1}); !errors.Is(err, ErrClosed) {
			t.Fatalf("Write after Abort: %v, want ErrClosed", err)
		}
	})
}
