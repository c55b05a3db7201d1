package data

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unicode/utf8"
)

// Prepare defaults.
const (
	// DefaultShardTokens is the shard size Prepare uses when none is given:
	// 64 Mi tokens, 128 MiB of uint16 tokens.
	DefaultShardTokens = 1 << 26
	// DefaultMaxFileBytes is the largest input file Prepare reads when no
	// limit is given.
	DefaultMaxFileBytes = 16 << 20
)

// PrepareOptions configure Prepare. The zero value is usable: default shard
// size and file limit, 2-byte tokens, no EOD token, every file.
type PrepareOptions struct {
	// ShardTokens is the number of tokens per shard (the last shard may hold
	// fewer); 0 means DefaultShardTokens.
	ShardTokens uint64
	// Width is the token width, 2 or 4; 0 means 2.
	Width int
	// EOD inserts EODToken between consecutive files (vocabulary 257).
	EOD bool
	// Extensions keeps, among the files found by walking directories, those
	// whose name ends with one of these suffixes (e.g. ".go", ".md"); empty
	// keeps all. Files named directly in the inputs are always taken.
	Extensions []string
	// Glob, if set, keeps only walked files whose base name matches this
	// filepath.Match pattern (in addition to Extensions).
	Glob string
	// MaxFileBytes skips files larger than this; 0 means DefaultMaxFileBytes.
	MaxFileBytes int64
	// IncludeHidden walks into files and directories whose names start
	// with "." (skipped by default, which keeps .git out).
	IncludeHidden bool
	// Prefix names the shards Prefix-000000.m2tok, ...; empty means "shard".
	Prefix string
	// Logger receives one debug line per skipped file; nil discards.
	Logger *slog.Logger
}

