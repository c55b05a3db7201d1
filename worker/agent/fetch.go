package agent

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

// isS3 reports whether a location names an S3 bucket.
func isS3(loc string) bool { return strings.HasPrefix(strings.ToLower(loc), "s3://") }

// locationJoin appends elements to a location: with '/' to a URL, with the
// path separator to a local path.
func locationJoin(loc string, elem ...string) string {
	if strings.Contains(loc, "://") {
		return strings.TrimRight(loc, "/") + "/" + strings.Join(elem, "/")
	}
	return filepath.Join(append([]string{loc}, elem...)...)
}

// fetcher downloads a job's inputs from S3 into a cache directory.
type fetcher struct {
	cacheDir string
	s3       *checkpoint.S3Config
	log      *slog.Logger
}

func (f fetcher) open(ctx context.Context, field, loc string) (checkpoint.Store, string, error) {
	if f.cacheDir == "" {
		return nil, "", Fatal(fmt.Errorf("agent: %s %s is in S3 but the worker has no cache directory to download it to", field, loc))
	}
	s, prefix, err := checkpoint.OpenStore(ctx, loc, checkpoint.OpenOptions{S3: f.s3, Log: f.log})
	if err != nil {
		return nil, "", fmt.Errorf("agent: %s %s: %w", field, loc, err)
	}
	return s, prefix, nil
}

func closeStore(s checkpoint.Store) {
	if c, ok := s.(io.Closer); ok {
		c.Close()
	}
}

// dir returns the cache directory of a location: readable names plus a
// hash of the store and prefix, so that equal names on different servers
// do not meet.
func (f fetcher) dir(kind string, s checkpoint.Store, prefix string) string {
	sum := sha256.Sum256([]byte(s.String() + "\x00" + prefix))
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_' {
			return r
		}
		return '_'
	}, path.Base("/"+prefix))
	if len(name) > 48 {
		name = name[:48]
	}
	return filepath.Join(f.cacheDir, kind, name+"-"+hex.EncodeToString(sum[:8]))
}

