package checkpoint

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// clearS3Env empties every variable S3ConfigFromEnv reads.
func clearS3Env(t *testing.T) {
	for _, k := range []string{EnvEndpoint, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
		"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", EnvCredentialsFile, "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"} {
		t.Setenv(k, "")
	}
	t.Setenv("HOME", t.TempDir())
}

func TestOpenStoreLocations(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for _, tc := range []struct {
		loc, root string
	}{
		{dir, dir},
		{"file://" + dir, dir},
		{"file://" + dir + "/", dir},
	} {
		s, prefix, err := OpenStore(ctx, tc.loc, OpenOptions{})
		if err != nil {
			t.Errorf("%s: %v", tc.loc, err)
			continue
		}
		if ls, ok := s.(LocalStore); !ok || ls.Root != tc.root || prefix != "" {
			t.Errorf("%s: store %v prefix %q, want a LocalStore at %s", tc.loc, s, prefix, tc.root)
		}
	}
	wd, _ := os.Getwd()
	if s, _, err := OpenStore(ctx, "rel/dir", OpenOptions{}); err != nil || s.(LocalStore).Root != filepath.Join(wd, "rel/dir") {
		t.Errorf("a relative path: %v, %v", s, err)
	}
	for _, tc := range []struct{ loc, want string }{
		{"", "must not be empty"},
		{"gs://bucket/x", `scheme "gs" is not supported`},
		{"s3://", "bucket"},
		{"s3://Upper/x", "lowercase"},
		{"s3://ab/x", "3 to 63"},
		{"file://host/x", "file:///absolute/path"},
	} {
		if _, _, err := OpenStore(ctx, tc.loc, OpenOptions{}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one that says %q", tc.loc, err, tc.want)
		}
	}
}

func TestOpenStoreS3PrefixAndBucketCreation(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	cfg := g.config()
	// A bucket that does not exist is an error unless creation is asked for.
	if _, _, err := OpenStore(ctx, "s3://fresh-bucket/a/b/", OpenOptions{S3: &cfg}); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing bucket: %v", err)
	}
	s, prefix, err := OpenStore(ctx, "s3://fresh-bucket/a/b/", OpenOptions{S3: &cfg, CreateBucket: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.(*S3Store).Close()
	if prefix != "a/b" || s.(*S3Store).Bucket() != "fresh-bucket" {
		t.Errorf("bucket %s prefix %q, want fresh-bucket and a/b", s.(*S3Store).Bucket(), prefix)
	}
	if _, err := Save(ctx, s, prefix, testState(5)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(g.opts.Dir, "fresh-bucket", "a", "b", StepDir(5), ManifestObject)); err != nil {
		t.Error(err)
	}
	// Wrong credentials fail at once with the server's refusal, not after retries.
	bad := cfg
	bad.SecretKey = "not-the-secret"
	if _, _, err := OpenStore(ctx, "s3://"+testBucket, OpenOptions{S3: &bad}); err == nil || strings.Contains(err.Error(), "attempts") {
		t.Errorf("wrong secret: %v", err)
	}
}

func TestS3ConfigFromEnv(t *testing.T) {
	clearS3Env(t)
	t.Setenv("AWS_ENDPOINT_URL", "http://fallback:1")
	t.Setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
	t.Setenv("AWS_DEFAULT_REGION", "eu-west-3")
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
	c, err := S3ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if c.Endpoint != "http://s3-specific:2" || c.Region != "eu-west-3" || c.AccessKey != "AKIDENV" || c.SecretKey != "env-secret-value" {
		t.Errorf("from the environment: %+v", c)
	}
	t.Setenv(EnvEndpoint, "http://m2:3")
	if c, _ = S3ConfigFromEnv(); c.Endpoint != "http://m2:3" {
		t.Errorf("%s does not take precedence: %s", EnvEndpoint, c.Endpoint)
	}

	// A key without its secret is an error.
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	if _, err := S3ConfigFromEnv(); err == nil || !strings.Contains(err.Error(), "together") {
		t.Errorf("half the credentials: %v", err)
	}

	// Credentials from a named file, in the shared-credentials format.
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	f := filepath.Join(t.TempDir(), "creds")
	os.WriteFile(f, []byte("# comment\n[default]\naws_access_key_id = AKIDDEF\naws_secret_access_key = def-secret\n\n[profile ci]\naws_access_key_id=AKIDCI\naws_secret_access_key=ci-secret\naws_session_token = tok\n"), 0o600)
	t.Setenv(EnvCredentialsFile, f)
	if c, err = S3ConfigFromEnv(); err != nil || c.AccessKey != "AKIDDEF" || c.SecretKey != "def-secret" {
		t.Errorf("default profile: %+v, %v", c, err)
	}
	t.Setenv("AWS_PROFILE", "ci")
	if c, err = S3ConfigFromEnv(); err != nil || c.AccessKey != "AKIDCI" || c.SecretKey != "ci-secret" || c.SessionToken != "tok" {
		t.Errorf("profile ci: %+v, %v", c, err)
	}
	t.Setenv("AWS_PROFILE", "nope")
	if _, err = S3ConfigFromEnv(); err == nil || !strings.Contains(err.Error(), `profile "nope" is missing`) {
		t.Errorf("missing profile: %v", err)
	}
	t.Setenv(EnvCredentialsFile, filepath.Join(t.TempDir(), "absent"))
	if _, err = S3ConfigFromEnv(); err == nil {
		t.Error("a named credentials file that does not exist was accepted")
	}

	// The AWS shared file in the home directory is optional.
	t.Setenv(EnvCredentialsFile, "")
	t.Setenv("AWS_PROFILE", "")
	if c, err = S3ConfigFromEnv(); err != nil || c.AccessKey != "" {
		t.Errorf("no credentials anywhere: %+v, %v", c, err)
	}
	c.Bucket = "bkt"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "AWS_ACCESS_KEY_ID") {
		t.Errorf("validating a config without credentials: %v", err)
	}
}

