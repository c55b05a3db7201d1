package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
)

func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestS3StoreObjects(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	cfg := g.config()
	cfg.Concurrency = 2
	s := g.store(t, cfg)

	small := []byte("tiny object")
	// Three full parts and a short fourth: a multipart upload.
	large := randomBytes(3*MinPartSize+12345, 1)
	exact := randomBytes(MinPartSize, 2)
	for name, data := range map[string][]byte{"p/small": small, "p/large": large, "p/exact": exact, "p/empty": {}} {
		if err := PutBytes(ctx, s, name, data); err != nil {
			t.Fatalf("put %s: %v", name, err)
		}
		got, err := GetBytes(ctx, s, name)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("get %s: %d bytes (want %d), %v", name, len(got), len(data), err)
		}
	}
	// An object of unknown size streams the same way.
	if err := s.Put(ctx, "p/unsized", bytes.NewReader(large), -1); err != nil {
		t.Fatal(err)
	}
	if got, _ := GetBytes(ctx, s, "p/unsized"); !bytes.Equal(got, large) {
		t.Fatal("object of unknown size differs")
	}
	// A size that disagrees with the reader fails and leaves nothing.
	if err := s.Put(ctx, "p/short", bytes.NewReader(large), int64(len(large))+1); err == nil {
		t.Error("a reader shorter than the announced size was accepted")
	}
	names, err := s.List(ctx, "p/")
	want := []string{"p/empty", "p/exact", "p/large", "p/small", "p/unsized"}
	if err != nil || !reflect.DeepEqual(names, want) {
		t.Fatalf("list: %v, %v; want %v", names, err, want)
	}
	if err := s.Delete(ctx, "p/large"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "p/never-was"); err != nil {
		t.Errorf("deleting a missing object: %v", err)
	}
	if _, err := s.Open(ctx, "p/large"); !errors.Is(err, ErrNotFound) {
		t.Errorf("open of a deleted object: %v, want ErrNotFound", err)
	}
	if n, err := s.AbortIncomplete(ctx, "p/"); err != nil || n != 0 {
		t.Errorf("incomplete uploads after clean puts: %d, %v", n, err)
	}
}

// TestS3SmallPutsSignTheirDigest checks that an object put in one request
// (an empty one included) is signed with its SHA-256 rather than sent with
// the client's chunked streaming signature: for an empty body over plain
// HTTP that sends chunk framing after Content-Length 0, which the server
// reads as a next request and answers with a 400 that fails the request
// after it (a GET of the empty object, one time in a few dozen).
func TestS3SmallPutsSignTheirDigest(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	s := g.store(t, g.config())
	var trace bytes.Buffer
	s.client.TraceOn(&trace)
	defer s.client.TraceOff()
	for i := range 20 {
		for _, data := range [][]byte{{}, []byte("tiny object")} {
			name := fmt.Sprintf("d/%d-%d", i, len(data))
			if err := PutBytes(ctx, s, name, data); err != nil {
				t.Fatalf("put %s: %v", name, err)
			}
			if got, err := GetBytes(ctx, s, name); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("get %s: %q, %v; want %q", name, got, err, data)
			}
		}
	}
	if strings.Contains(trace.String(), "STREAMING-") {
		t.Fatal("a single-request put used the streaming signature")
	}
	if !strings.Contains(trace.String(), "X-Amz-Content-Sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") {
		t.Fatal("the empty object's put did not carry its SHA-256")
	}
}

// TestS3PutFailureLeavesNothing feeds a multipart upload a reader that
// fails half way: no object may appear and the upload must be aborted.
func TestS3PutFailureLeavesNothing(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	s := g.store(t, g.config())
	broken := io.MultiReader(bytes.NewReader(randomBytes(2*MinPartSize+10, 3)), iotestErrReader{errors.New("disk on fire")})
	if err := s.Put(ctx, "x/obj", broken, -1); err == nil {
		t.Fatal("a failing reader was uploaded")
	}
	if _, err := s.Open(ctx, "x/obj"); !errors.Is(err, ErrNotFound) {
		t.Errorf("a failed put left an object: %v", err)
	}
	if n, err := s.AbortIncomplete(ctx, "x/"); err != nil || n != 0 {
		t.Errorf("a failed put left %d incomplete uploads (%v)", n, err)
	}
}

