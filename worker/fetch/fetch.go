// Package fetch downloads a training job's remote inputs, a token dataset
// (data.path) and a Hugging Face model directory (model.init_from), from a
// checkpoint store (usually s3://) into a local cache, and verifies them
// before they are used.
//
// Files are written through a temporary file and a rename, so processes
// sharing a cache never see a partial file. A dataset's shards are checked
// against its manifest and their CRC-32C verified; a cached shard whose
// size matches its manifest entry and that verifies is reused. A model
// directory that is a step of a training checkpoint is checked against that
// checkpoint's manifest (sizes and SHA-256).
package fetch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
)

// Options configure Dataset and Model.
type Options struct {
	// CacheDir is the root of the download cache; required. Datasets go
	// under CacheDir/data/, models under CacheDir/models/.
	CacheDir string
	// S3 replaces the endpoint and credentials that s3:// locations
	// otherwise take from the environment (checkpoint.S3ConfigFromEnv).
	S3 *checkpoint.S3Config
	// Log receives the store's retries and warnings, and the summary lines
	// when Out is nil; nil discards them.
	Log *slog.Logger
	// Out, when set, receives one summary line per download (what was
	// downloaded, reused and verified, and where).
	Out io.Writer
}

// ErrNoCacheDir is returned when Options.CacheDir is empty.
var ErrNoCacheDir = errors.New("fetch: no cache directory to download to")

// OpenError is the failure to open the store of a location (a malformed
// location, a missing bucket or credentials, or the network), as distinct
// from a failure while downloading or verifying. Its message starts with
// the job spec field that named the location.
type OpenError struct {
	Field    string // job spec field: "data.path" or "model.init_from"
	Location string
	Err      error
}

func (e *OpenError) Error() string { return e.Field + ": " + e.Err.Error() }

// Unwrap returns the store's error.
func (e *OpenError) Unwrap() error { return e.Err }

// IsRemote reports whether a location is in S3 and so must be fetched
// before use.
func IsRemote(loc string) bool { return strings.HasPrefix(strings.ToLower(loc), "s3://") }

func (o Options) log() *slog.Logger {
	if o.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Log
}

// report writes a summary line to Out, else logs it at Info level.
func (o Options) report(format string, args ...any) {
	if o.Out != nil {
		fmt.Fprintf(o.Out, format+"\n", args...)
		return
	}
	o.log().Info(fmt.Sprintf(format, args...))
}

func (o Options) open(ctx context.Context, field, loc string) (checkpoint.Store, string, error) {
	if o.CacheDir == "" {
		return nil, "", fmt.Errorf("%s %s: %w", field, loc, ErrNoCacheDir)
	}
	s, prefix, err := checkpoint.OpenStore(ctx, loc, checkpoint.OpenOptions{S3: o.S3, Log: o.Log})
	if err != nil {
		return nil, "", &OpenError{Field: field, Location: loc, Err: err}
	}
	return s, prefix, nil
}

func closeStore(s checkpoint.Store) {
	if c, ok := s.(io.Closer); ok {
		c.Close()
	}
}

// cacheDir returns the directory under the cache root that mirrors a
// location: its store and prefix made safe for a path, and a hash of both
// so that equal names on different servers do not share it.
func cacheDir(root, kind string, store checkpoint.Store, prefix string) string {
	sum := sha256.Sum256([]byte(store.String() + "\x00" + prefix))
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_' {
			return r
		}
		return '_'
	}, strings.TrimPrefix(store.String(), "s3://")+"_"+prefix)
	if len(name) > 80 {
		name = name[:80]
	}
	return filepath.Join(root, kind, name+"-"+hex.EncodeToString(sum[:6]))
}

// download copies the object key of store to the file dst through a
// temporary file in its directory, and returns the number of bytes.
// want >= 0 is the size the object must have.
func download(ctx context.Context, store checkpoint.Store, key, dst string, want int64) (int64, error) {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return 0, err
	}
	r, err := store.Open(ctx, key)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	n, err := checkpoint.WriteFileAtomic(ctx, dst, 0o600, r, want)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", key, err)
	}
	return n, nil
}

// safeRelPath checks that a slash-separated relative path from a manifest
// or an index stays below its directory.
func safeRelPath(p string) error {
	c := path.Clean(p)
	if p == "" || path.IsAbs(p) || c == "." || c == ".." || strings.HasPrefix(c, "../") || strings.Contains(p, "\\") {
		return fmt.Errorf("path %q must be relative and stay below its directory", p)
	}
	return nil
}

// Dataset downloads the token dataset at loc into the cache and opens it.
// The location is a dataset directory (its manifest.json, else every
// *.m2tok object directly in it, by name), a manifest (*.json) or one
// shard (*.m2tok). Every shard's header is checked (against its manifest
// entry when there is one) and its size and CRC-32C verified; with a
// manifest, a cached shard whose size matches is verified and reused
// instead of downloaded again, and one that fails is downloaded again.
// Errors name the field data.path and the location.
func Dataset(ctx context.Context, loc string, o Options) (*data.Dataset, error) {
	store, prefix, err := o.open(ctx, "data.path", loc)
	if err != nil {
		return nil, err
	}
	defer closeStore(store)
	return dataset(ctx, store, prefix, loc, o)
}

