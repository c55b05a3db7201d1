package checkpoint

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Defaults of S3Config.
const (
	DefaultRegion = "us-east-1"
	// DefaultPartSize is the size of one part of a multipart upload; a
	// Put holds at most Concurrency+1 parts in memory.
	DefaultPartSize = 16 << 20
	// MinPartSize is S3's smallest part other than the last.
	MinPartSize = 5 << 20
	// MaxPartSize is S3's largest part.
	MaxPartSize = 5 << 30
	// DefaultConcurrency is the number of parts uploaded at once.
	DefaultConcurrency = 4
	// defaultEndpoint is AWS S3's global endpoint.
	defaultEndpoint = "https://s3.amazonaws.com"
)

// Environment variables read by S3ConfigFromEnv.
const (
	EnvEndpoint        = "M2_S3_ENDPOINT"
	EnvCredentialsFile = "M2_S3_CREDENTIALS_FILE"
)

// S3Config configures an S3Store. Zero values take the documented
// defaults; Validate names the field and the rule of a bad value.
type S3Config struct {
	// Endpoint is the server's URL. https:// (and a bare host[:port])
	// use TLS, http:// does not. Empty means AWS S3.
	Endpoint string
	// Region signs the requests (DefaultRegion when empty).
	Region string
	// Bucket holds the objects. Required.
	Bucket string
	// AccessKey and SecretKey (and SessionToken, for temporary
	// credentials) sign the requests. Both are required.
	AccessKey, SecretKey, SessionToken string
	// CreateBucket creates a missing bucket instead of failing.
	CreateBucket bool
	// PartSize is the multipart part size in bytes (DefaultPartSize),
	// between MinPartSize and MaxPartSize; an object no larger than one
	// part is sent in a single request.
	PartSize int64
	// Concurrency is the number of parts in flight (DefaultConcurrency).
	Concurrency int
	// Retry says how often and how long transient failures are retried.
	Retry RetryPolicy
	// Log receives one warning per retried request; nil discards them.
	Log *slog.Logger
	// OnRetry, when set, is called before each wait for a retry with the
	// operation, the object, the attempt that failed (1 for the first)
	// and its error.
	OnRetry func(op, name string, attempt int, err error)
}

// String describes the configuration without secrets.
func (c S3Config) String() string {
	return fmt.Sprintf("s3://%s (endpoint %s, region %s)", c.Bucket, c.endpointOrDefault(), c.regionOrDefault())
}

func (c S3Config) endpointOrDefault() string {
	if c.Endpoint == "" {
		return defaultEndpoint
	}
	return c.Endpoint
}

func (c S3Config) regionOrDefault() string {
	if c.Region == "" {
		return DefaultRegion
	}
	return c.Region
}

// endpoint splits Endpoint into host[:port] and whether it uses TLS.
func (c S3Config) endpoint() (host string, secure bool, err error) {
	e := c.endpointOrDefault()
	if !strings.Contains(e, "://") {
		e = "https://" + e
	}
	u, err := url.Parse(e)
	if err != nil {
		return "", false, fmt.Errorf("endpoint %q: %v", c.Endpoint, err)
	}
	switch u.Scheme {
	case "http", "https":
	default:
		return "", false, fmt.Errorf("endpoint %q: scheme must be http or https, got %q", c.Endpoint, u.Scheme)
	}
	if u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return "", false, fmt.Errorf("endpoint %q: must be scheme://host[:port] with no path, query or user", c.Endpoint)
	}
	return u.Host, u.Scheme == "https", nil
}

// Validate checks the configuration, naming the field and the rule that a
// bad value breaks.
func (c S3Config) Validate() error {
	if _, _, err := c.endpoint(); err != nil {
		return fmt.Errorf("checkpoint: s3: %w", err)
	}
	if err := validBucketName(c.Bucket); err != nil {
		return fmt.Errorf("checkpoint: s3: %w", err)
	}
	if c.AccessKey == "" || c.SecretKey == "" {
		return fmt.Errorf("checkpoint: s3: credentials: access key and secret key are required (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or %s)", EnvCredentialsFile)
	}
	if c.PartSize != 0 && (c.PartSize < MinPartSize || c.PartSize > MaxPartSize) {
		return fmt.Errorf("checkpoint: s3: part size must be between %d and %d bytes, got %d", MinPartSize, MaxPartSize, c.PartSize)
	}
	if c.Concurrency < 0 || c.Concurrency > 64 {
		return fmt.Errorf("checkpoint: s3: concurrency must be between 1 and 64 (0 for the default), got %d", c.Concurrency)
	}
	return c.Retry.validate()
}

