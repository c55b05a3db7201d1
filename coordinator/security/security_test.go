package security

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/metadata"
)

// handshake runs one TLS handshake over loopback and returns the client's
// and the server's errors.
func handshake(t *testing.T, server, client *tls.Config) (cerr, serr error) {
	t.Helper()
	l, err := tls.Listen("tcp", "127.0.0.1:0", server)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		err = c.(*tls.Conn).Handshake()
		if err == nil {
			_, err = c.Write([]byte("x"))
		}
		done <- err
	}()
	c, err := tls.Dial("tcp", l.Addr().String(), client)
	if err == nil {
		// TLS 1.3 reports a rejected client certificate on the first read.
		_, err = io.ReadFull(c, make([]byte, 1))
		c.Close()
	}
	return err, <-done
}

func TestMutualTLS(t *testing.T) {
	good, err := GenerateDevPKI(t.TempDir(), "127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	other, err := GenerateDevPKI(t.TempDir(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := good.Server()
	if err != nil {
		t.Fatal(err)
	}
	peer, err := good.Peer()
	if err != nil {
		t.Fatal(err)
	}
	cli, _ := good.Client("")
	foreign, _ := other.Client("127.0.0.1")
	noCert := cli.Clone()
	noCert.Certificates = nil
	wrongName, _ := good.Client("example.com")

	cases := []struct {
		name   string
		server *tls.Config
		client *tls.Config
		ok     bool
	}{
		{"client and server of one CA", srv, withName(cli, "127.0.0.1"), true},
		{"peer config on both ends", peer, withName(peer, "localhost"), true},
		{"client without certificate", srv, withName(noCert, "127.0.0.1"), false},
		{"client of another CA", srv, foreign, false},
		{"server name not in certificate", srv, wrongName, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cerr, serr := handshake(t, tc.server, tc.client)
			if ok := cerr == nil && serr == nil; ok != tc.ok {
				t.Fatalf("client err %v, server err %v; want ok=%v", cerr, serr, tc.ok)
			}
		})
	}
}

func withName(c *tls.Config, name string) *tls.Config {
	c = c.Clone()
	c.ServerName = name
	return c
}

func TestFilesErrors(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.pem")
	os.WriteFile(empty, []byte("not pem"), 0o600)
	good, err := GenerateDevPKI(dir, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]Files{
		"missing key":    {Cert: good.Cert, CA: good.CA},
		"missing file":   {Cert: filepath.Join(dir, "nope.pem"), Key: good.Key, CA: good.CA},
		"CA without PEM": {Cert: good.Cert, Key: good.Key, CA: empty},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := f.Server(); !errors.Is(err, ErrConfig) {
				t.Fatalf("Server() = %v, want ErrConfig", err)
			}
		})
	}
	if creds, err := (Files{}).ClientCredentials(""); creds != nil || err != nil {
		t.Fatalf("no files: %v, %v", creds, err)
	}
}

func TestCheckToken(t *testing.T) {
	in := func(vals ...string) context.Context {
		md := metadata.MD{}
		for _, v := range vals {
			md.Append("authorization", v)
		}
		return metadata.NewIncomingContext(context.Background(), md)
	}
	cases := []struct {
		name string
		ctx  context.Context
		want string
		ok   bool
	}{
		{"disabled", context.Background(), "", true},
		{"right token", in("Bearer abc"), "abc", true},
		{"no metadata", context.Background(), "abc", false},
		{"wrong token", in("Bearer abd"), "abc", false},
		{"no Bearer prefix", in("abc"), "abc", false},
		{"one of several", in("Bearer x", "Bearer abc"), "abc", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckToken(tc.ctx, tc.want)
			if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrUnauthenticated)) {
				t.Fatalf("CheckToken = %v, want ok=%v", err, tc.ok)
			}
		})
	}
	md, _ := Token{Value: "abc"}.GetRequestMetadata(context.Background())
	if md["authorization"] != "Bearer abc" {
		t.Fatalf("Token metadata = %v", md)
	}
}

func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "tok")
	os.WriteFile(p, []byte("  s3cret\n"), 0o600)
	if tok, err := ReadToken("flag", p); err != nil || tok != "s3cret" {
		t.Fatalf("ReadToken = %q, %v", tok, err)
	}
	if tok, err := ReadToken("flag", ""); err != nil || tok != "flag" {
		t.Fatalf("ReadToken without file = %q, %v", tok, err)
	}
	os.WriteFile(p, []byte("\n"), 0o600)
	if _, err := ReadToken("", p); !errors.Is(err, ErrConfig) {
		t.Fatalf("empty token file: %v", err)
	}
}

// TestDevCAIssues issues two certificates from one authority: both verify
// against it for their names and addresses (a wildcard included), as server
// and as client, with distinct serial numbers.
func TestDevCAIssues(t *testing.T) {
	ca, err := NewDevCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca.CertPEM()) {
		t.Fatal("the CA's PEM holds no certificate")
	}
	serials := map[string]bool{}
	for _, c := range []struct {
		cn    string
		hosts []string
		name  string
	}{{"a", []string{"*.svc.example", "10.0.0.7"}, "pod-0.svc.example"}, {"b", []string{"127.0.0.1"}, "127.0.0.1"}} {
		certPEM, keyPEM, err := ca.Issue(c.cn, c.hosts...)
		if err != nil {
			t.Fatal(err)
		}
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatalf("%s: %v", c.cn, err)
		}
		leaf, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: c.name, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
				t.Errorf("%s for %s (usage %v): %v", c.cn, c.name, usage, err)
			}
		}
		serials[leaf.SerialNumber.String()] = true
	}
	if len(serials) != 2 {
		t.Errorf("serial numbers %v: want two distinct", serials)
	}
}
