// Package benchio holds the file handling that the benchmark commands
// share: their JSON results and their Go CPU profiles.
package benchio

import (
	"encoding/json"
	"os"
	"runtime/pprof"
)

// WriteJSON writes v to path as indented JSON with a final newline;
// nothing when path is empty.
func WriteJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// StartCPUProfile starts a Go CPU profile into path and returns the
// function that stops it and closes the file; with an empty path it
// profiles nothing and stop does nothing.
func StartCPUProfile(path string) (stop func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}
