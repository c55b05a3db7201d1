package etcdembed

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/m2train/m2train/coordinator/coordtest"
	"github.com/m2train/m2train/coordinator/security"
	"github.com/m2train/m2train/tools/testlog"
)

// testLogger routes logs to t.Log until the test's cleanup stops it.
func testLogger(t *testing.T) *slog.Logger {
	return testlog.New(t, slog.LevelInfo)
}

// cluster lays out n members on loopback, each on its own ports.
func cluster(t *testing.T, n int, tlsFiles *TLSFiles) []Config {
	scheme := "http"
	if tlsFiles != nil {
		scheme = "https"
	}
	var members []Member
	var listen [][2]string
	for i := range n {
		client, peer := coordtest.MustFreeAddr(t), coordtest.MustFreeAddr(t)
		members = append(members, Member{Name: fmt.Sprintf("m%d", i), PeerURL: scheme + "://" + peer, ClientURL: scheme + "://" + client})
		listen = append(listen, [2]string{client, peer})
	}
	dir := t.TempDir()
	log := testLogger(t)
	cfgs := make([]Config, n)
	for i := range n {
		cfgs[i] = Config{Name: members[i].Name, Dir: filepath.Join(dir, members[i].Name), ListenClient: listen[i][0],
			ListenPeer: listen[i][1], Members: members, TLS: tlsFiles, Logger: log}
	}
	return cfgs
}

