package node

import (
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// tcpLayer is raft's stream layer over TCP, optionally wrapped in TLS. With
// TLS both sides present certificates: the listener requires and verifies
// client certificates per the tls.Config, and the dialer verifies the
// server's certificate against the host of the address it dials.
//
// Close also closes every connection the layer accepted or dialed: raft's
// transport leaves inbound connections to the remote side, which would keep
// a closed replica's goroutines alive.
type tcpLayer struct {
	net.Listener
	advertise net.Addr
	tls       *tls.Config
	conns     connSet
}

// connSet tracks open connections so that they can be closed together.
type connSet struct {
	mu     sync.Mutex
	closed bool
	m      map[*trackedConn]struct{}
}

type trackedConn struct {
	net.Conn
	set *connSet
}

func (c *trackedConn) Close() error {
	c.set.mu.Lock()
	delete(c.set.m, c)
	c.set.mu.Unlock()
	return c.Conn.Close()
}

func (s *connSet) add(c net.Conn) net.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
		return c
	}
	if s.m == nil {
		s.m = map[*trackedConn]struct{}{}
	}
	t := &trackedConn{Conn: c, set: s}
	s.m[t] = struct{}{}
	return t
}

func (s *connSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	conns := s.m
	s.m = nil
	s.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
}

func listenTCP(bind, advertise string, cfg *tls.Config) (*tcpLayer, error) {
	l, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("coordinator: raft listen %s: %w", bind, err)
	}
	var adv net.Addr = l.Addr()
	if advertise != "" {
		a, err := net.ResolveTCPAddr("tcp", advertise)
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("%w: AdvertiseAddr %q: %v", ErrConfig, advertise, err)
		}
		adv = a
	}
	if ta, ok := adv.(*net.TCPAddr); ok && ta.IP.IsUnspecified() {
		l.Close()
		return nil, fmt.Errorf("%w: AdvertiseAddr is required when BindAddr %q is unspecified", ErrConfig, bind)
	}
	if cfg != nil {
		l = tls.NewListener(l, cfg)
	}
	return &tcpLayer{Listener: l, advertise: adv, tls: cfg}, nil
}

// Accept implements net.Listener.
func (t *tcpLayer) Accept() (net.Conn, error) {
	c, err := t.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return t.conns.add(c), nil
}

// Close stops the listener and closes every open connection.
func (t *tcpLayer) Close() error {
	err := t.Listener.Close()
	t.conns.closeAll()
	return err
}

// Addr returns the advertised address.
func (t *tcpLayer) Addr() net.Addr { return t.advertise }

// Dial implements raft.StreamLayer.
func (t *tcpLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	c, err := t.dial(addr, timeout)
	if err != nil {
		return nil, err
	}
	return t.conns.add(c), nil
}

func (t *tcpLayer) dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	if t.tls == nil {
		return d.Dial("tcp", string(addr))
	}
	cfg := t.tls.Clone()
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(string(addr))
		if err != nil {
			return nil, err
		}
		cfg.ServerName = host
	}
	return tls.DialWithDialer(d, "tcp", string(addr), cfg)
}
