package fetch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
)

// writeShard writes a shard of n tokens (i mod 7) to path and returns its
// manifest entry, with Path relative to dir.
func writeShard(t *testing.T, dir, name string, n int) data.ManifestShard {
	t.Helper()
	w, err := data.NewShardWriter(filepath.Join(dir, name), data.WriterOptions{Vocab: 16})
	if err != nil {
		t.Fatal(err)
	}
	toks := make([]int32, n)
	for i := range toks {
		toks[i] = int32(i % 7)
	}
	if err := w.Write(toks); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	h := w.Header()
	return data.ManifestShard{Path: name, Tokens: h.Count, Width: h.Width, CRC32C: fmt.Sprintf("%08x", h.Checksum)}
}

func writeManifest(t *testing.T, dir string, shards ...data.ManifestShard) {
	t.Helper()
	m := &data.Manifest{Format: "m2tok-manifest", Version: 1, VocabSize: 16, Shards: shards}
	for _, s := range shards {
		m.Tokens += s.Tokens
	}
	if err := data.WriteManifest(filepath.Join(dir, data.ManifestName), m); err != nil {
		t.Fatal(err)
	}
}

// TestDatasetManifest fetches a dataset with a manifest three times: the
// first downloads its shards, the second reuses the cache, the third
// downloads again the shard whose cached copy was damaged.
func TestDatasetManifest(t *testing.T) {
	ctx := context.Background()
	src, cache := t.TempDir(), t.TempDir()
	a, b := writeShard(t, src, "a.m2tok", 100), writeShard(t, src, "b.m2tok", 50)
	writeManifest(t, src, a, b)
	var out bytes.Buffer
	o := Options{CacheDir: cache, Out: &out}
	fetchOnce := func(want string) {
		t.Helper()
		out.Reset()
		ds, err := Dataset(ctx, src, o)
		if err != nil {
			t.Fatal(err)
		}
		defer ds.Close()
		if ds.Tokens() != 150 {
			t.Errorf("%d tokens, want 150", ds.Tokens())
		}
		if !strings.Contains(out.String(), "2 shards verified") || !strings.Contains(out.String(), want) {
			t.Errorf("report %q lacks %q", out.String(), want)
		}
	}
	fetchOnce("(2 downloaded")
	fetchOnce("(0 downloaded, 0 bytes; 2 reused)")
	cached, _ := filepath.Glob(filepath.Join(cache, "data", "*", "b.m2tok"))
	if len(cached) != 1 {
		t.Fatalf("cached b.m2tok: %v", cached)
	}
	bb, _ := os.ReadFile(cached[0])
	bb[len(bb)-1] ^= 1
	if err := os.WriteFile(cached[0], bb, 0o644); err != nil {
		t.Fatal(err)
	}
	fetchOnce("(1 downloaded")
}

