// Package flagpreset gives the benchmark commands named presets: sets of
// flag values that a -preset flag selects and that flags given on the
// command line override.
package flagpreset

import (
	"flag"
	"fmt"
	"slices"
)

// Presets maps a preset's name to its flag values by flag name. A preset
// named "" (no preset) is accepted but not listed in errors.
type Presets map[string]map[string]string

// Apply sets, in fs, the flags of preset name that the command line left
// unset (fs must have been parsed). dash is how the command writes a flag
// ("-" or "--") in its errors.
func (ps Presets) Apply(fs *flag.FlagSet, name, dash string) error {
	p, ok := ps[name]
	if !ok {
		var names []string
		for n := range ps {
			if n != "" {
				names = append(names, n)
			}
		}
		slices.Sort(names)
		return fmt.Errorf("%spreset must be one of %v, got %q", dash, names, name)
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if set[k] {
			continue
		}
		if err := fs.Set(k, p[k]); err != nil {
			return fmt.Errorf("%spreset %s: %s%s %s: %w", dash, name, dash, k, p[k], err)
		}
	}
	return nil
}
