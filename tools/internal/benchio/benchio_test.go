package benchio

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteJSON(t *testing.T) {
	if err := WriteJSON("", map[string]int{"a": 1}); err != nil {
		t.Fatalf("no path: %v", err)
	}
	p := filepath.Join(t.TempDir(), "r.json")
	if err := WriteJSON(p, map[string]int{"a": 1}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]int
	if err := json.Unmarshal(b, &got); err != nil || got["a"] != 1 || b[len(b)-1] != '\n' {
		t.Errorf("file %q: %v", b, err)
	}
	if err := WriteJSON(filepath.Join(t.TempDir(), "no", "such", "dir.json"), 1); err == nil {
		t.Error("writing into a missing directory succeeded")
	}
}

func TestStartCPUProfile(t *testing.T) {
	stop, err := StartCPUProfile("")
	if err != nil {
		t.Fatal(err)
	}
	stop()
	p := filepath.Join(t.TempDir(), "cpu.prof")
	if stop, err = StartCPUProfile(p); err != nil {
		t.Fatal(err)
	}
	x := 0
	for i := range 1_000_000 {
		x += i % 7
	}
	_ = x
	stop()
	if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
		t.Errorf("profile %s: %v (size %v)", p, err, fi)
	}
}