// dataset is Dataset on the store and key prefix of loc.
func dataset(ctx context.Context, store checkpoint.Store, prefix, loc string, o Options) (*data.Dataset, error) {
	cache := cacheDir(o.CacheDir, "data", store, prefix)
	fail := func(err error) (*data.Dataset, error) { return nil, fmt.Errorf("data.path %s: %w", loc, err) }

	manifestKey, dirKey := "", prefix
	switch {
	case strings.HasSuffix(prefix, ".json"):
		manifestKey, dirKey = prefix, path.Dir(prefix)
	case strings.HasSuffix(prefix, data.ShardExt):
		dst := filepath.Join(cache, path.Base(prefix))
		if _, err := download(ctx, store, prefix, dst, -1); err != nil {
			return fail(err)
		}
		return openVerified(ctx, fail, dst)
	default:
		manifestKey = checkpoint.JoinKey(prefix, data.ManifestName)
	}
	if dirKey == "." {
		dirKey = ""
	}
	mpath := filepath.Join(cache, data.ManifestName)
	if _, err := download(ctx, store, manifestKey, mpath, -1); errors.Is(err, checkpoint.ErrNotFound) && !strings.HasSuffix(prefix, ".json") {
		return shardsWithoutManifest(ctx, store, dirKey, cache, fail, o)
	} else if err != nil {
		return fail(err)
	}
	man, err := data.ReadManifest(mpath)
	if err != nil {
		return fail(err)
	}
	var fetched, reused int
	var bytes int64
	for _, e := range man.Shards {
		if err := safeRelPath(e.Path); err != nil {
			return fail(fmt.Errorf("manifest: %w", err))
		}
		key, dst := checkpoint.JoinKey(dirKey, e.Path), filepath.Join(cache, filepath.FromSlash(e.Path))
		want := int64(data.HeaderSize) + int64(e.Tokens)*int64(e.Width)
		if st, err := os.Stat(dst); err == nil && st.Size() == want && checkShard(ctx, dst, &e) == nil {
			reused++
			continue
		}
		if _, err := download(ctx, store, key, dst, want); err != nil {
			return fail(err)
		}
		if err := checkShard(ctx, dst, &e); err != nil {
			os.Remove(dst)
			return fail(err)
		}
		fetched++
		bytes += want
	}
	o.report("data: %s: %d shards verified in %s (%d downloaded, %d bytes; %d reused)", loc, len(man.Shards), cache, fetched, bytes, reused)
	ds, err := data.OpenManifest(mpath)
	if err != nil {
		return fail(err)
	}
	return ds, nil
}

// shardsWithoutManifest downloads every *.m2tok object directly under
// dirKey (no manifest says what to expect, so nothing is reused),
// verifies each and opens them in name order.
func shardsWithoutManifest(ctx context.Context, store checkpoint.Store, dirKey, cache string, fail func(error) (*data.Dataset, error), o Options) (*data.Dataset, error) {
	base := checkpoint.JoinKey(dirKey, "")
	if dirKey == "" {
		base = ""
	}
	names, err := store.List(ctx, base)
	if err != nil {
		return fail(err)
	}
	var paths []string
	var total int64
	for _, n := range names {
		rel := strings.TrimPrefix(n, base)
		if strings.Contains(rel, "/") || !strings.HasSuffix(rel, data.ShardExt) || strings.HasPrefix(rel, ".") {
			continue
		}
		dst := filepath.Join(cache, rel)
		k, err := download(ctx, store, n, dst, -1)
		if err != nil {
			return fail(err)
		}
		paths = append(paths, dst)
		total += k
	}
	if len(paths) == 0 {
		return fail(fmt.Errorf("%w: no %s and no *%s objects", data.ErrNoShards, data.ManifestName, data.ShardExt))
	}
	slices.Sort(paths)
	o.report("data: %d shards without a manifest downloaded to %s (%d bytes)", len(paths), cache, total)
	return openVerified(ctx, fail, paths...)
}

// openVerified opens shard files as one dataset and verifies every one.
func openVerified(ctx context.Context, fail func(error) (*data.Dataset, error), paths ...string) (*data.Dataset, error) {
	ds, err := data.OpenShards(paths...)
	if err != nil {
		return fail(err)
	}
	if err := ds.Verify(ctx); err != nil {
		ds.Close()
		return fail(err)
	}
	return ds, nil
}

// checkShard opens a shard file, checks its header against the manifest
// entry and verifies its tokens (CRC-32C and vocabulary range).
func checkShard(ctx context.Context, file string, e *data.ManifestShard) error {
	s, err := data.OpenShard(file)
	if err != nil {
		return err
	}
	defer s.Close()
	h := s.Header()
	if h.Count != e.Tokens || h.Width != e.Width || fmt.Sprintf("%08x", h.Checksum) != e.CRC32C {
		return fmt.Errorf("%s: header says %d tokens of width %d, crc32c %08x; the manifest %d, %d, %s", e.Path, h.Count, h.Width, h.Checksum, e.Tokens, e.Width, e.CRC32C)
	}
	return s.VerifyContext(ctx)
}

