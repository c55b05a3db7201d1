package kernels

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	notLib := filepath.Join(dir, "text.so")
	if err := os.WriteFile(notLib, []byte("not an ELF file"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, path, want string
	}{
		{"empty", "", "empty path"},
		{"missing", filepath.Join(dir, "nope", LibName), filepath.Join(dir, "nope", LibName)},
		{"directory", dir, "is a directory"},
		{"not a library", notLib, notLib},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := Open(tc.path)
			if err == nil {
				t.Fatalf("Open(%q) = %v, want an error", tc.path, l)
			}
			if !errors.Is(err, ErrNoLibrary) {
				t.Errorf("Open(%q) error %v does not wrap ErrNoLibrary", tc.path, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Open(%q) error %q does not mention %q", tc.path, err, tc.want)
			}
		})
	}
}

func TestDefaultHonoursEnv(t *testing.T) {
	missing := filepath.Join(t.TempDir(), LibName)
	t.Setenv(EnvLib, missing)
	_, err := Default()
	if !errors.Is(err, ErrNoLibrary) || !strings.Contains(err.Error(), missing) {
		t.Fatalf("Default() with %s=%s: got %v, want ErrNoLibrary naming the path", EnvLib, missing, err)
	}
}

func TestErrorUnwrap(t *testing.T) {
	for _, tc := range []struct {
		code int
		want error
	}{
		{2, ErrCUDA}, {2, ErrOutOfMemory}, {1003, ErrOutOfMemory}, {1013, ErrCUDA}, {statusInvalidArg, ErrInvalidArg},
		{statusUnsupported, ErrUnsupported}, {statusWorkspace, ErrWorkspace},
	} {
		e := &Error{Op: "m2k_x", Code: tc.code, Msg: "m", Detail: "d"}
		if !errors.Is(e, tc.want) {
			t.Errorf("code %d: errors.Is(_, %v) is false", tc.code, tc.want)
		}
		if s := e.Error(); !strings.Contains(s, "m2k_x") || !strings.Contains(s, ": d") {
			t.Errorf("code %d: message %q lacks the op or the detail", tc.code, s)
		}
	}
	for _, code := range []int{700, 1013, statusWorkspace} {
		if errors.Is(&Error{Code: code}, ErrOutOfMemory) {
			t.Errorf("code %d counts as out of memory", code)
		}
	}
}
