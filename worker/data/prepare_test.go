package data

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// writeTree creates files (path relative to root -> content) under root.
func writeTree(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for p, c := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func testCorpus(t *testing.T) string {
	root := t.TempDir()
	writeTree(t, root, map[string]string{
		"b/two.go":        "package two\n",
		"a/one.md":        "# One\nsome text\n",
		"a/deep/three.go": "package three // ü\n",
		"a/notes.txt":     "filtered out by extension\n",
		"a/binary.go":     "package x\x00\x01",
		"a/latin1.md":     "caf\xe9\n",
		"a/empty.md":      "",
		"a/big.md":        strings.Repeat("x", 200),
		".git/config.md":  "hidden\n",
		"a/.hidden.go":    "package hidden\n",
		"z/last.go":       "package last\n",
	})
	return root
}

func TestPrepare(t *testing.T) {
	root := testCorpus(t)
	opts := PrepareOptions{ShardTokens: 16, EOD: true, Extensions: []string{".go", ".md"}, MaxFileBytes: 100}
	out1 := filepath.Join(t.TempDir(), "out")
	st, err := Prepare(context.Background(), []string{root}, out1, opts)
	if err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	// Used, in sorted path order: a/deep/three.go, a/one.md, b/two.go, z/last.go.
	docs := []string{"package three // ü\n", "# One\nsome text\n", "package two\n", "package last\n"}
	var wantBytes int
	for _, d := range docs {
		wantBytes += len(d)
	}
	want := PrepareStats{
		FilesFound: 8, FilesUsed: 4, SkippedNotText: 2, SkippedTooLarge: 1, SkippedEmpty: 1,
		Bytes: uint64(wantBytes), Tokens: uint64(wantBytes + 3), VocabSize: 257,
	}
	if st.FilesFound != want.FilesFound || st.FilesUsed != want.FilesUsed || st.SkippedNotText != want.SkippedNotText ||
		st.SkippedTooLarge != want.SkippedTooLarge || st.SkippedEmpty != want.SkippedEmpty || st.Bytes != want.Bytes ||
		st.Tokens != want.Tokens || st.VocabSize != want.VocabSize {
		t.Fatalf("stats %+v, want %+v", st, want)
	}
	wantShards := int((st.Tokens + 15) / 16)
	if len(st.Shards) != wantShards || st.Shards[0] != "shard-000000.m2tok" {
		t.Fatalf("shards %v, want %d starting with shard-000000.m2tok", st.Shards, wantShards)
	}

	ds, err := Open(out1)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer ds.Close()
	if err := ds.Verify(context.Background()); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	for i, s := range ds.Shards() {
		if i < len(ds.Shards())-1 && s.Len() != 16 {
			t.Fatalf("shard %d holds %d tokens, want 16", i, s.Len())
		}
	}
	all := make([]int32, ds.Tokens())
	if err := ds.ReadTokens(all, 0); err != nil {
		t.Fatal(err)
	}
	got, err := ByteTokenizer{EOD: true}.DecodeDocuments(all)
	if err != nil {
		t.Fatal(err)
	}
	var gotDocs []string
	for _, d := range got {
		gotDocs = append(gotDocs, string(d))
	}
	if !slices.Equal(gotDocs, docs) {
		t.Fatalf("documents %q, want %q", gotDocs, docs)
	}

	// A second run over the same inputs gives the same bytes, file by file.
	out2 := filepath.Join(t.TempDir(), "out")
	if _, err := Prepare(context.Background(), []string{root}, out2, opts); err != nil {
		t.Fatal(err)
	}
	e1, _ := os.ReadDir(out1)
	e2, _ := os.ReadDir(out2)
	if len(e1) != len(e2) || len(e1) != wantShards+1 {
		t.Fatalf("outputs hold %d and %d files, want %d", len(e1), len(e2), wantShards+1)
	}
	for i := range e1 {
		a, _ := os.ReadFile(filepath.Join(out1, e1[i].Name()))
		b, _ := os.ReadFile(filepath.Join(out2, e2[i].Name()))
		if e1[i].Name() != e2[i].Name() || !bytes.Equal(a, b) {
			t.Fatalf("file %s differs between runs", e1[i].Name())
		}
	}

	// The output directory is not overwritten.
	if _, err := Prepare(context.Background(), []string{root}, out1, opts); !errors.Is(err, ErrOutputExists) {
		t.Fatalf("Prepare into a dataset: %v, want ErrOutputExists", err)
	}
}

func TestPrepareOptions(t *testing.T) {
	root := testCorpus(t)
	ctx := context.Background()
	t.Run("explicit file bypasses filters, no EOD, width 4", func(t *testing.T) {
		out := t.TempDir()
		st, err := Prepare(ctx, []string{filepath.Join(root, "a/notes.txt"), filepath.Join(root, "z")}, out, PrepareOptions{Extensions: []string{".go"}, Width: 4})
		if err != nil {
			t.Fatal(err)
		}
		if st.FilesUsed != 2 || st.VocabSize != 256 || st.Tokens != uint64(len("filtered out by extension\n")+len("package last\n")) || len(st.Shards) != 1 {
			t.Fatalf("stats %+v", st)
		}
		ds, err := Open(out)
		if err != nil {
			t.Fatal(err)
		}
		defer ds.Close()
		if h := ds.Shards()[0].Header(); h.Width != 4 || h.Vocab != 256 {
			t.Fatalf("header %+v", h)
		}
	})
	t.Run("glob and hidden", func(t *testing.T) {
		st, err := Prepare(ctx, []string{root}, t.TempDir(), PrepareOptions{Glob: "*.md", IncludeHidden: true})
		if err != nil {
			t.Fatal(err)
		}
		// config.md under .git, one.md, latin1.md (not text), empty.md, big.md.
		if st.FilesFound != 5 || st.FilesUsed != 3 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("duplicates counted once", func(t *testing.T) {
		st, err := Prepare(ctx, []string{filepath.Join(root, "b"), filepath.Join(root, "b", "two.go"), filepath.Join(root, "b")}, t.TempDir(), PrepareOptions{})
		if err != nil || st.FilesUsed != 1 {
			t.Fatalf("stats %+v, %v", st, err)
		}
	})
	bad := []struct {
		name   string
		inputs []string
		opts   PrepareOptions
		want   error
	}{
		{"width", []string{root}, PrepareOptions{Width: 3}, ErrInvalidArgument},
		{"max file bytes", []string{root}, PrepareOptions{MaxFileBytes: -1}, ErrInvalidArgument},
		{"glob", []string{root}, PrepareOptions{Glob: "["}, ErrInvalidArgument},
		{"prefix", []string{root}, PrepareOptions{Prefix: "a/b"}, ErrInvalidArgument},
		{"no inputs", nil, PrepareOptions{}, ErrInvalidArgument},
		{"missing input", []string{filepath.Join(root, "nope")}, PrepareOptions{}, os.ErrNotExist},
		{"nothing usable", []string{root}, PrepareOptions{Extensions: []string{".rs"}}, ErrNoInput},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out")
			if _, err := Prepare(ctx, tc.inputs, out, tc.opts); !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if entries, _ := os.ReadDir(out); len(entries) != 0 {
				t.Fatalf("failed Prepare left %d files", len(entries))
			}
		})
	}
	t.Run("cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := Prepare(cctx, []string{root}, t.TempDir(), PrepareOptions{}); !errors.Is(err, context.Canceled) {
			t.Fatalf("error %v, want context.Canceled", err)
		}
	})
}