// get copies an object to dst through a temporary file and a rename, so
// that workers sharing the cache never see a partial file; want >= 0 is
// the size the object must have.
func get(ctx context.Context, s checkpoint.Store, key, dst string, want int64) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	r, err := s.Open(ctx, key)
	if err != nil {
		return err
	}
	defer r.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".get-*")
	if err != nil {
		return err
	}
	n, err := io.Copy(tmp, r)
	if err == nil && want >= 0 && n != want {
		err = fmt.Errorf("%s: %d bytes downloaded, the manifest says %d", key, n, want)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// relPath checks that a path from a manifest stays inside its directory.
func relPath(p string) error {
	c := path.Clean(p)
	if p == "" || path.IsAbs(p) || c == ".." || strings.HasPrefix(c, "../") || strings.Contains(p, "\\") {
		return fmt.Errorf("path %q must be relative and stay inside its directory", p)
	}
	return nil
}

// dataset downloads the token dataset at an s3:// location (a directory
// with a manifest.json, else its *.m2tok objects) and opens it after
// verifying every shard's checksum. Shards already in the cache with the
// manifest's size are reused when they verify.
func (f fetcher) dataset(ctx context.Context, loc string) (*data.Dataset, error) {
	s, prefix, err := f.open(ctx, "data.path", loc)
	if err != nil {
		return nil, err
	}
	defer closeStore(s)
	dir := f.dir("data", s, prefix)
	fail := func(err error) (*data.Dataset, error) { return nil, fmt.Errorf("agent: data.path %s: %w", loc, err) }
	mpath := filepath.Join(dir, data.ManifestName)
	err = get(ctx, s, checkpoint.JoinKey(prefix, data.ManifestName), mpath, -1)
	switch {
	case errors.Is(err, checkpoint.ErrNotFound):
		base := checkpoint.JoinKey(prefix, "")
		names, err := s.List(ctx, base)
		if err != nil {
			return fail(err)
		}
		var files []string
		for _, n := range names {
			rel := strings.TrimPrefix(n, base)
			if strings.Contains(rel, "/") || strings.HasPrefix(rel, ".") || !strings.HasSuffix(rel, data.ShardExt) {
				continue
			}
			dst := filepath.Join(dir, rel)
			if err := get(ctx, s, n, dst, -1); err != nil {
				return fail(err)
			}
			files = append(files, dst)
		}
		if len(files) == 0 {
			return fail(fmt.Errorf("%w: neither %s nor *%s objects", data.ErrNoShards, data.ManifestName, data.ShardExt))
		}
		slices.Sort(files)
		ds, err := data.OpenShards(files...)
		if err != nil {
			return fail(err)
		}
		if err := ds.Verify(ctx); err != nil {
			ds.Close()
			return fail(err)
		}
		return ds, nil
	case err != nil:
		return fail(err)
	}
	man, err := data.ReadManifest(mpath)
	if err != nil {
		return fail(err)
	}
	fetched := 0
	for _, e := range man.Shards {
		if err := relPath(e.Path); err != nil {
			return fail(fmt.Errorf("manifest: %w", err))
		}
		dst := filepath.Join(dir, filepath.FromSlash(e.Path))
		size := int64(data.HeaderSize) + int64(e.Tokens)*int64(e.Width)
		if st, err := os.Stat(dst); err == nil && st.Size() == size && verifyShard(ctx, dst) == nil {
			continue
		}
		if err := get(ctx, s, checkpoint.JoinKey(prefix, e.Path), dst, size); err != nil {
			return fail(err)
		}
		fetched++
	}
	ds, err := data.OpenManifest(mpath)
	if err != nil {
		return fail(err)
	}
	if err := ds.Verify(ctx); err != nil {
		ds.Close()
		return fail(err)
	}
	f.log.Info("dataset downloaded and verified", "location", loc, "cache", dir, "shards", len(man.Shards), "downloaded", fetched)
	return ds, nil
}

func verifyShard(ctx context.Context, file string) error {
	sh, err := data.OpenShard(file)
	if err != nil {
		return err
	}
	defer sh.Close()
	return sh.VerifyContext(ctx)
}

// model downloads the Hugging Face checkpoint directory at an s3://
// location (config.json and model.safetensors, or a safetensors index and
// its shards) and returns the local directory. When the location is a step
// of a training checkpoint, the files are checked against its manifest.
func (f fetcher) model(ctx context.Context, loc string) (string, error) {
	s, prefix, err := f.open(ctx, "model.init_from", loc)
	if err != nil {
		return "", err
	}
	defer closeStore(s)
	dir := f.dir("models", s, prefix)
	fail := func(err error) (string, error) { return "", fmt.Errorf("agent: model.init_from %s: %w", loc, err) }
	files := []string{hf.ConfigFile, hf.WeightsFile}
	err = get(ctx, s, checkpoint.JoinKey(prefix, hf.WeightsFile), filepath.Join(dir, hf.WeightsFile), -1)
	if errors.Is(err, checkpoint.ErrNotFound) {
		files = []string{hf.ConfigFile, hf.WeightsIndexFile}
		idx := filepath.Join(dir, hf.WeightsIndexFile)
		if err := get(ctx, s, checkpoint.JoinKey(prefix, hf.WeightsIndexFile), idx, -1); err != nil {
			return fail(fmt.Errorf("neither %s nor %s: %w", hf.WeightsFile, hf.WeightsIndexFile, err))
		}
		shards, err := indexShards(idx)
		if err != nil {
			return fail(err)
		}
		for _, sh := range shards {
			if err := relPath(sh); err != nil {
				return fail(fmt.Errorf("%s: %w", hf.WeightsIndexFile, err))
			}
			if err := get(ctx, s, checkpoint.JoinKey(prefix, sh), filepath.Join(dir, filepath.FromSlash(sh)), -1); err != nil {
				return fail(err)
			}
			files = append(files, sh)
		}
	} else if err != nil {
		return fail(err)
	}
	if err := get(ctx, s, checkpoint.JoinKey(prefix, hf.ConfigFile), filepath.Join(dir, hf.ConfigFile), -1); err != nil {
		return fail(err)
	}
	if err := checkManifest(ctx, s, prefix, dir, files); err != nil {
		return fail(err)
	}
	f.log.Info("model downloaded", "location", loc, "dir", dir)
	return dir, nil
}

// indexShards lists the files a safetensors index maps weights to.
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
	var out []string
	for _, v := range idx.WeightMap {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return out, nil
}

// checkManifest compares downloaded files with the manifest of the training
// checkpoint whose step directory prefix is, when it is one.
func checkManifest(ctx context.Context, s checkpoint.Store, prefix, dir string, files []string) error {
	parent, stepDir := path.Split(prefix)
	var step int
	if _, err := fmt.Sscanf(stepDir, "step-%d", &step); err != nil || checkpoint.StepDir(step) != stepDir {
		return nil
	}
	man, err := checkpoint.ReadManifest(ctx, s, strings.TrimSuffix(parent, "/"), step)
	if errors.Is(err, checkpoint.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, name := range files {
		i := slices.IndexFunc(man.Objects, func(o checkpoint.Object) bool { return o.Name == name })
		if i < 0 {
			continue
		}
		fh, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			return err
		}
		h := sha256.New()
		n, err := io.Copy(h, fh)
		fh.Close()
		if err != nil {
			return err
		}
		if want := man.Objects[i]; n != want.Size || hex.EncodeToString(h.Sum(nil)) != want.SHA256 {
			return fmt.Errorf("%w: %s: %d bytes with sha256 %x, the manifest says %d bytes with %s", checkpoint.ErrCorrupt, name, n, h.Sum(nil), want.Size, want.SHA256)
		}
	}
	return nil
}