// S3ConfigFromEnv reads the endpoint, region and credentials of an S3
// store from the environment:
//
//   - endpoint: M2_S3_ENDPOINT, else AWS_ENDPOINT_URL_S3, else
//     AWS_ENDPOINT_URL, else AWS S3;
//   - region: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1;
//   - credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
//     AWS_SESSION_TOKEN; else the file named by M2_S3_CREDENTIALS_FILE;
//     else AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials. Files are in
//     the AWS shared-credentials format, profile AWS_PROFILE or "default".
//
// The bucket is left empty. A credentials file that cannot be read or
// parsed is an error that names the file but never its content.
func S3ConfigFromEnv() (S3Config, error) {
	var c S3Config
	for _, k := range []string{EnvEndpoint, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"} {
		if v := os.Getenv(k); v != "" {
			c.Endpoint = v
			break
		}
	}
	for _, k := range []string{"AWS_REGION", "AWS_DEFAULT_REGION"} {
		if v := os.Getenv(k); v != "" {
			c.Region = v
			break
		}
	}
	c.AccessKey, c.SecretKey, c.SessionToken = os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"), os.Getenv("AWS_SESSION_TOKEN")
	if c.AccessKey != "" || c.SecretKey != "" {
		if c.AccessKey == "" || c.SecretKey == "" {
			return c, errors.New("checkpoint: s3: credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together")
		}
		return c, nil
	}
	profile := os.Getenv("AWS_PROFILE")
	if profile == "" {
		profile = "default"
	}
	if f := os.Getenv(EnvCredentialsFile); f != "" {
		return c, readCredentialsFile(&c, f, profile, true)
	}
	f := os.Getenv("AWS_SHARED_CREDENTIALS_FILE")
	required := f != ""
	if f == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return c, nil
		}
		f = filepath.Join(home, ".aws", "credentials")
	}
	return c, readCredentialsFile(&c, f, profile, required)
}

