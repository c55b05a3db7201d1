package grpcnet_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/collective/grpcnet"
)

func freeAddrs(t *testing.T, n int) []string {
	t.Helper()
	addrs := make([]string, n)
	// Every listener stays open until all n ports are taken, so that the
	// kernel cannot hand one port out twice.
	for r := range addrs {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		addrs[r] = l.Addr().String()
	}
	return addrs
}

// build starts the ranks of addrs with cfg and returns their communicators
// (nil where New failed) and errors.
func build(cfg collective.Config, addrs []string, ranks []int, wait time.Duration) ([]*collective.Communicator, []error) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	comms := make([]*collective.Communicator, len(ranks))
	errs := make([]error, len(ranks))
	var wg sync.WaitGroup
	for i, r := range ranks {
		wg.Go(func() { comms[i], errs[i] = grpcnet.New(ctx, cfg, r, addrs) })
	}
	wg.Wait()
	return comms, errs
}

func closeAll(t *testing.T, comms []*collective.Communicator) {
	var wg sync.WaitGroup
	for _, c := range comms {
		if c != nil {
			wg.Go(func() {
				if err := c.Close(); err != nil {
					t.Error(err)
				}
			})
		}
	}
	wg.Wait()
}

func allReduce(t *testing.T, comms []*collective.Communicator) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	bufs := make([][]float64, len(comms))
	errs := make([]error, len(comms))
	for r, c := range comms {
		bufs[r] = []float64{float64(r), 1, 2}
		wg.Go(func() { errs[r] = c.AllReduce(ctx, collective.Float64s(bufs[r])) })
	}
	wg.Wait()
	n := float64(len(comms))
	for r := range comms {
		if errs[r] != nil {
			t.Fatalf("rank %d: %v", r, errs[r])
		}
		if want := []float64{n * (n - 1) / 2, n, 2 * n}; bufs[r][0] != want[0] || bufs[r][1] != want[1] || bufs[r][2] != want[2] {
			t.Fatalf("rank %d: %v, want %v", r, bufs[r], want)
		}
	}
}

// TestGenerations closes a communicator and builds the next generation on
// the same addresses; a rank still on the old generation is turned away.
func TestGenerations(t *testing.T) {
	defer goleak.VerifyNone(t)
	cfg := collective.DefaultConfig()
	cfg.Timeout = 5 * time.Second
	addrs := freeAddrs(t, 3)
	all := []int{0, 1, 2}

	cfg.Generation = 7
	comms, errs := build(cfg, addrs, all, 10*time.Second)
	for r, err := range errs {
		if err != nil {
			t.Fatalf("generation 7, rank %d: %v", r, err)
		}
	}
	allReduce(t, comms)
	closeAll(t, comms)

	cfg.Generation = 8
	comms, errs = build(cfg, addrs, all, 10*time.Second)
	for r, err := range errs {
		if err != nil {
			t.Fatalf("generation 8, rank %d: %v", r, err)
		}
	}
	allReduce(t, comms)
	closeAll(t, comms)

	// Ranks 0 and 1 on generation 9, rank 2 still on 8: nobody starts, and
	// the error says why.
	stale := cfg
	stale.Generation = 8
	cfg.Generation = 9
	var wg sync.WaitGroup
	var newComms []*collective.Communicator
	var newErrs []error
	var staleComms []*collective.Communicator
	var staleErrs []error
	wg.Go(func() { newComms, newErrs = build(cfg, addrs, []int{0, 1}, time.Second) })
	wg.Go(func() { staleComms, staleErrs = build(stale, addrs, []int{2}, time.Second) })
	wg.Wait()
	closeAll(t, newComms)
	closeAll(t, staleComms)
	for _, err := range append(newErrs, staleErrs...) {
		if !errors.Is(err, collective.ErrStaleGeneration) {
			t.Errorf("mixed generations: %v, want ErrStaleGeneration", err)
		}
	}
}

// TestTLS runs an all-reduce over mutual TLS.
func TestTLS(t *testing.T) {
	defer goleak.VerifyNone(t)
	cfg := collective.DefaultConfig()
	cfg.TLS = testTLS(t)
	addrs := freeAddrs(t, 3)
	comms, errs := build(cfg, addrs, []int{0, 1, 2}, 10*time.Second)
	defer closeAll(t, comms)
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
	allReduce(t, comms)

	// A rank without the certificates cannot join.
	plain := collective.DefaultConfig()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	other := freeAddrs(t, 1)[0]
	if c, err := grpcnet.New(ctx, plain, 1, []string{addrs[0], other}); err == nil {
		_ = c.Close()
		t.Fatal("a plaintext rank joined a TLS rank")
	} else if c != nil {
		_ = c.Close()
	}
}

// testTLS makes a self-signed certificate for 127.0.0.1 that serves as
// server and client certificate and as the only trusted root.
func testTLS(t *testing.T) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "collective test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}},
		RootCAs:      pool,
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS13,
	}
}