type iotestErrReader struct{ err error }

func (r iotestErrReader) Read([]byte) (int, error) { return 0, r.err }

// TestS3ServerKilledMidUpload kills the server with SIGKILL while a
// multipart upload is under way: the Put fails, no object is visible
// after a restart, and the upload left behind is found and aborted.
func TestS3ServerKilledMidUpload(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	cfg := g.config()
	cfg.Concurrency = 1
	s := g.store(t, cfg)
	data := randomBytes(3*MinPartSize, 4)
	// The kill lands when the reader reaches the third part: the upload
	// exists and holds at least its first part by then.
	r := &hookReader{r: bytes.NewReader(data), at: 2 * MinPartSize, hook: g.kill}
	if err := s.Put(ctx, "k/obj", r, int64(len(data))); err == nil {
		t.Fatal("an upload to a killed server succeeded")
	}
	g.restart()
	s = g.store(t, g.config())
	if _, err := s.Open(ctx, "k/obj"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the interrupted upload is visible: %v", err)
	}
	n, err := s.AbortIncomplete(ctx, "k/")
	if err != nil || n != 1 {
		t.Fatalf("aborted %d incomplete uploads (%v), want the 1 the kill left", n, err)
	}
	if n, err := s.AbortIncomplete(ctx, "k/"); err != nil || n != 0 {
		t.Errorf("%d incomplete uploads remain after the abort (%v)", n, err)
	}
	// The same name uploads cleanly afterwards.
	if err := PutBytes(ctx, s, "k/obj", data); err != nil {
		t.Fatal(err)
	}
}

// TestS3RetriesWhileServerIsDown stops the server before a save and
// restarts it on the same address once the store has seen a failure:
// the retries carry the save through.
func TestS3RetriesWhileServerIsDown(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	cfg := g.config()
	cfg.Retry = RetryPolicy{Attempts: 8, BaseDelay: 10 * time.Millisecond, MaxDelay: 200 * time.Millisecond}
	var retries atomic.Int32
	cfg.OnRetry = func(op, name string, attempt int, err error) {
		if retries.Add(1) == 1 {
			g.restart()
		}
	}
	s := g.store(t, cfg)
	g.kill()
	want := testState(12)
	if _, err := Save(ctx, s, "job", want); err != nil {
		t.Fatalf("save across a restart: %v", err)
	}
	if retries.Load() == 0 {
		t.Fatal("no request was retried, so the server was not down")
	}
	got, err := LoadLatest[float32](ctx, s, "job", testLogger(t))
	if err != nil || !reflect.DeepEqual(got.Params, want.Params) {
		t.Fatalf("load after the outage: %v", err)
	}
}

// TestS3CorruptObjectFallsBack flips one byte of an object file under the
// gateway's directory: the checkpoint fails verification and the previous
// one loads; a checkpoint missing an object falls back the same way.
func TestS3CorruptObjectFallsBack(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	s := g.store(t, g.config())
	for _, step := range []int{10, 20, 30} {
		if _, err := Save(ctx, s, "job", testState(step)); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(g.opts.Dir, testBucket, "job")
	p := filepath.Join(dir, StepDir(30), ModelObject)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x10
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, StepDir(20), OptimizerObject)); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	got, err := LoadLatest[float32](ctx, s, "job", slogTo(&logs))
	if err != nil {
		t.Fatal(err)
	}
	if got.Trainer.Step != 10 {
		t.Fatalf("loaded step %d, want 10", got.Trainer.Step)
	}
	for _, w := range []string{"step=30", "model.safetensors segment 0 of 1 (bytes 0 to ", "step=20", "optimizer.safetensors is missing", "fallback=\"trying step 10\""} {
		if !bytes.Contains(logs.Bytes(), []byte(w)) {
			t.Errorf("the log does not say %q:\n%s", w, logs.String())
		}
	}
}