// readCredentialsFile fills the keys of c from profile of an AWS
// shared-credentials file. A missing file is an error only if required.
func readCredentialsFile(c *S3Config, path, profile string, required bool) error {
	f, err := os.Open(path)
	if err != nil {
		if !required && errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("checkpoint: s3: credentials file %s: %w", path, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	section, found := "", false
	for line := 1; sc.Scan(); line++ {
		l := strings.TrimSpace(sc.Text())
		if l == "" || l[0] == '#' || l[0] == ';' {
			continue
		}
		if l[0] == '[' {
			if !strings.HasSuffix(l, "]") {
				return fmt.Errorf("checkpoint: s3: credentials file %s: line %d: a section header must end with ]", path, line)
			}
			section = strings.TrimSpace(strings.TrimPrefix(l[1:len(l)-1], "profile "))
			found = found || section == profile
			continue
		}
		if section != profile {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return fmt.Errorf("checkpoint: s3: credentials file %s: line %d: want key = value", path, line)
		}
		switch strings.ToLower(strings.TrimSpace(k)) {
		case "aws_access_key_id":
			c.AccessKey = strings.TrimSpace(v)
		case "aws_secret_access_key":
			c.SecretKey = strings.TrimSpace(v)
		case "aws_session_token":
			c.SessionToken = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("checkpoint: s3: credentials file %s: %w", path, err)
	}
	if !found {
		if required {
			return fmt.Errorf("checkpoint: s3: credentials file %s: profile %q is missing", path, profile)
		}
		return nil
	}
	if c.AccessKey == "" || c.SecretKey == "" {
		return fmt.Errorf("checkpoint: s3: credentials file %s: profile %q needs aws_access_key_id and aws_secret_access_key", path, profile)
	}
	return nil
}

// S3Store keeps checkpoints in a bucket of an S3-compatible server.
// Uploads larger than one part are multipart, with Concurrency parts in
// flight; every request is retried on transient failures (network errors,
// 5xx, SlowDown) with exponential backoff and full jitter until its
// context ends or the retry policy gives up; a multipart upload that fails
// is aborted.
type S3Store struct {
	cfg    S3Config
	client *minio.Client
	core   minio.Core
	log    *slog.Logger
	bufs   sync.Pool

	transport *http.Transport
}

// Close drops the store's idle connections. Requests still running go on.
func (s *S3Store) Close() error {
	s.transport.CloseIdleConnections()
	return nil
}

// NewS3Store connects to the bucket of cfg, creating it when
// cfg.CreateBucket says so, and fails if it does not exist otherwise.
func NewS3Store(ctx context.Context, cfg S3Config) (*S3Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.PartSize == 0 {
		cfg.PartSize = DefaultPartSize
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = DefaultConcurrency
	}
	cfg.Retry = cfg.Retry.withDefaults()
	cfg.Region = cfg.regionOrDefault()
	host, secure, _ := cfg.endpoint()
	// A transport of its own, so that Close can drop its connections.
	tr, err := minio.DefaultTransport(secure)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: s3: %s: %w", cfg, err)
	}
	tr.MaxIdleConnsPerHost = 2*cfg.Concurrency + 2
	client, err := minio.New(host, &minio.Options{
		Transport:    tr,
		Creds:        credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, cfg.SessionToken),
		Secure:       secure,
		Region:       cfg.Region,
		BucketLookup: minio.BucketLookupPath,
		// Retries are this package's, with jitter and a policy.
		MaxRetries: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint: s3: %s: %w", cfg, err)
	}
	s := &S3Store{cfg: cfg, client: client, core: minio.Core{Client: client}, log: cfg.Log, transport: tr}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.bufs.New = func() any { b := make([]byte, cfg.PartSize); return &b }
	var exists bool
	err = s.retry(ctx, "HeadBucket", "", func(ctx context.Context) error {
		var err error
		exists, err = client.BucketExists(ctx, cfg.Bucket)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint: s3: %s: %w", cfg, err)
	}
	if !exists {
		if !cfg.CreateBucket {
			return nil, fmt.Errorf("checkpoint: s3: %s: %w: bucket %s does not exist", cfg, ErrNotFound, cfg.Bucket)
		}
		err = s.retry(ctx, "CreateBucket", "", func(ctx context.Context) error {
			err := client.MakeBucket(ctx, cfg.Bucket, minio.MakeBucketOptions{Region: cfg.Region})
			if code := minio.ToErrorResponse(err).Code; code == "BucketAlreadyOwnedByYou" {
				return nil
			}
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("checkpoint: s3: %s: create bucket: %w", cfg, err)
		}
	}
	return s, nil
}

// String names the store by bucket and endpoint.
func (s *S3Store) String() string { return s.cfg.String() }

// Bucket returns the store's bucket.
func (s *S3Store) Bucket() string { return s.cfg.Bucket }

func (s *S3Store) retry(ctx context.Context, op, name string, fn func(context.Context) error) error {
	return s.cfg.Retry.do(ctx, fn, func(attempt int, delay time.Duration, err error) {
		s.log.Warn("s3 request failed; retrying", "op", op, "bucket", s.cfg.Bucket, "object", name,
			"attempt", attempt, "delay", delay, "err", err)
		if s.cfg.OnRetry != nil {
			s.cfg.OnRetry(op, name, attempt, err)
		}
	})
}

// Put uploads r to name: in one request when it fits in one part, as a
// multipart upload otherwise. Memory is bounded by Concurrency+1 parts.
func (s *S3Store) Put(ctx context.Context, name string, r io.Reader, size int64) error {
	first := s.bufs.Get().(*[]byte)
	n, err := io.ReadFull(r, *first)
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		defer s.bufs.Put(first)
		if size >= 0 && int64(n) != size {
			return fmt.Errorf("checkpoint: s3: put %s: read %d bytes, caller said %d", name, n, size)
		}
		data := (*first)[:n]
		// A payload signed with its digest, rather than the client's
		// chunked streaming signature: over plain HTTP the client streams
		// whenever DisableContentSha256 is unset, digest or not, and for
		// an empty body it sends chunk framing after a Content-Length of
		// 0, which the server then reads as the next request on the
		// connection and answers with a 400 that fails whichever request
		// comes next.
		sum := sha256.Sum256(data)
		digest := hex.EncodeToString(sum[:])
		return s.retry(ctx, "PutObject", name, func(ctx context.Context) error {
			_, err := s.core.PutObject(ctx, s.cfg.Bucket, name, bytes.NewReader(data), int64(len(data)), "", digest,
				minio.PutObjectOptions{DisableContentSha256: true})
			return err
		})
	case err != nil:
		s.bufs.Put(first)
		return fmt.Errorf("checkpoint: s3: put %s: read: %w", name, err)
	}
	return s.putMultipart(ctx, name, r, size, first)
}

// putMultipart uploads first and the rest of r as the parts of one
// multipart upload, aborting it on any failure.
func (s *S3Store) putMultipart(ctx context.Context, name string, r io.Reader, size int64, first *[]byte) (err error) {
	var uploadID string
	err = s.retry(ctx, "NewMultipartUpload", name, func(ctx context.Context) error {
		var err error
		uploadID, err = s.core.NewMultipartUpload(ctx, s.cfg.Bucket, name, minio.PutObjectOptions{})
		return err
	})
	if err != nil {
		s.bufs.Put(first)
		return fmt.Errorf("checkpoint: s3: put %s: %w", name, err)
	}
	defer func() {
		if err != nil {
			s.abort(name, uploadID)
		}
	}()

	uctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		parts []minio.CompletePart
		total int64
	)
	// free holds the part buffers not being uploaded: Concurrency+1 of
	// them, so that the next part is read while Concurrency upload.
	free := make(chan *[]byte, s.cfg.Concurrency+1)
	for range s.cfg.Concurrency {
		free <- s.bufs.Get().(*[]byte)
	}
	defer func() {
		wg.Wait()
		close(free)
		for b := range free {
			s.bufs.Put(b)
		}
	}()
	buf, n := first, len(*first)
	for part := 1; ; part++ {
		if part > 10000 {
			return fmt.Errorf("checkpoint: s3: put %s: more than 10000 parts of %d bytes; raise the part size", name, s.cfg.PartSize)
		}
		total += int64(n)
		wg.Add(1)
		go func(part int, buf *[]byte, data []byte) {
			defer wg.Done()
			defer func() { free <- buf }()
			var p minio.ObjectPart
			err := s.retry(uctx, "UploadPart", name, func(ctx context.Context) error {
				var err error
				p, err = s.core.PutObjectPart(ctx, s.cfg.Bucket, name, uploadID, part, bytes.NewReader(data), int64(len(data)), partOptions(data))
				return err
			})
			if err != nil {
				cancel(fmt.Errorf("part %d: %w", part, err))
				return
			}
			mu.Lock()
			parts = append(parts, minio.CompletePart{PartNumber: part, ETag: p.ETag})
			mu.Unlock()
		}(part, buf, (*buf)[:n])
		if n < len(*buf) {
			break // a short part is the last
		}
		select {
		case buf = <-free:
		case <-uctx.Done():
			wg.Wait()
			return fmt.Errorf("checkpoint: s3: put %s: %w", name, context.Cause(uctx))
		}
		var rerr error
		n, rerr = io.ReadFull(r, *buf)
		if rerr == io.EOF {
			free <- buf
			break
		}
		if rerr != nil && rerr != io.ErrUnexpectedEOF {
			free <- buf
			cancel(rerr)
			wg.Wait()
			return fmt.Errorf("checkpoint: s3: put %s: read: %w", name, rerr)
		}
	}
	wg.Wait()
	if err := context.Cause(uctx); err != nil {
		return fmt.Errorf("checkpoint: s3: put %s: %w", name, err)
	}
	if size >= 0 && total != size {
		return fmt.Errorf("checkpoint: s3: put %s: read %d bytes, caller said %d", name, total, size)
	}
	sort.Slice(parts, func(i, j int) bool { return parts[i].PartNumber < parts[j].PartNumber })
	attempts := 0
	err = s.retry(ctx, "CompleteMultipartUpload", name, func(ctx context.Context) error {
		attempts++
		_, err := s.core.CompleteMultipartUpload(ctx, s.cfg.Bucket, name, uploadID, parts, minio.PutObjectOptions{})
		if err != nil && attempts > 1 && minio.ToErrorResponse(err).Code == "NoSuchUpload" {
			// An earlier attempt may have completed the upload and lost
			// only its response: the object is then there, whole.
			if info, serr := s.client.StatObject(ctx, s.cfg.Bucket, name, minio.StatObjectOptions{}); serr == nil && info.Size == total {
				return nil
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("checkpoint: s3: put %s: %w", name, err)
	}
	return nil
}

// castagnoli is the CRC-32C table; the checksum of every part.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// partOptions sends a part with a CRC-32C checksum, which the server
// verifies, and an unsigned payload. A payload signature would hash every
// byte with SHA-256 once more on both ends; the integrity of the object
// end to end already rests on its SHA-256 in the manifest, which is sent
// signed with its digest, and is verified at every load.
func partOptions(data []byte) minio.PutObjectPartOptions {
	var sum [4]byte
	binary.BigEndian.PutUint32(sum[:], crc32.Checksum(data, castagnoli))
	h := make(http.Header)
	h.Set("X-Amz-Checksum-Crc32c", base64.StdEncoding.EncodeToString(sum[:]))
	return minio.PutObjectPartOptions{DisableContentSha256: true, CustomHeader: h}
}

// abort aborts a multipart upload, best effort, even after the caller's
// context ended: an incomplete upload holds storage until it is aborted.
func (s *S3Store) abort(name, uploadID string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := s.cfg.Retry
	p.Attempts = min(p.Attempts, 3)
	err := p.do(ctx, func(ctx context.Context) error {
		err := s.core.AbortMultipartUpload(ctx, s.cfg.Bucket, name, uploadID)
		if minio.ToErrorResponse(err).Code == "NoSuchUpload" {
			return nil
		}
		return err
	}, nil)
	if err != nil {
		s.log.Warn("could not abort an incomplete multipart upload; it is removed at the next start", "bucket", s.cfg.Bucket, "object", name, "err", err)
	}
}

// Open returns a reader of the object. A read that fails on the way is
// resumed from where it stopped, with the retry policy, as long as the
// object is unchanged (same ETag).
func (s *S3Store) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	r := &s3Reader{s: s, ctx: ctx, name: name, end: -1}
	if err := r.open(); err != nil {
		return nil, err
	}
	return r, nil
}

// OpenRanges opens an object for range reads with one HEAD request, which
// gives its size and ETag. Every range is then a GET of that ETag, so
// that all come from the same object (a changed object fails the read),
// and a range that fails on the way resumes as Open's reader does.
func (s *S3Store) OpenRanges(ctx context.Context, name string) (RangeReader, error) {
	var info minio.ObjectInfo
	err := s.retry(ctx, "StatObject", name, func(ctx context.Context) error {
		var err error
		info, err = s.client.StatObject(ctx, s.cfg.Bucket, name, minio.StatObjectOptions{})
		return err
	})
	if err != nil {
		switch minio.ToErrorResponse(err).Code {
		case "NoSuchKey", "NoSuchBucket":
			return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
		}
		return nil, fmt.Errorf("checkpoint: s3: stat %s: %w", name, err)
	}
	if info.ETag == "" {
		return nil, fmt.Errorf("checkpoint: s3: stat %s: the server gave no ETag, which range reads need", name)
	}
	return &s3Ranges{s: s, name: name, etag: info.ETag, size: info.Size}, nil
}

// s3Ranges reads ranges of one version of an object.
type s3Ranges struct {
	s    *S3Store
	name string
	etag string
	size int64
}

func (o *s3Ranges) Size() int64 { return o.size }

func (o *s3Ranges) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	if err := checkRange(o.name, o.size, off, n); err != nil {
		return nil, err
	}
	if n == 0 {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	r := &s3Reader{s: o.s, ctx: ctx, name: o.name, etag: o.etag, off: off, end: off + n}
	if err := r.open(); err != nil {
		return nil, err
	}
	return r, nil
}

func (o *s3Ranges) Close() error { return nil }

// s3Reader reads an object, or the range [off, end) of it, resuming after
// a failure from where it stopped.
type s3Reader struct {
	s    *S3Store
	ctx  context.Context
	name string
	body io.ReadCloser
	etag string // of the object being read; empty until the first response of a whole-object read
	off  int64  // next byte to read
	end  int64  // end of what is read; -1 until the first response of a whole-object read
}

func (r *s3Reader) open() error {
	err := r.s.retry(r.ctx, "GetObject", r.name, func(ctx context.Context) error {
		var opts minio.GetObjectOptions
		if r.etag != "" {
			if err := opts.SetMatchETag(r.etag); err != nil {
				return err
			}
		}
		ranged := r.end >= 0
		if ranged {
			if err := opts.SetRange(r.off, r.end-1); err != nil {
				return err
			}
		}
		body, info, _, err := r.s.core.GetObject(ctx, r.s.cfg.Bucket, r.name, opts)
		if err != nil {
			return err
		}
		if ranged && info.Size != r.end-r.off {
			body.Close()
			return fmt.Errorf("checkpoint: s3: get %s: asked for bytes %d to %d, the server sent %d bytes", r.name, r.off, r.end, info.Size)
		}
		if !ranged {
			r.etag, r.end = info.ETag, info.Size
		}
		r.body = body
		return nil
	})
	if err == nil {
		return nil
	}
	switch minio.ToErrorResponse(err).Code {
	case "NoSuchKey", "NoSuchBucket":
		return fmt.Errorf("%w: %s", ErrNotFound, r.name)
	case "PreconditionFailed":
		return fmt.Errorf("checkpoint: s3: get %s: the object changed while it was read", r.name)
	}
	return fmt.Errorf("checkpoint: s3: get %s: %w", r.name, err)
}

func (r *s3Reader) Read(p []byte) (int, error) {
	for {
		if r.body == nil {
			return 0, io.ErrClosedPipe
		}
		if r.off == r.end {
			return 0, io.EOF
		}
		n, err := r.body.Read(p[:min(int64(len(p)), r.end-r.off)])
		r.off += int64(n)
		if err == nil || n > 0 {
			return n, nil
		}
		if err == io.EOF {
			if r.off == r.end {
				return 0, io.EOF
			}
			err = io.ErrUnexpectedEOF
		}
		if r.ctx.Err() != nil || !retryable(err) {
			return 0, err
		}
		r.s.log.Warn("s3 read failed; resuming", "bucket", r.s.cfg.Bucket, "object", r.name, "offset", r.off, "err", err)
		r.body.Close()
		r.body = nil
		if oerr := r.open(); oerr != nil {
			return 0, oerr
		}
	}
}

func (r *s3Reader) Close() error {
	if r.body == nil {
		return nil
	}
	err := r.body.Close()
	r.body = nil
	return err
}

// List returns the object names under prefix, sorted.
func (s *S3Store) List(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	err := s.retry(ctx, "ListObjects", prefix, func(ctx context.Context) error {
		out = out[:0]
		for o := range s.client.ListObjectsIter(ctx, s.cfg.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
			if o.Err != nil {
				return o.Err
			}
			out = append(out, o.Key)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("checkpoint: s3: list %s: %w", prefix, err)
	}
	sort.Strings(out)
	return out, nil
}

// Delete removes an object; a missing one is not an error.
func (s *S3Store) Delete(ctx context.Context, name string) error {
	err := s.retry(ctx, "DeleteObject", name, func(ctx context.Context) error {
		err := s.client.RemoveObject(ctx, s.cfg.Bucket, name, minio.RemoveObjectOptions{})
		if minio.ToErrorResponse(err).Code == "NoSuchKey" {
			return nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("checkpoint: s3: delete %s: %w", name, err)
	}
	return nil
}

// AbortIncomplete aborts every incomplete multipart upload of an object
// under prefix: what a writer that died mid-upload left behind.
func (s *S3Store) AbortIncomplete(ctx context.Context, prefix string) (int, error) {
	type upload struct{ key, id string }
	var ups []upload
	err := s.retry(ctx, "ListMultipartUploads", prefix, func(ctx context.Context) error {
		ups = ups[:0]
		keyMarker, idMarker := "", ""
		for {
			res, err := s.core.ListMultipartUploads(ctx, s.cfg.Bucket, prefix, keyMarker, idMarker, "", 1000)
			if err != nil {
				return err
			}
			for _, u := range res.Uploads {
				ups = append(ups, upload{u.Key, u.UploadID})
			}
			if !res.IsTruncated {
				return nil
			}
			keyMarker, idMarker = res.NextKeyMarker, res.NextUploadIDMarker
		}
	})
	if err != nil {
		return 0, fmt.Errorf("checkpoint: s3: list incomplete uploads under %s: %w", prefix, err)
	}
	for i, u := range ups {
		err := s.retry(ctx, "AbortMultipartUpload", u.key, func(ctx context.Context) error {
			err := s.core.AbortMultipartUpload(ctx, s.cfg.Bucket, u.key, u.id)
			if minio.ToErrorResponse(err).Code == "NoSuchUpload" {
				return nil
			}
			return err
		})
		if err != nil {
			return i, fmt.Errorf("checkpoint: s3: abort upload of %s: %w", u.key, err)
		}
	}
	return len(ups), nil
}

// retryable says whether an S3 request that failed with err may succeed
// if sent again: network failures, 5xx, throttling and timeouts.
func retryable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var resp minio.ErrorResponse
	if !errors.As(err, &resp) || (resp.Code == "" && resp.StatusCode == 0) {
		// Not an S3 error response: the connection failed, was reset or
		// ended early.
		return true
	}
	switch resp.Code {
	case "SlowDown", "SlowDownWrite", "SlowDownRead", "InternalError", "ServiceUnavailable", "RequestTimeout",
		"OperationAborted", "XMinioServerNotInitialized":
		return true
	}
	return resp.StatusCode >= 500 || resp.StatusCode == 429 || resp.StatusCode == 408
}

// PutObjectBaseline uploads b with the S3 client's own PutObject (its
// multipart upload with the store's part size and concurrency), without
// this package's hashing or retries. It exists to measure Put and Save
// against what the client alone achieves (tools/ckptbench).
func (s *S3Store) PutObjectBaseline(ctx context.Context, name string, b []byte) error {
	_, err := s.client.PutObject(ctx, s.cfg.Bucket, name, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{
		PartSize: uint64(s.cfg.PartSize), NumThreads: uint(s.cfg.Concurrency)})
	return err
}

// GetObjectBaseline reads an object into b, which must have its size, with
// the S3 client's own GetObject, without this package's verification or
// retries; the counterpart of PutObjectBaseline.
func (s *S3Store) GetObjectBaseline(ctx context.Context, name string, b []byte) error {
	obj, err := s.client.GetObject(ctx, s.cfg.Bucket, name, minio.GetObjectOptions{})
	if err != nil {
		return err
	}
	defer obj.Close()
	if _, err := io.ReadFull(obj, b); err != nil {
		return err
	}
	return nil
}

// GetRangesBaseline reads objects into bufs (one each, of the object's
// size) with the S3 client's own GetObject of ranges of rangeSize bytes,
// concurrency ranges at once over all the objects, without this package's
// verification or retries: the raw counterpart of Load's parallel fetch,
// for tools/ckptbench.
func (s *S3Store) GetRangesBaseline(ctx context.Context, names []string, bufs [][]byte, rangeSize int64, concurrency int) error {
	if len(names) != len(bufs) || rangeSize <= 0 || concurrency <= 0 {
		return fmt.Errorf("checkpoint: s3: ranges baseline: %d names, %d buffers, range size %d, concurrency %d", len(names), len(bufs), rangeSize, concurrency)
	}
	type rng struct {
		name string
		off  int64
		b    []byte
	}
	work := make(chan rng)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range work {
				var opts minio.GetObjectOptions
				err := opts.SetRange(r.off, r.off+int64(len(r.b))-1)
				if err == nil {
					var obj *minio.Object
					if obj, err = s.client.GetObject(ctx, s.cfg.Bucket, r.name, opts); err == nil {
						_, err = io.ReadFull(obj, r.b)
						obj.Close()
					}
				}
				if err != nil {
					cancel(fmt.Errorf("get %s at %d: %w", r.name, r.off, err))
				}
			}
		}()
	}
feed:
	for i, name := range names {
		for off := int64(0); off < int64(len(bufs[i])); off += rangeSize {
			select {
			case work <- rng{name, off, bufs[i][off:min(off+rangeSize, int64(len(bufs[i])))]}:
			case <-ctx.Done():
				break feed
			}
		}
	}
	close(work)
	wg.Wait()
	return context.Cause(ctx)
}
