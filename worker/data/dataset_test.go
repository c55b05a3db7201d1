package data

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// makeDataset writes the stream 0, 1, 2, ... (mod vocab) of the given shard
// sizes into dir, named so that directory order is stream order, and returns
// the stream.
func makeDataset(t testing.TB, dir string, vocab uint32, sizes ...int) []int32 {
	t.Helper()
	var stream []int32
	for i, n := range sizes {
		toks := make([]int32, n)
		for j := range toks {
			toks[j] = int32(uint32(len(stream)+j) % vocab)
		}
		p := filepath.Join(dir, shardName(i))
		w, err := NewShardWriter(p, WriterOptions{Vocab: vocab})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Write(toks); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		stream = append(stream, toks...)
	}
	return stream
}

func shardName(i int) string { return "part-" + string(rune('a'+i)) + ShardExt }

func TestDatasetSamplesCrossShards(t *testing.T) {
	dir := t.TempDir()
	// Shard sizes chosen so that windows of length 5 start inside one shard
	// and end in the next, and one window spans three shards (the 2-token one).
	stream := makeDataset(t, dir, 1000, 7, 2, 9, 1, 6)
	ds, err := Open(dir)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer ds.Close()
	if ds.Tokens() != 25 || ds.Vocab() != 1000 || len(ds.Shards()) != 5 {
		t.Fatalf("tokens %d vocab %d shards %d", ds.Tokens(), ds.Vocab(), len(ds.Shards()))
	}
	for _, L := range []int{1, 2, 4, 5, 8, 24} {
		t.Run("seq"+strconv.Itoa(L), func(t *testing.T) {
			n := ds.NumSamples(L)
			if want := uint64((len(stream) - 1) / L); n != want {
				t.Fatalf("NumSamples(%d) = %d, want %d", L, n, want)
			}
			in, tg := make([]int32, L), make([]int32, L)
			for i := range n {
				if err := ds.Sample(i, in, tg); err != nil {
					t.Fatalf("Sample(%d): %v", i, err)
				}
				s := int(i) * L
				if !slices.Equal(in, stream[s:s+L]) || !slices.Equal(tg, stream[s+1:s+L+1]) {
					t.Fatalf("sample %d: inputs %v targets %v, want %v %v", i, in, tg, stream[s:s+L], stream[s+1:s+L+1])
				}
			}
			if err := ds.Sample(n, in, tg); !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("Sample(%d) past the end: %v, want ErrOutOfRange", n, err)
			}
		})
	}
	if ds.NumSamples(25) != 0 {
		t.Fatalf("NumSamples(25) of 25 tokens = %d, want 0 (a window needs 26)", ds.NumSamples(25))
	}
	all := make([]int32, len(stream))
	if err := ds.ReadTokens(all, 0); err != nil || !slices.Equal(all, stream) {
		t.Fatalf("ReadTokens over all shards: %v", err)
	}
	if err := ds.ReadTokens(make([]int32, 2), 24); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("ReadTokens past the end: %v", err)
	}
	if err := ds.Verify(context.Background()); err != nil {
		t.Fatalf("Verify: %v", err)
	}
}

