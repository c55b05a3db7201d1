package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/data"
	"github.com/m2train/m2train/worker/fetch"
)

// isS3 reports whether a location names an S3 bucket.
func isS3(loc string) bool { return fetch.IsRemote(loc) }

// locationJoin appends elements to a location: with '/' to a URL, with the
// path separator to a local path.
func locationJoin(loc string, elem ...string) string {
	if strings.Contains(loc, "://") {
		return strings.TrimRight(loc, "/") + "/" + strings.Join(elem, "/")
	}
	return filepath.Join(append([]string{loc}, elem...)...)
}

func closeStore(s checkpoint.Store) {
	if c, ok := s.(io.Closer); ok {
		c.Close()
	}
}

// fetcher downloads a job's inputs from S3 into a cache directory through
// package fetch; a worker without a cache directory cannot run such a job
// anywhere, so that failure is fatal to the job.
type fetcher struct {
	cacheDir string
	s3       *checkpoint.S3Config
	log      *slog.Logger
}

func (f fetcher) options() fetch.Options {
	return fetch.Options{CacheDir: f.cacheDir, S3: f.s3, Log: f.log}
}

// wrap prefixes an error of package fetch with the agent's name, fatal
// when the worker has no cache directory.
func wrap(err error) error {
	err = fmt.Errorf("agent: %w", err)
	if errors.Is(err, fetch.ErrNoCacheDir) {
		return Fatal(err)
	}
	return err
}

// dataset downloads and verifies the token dataset at an s3:// location
// (fetch.Dataset) and opens it.
func (f fetcher) dataset(ctx context.Context, loc string) (*data.Dataset, error) {
	ds, err := fetch.Dataset(ctx, loc, f.options())
	if err != nil {
		return nil, wrap(err)
	}
	return ds, nil
}

// model downloads the Hugging Face checkpoint directory at an s3://
// location (fetch.Model) and returns the local directory.
func (f fetcher) model(ctx context.Context, loc string) (string, error) {
	dir, err := fetch.Model(ctx, loc, f.options())
	if err != nil {
		return "", wrap(err)
	}
	return dir, nil
}
