package s3gw_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/checkpoint/s3gw"
)

func TestMain(m *testing.M) {
	s3gw.RunIfChild()
	os.Exit(m.Run())
}

func TestProcessServesObjectsAcrossRestarts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	p, err := s3gw.StartProcess(ctx, s3gw.Options{Dir: dir, Buckets: []string{"ckpt"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := checkpoint.S3Config{Endpoint: p.Endpoint, Bucket: "ckpt", AccessKey: p.AccessKey, SecretKey: p.SecretKey}
	store, err := checkpoint.NewS3Store(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("m2"), 1000)
	if err := checkpoint.PutBytes(ctx, store, "a/b.bin", want); err != nil {
		t.Fatal(err)
	}
	// The posix backend keeps objects as plain files.
	if b, err := os.ReadFile(filepath.Join(dir, "ckpt", "a", "b.bin")); err != nil || !bytes.Equal(b, want) {
		t.Fatalf("object file: %v", err)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	o := s3gw.Options{Dir: dir, Addr: p.Addr, AccessKey: p.AccessKey, SecretKey: p.SecretKey}
	p2, err := s3gw.StartProcess(ctx, o, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Stop(10 * time.Second)
	got, err := checkpoint.GetBytes(ctx, store, "a/b.bin")
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after restart: %d bytes, %v", len(got), err)
	}
}

func TestOptionsAreChecked(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		o    s3gw.Options
		want string
	}{
		{s3gw.Options{}, "dir is required"},
		{s3gw.Options{Dir: dir, AccessKey: "a"}, "set together"},
		{s3gw.Options{Dir: dir, AccessKey: "a", SecretKey: "short"}, "at least 8"},
		{s3gw.Options{Dir: dir, MaxConnections: 4, MaxRequests: 8}, "must not exceed"},
		{s3gw.Options{Dir: dir, MultipartMaxParts: -1}, "multipart_max_parts"},
		{s3gw.Options{Dir: dir, Buckets: []string{"Bad_Name"}}, "bucket"},
		{s3gw.Options{Dir: dir, Addr: "nonsense"}, "host:port"},
	} {
		_, err := s3gw.StartProcess(context.Background(), tc.o, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want one that says %q", tc.o, err, tc.want)
		}
	}
	o := s3gw.Options{Dir: dir, AccessKey: "AKID", SecretKey: "the-secret-key"}
	if strings.Contains(o.String(), "the-secret-key") {
		t.Errorf("Options.String shows the secret: %s", o)
	}
}
