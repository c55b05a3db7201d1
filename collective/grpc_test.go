package collective_test

import (
	"context"
	"net"
	"testing"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
)

// startGRPC runs n ranks over gRPC on loopback in this process.
func startGRPC(t *testing.T, n int, cfg collective.Config) []*collective.Communicator {
	t.Helper()
	lis := make([]net.Listener, n)
	addrs := make([]string, n)
	for r := range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[r], addrs[r] = l, l.Addr().String()
	}
	return startAll(t, n, func(ctx context.Context, r int) (*collective.Communicator, error) {
		tr, err := grpcnet.Listen(cfg, r, addrs, lis[r])
		if err != nil {
			return nil, err
		}
		return collective.New(ctx, cfg, tr)
	})
}
