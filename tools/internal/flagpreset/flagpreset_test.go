package flagpreset

import (
	"flag"
	"io"
	"strings"
	"testing"
)

func TestApply(t *testing.T) {
	ps := Presets{"": {}, "big": {"width": "768", "depth": "24"}, "bad": {"width": "wide"}}
	parse := func(args ...string) (*flag.FlagSet, *int, *int) {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		w, d := fs.Int("width", 64, ""), fs.Int("depth", 2, "")
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		return fs, w, d
	}
	fs, w, d := parse("-depth", "3")
	if err := ps.Apply(fs, "big", "-"); err != nil {
		t.Fatal(err)
	}
	if *w != 768 || *d != 3 {
		t.Errorf("big with -depth 3: width %d depth %d, want 768 and 3 (the command line wins)", *w, *d)
	}
	fs, w, d = parse()
	if err := ps.Apply(fs, "", "-"); err != nil || *w != 64 || *d != 2 {
		t.Errorf("no preset: width %d depth %d, err %v; want the defaults", *w, *d, err)
	}
	fs, _, _ = parse()
	if err := ps.Apply(fs, "huge", "--"); err == nil || !strings.Contains(err.Error(), "--preset must be one of [bad big]") {
		t.Errorf("unknown preset: %v", err)
	}
	fs, _, _ = parse()
	if err := ps.Apply(fs, "bad", "-"); err == nil || !strings.Contains(err.Error(), "-preset bad: -width wide") {
		t.Errorf("a preset value the flag refuses: %v", err)
	}
}
