// Package etcdtest runs a package's tests against one real etcd embedded in
// the test process, shared by all of the package's tests.
package etcdtest

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/m2train/m2train/coordinator/etcdembed"
)

// Main starts an embedded etcd on loopback, stores its client endpoint in
// *endpoint, runs the tests, stops etcd and returns the exit code for
// os.Exit. Use it from TestMain.
func Main(m *testing.M, endpoint *string) int {
	dir, err := os.MkdirTemp("", "etcdtest")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	srv, err := etcdembed.Start(ctx, dir, "127.0.0.1")
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer srv.Close()
	*endpoint = srv.Endpoint()
	return m.Run()
}