// Model downloads the Hugging Face checkpoint directory at loc
// (config.json and model.safetensors, or a safetensors index and the
// shards it names) into the cache and returns the local directory. When
// the location is a step directory of a training checkpoint, the files'
// sizes and SHA-256 are checked against its manifest. A cached file of the
// other layout (an index where the weights are now one file, or the
// reverse) is removed so that the directory loads as the location is.
// Errors name the field model.init_from and the location.
func Model(ctx context.Context, loc string, o Options) (string, error) {
	store, prefix, err := o.open(ctx, "model.init_from", loc)
	if err != nil {
		return "", err
	}
	defer closeStore(store)
	return hfModel(ctx, store, prefix, loc, o)
}

// hfModel is Model on the store and key prefix of loc.
func hfModel(ctx context.Context, store checkpoint.Store, prefix, loc string, o Options) (string, error) {
	fail := func(err error) (string, error) { return "", fmt.Errorf("model.init_from %s: %w", loc, err) }
	dir := cacheDir(o.CacheDir, "models", store, prefix)
	files := []string{hf.ConfigFile, hf.WeightsFile}
	stale := hf.WeightsIndexFile
	if _, err := download(ctx, store, checkpoint.JoinKey(prefix, hf.WeightsFile), filepath.Join(dir, hf.WeightsFile), -1); errors.Is(err, checkpoint.ErrNotFound) {
		// Sharded weights: the index names the shard files.
		files, stale = []string{hf.ConfigFile, hf.WeightsIndexFile}, hf.WeightsFile
		if _, err := download(ctx, store, checkpoint.JoinKey(prefix, hf.WeightsIndexFile), filepath.Join(dir, hf.WeightsIndexFile), -1); err != nil {
			return fail(fmt.Errorf("neither %s nor %s: %w", hf.WeightsFile, hf.WeightsIndexFile, err))
		}
		shards, err := indexShards(filepath.Join(dir, hf.WeightsIndexFile))
		if err != nil {
			return fail(err)
		}
		for _, s := range shards {
			if err := safeRelPath(s); err != nil {
				return fail(fmt.Errorf("%s: %w", hf.WeightsIndexFile, err))
			}
			if _, err := download(ctx, store, checkpoint.JoinKey(prefix, s), filepath.Join(dir, filepath.FromSlash(s)), -1); err != nil {
				return fail(err)
			}
			files = append(files, s)
		}
	} else if err != nil {
		return fail(err)
	}
	if err := os.Remove(filepath.Join(dir, stale)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fail(err)
	}
	if _, err := download(ctx, store, checkpoint.JoinKey(prefix, hf.ConfigFile), filepath.Join(dir, hf.ConfigFile), -1); err != nil {
		return fail(err)
	}
	verified := ""
	if man, err := checkAgainstManifest(ctx, store, prefix, dir, files); err != nil {
		return fail(err)
	} else if man {
		verified = ", sizes and SHA-256 checked against the checkpoint's manifest"
	}
	o.report("model.init_from: %s downloaded to %s%s", loc, dir, verified)
	return dir, nil
}

// checkAgainstManifest checks the downloaded files against the manifest of
// the training checkpoint whose step directory prefix is, if it is one;
// it reports whether there was a manifest.
func checkAgainstManifest(ctx context.Context, store checkpoint.Store, prefix, dir string, files []string) (bool, error) {
	parent, stepDir := path.Split(prefix)
	var step int
	if _, err := fmt.Sscanf(stepDir, "step-%d", &step); err != nil || step < 0 || checkpoint.StepDir(step) != stepDir {
		return false, nil
	}
	man, err := checkpoint.ReadManifest(ctx, store, strings.TrimSuffix(parent, "/"), step)
	if errors.Is(err, checkpoint.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	for _, f := range files {
		i := slices.IndexFunc(man.Objects, func(o checkpoint.Object) bool { return o.Name == f })
		if i < 0 {
			continue
		}
		want := man.Objects[i]
		fh, err := os.Open(filepath.Join(dir, f))
		if err != nil {
			return true, err
		}
		h := sha256.New()
		n, err := io.Copy(h, fh)
		fh.Close()
		if err != nil {
			return true, err
		}
		if sum := hex.EncodeToString(h.Sum(nil)); n != want.Size || sum != want.SHA256 {
			return true, fmt.Errorf("%w: %s: %d bytes sha256 %s, the manifest says %d bytes sha256 %s", checkpoint.ErrCorrupt, f, n, sum, want.Size, want.SHA256)
		}
	}
	return true, nil
}

// indexShards returns the shard files a safetensors index's weight_map
// names, sorted, each once.
func indexShards(file string) ([]string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Base(file), err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, fmt.Errorf("%s: weight_map is missing or empty", filepath.Base(file))
	}
	var shards []string
	for _, s := range idx.WeightMap {
		if !slices.Contains(shards, s) {
			shards = append(shards, s)
		}
	}
	slices.Sort(shards)
	return shards, nil
}