func TestDatasetOpenForms(t *testing.T) {
	dir := t.TempDir()
	stream := makeDataset(t, dir, 300, 10, 0, 5)
	names, err := ListShards(dir)
	if err != nil {
		t.Fatal(err)
	}
	// Explicit list in reverse order: the stream follows the list.
	rev, err := OpenShards(names[2], names[1], names[0])
	if err != nil {
		t.Fatalf("OpenShards: %v", err)
	}
	got := make([]int32, 15)
	if err := rev.ReadTokens(got, 0); err != nil {
		t.Fatal(err)
	}
	rev.Close()
	want := append(append([]int32{}, stream[10:]...), stream[:10]...)
	if !slices.Equal(got, want) {
		t.Fatalf("reverse list stream %v, want %v", got, want)
	}

	// A manifest takes precedence over listing the directory.
	m := &Manifest{Format: manifestFormat, Version: 1, VocabSize: 300, Tokens: 5}
	s2, _ := OpenShard(names[2])
	h := s2.Header()
	s2.Close()
	m.Shards = []ManifestShard{{Path: filepath.Base(names[2]), Tokens: h.Count, Width: h.Width, CRC32C: fmt.Sprintf("%08x", h.Checksum)}}
	if err := WriteManifest(filepath.Join(dir, ManifestName), m); err != nil {
		t.Fatal(err)
	}
	ds, err := Open(dir)
	if err != nil {
		t.Fatalf("Open with manifest: %v", err)
	}
	if ds.Tokens() != 5 {
		t.Fatalf("manifest dataset has %d tokens, want 5", ds.Tokens())
	}
	ds.Close()

	single, err := Open(names[0])
	if err != nil || single.Tokens() != 10 {
		t.Fatalf("Open(single shard): %v", err)
	}
	single.Close()
}

func TestDatasetRejects(t *testing.T) {
	t.Run("empty dir", func(t *testing.T) {
		if _, err := Open(t.TempDir()); !errors.Is(err, ErrNoShards) {
			t.Fatalf("error %v, want ErrNoShards", err)
		}
	})
	t.Run("vocab differs", func(t *testing.T) {
		dir := t.TempDir()
		a := writeShard(t, dir, "a"+ShardExt, 2, 256, []int32{1})
		b := writeShard(t, dir, "b"+ShardExt, 2, 257, []int32{1})
		_, err := OpenShards(a, b)
		var se *ShardError
		if !errors.Is(err, ErrMismatch) || !errors.As(err, &se) || se.Path != b || se.Field != "vocab_size" {
			t.Fatalf("error %v, want ErrMismatch naming %s vocab_size", err, b)
		}
	})
	t.Run("corrupt shard in dir", func(t *testing.T) {
		dir := t.TempDir()
		writeShard(t, dir, "a"+ShardExt, 2, 256, []int32{1})
		if err := os.WriteFile(filepath.Join(dir, "b"+ShardExt), []byte("not a shard at all, long enough to hold a header ...................................."), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(dir); !errors.Is(err, ErrBadMagic) {
			t.Fatalf("error %v, want ErrBadMagic", err)
		}
	})
	manifestCases := []struct {
		name string
		edit func(*Manifest)
		want error
	}{
		{"count", func(m *Manifest) { m.Shards[0].Tokens++; m.Tokens++ }, ErrMismatch},
		{"width", func(m *Manifest) { m.Shards[0].Width = 4 }, ErrMismatch},
		{"checksum", func(m *Manifest) { m.Shards[0].CRC32C = "00000000" }, ErrMismatch},
		{"vocab", func(m *Manifest) { m.VocabSize = 999 }, ErrMismatch},
		{"total", func(m *Manifest) { m.Tokens = 1 }, ErrMismatch},
		{"format", func(m *Manifest) { m.Format = "other" }, ErrInvalidArgument},
		{"no shards", func(m *Manifest) { m.Shards = nil; m.Tokens = 0 }, ErrNoShards},
	}
	for _, tc := range manifestCases {
		t.Run("manifest "+tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := writeShard(t, dir, "a"+ShardExt, 2, 256, []int32{1, 2, 3})
			s, _ := OpenShard(p)
			h := s.Header()
			s.Close()
			m := &Manifest{Format: manifestFormat, Version: 1, VocabSize: 256, Tokens: 3,
				Shards: []ManifestShard{{Path: "a" + ShardExt, Tokens: 3, Width: 2, CRC32C: fmt.Sprintf("%08x", h.Checksum)}}}
			tc.edit(m)
			_, err := OpenSource(context.Background(), LocalDir(dir), m)
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
		})
	}
}