// startAll starts every member and waits until each serves.
func startAll(t *testing.T, cfgs []Config) []*Server {
	t.Helper()
	srvs := make([]*Server, len(cfgs))
	for i, c := range cfgs {
		s, err := StartMember(c)
		if err != nil {
			t.Fatalf("start %s: %v", c.Name, err)
		}
		srvs[i] = s
		t.Cleanup(func() {
			if srvs[i] != nil {
				srvs[i].Close()
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for i, s := range srvs {
		if err := s.WaitReady(ctx); err != nil {
			t.Fatalf("member %s: %v", cfgs[i].Name, err)
		}
	}
	return srvs
}

func client(t *testing.T, endpoint string, tc *tls.Config) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 10 * time.Second, TLS: tc, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func put(t *testing.T, c *clientv3.Client, k, v string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.Put(ctx, k, v); err != nil {
		t.Fatalf("put %s through %v: %v", k, c.Endpoints(), err)
	}
}

// get reads k with a linearizable read, which goes through the cluster's
// leader: the answer is current, not the member's possibly stale copy.
func get(t *testing.T, c *clientv3.Client, k string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := c.Get(ctx, k)
	if err != nil {
		t.Fatalf("get %s through %v: %v", k, c.Endpoints(), err)
	}
	if len(r.Kvs) != 1 {
		t.Fatalf("get %s through %v: %d keys", k, c.Endpoints(), len(r.Kvs))
	}
	return string(r.Kvs[0].Value)
}

func TestThreeMembersFormOneClusterAndSurviveARestart(t *testing.T) {
	cfgs := cluster(t, 3, nil)
	srvs := startAll(t, cfgs)
	clients := make([]*clientv3.Client, 3)
	for i, s := range srvs {
		if s.Endpoint() != cfgs[i].Members[i].ClientURL {
			t.Errorf("member %d: endpoint %s, want %s", i, s.Endpoint(), cfgs[i].Members[i].ClientURL)
		}
		if got := s.Endpoints(); len(got) != 3 || got[2] != cfgs[0].Members[2].ClientURL {
			t.Errorf("member %d: endpoints %v", i, got)
		}
		clients[i] = client(t, s.Endpoint(), nil)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ml, err := clients[1].MemberList(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range ml.Members {
		names = append(names, m.Name)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"m0", "m1", "m2"}) {
		t.Fatalf("one cluster of m0, m1, m2 expected, member list: %v", names)
	}

	put(t, clients[0], "k", "written through m0")
	if v := get(t, clients[2], "k"); v != "written through m0" {
		t.Fatalf("read through m2: %q", v)
	}

	// One member stops: the other two are a quorum and go on serving.
	srvs[1].Close()
	srvs[1] = nil
	put(t, clients[2], "k2", "written while m1 was down")
	if v := get(t, clients[0], "k2"); v != "written while m1 was down" {
		t.Fatalf("read through m0 with m1 down: %q", v)
	}

	// It restarts from its data and catches up on what it missed.
	s, err := StartMember(cfgs[1])
	if err != nil {
		t.Fatalf("restart m1: %v", err)
	}
	srvs[1] = s
	if err := s.WaitReady(ctx); err != nil {
		t.Fatalf("restarted m1: %v", err)
	}
	if v := get(t, clients[1], "k2"); v != "written while m1 was down" {
		t.Fatalf("read through the restarted m1: %q", v)
	}
	put(t, clients[1], "k3", "written through the restarted m1")
	if v := get(t, clients[0], "k3"); v != "written through the restarted m1" {
		t.Fatalf("read through m0: %q", v)
	}
	if ml, err = clients[0].MemberList(ctx); err != nil || len(ml.Members) != 3 {
		t.Fatalf("member list after the restart: %v, %v", ml, err)
	}
}

func TestClusterWithMutualTLS(t *testing.T) {
	files, err := security.GenerateDevPKI(t.TempDir(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cfgs := cluster(t, 3, &TLSFiles{Cert: files.Cert, Key: files.Key, CA: files.CA})
	srvs := startAll(t, cfgs)
	tc, err := files.Client("")
	if err != nil {
		t.Fatal(err)
	}
	put(t, client(t, srvs[0].Endpoint(), tc), "secure", "yes")
	if v := get(t, client(t, srvs[2].Endpoint(), tc), "secure"); v != "yes" {
		t.Fatalf("read through m2: %q", v)
	}

	// A client that trusts the CA but has no certificate is refused.
	anon := tc.Clone()
	anon.Certificates = nil
	c := client(t, srvs[1].Endpoint(), anon)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := c.Get(ctx, "secure"); err == nil {
		t.Fatal("a client without a certificate read a key")
	}
}

func TestSingleMemberOnLoopback(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Start(ctx, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(s.Endpoint(), "http://127.0.0.1:") || !slices.Equal(s.Endpoints(), []string{s.Endpoint()}) {
		t.Fatalf("endpoint %s, endpoints %v", s.Endpoint(), s.Endpoints())
	}
	put(t, client(t, s.Endpoint(), nil), "k", "v")
	s.Close()

	// A restart in the same directory (on new ports) keeps the data.
	s, err = Start(ctx, dir, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v := get(t, client(t, s.Endpoint(), nil), "k"); v != "v" {
		t.Fatalf("after restart: %q", v)
	}
}

func TestConfigValidate(t *testing.T) {
	base := func() Config {
		return Config{Name: "a", Dir: "/d", ListenClient: "0.0.0.0:2379", ListenPeer: "0.0.0.0:2380", Members: []Member{
			{Name: "a", PeerURL: "http://a.svc:2380", ClientURL: "http://a.svc:2379"},
			{Name: "b", PeerURL: "http://b.svc:2380", ClientURL: "http://b.svc:2379"},
		}}
	}
	if err := base().Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	tests := []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"no name", func(c *Config) { c.Name = "" }, "Name is required"},
		{"no dir", func(c *Config) { c.Dir = "" }, "Dir is required"},
		{"no members", func(c *Config) { c.Members = nil }, "Members must list"},
		{"not a member", func(c *Config) { c.Name = "z" }, `include this member's name "z"`},
		{"listen on a name", func(c *Config) { c.ListenClient = "a.svc:2379" }, "ListenClient"},
		{"listen without port", func(c *Config) { c.ListenPeer = "0.0.0.0" }, "ListenPeer"},
		{"listen on port 0", func(c *Config) { c.ListenPeer = "0.0.0.0:0" }, "port must be in [1, 65535]"},
		{"member without name", func(c *Config) { c.Members[1].Name = "" }, "Members[1].Name is required"},
		{"duplicate name", func(c *Config) { c.Members[1].Name = "a" }, `name "a" appears twice`},
		{"duplicate url", func(c *Config) { c.Members[1].PeerURL = "http://a.svc:2380" }, "is also Members[0].PeerURL"},
		{"wrong scheme", func(c *Config) { c.Members[0].ClientURL = "https://a.svc:2379" }, "scheme must be http"},
		{"no port", func(c *Config) { c.Members[0].PeerURL = "http://a.svc" }, "must be http://host:port"},
		{"unspecified host", func(c *Config) { c.Members[0].PeerURL = "http://0.0.0.0:2380" }, "not an address others can dial"},
		{"http URLs with TLS", func(c *Config) {
			c.TLS = &TLSFiles{Cert: "c", Key: "k", CA: "ca"}
		}, "scheme must be https"},
		{"partial TLS", func(c *Config) { c.TLS = &TLSFiles{Cert: "c"} }, "TLS needs Cert, Key and CA"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base()
			c.Members = slices.Clone(c.Members)
			tt.edit(&c)
			err := c.Validate()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want ErrConfig mentioning %q", err, tt.want)
			}
		})
	}
}
