package flagenv

import (
	"flag"
	"io"
	"strings"
	"testing"
)

func newSet() (*flag.FlagSet, *string, *int) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs, fs.String("etcd-endpoints", "", ""), fs.Int("lease-ttl", 10, "")
}

func TestName(t *testing.T) {
	if got := Name("etcd-endpoints"); got != "M2_ETCD_ENDPOINTS" {
		t.Fatalf("Name = %q", got)
	}
}

func TestApplyFillsUnsetFlagsOnly(t *testing.T) {
	t.Setenv("M2_ETCD_ENDPOINTS", "http://e:2379")
	t.Setenv("M2_LEASE_TTL", "30")
	fs, endpoints, ttl := newSet()
	if err := fs.Parse([]string{"--lease-ttl", "5"}); err != nil {
		t.Fatal(err)
	}
	if err := Apply(fs); err != nil {
		t.Fatal(err)
	}
	if *endpoints != "http://e:2379" || *ttl != 5 {
		t.Fatalf("endpoints %q ttl %d; want the variable's endpoints and the command line's ttl 5", *endpoints, *ttl)
	}
}

func TestApplyNamesTheVariableOfABadValue(t *testing.T) {
	t.Setenv("M2_LEASE_TTL", "soon")
	fs, _, _ := newSet()
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	err := Apply(fs)
	if err == nil || !strings.HasPrefix(err.Error(), "M2_LEASE_TTL: ") {
		t.Fatalf("Apply = %v; want an error naming M2_LEASE_TTL", err)
	}
}
