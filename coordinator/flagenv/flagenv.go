// Package flagenv gives every flag of the m2train commands (m2coord,
// m2worker) an environment variable: M2_ and the flag's name in upper case
// with '-' as '_' (--etcd-endpoints is M2_ETCD_ENDPOINTS). A flag given on
// the command line wins over its variable. Kubernetes manifests and
// container images set either.
package flagenv

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

// Name is the environment variable of the flag named flagName.
func Name(flagName string) string {
	return "M2_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Apply sets each flag of the parsed fs that the command line did not set
// from its environment variable, if that is set. The first value a flag
// rejects is the error, naming the variable.
func Apply(fs *flag.FlagSet) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(Name(f.Name)); ok {
			if serr := f.Value.Set(v); serr != nil {
				err = fmt.Errorf("%s: %w", Name(f.Name), serr)
			}
		}
	})
	return err
}
