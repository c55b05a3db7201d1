// Package security builds the transport security of the coordinator's
// connections: mutual TLS configurations from PEM files (gRPC server and
// clients, raft replicas, etcd client) and the bearer token that the job API
// requires when one is configured. It holds no secrets itself.
package security

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// Sentinel errors of the package.
var (
	// ErrConfig marks unusable TLS or token settings; the message names the
	// file or field.
	ErrConfig = errors.New("security: invalid configuration")
	// ErrUnauthenticated marks a request without the configured token.
	ErrUnauthenticated = errors.New("security: missing or wrong bearer token")
)

// Files names the PEM files of one component: its certificate and key, and
// the CA that signs every component's certificate.
type Files struct {
	Cert string
	Key  string
	CA   string
}

// Enabled reports whether any file is set.
func (f Files) Enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

func (f Files) load() (tls.Certificate, *x509.CertPool, error) {
	if f.Cert == "" || f.Key == "" || f.CA == "" {
		return tls.Certificate{}, nil, fmt.Errorf("%w: mutual TLS needs a certificate, a key and a CA file (got cert %q, key %q, ca %q)", ErrConfig, f.Cert, f.Key, f.CA)
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("%w: certificate %s / key %s: %v", ErrConfig, f.Cert, f.Key, err)
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("%w: CA file: %v", ErrConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return tls.Certificate{}, nil, fmt.Errorf("%w: CA file %s holds no PEM certificate", ErrConfig, f.CA)
	}
	return cert, pool, nil
}

// Server returns a TLS config that presents the certificate and requires a
// client certificate signed by the CA.
func (f Files) Server() (*tls.Config, error) {
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}, nil
}

// Client returns a TLS config that presents the certificate and verifies the
// server against the CA; serverName overrides the dialed host name.
func (f Files) Client(serverName string) (*tls.Config, error) {
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
	}, nil
}

// Peer returns a config usable on both ends of a replica-to-replica link
// (raft): it requires client certificates and verifies servers.
func (f Files) Peer() (*tls.Config, error) {
	cfg, err := f.Server()
	if err != nil {
		return nil, err
	}
	cfg.RootCAs = cfg.ClientCAs
	return cfg, nil
}

// ClientCredentials returns gRPC transport credentials for a client, or
// nil when no file is set.
func (f Files) ClientCredentials(serverName string) (credentials.TransportCredentials, error) {
	if !f.Enabled() {
		return nil, nil
	}
	cfg, err := f.Client(serverName)
	if err != nil {
		return nil, err
	}
	return credentials.NewTLS(cfg), nil
}

const authHeader = "authorization"

// CheckToken verifies the bearer token in the incoming metadata of ctx. An
// empty want disables the check.
func CheckToken(ctx context.Context, want string) error {
	if want == "" {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get(authHeader) {
		got, ok := strings.CutPrefix(v, "Bearer ")
		if ok && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1 {
			return nil
		}
	}
	return ErrUnauthenticated
}

// Token is a gRPC per-call credential carrying a bearer token.
type Token struct {
	Value string
	// AllowInsecure permits sending the token without TLS (loopback and
	// tests); otherwise gRPC refuses to send it in the clear.
	AllowInsecure bool
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (t Token) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{authHeader: "Bearer " + t.Value}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (t Token) RequireTransportSecurity() bool { return !t.AllowInsecure }

// ReadToken returns the token from a file (trimmed) when path is set, else
// value.
func ReadToken(value, path string) (string, error) {
	if path == "" {
		return value, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%w: token file: %v", ErrConfig, err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("%w: token file %s is empty", ErrConfig, path)
	}
	return tok, nil
}