func (o *PrepareOptions) setDefaults() error {
	if o.ShardTokens == 0 {
		o.ShardTokens = DefaultShardTokens
	}
	if o.Width == 0 {
		o.Width = 2
	}
	if o.Width != 2 && o.Width != 4 {
		return invalidf("Width %d must be 2 or 4", o.Width)
	}
	if o.MaxFileBytes == 0 {
		o.MaxFileBytes = DefaultMaxFileBytes
	}
	if o.MaxFileBytes < 0 {
		return invalidf("MaxFileBytes %d must be >= 0", o.MaxFileBytes)
	}
	if o.Prefix == "" {
		o.Prefix = "shard"
	}
	if strings.ContainsAny(o.Prefix, `/\`) {
		return invalidf("Prefix %q must not contain a path separator", o.Prefix)
	}
	if o.Glob != "" {
		if _, err := filepath.Match(o.Glob, ""); err != nil {
			return invalidf("Glob %q: %v", o.Glob, err)
		}
	}
	for _, e := range o.Extensions {
		if e == "" {
			return invalidf("Extensions must not contain an empty suffix")
		}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return nil
}

// PrepareStats reports what Prepare did.
type PrepareStats struct {
	FilesFound      int      `json:"files_found"`       // files that passed the name filters
	FilesUsed       int      `json:"files_used"`        // files tokenized
	SkippedNotText  int      `json:"skipped_not_text"`  // not valid UTF-8, or holding a NUL byte
	SkippedTooLarge int      `json:"skipped_too_large"` // larger than MaxFileBytes
	SkippedEmpty    int      `json:"skipped_empty"`     // zero bytes
	Bytes           uint64   `json:"bytes"`             // bytes of the files used
	Tokens          uint64   `json:"tokens"`            // tokens written, EOD tokens included
	VocabSize       uint32   `json:"vocab_size"`        // 256, or 257 with EOD
	Shards          []string `json:"shards"`            // shard file names in stream order
	Manifest        string   `json:"manifest"`          // path of the manifest written
}

// Prepare turns the text files under inputs (files, or directories walked
// recursively through the name filters) into byte-tokenized shards and a
// manifest in outDir. Files are taken in sorted path order, so equal inputs
// and options give byte-identical output. Files that are not valid UTF-8, hold
// a NUL byte, are empty, or exceed MaxFileBytes are skipped and counted.
// outDir is created if needed and must not already hold shards or a manifest.
// On error the shards written so far are removed.
func Prepare(ctx context.Context, inputs []string, outDir string, opts PrepareOptions) (PrepareStats, error) {
	if err := opts.setDefaults(); err != nil {
		return PrepareStats{}, err
	}
	if len(inputs) == 0 {
		return PrepareStats{}, invalidf("inputs: at least one file or directory is required")
	}
	if outDir == "" {
		return PrepareStats{}, invalidf("outDir must not be empty")
	}
	files, err := collectFiles(ctx, inputs, &opts)
	if err != nil {
		return PrepareStats{}, err
	}
	if err := prepareOutDir(outDir); err != nil {
		return PrepareStats{}, err
	}
	tok := ByteTokenizer{EOD: opts.EOD}
	st := PrepareStats{FilesFound: len(files), VocabSize: tok.VocabSize()}
	sw := &shardSeq{dir: outDir, opts: &opts, vocab: tok.VocabSize()}
	fail := func(err error) (PrepareStats, error) {
		sw.abort()
		return PrepareStats{}, err
	}
	var toks []int32
	for _, path := range files {
		if err := ctx.Err(); err != nil {
			return fail(err)
		}
		b, skip, err := readTextFile(path, opts.MaxFileBytes)
		if err != nil {
			return fail(err)
		}
		switch skip {
		case skipTooLarge:
			st.SkippedTooLarge++
		case skipNotText:
			st.SkippedNotText++
		case skipEmpty:
			st.SkippedEmpty++
		}
		if skip != "" {
			opts.Logger.Debug("skip input file", "path", path, "reason", skip)
			continue
		}
		toks = toks[:0]
		if opts.EOD && st.FilesUsed > 0 {
			toks = append(toks, EODToken)
		}
		toks = tok.Encode(toks, b)
		if err := sw.write(toks); err != nil {
			return fail(err)
		}
		st.FilesUsed++
		st.Bytes += uint64(len(b))
		st.Tokens += uint64(len(toks))
	}
	if st.FilesUsed == 0 {
		return fail(fmt.Errorf("%w: %d files found, none is non-empty UTF-8 text within %d bytes", ErrNoInput, len(files), opts.MaxFileBytes))
	}
	if err := sw.close(); err != nil {
		return fail(err)
	}
	m := &Manifest{Format: manifestFormat, Version: 1, Tokenizer: "byte", VocabSize: tok.VocabSize(), Tokens: st.Tokens}
	if opts.EOD {
		m.Tokenizer = "byte+eod"
	}
	for _, h := range sw.done {
		m.Shards = append(m.Shards, ManifestShard{Path: h.name, Tokens: h.hdr.Count, Width: h.hdr.Width, CRC32C: fmt.Sprintf("%08x", h.hdr.Checksum)})
		st.Shards = append(st.Shards, h.name)
	}
	st.Manifest = filepath.Join(outDir, ManifestName)
	if err := WriteManifest(st.Manifest, m); err != nil {
		return fail(err)
	}
	return st, nil
}

// Reasons for skipping an input file.
const (
	skipTooLarge = "too large"
	skipNotText  = "not UTF-8 text"
	skipEmpty    = "empty"
)

// readTextFile returns the contents of path, or the reason to skip it.
func readTextFile(path string, limit int64) ([]byte, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, "", fmt.Errorf("data: prepare: %w", err)
	}
	defer f.Close()
	// Read one byte past the limit to tell "exactly at the limit" from "over".
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, "", fmt.Errorf("data: prepare: read %s: %w", path, err)
	}
	switch {
	case int64(len(b)) > limit:
		return nil, skipTooLarge, nil
	case len(b) == 0:
		return nil, skipEmpty, nil
	case !utf8.Valid(b) || bytes.IndexByte(b, 0) >= 0:
		return nil, skipNotText, nil
	}
	return b, "", nil
}

// collectFiles expands inputs into a sorted, duplicate-free list of regular files.
func collectFiles(ctx context.Context, inputs []string, o *PrepareOptions) ([]string, error) {
	seen := map[string]bool{}
	for _, in := range inputs {
		st, err := os.Stat(in)
		if err != nil {
			return nil, fmt.Errorf("data: prepare input: %w", err)
		}
		if !st.IsDir() {
			if !st.Mode().IsRegular() {
				return nil, invalidf("input %s is not a regular file or directory", in)
			}
			seen[filepath.Clean(in)] = true
			continue
		}
		err = filepath.WalkDir(in, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			hidden := strings.HasPrefix(d.Name(), ".") && p != in && !o.IncludeHidden
			if d.IsDir() {
				if hidden {
					return filepath.SkipDir
				}
				return nil
			}
			if hidden || !d.Type().IsRegular() || !o.nameMatches(d.Name()) {
				return nil
			}
			seen[p] = true
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("data: prepare: walk %s: %w", in, err)
		}
	}
	files := make([]string, 0, len(seen))
	for p := range seen {
		files = append(files, p)
	}
	slices.Sort(files)
	return files, nil
}

func (o *PrepareOptions) nameMatches(name string) bool {
	if o.Glob != "" {
		if ok, _ := filepath.Match(o.Glob, name); !ok {
			return false
		}
	}
	if len(o.Extensions) == 0 {
		return true
	}
	for _, e := range o.Extensions {
		if strings.HasSuffix(name, e) {
			return true
		}
	}
	return false
}

// prepareOutDir creates dir and refuses one that already holds a dataset.
func prepareOutDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("data: prepare output: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, ManifestName)); err == nil {
		return fmt.Errorf("%w: %s exists", ErrOutputExists, filepath.Join(dir, ManifestName))
	}
	if _, err := ListShards(dir); err == nil {
		return fmt.Errorf("%w: %s holds *%s files", ErrOutputExists, dir, ShardExt)
	} else if !errors.Is(err, ErrNoShards) {
		return err
	}
	return nil
}

// shardSeq writes a token stream as consecutive shards of opts.ShardTokens.
type shardSeq struct {
	dir   string
	opts  *PrepareOptions
	vocab uint32
	cur   *ShardWriter
	done  []doneShard
}

type doneShard struct {
	name string
	hdr  Header
}

func (s *shardSeq) write(toks []int32) error {
	for len(toks) > 0 {
		if s.cur == nil {
			name := fmt.Sprintf("%s-%06d%s", s.opts.Prefix, len(s.done), ShardExt)
			w, err := NewShardWriter(filepath.Join(s.dir, name), WriterOptions{Width: s.opts.Width, Vocab: s.vocab})
			if err != nil {
				return err
			}
			s.cur = w
		}
		k := min(uint64(len(toks)), s.opts.ShardTokens-s.cur.Count())
		if err := s.cur.Write(toks[:k]); err != nil {
			return err
		}
		toks = toks[k:]
		if s.cur.Count() == s.opts.ShardTokens {
			if err := s.close(); err != nil {
				return err
			}
		}
	}
	return nil
}

// close finishes the current shard, if any.
func (s *shardSeq) close() error {
	if s.cur == nil {
		return nil
	}
	w := s.cur
	s.cur = nil
	if err := w.Close(); err != nil {
		return err
	}
	s.done = append(s.done, doneShard{name: filepath.Base(w.Path()), hdr: w.Header()})
	return nil
}

// abort discards the current shard and removes the finished ones.
func (s *shardSeq) abort() {
	if s.cur != nil {
		s.cur.Abort()
		s.cur = nil
	}
	for _, d := range s.done {
		os.Remove(filepath.Join(s.dir, d.name))
	}
	s.done = nil
}