// TestSecretsNeverPrinted checks the strings and errors a user sees.
func TestSecretsNeverPrinted(t *testing.T) {
	const secret = "very-secret-value-123"
	c := S3Config{Endpoint: "http://127.0.0.1:1", Bucket: "bkt", AccessKey: "AKID", SecretKey: secret, SessionToken: secret + "tok"}
	if strings.Contains(c.String(), secret) {
		t.Errorf("S3Config.String shows the secret: %s", c)
	}
	f := filepath.Join(t.TempDir(), "creds")
	os.WriteFile(f, []byte("[default]\naws_access_key_id = AKID\n"+secret+"\n"), 0o600)
	clearS3Env(t)
	t.Setenv(EnvCredentialsFile, f)
	_, err := S3ConfigFromEnv()
	if err == nil || strings.Contains(err.Error(), secret) {
		t.Errorf("a malformed credentials file: %v", err)
	}
	c.Retry = RetryPolicy{Attempts: 1}
	_, err = NewS3Store(context.Background(), c)
	if err == nil || strings.Contains(err.Error(), secret) {
		t.Errorf("an unreachable endpoint: %v", err)
	}
}

func TestS3ConfigValidate(t *testing.T) {
	ok := S3Config{Bucket: "bkt", AccessKey: "a", SecretKey: "b"}
	for _, tc := range []struct {
		mod  func(*S3Config)
		want string
	}{
		{func(c *S3Config) { c.Endpoint = "ftp://x" }, "scheme must be http or https"},
		{func(c *S3Config) { c.Endpoint = "http://x/path" }, "no path"},
		{func(c *S3Config) { c.PartSize = 1 << 20 }, "part size"},
		{func(c *S3Config) { c.Concurrency = -1 }, "concurrency"},
		{func(c *S3Config) { c.Retry.BaseDelay = -1 }, "retry"},
		{func(c *S3Config) { c.Bucket = "" }, "bucket"},
	} {
		c := ok
		tc.mod(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("error %v, want one that says %q", err, tc.want)
		}
	}
	if err := ok.Validate(); err != nil {
		t.Errorf("a valid config: %v", err)
	}
	for e, secure := range map[string]bool{"": true, "s3.example.com": true, "https://h:9000": true, "http://h:9000": false} {
		c := ok
		c.Endpoint = e
		if _, s, err := c.endpoint(); err != nil || s != secure {
			t.Errorf("endpoint %q: TLS %v (%v), want %v", e, s, err, secure)
		}
	}
}