func TestSaveOnS3KeepsRetentionAndCleansOrphans(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	s := g.store(t, g.config())
	for _, step := range []int{1, 2, 3} {
		if _, err := Save(ctx, s, "r", testState(step)); err != nil {
			t.Fatal(err)
		}
	}
	// Step 2 loses its manifest: what a failed save leaves is an orphan.
	if err := s.Delete(ctx, "r/"+StepDir(2)+"/"+ManifestObject); err != nil {
		t.Fatal(err)
	}
	// Step 4 is uncommitted and newer: a save may be writing it.
	if err := PutBytes(ctx, s, "r/"+StepDir(4)+"/"+ConfigObject, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if err := Prune(ctx, s, "r", 1); err != nil {
		t.Fatal(err)
	}
	names, _ := s.List(ctx, "r/")
	for _, n := range names {
		if st, _, _ := stepOf("r", n); st != 3 && st != 4 {
			t.Errorf("prune left %s", n)
		}
	}
	if steps, _ := Steps(ctx, s, "r"); !reflect.DeepEqual(steps, []int{3}) {
		t.Errorf("committed steps %v, want [3]", steps)
	}
}

// TestS3PartChecksumIsVerified sends a part whose CRC-32C does not match
// its bytes: the server must refuse it, or the checksum checks nothing.
func TestS3PartChecksumIsVerified(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	s := g.store(t, g.config())
	id, err := s.core.NewMultipartUpload(ctx, testBucket, "c/obj", minio.PutObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.core.AbortMultipartUpload(ctx, testBucket, "c/obj", id)
	data := randomBytes(MinPartSize, 5)
	opts := partOptions(data)
	if _, err := s.core.PutObjectPart(ctx, testBucket, "c/obj", id, 1, bytes.NewReader(data), int64(len(data)), opts); err != nil {
		t.Fatalf("a part with its checksum: %v", err)
	}
	data[12345] ^= 1
	if _, err := s.core.PutObjectPart(ctx, testBucket, "c/obj", id, 2, bytes.NewReader(data), int64(len(data)), opts); err == nil {
		t.Fatal("a part that does not match its CRC-32C was accepted")
	}
}

// TestS3ReadResumesAcrossRestart kills the server while an object is
// being read and brings it back: the reader picks up where it stopped
// and the bytes are whole.
func TestS3ReadResumesAcrossRestart(t *testing.T) {
	ctx := context.Background()
	g := startGateway(t)
	cfg := g.config()
	cfg.Retry = RetryPolicy{Attempts: 8, BaseDelay: 10 * time.Millisecond, MaxDelay: 200 * time.Millisecond}
	var restarted atomic.Bool
	cfg.OnRetry = func(op, name string, attempt int, err error) {
		if op == "GetObject" && restarted.CompareAndSwap(false, true) {
			g.restart()
		}
	}
	s := g.store(t, cfg)
	data := randomBytes(64<<20, 6)
	if err := PutBytes(ctx, s, "r/obj", data); err != nil {
		t.Fatal(err)
	}
	r, err := s.Open(ctx, "r/obj")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got := make([]byte, len(data))
	if _, err := io.ReadFull(r, got[:1<<20]); err != nil {
		t.Fatal(err)
	}
	g.kill()
	if _, err := io.ReadFull(r, got[1<<20:]); err != nil {
		t.Fatalf("read across the restart: %v", err)
	}
	if !restarted.Load() {
		t.Fatal("the read never failed: the kill did not land mid-read (the object fit in socket buffers)")
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the bytes read across the restart differ")
	}
}