// TestDatasetBadSource checks the failures of a dataset: a shard that does
// not match its manifest entry, a manifest path outside the directory, a
// directory with no shards at all.
func TestDatasetBadSource(t *testing.T) {
	ctx := context.Background()
	src := t.TempDir()
	a := writeShard(t, src, "a.m2tok", 100)
	a.CRC32C = "00000000"
	writeManifest(t, src, a)
	_, err := Dataset(ctx, src, Options{CacheDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "data.path "+src) || !strings.Contains(err.Error(), "the manifest 100") {
		t.Errorf("shard unlike its manifest entry: %v", err)
	}

	a.CRC32C = writeShard(t, src, "a.m2tok", 100).CRC32C
	a.Path = "../a.m2tok"
	b, _ := json.Marshal(data.Manifest{Format: "m2tok-manifest", Version: 1, VocabSize: 16, Tokens: 100, Shards: []data.ManifestShard{a}})
	os.WriteFile(filepath.Join(src, data.ManifestName), b, 0o644)
	if _, err := Dataset(ctx, src, Options{CacheDir: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "must be relative") {
		t.Errorf("manifest path outside the directory: %v", err)
	}

	if _, err := Dataset(ctx, t.TempDir(), Options{CacheDir: t.TempDir()}); !errors.Is(err, data.ErrNoShards) {
		t.Errorf("empty directory: %v, want ErrNoShards", err)
	}
}

// TestDatasetWithoutManifest fetches the shards of a directory without a
// manifest, in name order, and one shard named directly.
func TestDatasetWithoutManifest(t *testing.T) {
	ctx := context.Background()
	src := t.TempDir()
	writeShard(t, src, "b.m2tok", 30)
	writeShard(t, src, "a.m2tok", 20)
	os.WriteFile(filepath.Join(src, "notes.txt"), []byte("x"), 0o644)
	var out bytes.Buffer
	ds, err := Dataset(ctx, src, Options{CacheDir: t.TempDir(), Out: &out})
	if err != nil {
		t.Fatal(err)
	}
	defer ds.Close()
	sh := ds.Shards()
	if ds.Tokens() != 50 || len(sh) != 2 || sh[0].Header().Count != 20 {
		t.Errorf("%d tokens in %d shards, want 50 in 2 with a.m2tok first", ds.Tokens(), len(sh))
	}
	if !strings.Contains(out.String(), "2 shards without a manifest") {
		t.Errorf("report %q", out.String())
	}

	one, err := dataset(ctx, checkpoint.LocalStore{Root: src}, "b.m2tok", "b.m2tok", Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	if one.Tokens() != 30 {
		t.Errorf("one shard: %d tokens, want 30", one.Tokens())
	}
}

// TestOpenErrors checks the errors before any download: no cache
// directory, and a location whose store cannot be opened.
func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := Dataset(ctx, t.TempDir(), Options{}); !errors.Is(err, ErrNoCacheDir) {
		t.Errorf("no cache directory: %v", err)
	}
	if _, err := Model(ctx, t.TempDir(), Options{}); !errors.Is(err, ErrNoCacheDir) {
		t.Errorf("no cache directory: %v", err)
	}
	var oe *OpenError
	_, err := Model(ctx, "s3://No_Such/x", Options{CacheDir: t.TempDir(), S3: &checkpoint.S3Config{Endpoint: "http://127.0.0.1:1"}})
	if !errors.As(err, &oe) || oe.Field != "model.init_from" || !strings.HasPrefix(err.Error(), "model.init_from: ") {
		t.Errorf("bad bucket name: %v, want an OpenError of model.init_from", err)
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestModel fetches a model directory with one weights file, then the
// same location sharded (the cached single file must go), and checks a
// checkpoint step against its manifest.
func TestModel(t *testing.T) {
	ctx := context.Background()
	root, cache := t.TempDir(), t.TempDir()
	prefix := "run/" + checkpoint.StepDir(3)
	step := filepath.Join(root, filepath.FromSlash(prefix))
	store := checkpoint.LocalStore{Root: root}
	model := func(o Options) (string, error) { return hfModel(ctx, store, prefix, step, o) }
	os.MkdirAll(step, 0o755)
	cfg, weights := []byte(`{"model_type":"mamba2"}`), []byte("weights")
	os.WriteFile(filepath.Join(step, hf.ConfigFile), cfg, 0o644)
	os.WriteFile(filepath.Join(step, hf.WeightsFile), weights, 0o644)
	man := func(w []byte) {
		b, _ := json.Marshal(checkpoint.Manifest{Format: checkpoint.ManifestFormatV1, Step: 3, Objects: []checkpoint.Object{
			{Name: hf.ConfigFile, Size: int64(len(cfg)), SHA256: sha(cfg)},
			{Name: hf.WeightsFile, Size: int64(len(w)), SHA256: sha(w)},
		}})
		os.WriteFile(filepath.Join(step, checkpoint.ManifestObject), b, 0o644)
	}
	man(weights)
	var out bytes.Buffer
	o := Options{CacheDir: cache, Out: &out}
	dir, err := model(o)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, hf.WeightsFile)); !bytes.Equal(got, weights) {
		t.Errorf("weights %q, want %q", got, weights)
	}
	if !strings.Contains(out.String(), "checked against the checkpoint's manifest") {
		t.Errorf("report %q does not say the manifest was checked", out.String())
	}

	man([]byte("other weights"))
	if _, err := model(o); !errors.Is(err, checkpoint.ErrCorrupt) || !strings.Contains(err.Error(), "model.init_from "+step) {
		t.Errorf("weights unlike the manifest: %v, want ErrCorrupt", err)
	}

	// The same location, now sharded and no longer a checked step.
	os.Remove(filepath.Join(step, checkpoint.ManifestObject))
	os.Remove(filepath.Join(step, hf.WeightsFile))
	os.MkdirAll(filepath.Join(step, "w"), 0o755)
	os.WriteFile(filepath.Join(step, "w", "1.safetensors"), []byte("one"), 0o644)
	os.WriteFile(filepath.Join(step, "w", "2.safetensors"), []byte("two"), 0o644)
	os.WriteFile(filepath.Join(step, hf.WeightsIndexFile), []byte(`{"weight_map":{"a":"w/1.safetensors","b":"w/2.safetensors","c":"w/1.safetensors"}}`), 0o644)
	out.Reset()
	dir2, err := model(o)
	if err != nil {
		t.Fatal(err)
	}
	if dir2 != dir {
		t.Errorf("cache directory %s, then %s", dir, dir2)
	}
	if _, err := os.Stat(filepath.Join(dir, hf.WeightsFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the cached %s of the other layout is still there: %v", hf.WeightsFile, err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "w", "2.safetensors")); string(got) != "two" {
		t.Errorf("shard w/2.safetensors: %q", got)
	}
	if strings.Contains(out.String(), "manifest") {
		t.Errorf("report %q speaks of a manifest where there is none", out.String())
	}

	os.WriteFile(filepath.Join(step, hf.WeightsIndexFile), []byte(`{"weight_map":{"a":"../escape.safetensors"}}`), 0o644)
	if _, err := model(o); err == nil || !strings.Contains(err.Error(), "must be relative") {
		t.Errorf("index shard outside the directory: %v", err)
	}
	os.Remove(filepath.Join(step, hf.WeightsIndexFile))
	if _, err := model(o); !errors.Is(err, checkpoint.ErrNotFound) || !strings.Contains(err.Error(), "neither") {
		t.Errorf("no weights: %v, want ErrNotFound", err)
	}
}

// TestIndexShards checks the reading of a safetensors index.
func TestIndexShards(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		doc  string
		want string
		err  string
	}{
		{`{"weight_map":{"x":"b","y":"a","z":"b"}}`, "[a b]", ""},
		{`{"weight_map":{}}`, "", "weight_map is missing or empty"},
		{`{"metadata":{}}`, "", "weight_map is missing or empty"},
		{`{`, "", "unexpected end"},
	} {
		f := filepath.Join(dir, "index.json")
		os.WriteFile(f, []byte(tc.doc), 0o644)
		got, err := indexShards(f)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: error %v, want %q", tc.doc, err, tc.err)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != tc.want {
			t.Errorf("%s: %v, %v; want %s", tc.doc, got, err, tc.want)
		}
	}
}

// TestSafeRelPath checks the paths a manifest or an index may name.
func TestSafeRelPath(t *testing.T) {
	for p, ok := range map[string]bool{
		"a.m2tok": true, "sub/a.m2tok": true, "a/../b": true,
		"": false, ".": false, "..": false, "../a": false, "a/../../b": false, "/abs": false, `a\b`: false,
	} {
		if err := safeRelPath(p); (err == nil) != ok {
			t.Errorf("safeRelPath(%q) = %v, want ok %v", p, err, ok)
		}
	}
}
