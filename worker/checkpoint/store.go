package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"path/filepath"
	"strings"
)

// Store is where checkpoints live: a local directory or an S3 bucket.
// Object names are slash-separated keys. Implementations stream: no method
// holds a whole object in memory.
type Store interface {
	// Put stores the bytes of r under name. size is the number of bytes r
	// yields, or -1 when unknown. An object becomes visible whole or not
	// at all. A failed Put makes no new object visible and aborts its
	// incomplete upload, best effort (Cleanup removes what a crash left).
	Put(ctx context.Context, name string, r io.Reader, size int64) error
	// Open returns a reader of the object; a missing object is ErrNotFound.
	// The reader fails, rather than ends early, if the object cannot be
	// read to its end.
	Open(ctx context.Context, name string) (io.ReadCloser, error)
	// List returns the names that start with prefix, sorted.
	List(ctx context.Context, prefix string) ([]string, error)
	// Delete removes an object; a missing one is not an error.
	Delete(ctx context.Context, name string) error
	// String names the store for logs and messages, never with a secret.
	String() string
}

// RangeStore is implemented by stores that read parts of an object
// independently of each other; Load then fetches the segments of a
// checkpoint's tensor objects in parallel.
type RangeStore interface {
	Store
	// OpenRanges opens name for range reads; a missing object is
	// ErrNotFound.
	OpenRanges(ctx context.Context, name string) (RangeReader, error)
}

// RangeReader reads byte ranges of one object. Every range comes from the
// object as it was when it was opened, or the read fails. Its methods are
// safe for concurrent use.
type RangeReader interface {
	// Size is the object's size in bytes.
	Size() int64
	// ReadRange returns a reader of the n bytes of the object from offset
	// off on; off+n must not exceed Size. The reader fails, rather than
	// ends early, if the range cannot be read whole.
	ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error)
	// Close releases the object; readers it returned must be closed first.
	Close() error
}

// checkRange checks that [off, off+n) lies within an object of size bytes.
func checkRange(name string, size, off, n int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("checkpoint: %s: range of %d bytes at offset %d is outside its %d bytes", name, n, off, size)
	}
	return nil
}

// UploadJanitor is implemented by stores that can leave incomplete
// multipart uploads behind when a writer dies (S3).
type UploadJanitor interface {
	// AbortIncomplete aborts the incomplete uploads of objects under
	// prefix and returns how many it aborted.
	AbortIncomplete(ctx context.Context, prefix string) (int, error)
}

// PutBytes stores b under name.
func PutBytes(ctx context.Context, s Store, name string, b []byte) error {
	return s.Put(ctx, name, bytes.NewReader(b), int64(len(b)))
}

// GetBytes reads a whole object; a missing one is ErrNotFound.
func GetBytes(ctx context.Context, s Store, name string) ([]byte, error) {
	r, err := s.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}

// OpenOptions configure OpenStore.
type OpenOptions struct {
	// S3 overrides the S3 settings otherwise taken from the environment
	// (S3ConfigFromEnv); its Bucket is always the location's.
	S3 *S3Config
	// CreateBucket creates a missing bucket instead of failing.
	CreateBucket bool
	// Log receives retries and warnings; nil discards them.
	Log *slog.Logger
}

// OpenStore opens the store of a checkpoint location and returns it with
// the key prefix inside it under which the location's objects live.
//
//   - a path, absolute or relative, or file:///abs/path: a LocalStore
//     rooted there, prefix "";
//   - s3://BUCKET or s3://BUCKET/PREFIX: an S3Store on BUCKET, prefix
//     PREFIX (no leading or trailing slash). The endpoint, region and
//     credentials come from the environment as S3ConfigFromEnv describes,
//     unless opts.S3 gives them.
//
// A checkpoint of step S then lives under JoinKey(prefix, StepDir(S)).
func OpenStore(ctx context.Context, location string, opts OpenOptions) (Store, string, error) {
	if location == "" {
		return nil, "", errors.New("checkpoint: location: must not be empty")
	}
	scheme, rest, hasScheme := strings.Cut(location, "://")
	if !hasScheme {
		abs, err := filepath.Abs(location)
		if err != nil {
			return nil, "", fmt.Errorf("checkpoint: location %q: %w", location, err)
		}
		return LocalStore{Root: abs}, "", nil
	}
	switch strings.ToLower(scheme) {
	case "file":
		u, err := url.Parse(location)
		if err != nil || u.Path == "" || (u.Host != "" && u.Host != "localhost") {
			return nil, "", fmt.Errorf("checkpoint: location %q: a file location must be file:///absolute/path", location)
		}
		return LocalStore{Root: filepath.Clean(filepath.FromSlash(u.Path))}, "", nil
	case "s3":
		bucket, prefix, _ := strings.Cut(rest, "/")
		prefix = strings.Trim(prefix, "/")
		if err := validBucketName(bucket); err != nil {
			return nil, "", fmt.Errorf("checkpoint: location %q: %w", location, err)
		}
		var cfg S3Config
		if opts.S3 != nil {
			cfg = *opts.S3
		} else {
			var err error
			if cfg, err = S3ConfigFromEnv(); err != nil {
				return nil, "", fmt.Errorf("checkpoint: location %q: %w", location, err)
			}
		}
		cfg.Bucket = bucket
		if opts.CreateBucket {
			cfg.CreateBucket = true
		}
		if opts.Log != nil && cfg.Log == nil {
			cfg.Log = opts.Log
		}
		s, err := NewS3Store(ctx, cfg)
		if err != nil {
			return nil, "", err
		}
		return s, prefix, nil
	default:
		return nil, "", fmt.Errorf("checkpoint: location %q: scheme %q is not supported; use a path, file:// or s3://", location, scheme)
	}
}

// JoinKey joins a prefix and a name with one slash; an empty prefix adds
// nothing.
func JoinKey(prefix, name string) string {
	if prefix == "" {
		return name
	}
	return strings.TrimSuffix(prefix, "/") + "/" + name
}

func validBucketName(b string) error {
	if len(b) < 3 || len(b) > 63 {
		return fmt.Errorf("bucket %q: must have 3 to 63 characters", b)
	}
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !ok && (i == 0 || i == len(b)-1 || (c != '-' && c != '.')) {
			return fmt.Errorf("bucket %q: must be lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit", b)
		}
	}
	return nil
}
